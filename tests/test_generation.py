"""generate() against transformers' generate, plus its own contracts."""

from __future__ import annotations

import pytest
import torch

from mistral_lm import GenerationConfig, MistralForCausalLM
from mistral_lm.errors import GenerationError

from .conftest import INDUCTOR, tiny_config

transformers = pytest.importorskip("transformers")


def _pair(tmp_path, **overrides):
    ours = MistralForCausalLM(tiny_config(**overrides)).eval()
    ours.save_pretrained(tmp_path)
    ref = transformers.MistralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    return ours, ref


def _left_padded(rows: list[int], vocab: int = 128, pad: int = 0):
    width = max(rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(rows):
        ids[i, width - n:] = torch.randint(3, vocab, (n,))
        mask[i, width - n:] = 1
    return ids, mask


@pytest.mark.parametrize("window", [None, 6, 16])
@pytest.mark.parametrize("rows", [[10], [12, 5, 9]])
def test_greedy_ids_equal_transformers(window, rows, tmp_path):
    ours, ref = _pair(tmp_path, sliding_window=window)
    ids, mask = _left_padded(rows)
    a = ours.generate(ids, attention_mask=mask, max_new_tokens=40, eos_token_id=None, pad_token_id=0)
    b = ref.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, eos_token_id=None,
                     pad_token_id=0)
    assert torch.equal(a, b)


def test_prompt_longer_than_window_is_prefilled_in_chunks(tmp_path):
    ours, ref = _pair(tmp_path, sliding_window=5)
    ids, mask = _left_padded([23, 17])
    a = ours.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=None, pad_token_id=0)
    b = ref.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=None,
                     pad_token_id=0)
    assert torch.equal(a, b)


def test_use_cache_false_gives_the_same_tokens():
    model = MistralForCausalLM(tiny_config(sliding_window=6)).eval()
    ids, mask = _left_padded([11, 6])
    a = model.generate(ids, attention_mask=mask, max_new_tokens=15, eos_token_id=None)
    b = model.generate(ids, attention_mask=mask, max_new_tokens=15, eos_token_id=None, use_cache=False)
    assert torch.equal(a, b)


def test_finished_rows_emit_pad_and_generation_stops_when_all_finish():
    model = MistralForCausalLM(tiny_config(sliding_window=6)).eval()
    ids, mask = _left_padded([8, 8])
    free = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)
    eos = int(free[0, 8 + 2])  # row 0's third new token becomes "EOS"
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=127)
    first = (out[0, 8:] == eos).nonzero()[0, 0]
    assert torch.all(out[0, 8 + first + 1:] == 127)
    for row in range(2):  # before its EOS, each row equals the unconstrained run
        hit = (out[row, 8:] == eos).nonzero()
        stop = int(hit[0, 0]) + 1 if len(hit) else out.shape[1] - 8
        assert torch.equal(out[row, 8:8 + stop], free[row, 8:8 + stop])


def test_min_new_tokens_holds_back_eos():
    model = MistralForCausalLM(tiny_config(sliding_window=6)).eval()
    ids = torch.randint(3, 128, (1, 6))
    free = model.generate(ids, max_new_tokens=5, eos_token_id=None)
    eos = int(free[0, 6])  # the first greedy token
    out = model.generate(ids, max_new_tokens=5, eos_token_id=eos, min_new_tokens=3)
    assert eos not in out[0, 6:9].tolist()


def test_sampling_reproducible_and_num_return_sequences():
    model = MistralForCausalLM(tiny_config(sliding_window=6)).eval()
    ids = torch.randint(3, 128, (2, 5))
    kwargs = dict(max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, eos_token_id=None)
    a = model.generate(ids, seed=123, num_return_sequences=3, **kwargs)
    b = model.generate(ids, generator=torch.Generator().manual_seed(123), num_return_sequences=3, **kwargs)
    assert a.shape == (6, 15) and torch.equal(a, b)
    assert torch.equal(a[0, :5], a[2, :5]) and torch.equal(a[3, :5], ids[1])


def test_the_inverse_cdf_sampler_is_seeded_and_checked():
    """generate(sampler="inverse_cdf") (the CLI's) draws with the seed's generator; the default
    stays torch's multinomial, which a seeded run shares with Transformers."""
    model = MistralForCausalLM(tiny_config()).eval()
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=0, eos_token_id=None)
    a = model.generate(ids, seed=5, sampler="inverse_cdf", **kwargs)
    assert torch.equal(a, model.generate(ids, seed=5, sampler="inverse_cdf", **kwargs))
    assert not torch.equal(a, model.generate(ids, seed=5, **kwargs))  # another stream of draws
    assert not torch.equal(a, model.generate(ids, seed=6, sampler="inverse_cdf", **kwargs))
    with pytest.raises(GenerationError, match="sampler"):
        model.generate(ids, sampler="gumbel", **kwargs)


def test_generation_config_object_and_batch_encoding_mapping():
    model = MistralForCausalLM(tiny_config(sliding_window=6)).eval()
    ids, mask = _left_padded([7, 4])
    gen = GenerationConfig(max_new_tokens=6, eos_token_id=None)
    a = model.generate({"input_ids": ids, "attention_mask": mask}, gen)
    b = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(num_return_sequences=2), "num_return_sequences"),
        (dict(eos_token_id=10_000), "vocab_size"),
        (dict(max_length=3), "max_length"),
    ],
)
def test_invalid_arguments_fail_before_compute(kwargs, field, monkeypatch):
    model = MistralForCausalLM(tiny_config(sliding_window=6)).eval()
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("forward ran before validation"))
    with pytest.raises(GenerationError, match=field):
        model.generate(torch.randint(3, 128, (1, 5)), **kwargs)


def test_out_of_vocab_prompt_and_unknown_keyword():
    model = MistralForCausalLM(tiny_config(sliding_window=6)).eval()
    with pytest.raises(GenerationError, match="vocab_size"):
        model.generate(torch.tensor([[1, 500]]), max_new_tokens=2)
    with pytest.raises(TypeError, match="top_q"):
        model.generate(torch.tensor([[1, 2]]), top_q=0.5)


@INDUCTOR
@pytest.mark.parametrize("window", [None, 6])
def test_compiled_decode_generates_what_eager_does(window):
    """generate(compile=True) runs single-token steps through torch.compile; the tokens must be
    those of the eager model, for a static cache and for a rolling one (prompt longer than W)."""
    config = tiny_config(sliding_window=window)
    eager = MistralForCausalLM(config).eval()
    compiled = MistralForCausalLM(config).eval()
    compiled.load_state_dict(eager.state_dict())
    ids = torch.randint(3, config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    from torch._dynamo.utils import counters

    with torch.inference_mode():
        want = eager.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        counters.clear()
        got = compiled.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, compile=True)
        again = compiled.generate(ids[:1, :5], max_new_tokens=4, do_sample=False, compile=True)
    assert counters["stats"]["calls_captured"] > 0  # the decode steps ran through torch.compile
    assert torch.equal(got, want)
    assert torch.equal(again, eager.generate(ids[:1, :5], max_new_tokens=4, do_sample=False))


def test_compile_flag_is_validated():
    model = MistralForCausalLM(tiny_config()).eval()
    with pytest.raises(GenerationError, match="compile"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, compile="yes")


def test_no_repeat_ngram_greedy_and_min_p_validation_match_transformers(tmp_path):
    ours, ref = _pair(tmp_path, sliding_window=6)
    ids, mask = _left_padded([12, 7])
    a = ours.generate(ids, attention_mask=mask, max_new_tokens=30, eos_token_id=None, pad_token_id=0,
                      no_repeat_ngram_size=2)
    b = ref.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=None,
                     pad_token_id=0, no_repeat_ngram_size=2)
    assert torch.equal(a, b)
    for row in a.tolist():
        answer = row[ids.shape[1]:]  # the new tokens: each avoided every bigram before it
        grams = [tuple(answer[i:i + 2]) for i in range(len(answer) - 1)]
        assert len(grams) == len(set(grams))
    for bad in ({"min_p": 1.5}, {"min_p": -0.1}, {"no_repeat_ngram_size": -1}):
        with pytest.raises(GenerationError, match=next(iter(bad))):
            ours.generate(ids, attention_mask=mask, max_new_tokens=2, **bad)

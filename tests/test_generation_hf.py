"""generate()'s Transformers surface against transformers' own generate on the same weights:
beam search, return_dict_in_generate with scores / logits, stop_strings; the errors for what
is refused."""

from __future__ import annotations

import shutil

import pytest
import torch

from mistral_lm import MistralForCausalLM
from mistral_lm.errors import GenerationError

from .conftest import tiny_config
from .test_generation import _left_padded

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two threads
    per matmul cost ~10x (measured: 31 ms vs 3 ms for a 64 x 32000 head)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=[None, 5], ids=["full", "window5"])
def pair(request, tmp_path_factory):
    """Our model and transformers' on the same tiny random weights (window 5: shorter than every
    sequence below, so the rolling cache wraps while beams are reordered)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pair")
    ours = MistralForCausalLM(tiny_config(sliding_window=request.param)).eval()
    ours.save_pretrained(path)
    return ours, transformers.MistralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def vocab_pair(tmp_path_factory, tokenizer_model_v1):
    """A tiny model over Mistral-7B-v0.1's 32000-token vocabulary, with that tokenizer read by
    us and by transformers from the same file."""
    from mistral_lm import AutoTokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vocab")
    ours = MistralForCausalLM(tiny_config(vocab_size=32000, sliding_window=6)).eval()
    ours.save_pretrained(path)
    shutil.copy(tokenizer_model_v1, path / "tokenizer.model")
    ref = transformers.MistralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok, hf_tok = AutoTokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
    for t in (tok, hf_tok):  # pad with <unk> (id 0) on the left
        t.pad_token, t.padding_side = "<unk>", "left"
    return ours, ref, tok, hf_tok


def _both(pair, ids, mask, **kw):
    ours, ref = pair
    kw = {"eos_token_id": None, "pad_token_id": 0, "max_new_tokens": 16, **kw}
    return (ours.generate(ids, attention_mask=mask, **kw),
            ref.generate(ids, attention_mask=mask, do_sample=False, **kw))


def _assert_scores_close(ours, theirs):
    """Per-step scores: the same -inf mask, finite entries within 1e-5."""
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite)
        torch.testing.assert_close(a[finite], b[finite], rtol=0, atol=1e-5)


BEAMS = {
    "k2": dict(num_beams=2),
    "k4_one_prompt": dict(num_beams=4, rows=[9]),
    "k4_eos_list_3_returned": dict(num_beams=4, eos_token_id=[5, 7], num_return_sequences=3),
    "k3_early_lp_half": dict(num_beams=3, early_stopping=True, eos_token_id=9, length_penalty=0.5),
    "k3_never_lp2": dict(num_beams=3, early_stopping="never", eos_token_id=9, length_penalty=2.0),
    "k2_penalty_min_new": dict(num_beams=2, repetition_penalty=1.3, min_new_tokens=3, eos_token_id=9),
}


@pytest.mark.parametrize("settings", BEAMS.values(), ids=BEAMS.keys())
def test_beam_search_ids_equal_transformers(pair, settings):
    settings = dict(settings)
    ids, mask = _left_padded(settings.pop("rows", [12, 6]))  # a left-padded batch of 2 unless said
    ours, theirs = _both(pair, ids, mask, **settings)
    assert torch.equal(ours, theirs)


def test_beam_search_reaches_eos_and_pads_like_transformers(pair):
    """A hypothesis that ends early is padded after its eos to the longest returned one."""
    ids, mask = _left_padded([12, 6])
    ours, ref = pair
    probe = ours.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=4, eos_token_id=None)
    eos = probe[:, ids.shape[1] + 1: ids.shape[1] + 4].flatten().unique().tolist()  # tokens the beams emit early
    ours_out, theirs = _both(pair, ids, mask, num_beams=4, num_return_sequences=4, eos_token_id=eos,
                             pad_token_id=1, max_new_tokens=12)
    assert torch.equal(ours_out, theirs)
    assert torch.isin(ours_out[:, ids.shape[1]:], torch.tensor(eos)).any()


def test_beam_search_dict_scores_logits_and_indices_match(pair):
    ids, mask = _left_padded([12, 6])
    kw = dict(num_beams=3, num_return_sequences=2, eos_token_id=9, repetition_penalty=1.2,
              return_dict_in_generate=True, output_scores=True, output_logits=True)
    ours, theirs = _both(pair, ids, mask, **kw)
    assert type(ours).__name__ == "GenerateBeamDecoderOnlyOutput"
    assert torch.equal(ours.sequences, theirs.sequences) and torch.equal(ours["sequences"], ours.sequences)
    assert ours.beam_indices.tolist() == theirs.beam_indices.tolist()
    torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores, rtol=0, atol=1e-5)
    _assert_scores_close(ours.scores, theirs.scores)
    _assert_scores_close(ours.logits, theirs.logits)
    assert ours.scores[0].shape == (2 * 3, 128)  # per step: (prompts * beams, V)
    plain, _ = _both(pair, ids, mask, **{**kw, "output_scores": False, "output_logits": False})
    assert plain.scores is None and plain.sequences_scores is None and torch.equal(plain.sequences, ours.sequences)


def test_greedy_dict_scores_and_logits_match(pair):
    ids, mask = _left_padded([12, 6])
    kw = dict(eos_token_id=9, repetition_penalty=1.3, no_repeat_ngram_size=3, min_new_tokens=2,
              return_dict_in_generate=True, output_scores=True, output_logits=True)
    ours, theirs = _both(pair, ids, mask, **kw)
    assert type(ours).__name__ == "GenerateDecoderOnlyOutput"
    assert torch.equal(ours.sequences, theirs.sequences)
    _assert_scores_close(ours.scores, theirs.scores)
    _assert_scores_close(ours.logits, theirs.logits)
    assert ours.keys() == ["sequences", "scores", "logits"] and ours[0] is ours.sequences
    only_logits, _ = _both(pair, ids, mask, **{**kw, "output_scores": False})
    assert only_logits.scores is None and len(only_logits.logits) == len(ours.logits)


def test_sampling_warper_scores_match(pair):
    """Temperature, top-k and top-p leave -inf masks: the same mask and finite values. The
    draws use the global generator on equal probabilities, so the tokens agree too."""
    ours, ref = pair
    ids, mask = _left_padded([12, 6])
    kw = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, max_new_tokens=10, eos_token_id=None,
              pad_token_id=0, return_dict_in_generate=True, output_scores=True, output_logits=True)
    torch.manual_seed(3)
    a = ours.generate(ids, attention_mask=mask, **kw)
    torch.manual_seed(3)
    b = ref.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(a.sequences, b.sequences)
    _assert_scores_close(a.scores, b.scores)
    _assert_scores_close(a.logits, b.logits)
    assert all(torch.isinf(s).any() for s in a.scores)


def _pieces(tokenizer, ids):
    return [tokenizer.token_table.raw[i].decode("utf-8", "replace") for i in ids]


def test_stop_strings_equal_transformers(vocab_pair):
    ours, ref, tok, hf_tok = vocab_pair
    batch = tok(["The harbour town wakes", "A cat"], return_tensors="pt", padding=True)  # left-padded
    enc = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    kw = dict(max_new_tokens=24, eos_token_id=None, pad_token_id=0)
    free = ours.generate(**enc, **kw)
    new = free[0, enc["input_ids"].shape[1]:].tolist()
    pieces = _pieces(tok, new)
    i = next(i for i in range(4, len(new) - 1) if len(pieces[i].strip()) >= 2 and len(pieces[i + 1]) >= 3)
    spanning = pieces[i][-2:] + pieces[i + 1][:2]  # ends inside token i + 1, starts inside token i
    inside = pieces[i + 1][:2]  # the token runs past the string's end
    outputs = []
    for stops, extra in (([spanning], {}), ([spanning], dict(eos_token_id=2)), ([spanning], dict(num_beams=2)),
                         ([inside, "zzzz"], dict(num_beams=2, eos_token_id=2))):
        a = ours.generate(**enc, **{**kw, **extra}, stop_strings=stops, tokenizer=tok)
        b = ref.generate(**enc, **{**kw, **extra}, do_sample=False, stop_strings=stops, tokenizer=hf_tok)
        assert torch.equal(a, b), (stops, extra)
        outputs.append(a)
    end = enc["input_ids"].shape[1] + i + 2  # row 0 stops at token i + 1, which completes the string
    assert torch.equal(outputs[1][0, :end], free[0, :end]) and (outputs[1][0, end:] == 0).all()  # then pad
    assert spanning in "".join(_pieces(tok, outputs[1][0, end - 2:end].tolist()))  # the stop string stays


def test_stop_strings_with_a_transformers_tokenizer(vocab_pair):
    """Our generate also takes transformers' tokenizer (its pieces found by decoding)."""
    ours, _, tok, hf_tok = vocab_pair
    enc = dict(input_ids=tok(["The harbour town wakes"], return_tensors="pt")["input_ids"])
    kw = dict(max_new_tokens=20, eos_token_id=None, stop_strings=["ing", "ed"])
    assert torch.equal(ours.generate(**enc, **kw, tokenizer=tok), ours.generate(**enc, **kw, tokenizer=hf_tok))


def test_text_generation_pipeline_passes_num_beams(vocab_pair):
    ours, ref, _, hf_tok = vocab_pair
    texts = []
    for model in (ours, ref):
        pipe = transformers.pipeline("text-generation", model=model, tokenizer=hf_tok)
        texts.append(pipe("The harbour town wakes", max_new_tokens=8, do_sample=False, num_beams=2)[0]
                     ["generated_text"])
    assert texts[0] == texts[1]


def test_refused_and_invalid_options():
    model = MistralForCausalLM(tiny_config()).eval()
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="you must pass the model's tokenizer to the `tokenizer` argument"):
        model.generate(ids, max_new_tokens=2, stop_strings=["x"])
    for bad, name in ((dict(num_beams=2, do_sample=True), "beam sampling"),
                      (dict(num_beams=2, num_beam_groups=2), "num_beam_groups"),
                      (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
                      (dict(num_beams=0), "num_beams"), (dict(early_stopping="sometimes"), "early_stopping"),
                      (dict(length_penalty="long"), "length_penalty"), (dict(stop_strings=[""]), "stop_strings"),
                      (dict(output_scores="yes"), "output_scores")):
        with pytest.raises(GenerationError, match=name):
            model.generate(ids, max_new_tokens=2, **bad)
    with pytest.raises(GenerationError, match="beam search"):
        model.generate(ids, max_new_tokens=2, num_beams=2, streamer=object())
    with pytest.raises(TypeError, match="constraints"):
        model.generate(ids, max_new_tokens=2, num_beams=2, constraints=[])


def test_reorder_cache_moves_rows_of_a_rolling_cache():
    """After reorder_cache, decoding gives each row what its source row would have given."""
    model = MistralForCausalLM(tiny_config(sliding_window=4)).eval()
    ids, mask = _left_padded([9, 7])
    cache = model.make_cache(2, max_length=30)
    with torch.inference_mode():
        model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        alone = cache.copy()
        cache.reorder_cache(torch.tensor([1, 1, 0]))
        step = torch.tensor([[5], [5], [6]])
        positions = mask.sum(1)[[1, 1, 0], None]
        out = model(step, position_ids=positions, past_key_values=cache, use_cache=True).logits
        ref = model(torch.tensor([[6], [5]]), position_ids=mask.sum(1)[:, None], past_key_values=alone,
                    use_cache=True).logits
    torch.testing.assert_close(out[[0, 1, 2]], ref[[1, 1, 0]])


def test_flax_generate_refuses_these_options(tmp_path):
    pytest.importorskip("jax")
    import numpy as np

    from mistral_lm.flax.modeling import FlaxMistralForCausalLM

    MistralForCausalLM(tiny_config()).save_pretrained(tmp_path)
    model = FlaxMistralForCausalLM.from_pretrained(tmp_path)
    for option in (dict(num_beams=2), dict(return_dict_in_generate=True, output_scores=True),
                   dict(output_logits=True), dict(stop_strings=["x"])):
        with pytest.raises(TypeError, match=next(iter(option))):
            model.generate(np.array([[1, 2, 3]]), max_new_tokens=2, **option)

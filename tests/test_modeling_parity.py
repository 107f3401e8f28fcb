"""Ours vs transformers' MistralForCausalLM: weights exchanged through save_pretrained both ways."""

from __future__ import annotations

import pytest
import torch

from mistral_lm import MistralConfig, MistralForCausalLM, MistralForSequenceClassification, MistralModel

from .conftest import PARITY_CONFIGS, tiny_config
from .test_mistral_format import RELEASE_SHAPES

transformers = pytest.importorskip("transformers")
TOL = 1e-5


def _batch(vocab: int, pad_rows: bool = True):
    ids = torch.randint(0, vocab, (3, 24))
    mask = torch.ones_like(ids)
    if pad_rows:
        mask[1, :5] = 0  # left padding, as generation uses
        mask[2, :11] = 0
    return ids, mask


def _pair(config, tmp_path, direction: str):
    """(ours, transformers') of one config, the second loaded from the first's save_pretrained."""
    if direction == "ours->hf":
        ours = MistralForCausalLM(config).eval()
        ours.save_pretrained(tmp_path)
        ref = transformers.MistralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    else:
        ref_config = transformers.MistralConfig(**{**config.to_dict(), "dtype": "float32"})
        ref = transformers.MistralForCausalLM(ref_config).eval()
        ref.save_pretrained(tmp_path)
        ours = MistralForCausalLM.from_pretrained(tmp_path).eval()
    return ours, ref


@pytest.mark.parametrize("direction", ["ours->hf", "hf->ours"])
@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_logits_loss_hidden_states_match(name, direction, tmp_path):
    ours, ref = _pair(tiny_config(**PARITY_CONFIGS[name]), tmp_path, direction)
    ids, mask = _batch(ours.config.vocab_size)
    # a label counts only when the token before it is real: a pad position's output is unspecified
    context = torch.nn.functional.pad(mask, (1, 0))[:, :-1]
    labels = ids.masked_fill((mask == 0) | (context == 0), -100)
    real = mask.bool()
    for impl in ("eager", "sdpa"):
        ours.attn_implementation = impl
        ref.config._attn_implementation = impl
        with torch.no_grad():
            a = ours(ids, attention_mask=mask, labels=labels, output_hidden_states=True, use_cache=False)
            b = ref(ids, attention_mask=mask, labels=labels, output_hidden_states=True)
        assert (a.logits - b.logits)[real].abs().max() <= TOL
        assert (a.loss - b.loss).abs() <= TOL
        assert len(a.hidden_states) == len(b.hidden_states) == ours.config.num_hidden_layers + 1
        for x, y in zip(a.hidden_states, b.hidden_states):
            assert (x - y)[real].abs().max() <= TOL


@pytest.mark.parametrize("name", ["window", "gqa"])
def test_attentions_match_with_eager(name, tmp_path):
    ours, ref = _pair(tiny_config(**PARITY_CONFIGS[name]), tmp_path, "ours->hf")
    ref.config._attn_implementation = "eager"
    ids, _ = _batch(ours.config.vocab_size, pad_rows=False)
    with torch.no_grad():
        a = ours(ids, output_attentions=True, use_cache=False)
        b = ref(ids, output_attentions=True)
    for x, y in zip(a.attentions, b.attentions):
        assert (x - y).abs().max() <= TOL


def test_no_padding_loss_matches_unmasked_labels(tmp_path):
    ours, ref = _pair(tiny_config(**PARITY_CONFIGS["window"]), tmp_path, "ours->hf")
    ids, _ = _batch(ours.config.vocab_size, pad_rows=False)
    with torch.no_grad():
        assert (ours(ids, labels=ids).loss - ref(ids, labels=ids).loss).abs() <= TOL


def test_base_model_matches(tmp_path):
    config = tiny_config(sliding_window=6)
    ours = MistralModel(config).eval()
    ours.save_pretrained(tmp_path)
    ref = transformers.MistralModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids, mask = _batch(config.vocab_size)
    with torch.no_grad():
        diff = ours(ids, attention_mask=mask).last_hidden_state - ref(ids, attention_mask=mask).last_hidden_state
    assert diff[mask.bool()].abs().max() <= TOL


@pytest.mark.parametrize(
    "num_labels, labels, problem",
    [
        (1, torch.randn(3), "regression"),
        (3, torch.tensor([0, 2, 1]), "single_label_classification"),
        (3, torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 0]]), "multi_label_classification"),
    ],
)
def test_sequence_classification_matches(num_labels, labels, problem, tmp_path):
    config = tiny_config(num_labels=num_labels, pad_token_id=0, sliding_window=6)
    ours = MistralForSequenceClassification(config).eval()
    ours.save_pretrained(tmp_path)
    ref = transformers.MistralForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids, mask = _batch(config.vocab_size)
    ids = ids.clamp(min=1).masked_fill(mask == 0, 0)  # pad id 0 exactly where padded
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, labels=labels)
        b = ref(ids, attention_mask=mask, labels=labels)
    assert ours.config.problem_type == ref.config.problem_type == problem
    assert (a.logits - b.logits).abs().max() <= TOL
    assert (a.loss - b.loss).abs() <= TOL


def test_round_trip_ours_hf_ours(tmp_path):
    """ours -> save -> transformers -> save -> ours gives back the same logits."""
    config = tiny_config(sliding_window=4, tie_word_embeddings=True)
    first = MistralForCausalLM(config).eval()
    first.save_pretrained(tmp_path / "a")
    ref = transformers.MistralForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32)
    ref.save_pretrained(tmp_path / "b")
    back = MistralForCausalLM.from_pretrained(tmp_path / "b")
    ids, mask = _batch(config.vocab_size)
    with torch.no_grad():
        assert torch.equal(first(ids, attention_mask=mask).logits, back(ids, attention_mask=mask).logits)
    assert back.lm_head.weight is back.model.embed_tokens.weight


def test_llama_checkpoint_runs_without_window(tmp_path):
    ref_config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, dtype="float32",
    )
    ref = transformers.LlamaForCausalLM(ref_config).eval()
    ref.save_pretrained(tmp_path)
    from mistral_lm import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert ours.config.model_type == "llama" and ours.config.sliding_window is None
    ids, mask = _batch(128)
    with torch.no_grad():
        diff = ours(ids, attention_mask=mask).logits - ref(ids, attention_mask=mask).logits
    assert diff[mask.bool()].abs().max() <= TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_close_to_float32(dtype, tmp_path):
    config = tiny_config(sliding_window=6)
    full = MistralForCausalLM(config).eval()
    full.save_pretrained(tmp_path)
    half = MistralForCausalLM.from_pretrained(tmp_path, torch_dtype=dtype)
    assert half.dtype == dtype
    ids, mask = _batch(config.vocab_size)
    with torch.no_grad():
        a = full(ids, attention_mask=mask).logits
        b = half(ids, attention_mask=mask).logits
    assert b.dtype == dtype and torch.isfinite(b).all()
    assert (a - b.float())[mask.bool()].abs().max() < 0.05


@pytest.mark.parametrize("direction", ["ours->hf", "hf->ours"])
@pytest.mark.parametrize("release", sorted(RELEASE_SHAPES))
def test_released_shapes_match(release, direction, tmp_path):
    """v0.1 / v0.2 / v0.3 / Nemo / Small, scaled down (tests/test_mistral_format.py's RELEASE_SHAPES):
    window or none, rope_theta up to 1e8, head_dim != hidden/heads, vocab growth."""
    ours, ref = _pair(tiny_config(**RELEASE_SHAPES[release]), tmp_path, direction)
    ids, mask = _batch(ours.config.vocab_size)
    real = mask.bool()
    with torch.no_grad():
        err = (ours(ids, attention_mask=mask, use_cache=False).logits - ref(ids, attention_mask=mask).logits)[real]
    assert err.abs().max() <= TOL, f"{release}: max |logit error| {err.abs().max():.3g}"

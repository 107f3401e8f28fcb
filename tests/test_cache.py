"""Rolling-cache invariants: incremental == full recompute with the window mask, chunked == unchunked."""

from __future__ import annotations

import pytest
import torch

from mistral_lm import MistralForCausalLM
from mistral_lm.cache import KVCache

from .conftest import tiny_config


def _model(**overrides) -> MistralForCausalLM:
    return MistralForCausalLM(tiny_config(**overrides)).eval()


@torch.no_grad()
def test_rolling_decode_matches_full_forward_every_step():
    """W=8, 110 tokens decoded one by one: every step within 1e-4 of a no-cache forward."""
    model = _model(sliding_window=8)
    ids = torch.randint(0, 128, (2, 110))
    full = model(ids, use_cache=False).logits
    cache = model.model.make_cache(2)
    assert cache.rolling and cache.size == 8
    worst = 0.0
    for t in range(ids.shape[1]):
        step = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, 0]
        worst = max(worst, (step - full[:, t]).abs().max().item())
    assert worst <= 1e-4


@torch.no_grad()
def test_cache_bytes_constant_after_window():
    model = _model(sliding_window=8)
    cache = model.model.make_cache(1)
    sizes = []
    for t in range(40):
        model(torch.tensor([[t % 128]]), past_key_values=cache, use_cache=True)
        sizes.append(cache.nbytes())
    assert len(set(sizes)) == 1
    per_layer = 2 * 1 * 2 * 8 * 16 * 4  # k and v: (B=1, H_kv=2, W=8, D=16) float32
    assert sizes[0] >= model.config.num_hidden_layers * per_layer


@pytest.mark.parametrize("chunk", [1, 3, 8, 13, 40])
@torch.no_grad()
def test_chunked_prefill_equals_unchunked(chunk):
    model = _model(sliding_window=8)
    ids = torch.randint(0, 128, (2, 37))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    full = model(ids, attention_mask=mask, use_cache=False).logits
    cache = model.model.make_cache(2)
    outs = []
    for start in range(0, ids.shape[1], chunk):
        end = min(start + chunk, ids.shape[1])
        outs.append(model(ids[:, start:end], attention_mask=mask[:, :end], past_key_values=cache).logits)
    got = torch.cat(outs, dim=1)
    assert (got - full)[mask.bool()].abs().max() <= 1e-4


@torch.no_grad()
def test_multi_token_step_does_not_overwrite_keys_still_needed():
    """A chunk on a full ring buffer must attend before it stores (W=4: chunk 4-5 over slots of 0-1)."""
    model = _model(sliding_window=4)
    ids = torch.randint(0, 128, (1, 6))
    full = model(ids, use_cache=False).logits
    cache = model.model.make_cache(1)
    model(ids[:, :4], past_key_values=cache)
    got = model(ids[:, 4:], past_key_values=cache).logits
    assert (got - full[:, 4:]).abs().max() <= 1e-5


@torch.no_grad()
def test_static_cache_grows_for_manual_loops_without_window():
    model = _model(sliding_window=None)
    ids = torch.randint(0, 128, (1, 300))
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :10])  # use_cache defaults to True at inference: a cache comes back
    cache = out.past_key_values
    assert isinstance(cache, KVCache) and not cache.rolling
    for t in range(10, 300):
        step = model(ids[:, t : t + 1], past_key_values=cache).logits
        assert (step[:, 0] - full[:, t]).abs().max() <= 1e-4
    assert cache.get_seq_length() == 300 and cache.size >= 300


@torch.no_grad()
def test_manual_loop_with_growing_attention_mask_matches_batch_rows_alone():
    """The seed's manual loop: past_key_values from forward, attention_mask growing by one each step."""
    model = _model(sliding_window=6)
    prompts = [torch.randint(0, 128, (n,)) for n in (9, 4)]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, -len(p):] = p
        mask[row, -len(p):] = 1
    out = model(ids, attention_mask=mask)
    cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
    tokens = [nxt]
    for _ in range(12):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        out = model(nxt[:, None], attention_mask=mask, past_key_values=cache)
        nxt = out.logits[:, -1].argmax(-1)
        tokens.append(nxt)
    batched = torch.stack(tokens, dim=1)
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=13, eos_token_id=None)[0, len(p):]
        assert torch.equal(alone, batched[row])


def test_foreign_cache_object_is_rejected():
    model = _model(sliding_window=6)
    with pytest.raises(ValueError, match="past_key_values"):
        model(torch.tensor([[1, 2]]), past_key_values=((torch.zeros(1), torch.zeros(1)),))


def test_cache_batch_mismatch_is_a_clear_error():
    model = _model(sliding_window=6)
    cache = model.model.make_cache(2)
    with pytest.raises(ValueError, match="batch size 2"):
        model(torch.tensor([[1, 2]]), past_key_values=cache)

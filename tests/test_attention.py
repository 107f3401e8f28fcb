"""Kernel dispatch: flash-attn receives the sliding window itself, never a reconstructed mask."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from mistral_lm import MistralForCausalLM

from .conftest import tiny_config


def _fake_flash(calls: list):
    """flash_attn_func's contract in plain torch: (B, T, H, D) tensors, causal with a
    (left, right) window where -1 means unbounded; GQA by head repetition."""

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1)):
        calls.append((causal, tuple(window_size)))
        t, s = q.shape[1], k.shape[1]
        i, j = torch.arange(t)[:, None], torch.arange(s)[None, :]
        allowed = torch.ones(t, s, dtype=torch.bool)
        if causal:
            allowed &= j <= i
        if window_size[0] >= 0:
            allowed &= j >= i - window_size[0]
        rep = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) * softmax_scale
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        return torch.einsum("bhts,bshd->bthd", weights, v)

    return types.SimpleNamespace(flash_attn_func=flash_attn_func)


@pytest.mark.parametrize("window,length", [(4, 10), (None, 10), (16, 10)])
@torch.no_grad()
def test_flash_attention_prefill_gets_the_window(monkeypatch, window, length):
    calls: list = []
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash(calls))
    model = MistralForCausalLM(tiny_config(sliding_window=window)).eval()
    ids = torch.randint(0, 128, (2, length))
    want = model(ids, use_cache=False).logits  # sdpa with our mask
    model.attn_implementation = "flash_attention_2"
    got = model(ids, use_cache=False).logits
    band = (window - 1, 0) if window is not None and window < length else (-1, -1)
    assert calls == [(True, band)] * model.config.num_hidden_layers
    assert (got - want).abs().max() <= 1e-5


@torch.no_grad()
def test_flash_attention_leaves_padded_and_cached_steps_to_sdpa(monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash(calls))
    model = MistralForCausalLM(tiny_config(sliding_window=4)).eval()
    model.attn_implementation = "flash_attention_2"
    ids = torch.randint(0, 128, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    out = model(ids, attention_mask=mask)  # padding: the mask is needed
    model(ids[:, :1], past_key_values=out.past_key_values)  # a cached decode step
    assert calls == []


def test_attn_implementation_reaches_the_decoder(tmp_path):
    """Regression: from_pretrained set the choice on the head model only, and the decoder inside
    kept running SDPA whatever was asked for."""
    MistralForCausalLM(tiny_config()).save_pretrained(tmp_path)
    model = MistralForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert model.model.attn_implementation == "eager"
    model.attn_implementation = "sdpa"
    assert model.model.attn_implementation == "sdpa"

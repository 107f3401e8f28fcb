"""native/attention: the C attention and RMSNorm == their torch definitions within float32 rounding,
bit-identical across ISAs, and batch-invariant: a query's output does not depend on the other
queries of the call, on extra masked cache slots or on the thread count. Model level: one forward
over T tokens == prefill + one-token decode steps, bit for bit (the server's logprobs guarantee)."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mistral_lm import MistralForCausalLM
from mistral_lm.attention import ATTENTION_FUNCTIONS, check_implementation, eager_attention
from mistral_lm.masks import attention_mask
from mistral_lm.native import attention as na

from .conftest import capped_isa, isa_levels, tiny_config, torch_threads

needs_lib = pytest.mark.skipif(not na.available(), reason="attention C library not built here")


def caps() -> list[int]:
    return isa_levels(na._lib())


def isa(cap: int):
    return capped_isa(na._lib(), cap)


threads = torch_threads


def qkv(b: int, h: int, h_kv: int, nq: int, nk: int, d: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(h * 100 + nk)
    return tuple(torch.randn(b, n, t, d, generator=g) * 2 for n, t in ((h, nq), (h_kv, nk), (h_kv, nk)))


def masks(b: int, nq: int, nk: int) -> dict[str, torch.Tensor]:
    """Padding, window and empty cache slots, built by masks.py as the model builds them."""
    q_pos = torch.arange(nk - nq, nk).expand(b, nq)
    k_pos = torch.arange(nk).expand(b, nk)
    valid = torch.ones(b, nk, dtype=torch.bool)
    padded = valid.clone()
    padded[0, :3] = False  # row 0 left-padded
    empty = valid.clone()
    empty[:, nk - 4:] = False  # trailing empty cache slots (their queries see nothing after them)
    return {"causal": attention_mask(q_pos, k_pos, valid, None), "padding": attention_mask(q_pos, k_pos, padded, None),
            "window": attention_mask(q_pos, k_pos, valid, 5), "empty_slots": attention_mask(q_pos, k_pos, empty, 6),
            "random": torch.rand(b, 1, nq, nk, generator=torch.Generator().manual_seed(1)) > 0.5}


SHAPES = {"gqa4": (8, 2, 64), "mha": (4, 4, 24), "mqa_d8": (3, 1, 8), "d128": (2, 1, 128)}


@needs_lib
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_eager_and_sdpa_on_every_isa(shape):
    h, h_kv, d = SHAPES[shape]
    q, k, v = qkv(2, h, h_kv, 6, 13, d)
    cases = {name: (q, k, v, m) for name, m in masks(2, 6, 13).items()}
    cases["mask_none"] = (q, k[:, :, :6], v[:, :, :6], None)
    results = {}
    for cap in caps():
        with isa(cap):
            for name, (q_, k_, v_, m) in cases.items():
                out = na.attention(q_, k_, v_, m, d**-0.5)
                results.setdefault(name, []).append(out)
                ref = na.reference_attention(q_, k_, v_, m, d**-0.5)
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=f"{name} cap {cap}")
                if m is None or m.any(-1).all():  # eager gives the mean of v to a query that sees nothing
                    torch.testing.assert_close(out, eager_attention(q_, k_, v_, m, d**-0.5)[0], rtol=1e-5, atol=1e-5)
    for name, outs in results.items():  # AVX-512, AVX2 and scalar perform the same operations
        assert all(torch.equal(outs[0], o) for o in outs[1:]), name


@needs_lib
def test_query_without_keys_gets_zeros_like_sdpa():
    q, k, v = qkv(1, 2, 1, 3, 5, 16)
    mask = torch.ones(1, 1, 3, 5, dtype=torch.bool)
    mask[..., 1, :] = False
    out = na.attention(q, k, v, mask, 0.25)
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    torch.testing.assert_close(out, na.reference_attention(q, k, v, mask, 0.25))


@needs_lib
@pytest.mark.parametrize("shape", ["gqa4", "mha"])
def test_batch_invariance(shape):
    """Query i of a Q-query call == a 1-query call with the same allowed keys, also over a cache
    buffer with extra masked slots appended, with strided inputs."""
    h, h_kv, d = SHAPES[shape]
    nq = nk = 20
    q, k, v = qkv(2, h, h_kv, nq, nk, d)
    mask = masks(2, nq, nk)["padding"]
    for cap in caps():
        with isa(cap):
            full = na.attention(q, k, v, None, 0.125)
            full_masked = na.attention(q, k, v, mask, 0.125)
            # a bigger cache buffer: 12 empty slots after the keys, in a (B, K, H_kv, D) layout
            big_k = torch.zeros(2, nk + 12, h_kv, d)
            big_v = torch.zeros(2, nk + 12, h_kv, d)
            big_k[:, :nk], big_v[:, :nk] = k.transpose(1, 2), v.transpose(1, 2)
            big_k, big_v = big_k.transpose(1, 2), big_v.transpose(1, 2)  # strided views, no copies
            for i in (0, 7, nq - 1):
                step = torch.zeros(2, 1, 1, nk + 12, dtype=torch.bool)
                step[..., : i + 1] = True
                one = na.attention(q[:, :, i:i + 1], big_k, big_v, step, 0.125)
                assert torch.equal(one[:, 0], full[:, i]), (cap, i)
                step[..., :nk] = mask[:, :, i:i + 1]  # the same allowed keys as query i of the call
                one = na.attention(q[:, :, i:i + 1], big_k, big_v, step, 0.125)
                assert torch.equal(one[:, 0], full_masked[:, i]), (cap, i)
            # one batch row alone == that row of the batch
            assert torch.equal(na.attention(q[1:], k[1:], v[1:], mask[1:], 0.125), full_masked[1:])


@needs_lib
def test_thread_count_does_not_change_a_bit():
    q, k, v = qkv(2, 8, 2, 96, 96, 64)  # big enough to run in parallel (attention.c's threshold)
    mask = masks(2, 96, 96)["padding"]
    for cap in caps():
        with isa(cap):
            with threads(2):
                two = na.attention(q, k, v, None, 0.125), na.attention(q, k, v, mask, 0.125)
            with threads(1):
                one = na.attention(q, k, v, None, 0.125), na.attention(q, k, v, mask, 0.125)
            assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@needs_lib
def test_rmsnorm_matches_and_is_row_invariant():
    x = torch.randn(40, 576) * 3
    w = torch.randn(576)
    outs = []
    for cap in caps():
        with isa(cap):
            out = na.rmsnorm(x, w, 1e-5)
            torch.testing.assert_close(out, na.reference_rmsnorm(x, w, 1e-5), rtol=1e-6, atol=1e-6)
            rows = torch.cat([na.rmsnorm(x[i:i + 1], w, 1e-5) for i in range(40)])
            with threads(1):
                assert torch.equal(na.rmsnorm(x, w, 1e-5), out)
            assert torch.equal(rows, out)
            outs.append(out)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    odd = torch.randn(3, 5, 37)  # a tail in every path
    torch.testing.assert_close(na.rmsnorm(odd, w[:37], 1e-6), na.reference_rmsnorm(odd, w[:37], 1e-6))


@needs_lib
def test_silu_mul_matches_torch_and_is_the_same_everywhere():
    """The MLP's silu(g) * u: within float32 rounding of torch's on every ISA (a few ulp: one exp
    polynomial and three roundings), bit-identical across ISAs, rows and threads; saturated
    arguments (|g| > 88, where exp over- or underflows) give torch's limits."""
    g, u = torch.randn(33, 197) * 6, torch.randn(33, 197)  # 197: a tail in every path
    g[0, :6] = torch.tensor([-200.0, -88.5, 89.0, 0.0, 200.0, -1e-30])
    want = na.reference_silu_mul(g, u)
    outs = []
    for cap in caps():
        with isa(cap):
            out = na.silu_mul(g, u)
            torch.testing.assert_close(out, want, rtol=4e-7, atol=1e-30)
            assert torch.equal(torch.cat([na.silu_mul(g[i:i + 1], u[i:i + 1]) for i in range(33)]), out)
            with threads(1):
                assert torch.equal(na.silu_mul(g, u), out)
            outs.append(out)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    big = torch.randn(4, 70000)  # large enough to be split across threads
    assert torch.equal(na.silu_mul(big, big.flip(1)), torch.cat([na.silu_mul(r[None], r.flip(0)[None]) for r in big]))


def test_native_is_registered_and_the_float32_default():
    assert "native" in ATTENTION_FUNCTIONS
    assert check_implementation("native") == "native"
    assert check_implementation(None, torch.float32) == ("native" if na.available() else "sdpa")
    assert check_implementation(None, torch.bfloat16) == "sdpa"


def test_training_runs_on_sdpa_with_gradients():
    q, k, v = (t.requires_grad_() for t in qkv(1, 4, 2, 5, 5, 16))
    out, _ = ATTENTION_FUNCTIONS["native"](q, k, v, None, 0.25)
    out.sum().backward()
    assert q.grad is not None and k.grad is not None
    model = MistralForCausalLM(tiny_config(sliding_window=None))
    model.attn_implementation = "native"
    ids = torch.randint(0, 128, (2, 9))
    model(ids, labels=ids).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    assert model.model.norm.weight.grad is not None


def incremental_equals_full(model: MistralForCausalLM, ids: torch.Tensor, prefill: int = 8,
                            full_threads: int | None = None) -> float:
    """max |logprob(one forward) - logprob(prefill + one-token decode steps)|."""
    with torch.no_grad(), threads(full_threads or torch.get_num_threads()):
        full = model(ids).logits.log_softmax(-1)
    with torch.no_grad():
        cache = model.make_cache(ids.shape[0])
        steps = [model(ids[:, :prefill], past_key_values=cache).logits]
        steps += [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(prefill, ids.shape[1])]
    return (full - torch.cat(steps, 1).log_softmax(-1)).abs().max().item()


class RowLinear(nn.Linear):
    """One row per matmul: batch-invariant by construction. torch's float GEMM is not (its
    blocking depends on M), so a dense float model's linears differ between a 1-token step and a
    prefill by an ulp; GGUF models' int8 linears (native/ggml.py) are invariant themselves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        return torch.cat([F.linear(r[None], self.weight, self.bias) for r in rows]).view(*x.shape[:-1], -1)


@needs_lib
@pytest.mark.parametrize("overrides", [dict(sliding_window=None), dict(head_dim=24, sliding_window=None),
                                       dict(sliding_window=40)])  # a window that does not wrap here
def test_tiny_model_decode_equals_forward_bitwise(overrides):
    """Everything but the linears (norms, RoPE, attention, SiLU, residuals) is batch-invariant."""
    model = MistralForCausalLM(tiny_config(**overrides)).eval()
    model.attn_implementation = "native"
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = RowLinear
    ids = torch.randint(0, 128, (2, 30))
    assert incremental_equals_full(model, ids) == 0.0


@needs_lib
def test_default_gguf_model_logprobs_decode_equal_forward():
    """The server's guarantee on the real model: its linears quantize activations to int8, so any
    last-bit difference upstream would move logprobs by up to ~0.8 (as SDPA did)."""
    from .conftest import default_model_or_skip

    model = MistralForCausalLM.from_pretrained(default_model_or_skip(), gguf_native=True)
    assert model.attn_implementation == "native"
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    assert incremental_equals_full(model, ids, full_threads=1) == 0.0  # and the threads do not matter

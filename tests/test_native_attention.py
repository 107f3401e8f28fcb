"""native/attention: the C attention and RMSNorm == their torch definitions within float32 rounding,
bit-identical across ISAs, and batch-invariant: a query's output does not depend on the other
queries of the call, on extra masked cache slots or on the thread count. Model level: one forward
over T tokens == prefill + one-token decode steps, bit for bit (the server's logprobs guarantee).
The bfloat16 kernels == the float32 kernels on the widened inputs, rounded where torch's bf16
expressions round, bit for bit; hence within a bf16 rounding step of those expressions."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mistral_lm import MistralForCausalLM
from mistral_lm.attention import ATTENTION_FUNCTIONS, check_implementation, eager_attention
from mistral_lm.errors import InputError
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


SHAPES = {"gqa4": (8, 2, 64), "mha": (4, 4, 24), "mqa_d8": (3, 1, 8), "d128": (2, 1, 128),
          "gqa3_d40": (9, 3, 40), "odd_d37": (4, 2, 37),
          "gqa5_d32": (10, 2, 32)}  # five heads per key/value head: a group of four, then one


@needs_lib
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nq,nk", [(6, 13), (21, 50)], ids=["short", "keys_in_sixteens"])
def test_matches_eager_and_sdpa_on_every_isa(shape, nq, nk):
    """`keys_in_sixteens`: queries that see 16 keys or more, which AVX-512 scores sixteen at a time."""
    h, h_kv, d = SHAPES[shape]
    q, k, v = qkv(2, h, h_kv, nq, nk, d)
    cases = {name: (q, k, v, m) for name, m in masks(2, nq, nk).items()}
    cases["mask_none"] = (q, k[:, :, :nq], v[:, :, :nq], None)
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["gqa4", "mha", "odd_d37"])
def test_batch_invariance(shape, dtype):
    """Query i of a Q-query call == a 1-query call with the same allowed keys, also over a cache
    buffer with extra masked slots appended, with strided inputs. 40 queries: a bf16 call of 32
    or more widens q, k and v once and runs the float32 kernel (attention.c WIDEN_QUERIES)."""
    h, h_kv, d = SHAPES[shape]
    nq = nk = 40
    q, k, v = (t.to(dtype) for t in qkv(2, h, h_kv, nq, nk, d))
    mask = masks(2, nq, nk)["padding"]
    for cap in caps():
        with isa(cap):
            full = na.attention(q, k, v, None, 0.125)
            full_masked = na.attention(q, k, v, mask, 0.125)
            # a bigger cache buffer: 12 empty slots after the keys, in a (B, K, H_kv, D) layout
            big_k = torch.zeros(2, nk + 12, h_kv, d, dtype=dtype)
            big_v = torch.zeros(2, nk + 12, h_kv, d, dtype=dtype)
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thread_count_does_not_change_a_bit(dtype):
    q, k, v = (t.to(dtype) for t in qkv(2, 8, 2, 96, 96, 64))  # big enough to run in parallel (attention.c's threshold)
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


# ------------------------------------------------------------------ bfloat16
BF16 = torch.bfloat16


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16 steps apart a and b are (+0 and -0 the same point)."""
    def line(t: torch.Tensor) -> torch.Tensor:
        bits = t.view(torch.int16).int()
        return torch.where(bits < 0, -(bits + 32768), bits)
    return (line(a) - line(b)).abs()


def assert_within_one_bf16_step(got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    """One bf16 step apart at most, or both within atol of each other: near zero, float32 last-bit
    differences before the rounding are many bf16 steps of a tiny number."""
    close = (bf16_ulps(got, want) <= 1) | ((got.float() - want.float()).abs() <= atol)
    assert close.all(), f"{(~close).sum().item()} values differ: got {got[~close][:4]}, want {want[~close][:4]}"


@needs_lib
@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_attention_is_the_float32_kernel_rounded(shape):
    """bf16 kernel == float32 kernel on the widened inputs, rounded, bitwise on every ISA (masks,
    GQA, head_dim tails); hence within a bf16 step of SDPA in float32, rounded."""
    h, h_kv, d = SHAPES[shape]
    q, k, v = (t.to(BF16) for t in qkv(2, h, h_kv, 6, 13, d))
    cases = {name: (q, k, v, m) for name, m in masks(2, 6, 13).items()}
    cases["mask_none"] = (q, k[:, :, :6], v[:, :, :6], None)
    lk, lv = (t.to(BF16) for t in qkv(1, h, h_kv, 3, 3001, d)[1:])  # a long key axis, a tail of 9 keys
    long_mask = torch.rand(1, 1, 3, 3001, generator=torch.Generator().manual_seed(2)) > 0.2
    cases["long"] = (q[:1, :, :3], lk, lv, long_mask)
    results = {}
    for cap in caps():
        with isa(cap):
            for name, (q_, k_, v_, m) in cases.items():
                out = na.attention(q_, k_, v_, m, d**-0.5)
                assert out.dtype == BF16
                wide = na.attention(q_.float(), k_.float(), v_.float(), m, d**-0.5).to(BF16)
                assert torch.equal(out, wide), f"{name} cap {cap}"
                assert_within_one_bf16_step(out, na.reference_attention(q_, k_, v_, m, d**-0.5), atol=1e-6)
                results.setdefault(name, []).append(out)
    for name, outs in results.items():
        assert all(torch.equal(outs[0], o) for o in outs[1:]), name


@needs_lib
@pytest.mark.parametrize("cache_dtype", [torch.float16, BF16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_float32_queries_over_a_16_bit_cache_are_the_float32_kernel_on_the_widened_cache(shape, cache_dtype):
    """A GGUF model's float32 queries over its 16-bit KV cache: exactly the float32 kernel on the
    widened keys and values, bitwise on every ISA, a query position's heads together (decode) and
    from 32 queries on (prefill, which widens the cache once); masks, GQA groups, head_dim tails,
    a long key axis, and strided keys (a cache's first `used` slots)."""
    h, h_kv, d = SHAPES[shape]
    q, k, v = qkv(2, h, h_kv, 40, 53, d)
    k, v = k.to(cache_dtype), v.to(cache_dtype)
    cases = {name: (q[:, :, -6:], k, v, m[:, :, -6:]) for name, m in masks(2, 40, 53).items()}
    cases |= {"prefill_" + name: (q, k, v, m) for name, m in masks(2, 40, 53).items()}
    cases["decode"] = (q[:, :, -1:], k, v, masks(2, 40, 53)["padding"][:, :, -1:])
    cases["mask_none"] = (q[:, :, :6], k[:, :, :6], v[:, :, :6], None)
    cases["strided_slots"] = (q[:, :, -1:], k[:, :, :20], v[:, :, :20], None)
    lk, lv = (t.to(cache_dtype) for t in qkv(1, h, h_kv, 3, 3001, d)[1:])
    cases["long"] = (q[:1, :, :3], lk, lv, torch.rand(1, 1, 3, 3001, generator=torch.Generator().manual_seed(2)) > 0.2)
    results = {}
    for cap in caps():
        with isa(cap):
            for name, (q_, k_, v_, m) in cases.items():
                assert na.supports_kv16(q_, k_, v_)
                out = na.attention(q_, k_, v_, m, d**-0.5)
                assert out.dtype == torch.float32
                assert torch.equal(out, na.attention(q_, k_.float(), v_.float(), m, d**-0.5)), f"{name} cap {cap}"
                ref = na.reference_attention(q_, k_.float(), v_.float(), m, d**-0.5)
                assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), name
                results.setdefault(name, []).append(out)
    for name, outs in results.items():
        assert all(torch.equal(outs[0], o) for o in outs[1:]), name


@pytest.mark.parametrize("cache_dtype", [torch.float16, BF16], ids=["float16", "bfloat16"])
def test_every_attention_takes_a_16_bit_cache_under_float32_queries(cache_dtype):
    """eager, SDPA and the native kernel attend a narrower cache as its values widened to q's dtype."""
    q, k, v = qkv(1, 8, 2, 5, 9, 16)
    kb, vb = k.to(cache_dtype), v.to(cache_dtype)
    mask = masks(1, 5, 9)["padding"]
    want = na.reference_attention(q, kb.float(), vb.float(), mask, 0.25)
    for name in ("eager", "sdpa", "native"):
        out, _ = ATTENTION_FUNCTIONS[name](q, kb, vb, mask, 0.25)
        assert out.dtype == torch.float32
        assert torch.allclose(out, want, atol=1e-5, rtol=1e-5), name


@needs_lib
def test_float16_conversions_are_torchs():
    """The fused step writes a float16 cache in C and the kernels read it back: both conversions
    equal torch's, bit for bit, on every float16 value and on the float32 edge cases (halfway
    cases each side of even, subnormals, the overflow threshold 65520, infinities, NaN, -0)."""
    lib = na._lib()
    halves = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    wide = torch.empty(halves.numel(), dtype=torch.float32)
    lib.mlm_f16_to_f32(halves.data_ptr(), halves.numel(), wide.data_ptr())
    want = halves.float()
    assert torch.equal(wide.view(torch.int32)[~want.isnan()], want.view(torch.int32)[~want.isnan()])
    assert wide.isnan().equal(want.isnan())
    finite = want[want.isfinite()]
    steps = torch.cat([finite, finite.nextafter(torch.tensor(float("inf"))), finite.nextafter(torch.tensor(-float("inf")))])
    ulp = (finite.double().abs() * 2**-11).clamp(min=2.0**-25)
    midpoints = torch.cat([(finite.double() + ulp).float(), (finite.double() - ulp).float()])  # ties and near-ties
    edge = torch.tensor([65504.0, 65519.99, 65520.0, 65536.0, 1e30, float("inf"), -float("inf"), float("nan"),
                         -0.0, 0.0, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0000001, 2.0**-26, 2.0**-14, 3 * 2.0**-26])
    x = torch.cat([steps, midpoints, edge, torch.randn(100000) * 1000, torch.randn(100000) * 1e-5])
    x = torch.cat([x, -x])
    out = torch.empty(x.numel(), dtype=torch.int16)
    lib.mlm_f32_to_f16(x.data_ptr(), x.numel(), out.data_ptr())
    assert torch.equal(out, x.to(torch.float16).view(torch.int16))


@needs_lib
def test_bf16_rmsnorm_rounds_where_mistral_rmsnorm_does():
    """bf16(w * bf16(x * r)) with the float32 kernel's r, bitwise (the float32 kernel with weight
    ones returns x * r itself); one bf16 step of modeling's expression; the same on every ISA,
    for one row or many, one thread or two, strided rows and tails."""
    x = (torch.randn(120, 576) * 3).to(BF16)  # 120 * 576 > attention.c's threshold for threads
    w = torch.randn(576).to(BF16)

    def formula(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        xr = na.rmsnorm(x.float(), torch.ones(x.shape[-1]), eps)  # x * r in float32, as the kernel's
        return (w.float() * xr.to(BF16).float()).to(BF16)

    want = formula(x, w, 1e-5)
    outs = []
    for cap in caps():
        with isa(cap):
            with threads(2):
                out = na.rmsnorm(x, w, 1e-5)
            assert out.dtype == BF16 and torch.equal(out, want), cap
            with threads(1):
                assert torch.equal(na.rmsnorm(x, w, 1e-5), out)
            assert torch.equal(torch.cat([na.rmsnorm(x[i:i + 1], w, 1e-5) for i in range(0, 120, 7)]), out[::7])
            odd = x[:9, :37]  # strided rows, a tail in every path
            assert torch.equal(na.rmsnorm(odd, w[:37], 1e-6), formula(odd, w[:37], 1e-6))
            outs.append(out)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert_within_one_bf16_step(want, na.reference_rmsnorm(x, w, 1e-5), atol=0.0)


@needs_lib
def test_bf16_silu_mul_rounds_where_torch_does():
    """bf16(bf16(silu(g)) * u) with the float32 kernel's silu, bitwise (its silu_mul with u = 1 is
    silu(g) itself); one bf16 step of torch's F.silu(g) * u in bf16 except where |g| > 88 (exp
    saturates: tiny values against torch's 0); the same on every ISA, rows and threads."""
    g, u = (torch.randn(33, 197) * 6).to(BF16), torch.randn(33, 197).to(BF16)  # 197: a tail in every path
    g[0, :7] = torch.tensor([-200.0, -88.5, 89.0, 0.0, 200.0, -1e-30, -1e4])
    want = (na.silu_mul(g.float(), torch.ones(g.shape)).to(BF16).float() * u.float()).to(BF16)
    outs = []
    for cap in caps():
        with isa(cap):
            out = na.silu_mul(g, u)
            assert out.dtype == BF16 and torch.equal(out, want), cap
            assert torch.equal(torch.cat([na.silu_mul(g[i:i + 1], u[i:i + 1]) for i in range(33)]), out)
            outs.append(out)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert_within_one_bf16_step(want, na.reference_silu_mul(g, u), atol=1e-30)
    big = torch.randn(4, 70000).to(BF16)  # large enough to be split across threads
    with threads(2):
        two = na.silu_mul(big, big.flip(1))
    with threads(1):
        assert torch.equal(na.silu_mul(big, big.flip(1)), two)
    assert torch.equal(two, torch.cat([na.silu_mul(r[None], r.flip(0)[None]) for r in big]))


@needs_lib
def test_bf16_is_asked_for_by_name_and_dtypes_do_not_mix():
    x = torch.ones(2, 4, dtype=BF16)
    assert na.supports_bf16(x, x) and not na.supports(x)  # modeling's float32 check stays float32
    assert not na.supports_bf16(x, x.float())
    with torch.enable_grad():
        assert not na.supports_bf16(x.clone().requires_grad_())
    with pytest.raises(InputError, match="all float32 or all bfloat16"):
        na.silu_mul(x, x.float())
    with pytest.raises(InputError, match="bfloat16 weight"):
        na.rmsnorm(x, torch.ones(4), 1e-6)


@needs_lib
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_custom_ops_compile_in_both_dtypes(dtype):
    """torch.compile sees the kernels as opaque ops whose fake results keep the inputs' dtype."""
    q, k, v = (t.to(dtype) for t in qkv(1, 4, 2, 3, 7, 16))
    mask = masks(1, 3, 7)["window"]
    w = torch.randn(16).to(dtype)

    def block(q, k, v):
        a = na.attention(q, k, v, mask, 0.25)
        return na.silu_mul(na.rmsnorm(a, w, 1e-6), a)

    for op, args in ((na._attention_op, (q, k, v, mask, 0.25)), (na._rmsnorm_op, (q, w, 1e-6)),
                     (na._silu_mul_op, (q, k[:, :, :3].repeat(1, 2, 1, 1)))):
        torch.library.opcheck(op, args, test_utils="test_faketensor")  # fake == real: shape, dtype
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v)
    assert out.dtype == dtype and torch.equal(out, block(q, k, v))


def test_native_is_registered_and_the_float32_and_bfloat16_default():
    assert "native" in ATTENTION_FUNCTIONS
    assert check_implementation("native") == "native"
    for dtype in (torch.float32, torch.bfloat16):
        assert check_implementation(None, dtype) == ("native" if na.available() else "sdpa")
    assert check_implementation(None, torch.float16) == "sdpa"


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


def _parts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, kind: int, key_cuts: int,
           lane_cuts: int) -> torch.Tensor:
    """One decode position's attention (q (H, D), k and v (H_kv, K, D)) from attention.c's pieces,
    as step.c shares them among threads: the allowed keys' scores in `key_cuts` ranges, each
    head's softmax, and the output in `lane_cuts` ranges of whole 16-lane groups."""
    import ctypes

    lib = na._lib()
    h, d = q.shape
    h_kv, nk = k.shape[0], k.shape[1]
    rep, es = h // h_kv, k.element_size()
    idx = torch.nonzero(mask).flatten().to(torch.int32)
    n = idx.numel()
    listed = torch.empty(nk, dtype=torch.int32)
    lib.mlm_attention_part_keys.restype = ctypes.c_int64
    assert lib.mlm_attention_part_keys(ctypes.c_void_p(mask.data_ptr()), ctypes.c_int64(1), ctypes.c_int64(nk),
                                       ctypes.c_void_p(listed.data_ptr())) == n
    assert torch.equal(listed[:n], idx)
    scores = torch.zeros(h, nk + 16)
    out = torch.full((h, d), float("nan"))
    fp = ctypes.POINTER(ctypes.c_float)

    def ptrs(rows: list[torch.Tensor], offset: int = 0) -> ctypes.Array:
        return (ctypes.c_void_p * 4)(*(r.data_ptr() + 4 * offset for r in rows))

    for g in range(h_kv):
        heads = range(g * rep, (g + 1) * rep)
        blocks = [list(heads[i:i + 4]) for i in range(0, rep, 4)]
        for cut in range(key_cuts):
            j0, j1 = n * cut // key_cuts, n * (cut + 1) // key_cuts
            for block in blocks:
                lib.mlm_attention_part_scores(kind, ptrs([q[i] for i in block]), len(block), ctypes.c_void_p(
                    k[g].data_ptr()), ctypes.c_int64(d), ctypes.c_void_p(idx.data_ptr() + 4 * j0),
                    ctypes.c_int64(j1 - j0), ctypes.c_int64(d), ctypes.c_float(d ** -0.5),
                    ptrs([scores[i] for i in block], j0))
        groups = -(-d // 16)
        for cut in range(lane_cuts):
            d0, d1 = 16 * (groups * cut // lane_cuts), min(d, 16 * (groups * (cut + 1) // lane_cuts))
            if d1 <= d0:
                continue
            for block in blocks:
                probs = [scores[i].clone() for i in block]
                sums = (ctypes.c_float * 4)(*(lib.mlm_attention_part_softmax(ctypes.cast(p.data_ptr(), fp),
                                                                             ctypes.c_int64(n)) for p in probs))
                lib.mlm_attention_part_weighted(kind, ptrs(probs), sums, len(block), ctypes.c_void_p(
                    v[g].data_ptr() + es * d0), ctypes.c_int64(d), ctypes.c_void_p(idx.data_ptr()), ctypes.c_int64(n),
                    ctypes.c_int64(d1 - d0), ptrs([out[i] for i in block], d0))
    return out


@needs_lib
@pytest.mark.parametrize("kind", [0, 1, 2], ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("h,h_kv,d", [(9, 3, 64), (12, 2, 80), (8, 8, 128), (10, 1, 64)])
def test_attention_pieces_shared_among_threads_give_attentions_bits(kind, h, h_kv, d):
    """step.c shares a decode step's key/value heads among threads through attention.c's pieces:
    scores over ranges of the keys, each thread's own softmax, ranges of the output lanes. Any
    split gives what attention gives in one call, bit for bit, on every ISA the pieces serve."""
    import ctypes

    lib = na._lib()
    lib.mlm_attention_parts.restype = ctypes.c_int
    lib.mlm_attention_part_softmax.restype = ctypes.c_float
    dtype = {0: torch.float32, 1: torch.bfloat16, 2: torch.float16}[kind]
    q, k, v = qkv(1, h, h_kv, 1, 301, d)
    k, v = k.to(dtype), v.to(dtype)
    mask = torch.rand(301, generator=torch.Generator().manual_seed(d)) > 0.2
    served = 0
    for cap in caps():
        with isa(cap):
            if not lib.mlm_attention_parts(kind, ctypes.c_int64(h // h_kv)):
                continue
            served += 1
            whole = na.attention(q, k, v, mask[None, None, None], d ** -0.5)[0, 0]
            for key_cuts, lane_cuts in ((1, 1), (2, 2), (3, 5)):
                assert torch.equal(_parts(q[0, :, 0], k[0], v[0], mask, kind, key_cuts, lane_cuts), whole)
    assert served or kind == 0 and h == h_kv or caps() == [0]

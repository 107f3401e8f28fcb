"""native/dense: the C bfloat16 linear == its float64 definition within 1 bfloat16 ulp, and
batch-invariant bit for bit: the same outputs on every ISA, for 1 or 2 threads, row by row or
batched, and for any slice of the weight's rows. MatvecLinear routes decode-sized bfloat16 calls
to it and everything larger to F.linear; a bfloat16 model still generates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mistral_lm import MistralForCausalLM
from mistral_lm.errors import InputError
from mistral_lm.matvec import MatvecLinear, install_matvec
from mistral_lm.native import dense

from .conftest import capped_isa, isa_levels, tiny_config, torch_threads

pytestmark = pytest.mark.skipif(not dense.available(), reason="dense C library not built here")

# (M, K, N): K off the 16-lane grid (37, 200), on it (576), tiny (1, 15); N odd and even
SHAPES = [(1, 37, 7), (3, 200, 33), (8, 576, 101), (5, 576, 64), (2, 15, 9), (11, 1, 5), (4, 1040, 257)]


def data(m: int, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    return torch.randn(m, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()


def ulp_bf16(t: torch.Tensor) -> torch.Tensor:
    """The bfloat16 spacing at |t| (float64): 2^(exponent - 7), floored at the smallest subnormal."""
    _, e = torch.frexp(t.double().abs())
    return torch.ldexp(torch.ones_like(t, dtype=torch.float64), (e - 8).clamp(min=-133))


def caps() -> list[int]:
    return isa_levels(dense._lib())


@pytest.mark.parametrize("shape", SHAPES)
def test_within_one_ulp_of_the_float64_definition(shape):
    x, w = data(*shape)
    ref = dense.reference_linear_bf16(x, w).double()
    # beyond 1 ulp only where float32 summation itself errs by more (cancellation to near zero)
    sum_err = (x.double().abs() @ w.double().abs().T) * ((shape[1] + 15) // 16 + 4) * 2.0**-24
    for cap in caps():
        with capped_isa(dense._lib(), cap):
            out = dense.linear_bf16(x, w)
        assert out.dtype == torch.bfloat16 and out.shape == (shape[0], shape[2])
        assert ((out.double() - ref).abs() <= ulp_bf16(ref) + sum_err).all(), f"cap {cap}"


def documented_order(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """dense.c's sum written out in torch: 16 float32 lanes (lane l: k = l mod 16, in k order;
    the bfloat16 products are exact, so mul + add == fma), the tree l + l+8, + l+4, + l+2, + l+1."""
    m, k = x.shape
    kp = -(-k // 16) * 16
    xp, wp = F.pad(x.float(), (0, kp - k)), F.pad(w.float(), (0, kp - k))
    acc = torch.zeros(m, w.shape[0], 16)
    for c in range(0, kp, 16):
        acc = acc + xp[:, None, c:c + 16] * wp[None, :, c:c + 16]
    for half in (8, 4, 2, 1):
        acc = acc[..., :half] + acc[..., half:2 * half]
    return acc[..., 0].bfloat16()


@pytest.mark.parametrize("shape", SHAPES)
def test_sums_in_the_documented_order_bit_for_bit(shape):
    x, w = data(*shape)
    assert torch.equal(dense.linear_bf16(x, w), documented_order(x, w))


@pytest.mark.parametrize("shape", SHAPES)
def test_bit_identical_across_isas_threads_rows_and_slices(shape):
    m, k, n = shape
    x, w = data(m, k, n)
    with torch_threads(1):
        base = dense.linear_bf16(x, w)
    for cap in caps():
        with capped_isa(dense._lib(), cap):
            for threads in (1, 2):
                with torch_threads(threads):
                    assert torch.equal(dense.linear_bf16(x, w), base), (cap, threads)
                    rows = torch.cat([dense.linear_bf16(x[i:i + 1], w) for i in range(m)])
                    assert torch.equal(rows, base), (cap, threads, "rows")
                    for a, b in ((0, 1), (1, n), (n // 3, n // 3 + 5), (n - 2, n)):
                        assert torch.equal(dense.linear_bf16(x, w[a:b]), base[:, a:b]), (cap, threads, a, b)


def test_large_call_splits_over_threads_with_the_same_bits():
    """Big enough (N * K >= 64k) for the OpenMP split, an N that no thread count divides evenly."""
    x, w = data(2, 576, 1531)
    outs = []
    for threads in (1, 2):
        with torch_threads(threads):
            outs.append(dense.linear_bf16(x, w))
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(torch.cat([dense.linear_bf16(x[i:i + 1], w) for i in range(2)]), outs[0])


def test_strided_rows_leading_dims_and_empty_shapes():
    x, w = data(6, 200, 40)
    base = dense.linear_bf16(x, w)
    wide = torch.zeros(40, 256, dtype=torch.bfloat16)
    wide[:, 3:203] = w
    xs = torch.zeros(6, 300, dtype=torch.bfloat16)
    xs[:, 50:250] = x
    assert torch.equal(dense.linear_bf16(xs[:, 50:250], wide[:, 3:203]), base)  # row strides != K
    assert torch.equal(dense.linear_bf16(x.view(2, 3, 200), w), base.view(2, 3, 40))
    assert dense.linear_bf16(x[:0], w).shape == (0, 40)
    assert torch.equal(dense.linear_bf16(x[:, :0], w[:, :0]), torch.zeros(6, 40, dtype=torch.bfloat16))


def test_rounds_like_torch_nan_and_inf_included():
    x = torch.tensor([[1.0, 2.0**-9, 0.0], [float("nan"), 1.0, 1.0], [float("inf"), 1.0, 1.0]]).bfloat16()
    w = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]).bfloat16()
    out = dense.linear_bf16(x, w)
    assert out[0, 0].item() == 1.0  # 1 + 2^-9 is a tie between 1 and 1 + 2^-7: to even
    assert out[1].view(torch.int16).tolist() == [0x7FC0, 0x7FC0]  # torch's canonical NaN
    assert out[2].tolist() == [float("inf"), float("inf")]


@pytest.mark.parametrize("bad", [
    lambda x, w: (x.float(), w),                   # dtype
    lambda x, w: (x, w.half()),
    lambda x, w: (x[:, :10], w),                   # K differs
    lambda x, w: (x, w.t().contiguous().t()),      # weight not unit stride along K
    lambda x, w: (x, w[0]),                        # weight not 2-D
])
def test_refuses_what_it_cannot_take_with_typed_errors(bad):
    x, w = data(2, 32, 8)
    with pytest.raises(InputError):
        dense.linear_bf16(*bad(x, w))


def test_custom_op_and_fake_under_torch_compile():
    x, w = data(3, 96, 50)
    torch.library.opcheck(dense._linear_op, (x, w))
    compiled = torch.compile(dense.linear_bf16, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x, w), dense.linear_bf16(x, w))


# ------------------------------------------------------------------ MatvecLinear
@pytest.mark.parametrize("rows", [1, 2, 5, 8])
def test_matvec_linear_takes_the_kernel_up_to_eight_rows(rows, monkeypatch):
    module = install_matvec(nn.Linear(200, 77, bias=False).bfloat16())
    x = torch.randn(1, rows, 200).bfloat16()
    monkeypatch.setattr(torch, "mv", lambda *args: pytest.fail("took torch.mv"))
    with torch.inference_mode():
        assert torch.equal(module(x), dense.linear_bf16(x, module.weight))


@pytest.mark.parametrize("rows", [9, 16])
def test_matvec_linear_takes_f_linear_beyond(rows, monkeypatch):
    module = install_matvec(nn.Linear(200, 77, bias=False).bfloat16())
    x = torch.randn(rows, 200).bfloat16()
    monkeypatch.setattr(dense, "linear_bf16", lambda *args: pytest.fail("took the kernel"))
    with torch.inference_mode():
        assert torch.equal(module(x), F.linear(x, module.weight))


def test_matvec_linear_with_autograd_keeps_torch(monkeypatch):
    module = install_matvec(nn.Linear(64, 16, bias=False).bfloat16())
    monkeypatch.setattr(dense, "linear_bf16", lambda *args: pytest.fail("took the kernel"))
    module(torch.randn(3, 64).bfloat16()).float().sum().backward()
    assert module.weight.grad is not None


def test_matvec_linear_compiles_to_the_custom_op():
    module = install_matvec(nn.Linear(96, 40, bias=False).bfloat16())
    x = torch.randn(2, 96).bfloat16()
    compiled = torch.compile(module, backend="eager", fullgraph=True)
    with torch.inference_mode():
        assert torch.equal(compiled(x), dense.linear_bf16(x, module.weight))


def test_bf16_model_generates():
    model = install_matvec(MistralForCausalLM(tiny_config()).to(torch.bfloat16)).eval()
    assert type(model.lm_head) is MatvecLinear
    prompt = torch.tensor([[1, 5, 9, 2], [1, 7, 3, 3]])
    with torch.inference_mode():
        out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 10) and torch.equal(out[:, :4], prompt)
    assert ((out >= 0) & (out < model.config.vocab_size)).all()

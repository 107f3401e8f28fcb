"""native/dense: the C bfloat16 and int8-weight linears == their float64 definitions within 1
bfloat16 ulp, and batch-invariant bit for bit: the same outputs on every ISA, for 1 or 2 threads,
row by row or batched, and for any slice of the weight's rows. MatvecLinear and Int8Linear route
decode-sized bfloat16 calls to them and everything larger to their torch paths; bfloat16 and
int8-quantized models still generate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mistral_lm import BitsAndBytesConfig, MistralForCausalLM
from mistral_lm.errors import InputError
from mistral_lm.matvec import MatvecLinear, install_matvec
from mistral_lm.native import dense
from mistral_lm.quantization import Int8Linear, quantize_model
from mistral_lm.quantization.kernels import int8_mm

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


def documented_sum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """dense.c's float32 sum written out in torch: 16 float32 lanes (lane l: k = l mod 16, in k
    order; the bfloat16 x bfloat16 or int8 products are exact, so mul + add == fma), the tree
    l + l+8, + l+4, + l+2, + l+1."""
    m, k = x.shape
    kp = -(-k // 16) * 16
    xp, wp = F.pad(x.float(), (0, kp - k)), F.pad(w.float(), (0, kp - k))
    acc = torch.zeros(m, w.shape[0], 16)
    for c in range(0, kp, 16):
        acc = acc + xp[:, None, c:c + 16] * wp[None, :, c:c + 16]
    for half in (8, 4, 2, 1):
        acc = acc[..., :half] + acc[..., half:2 * half]
    return acc[..., 0]


def documented_order(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return documented_sum(x, w).bfloat16()


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


# ------------------------------------------------------------------ int8 weights
def data_int8(m: int, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x bfloat16, codes over the whole int8 range (-128 included), scales of a quantized layer."""
    g = torch.Generator().manual_seed(m * 1000 + k + n + 7)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, generator=g) * 0.02 + 1e-3).bfloat16()
    return torch.randn(m, k, generator=g).bfloat16(), w, scale


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_within_one_ulp_of_the_float64_definition(shape):
    x, w, scale = data_int8(*shape)
    ref = dense.reference_linear_int8(x, w, scale).double()
    sum_err = ((x.double().abs() @ w.double().abs().T) * scale.double() * ((shape[1] + 15) // 16 + 4)
               * 2.0**-24)
    for cap in caps():
        with capped_isa(dense._lib(), cap):
            out = dense.linear_int8(x, w, scale)
        assert out.dtype == torch.bfloat16 and out.shape == (shape[0], shape[2])
        assert ((out.double() - ref).abs() <= ulp_bf16(ref) + sum_err).all(), f"cap {cap}"


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_sums_in_the_documented_order_then_scales_once(shape):
    x, w, scale = data_int8(*shape)
    expected = (documented_sum(x, w.float()) * scale.float()).bfloat16()
    for cap in caps():
        with capped_isa(dense._lib(), cap):
            assert torch.equal(dense.linear_int8(x, w, scale), expected), f"cap {cap}"


def test_int8_dot_is_the_bf16_dot_of_the_same_values():
    """The int8 kernel's sum is mlm_bf16_linear's (int8 values are exact in bfloat16): with unit
    scales the two agree bit for bit."""
    x, w, _ = data_int8(3, 200, 33)
    ones = torch.ones(33, dtype=torch.bfloat16)
    assert torch.equal(dense.linear_int8(x, w, ones), dense.linear_bf16(x, w.bfloat16()))


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_bit_identical_across_isas_threads_rows_and_slices(shape):
    m, k, n = shape
    x, w, scale = data_int8(m, k, n)
    with torch_threads(1):
        base = dense.linear_int8(x, w, scale)
    for cap in caps():
        with capped_isa(dense._lib(), cap):
            for threads in (1, 2):
                with torch_threads(threads):
                    assert torch.equal(dense.linear_int8(x, w, scale), base), (cap, threads)
                    rows = torch.cat([dense.linear_int8(x[i:i + 1], w, scale) for i in range(m)])
                    assert torch.equal(rows, base), (cap, threads, "rows")
                    for a, b in ((0, 1), (1, n), (n // 3, n // 3 + 5), (n - 2, n)):
                        out = dense.linear_int8(x, w[a:b], scale[a:b])
                        assert torch.equal(out, base[:, a:b]), (cap, threads, a, b)


def test_int8_large_call_splits_over_threads_with_the_same_bits():
    x, w, scale = data_int8(2, 576, 1531)
    outs = []
    for threads in (1, 2):
        with torch_threads(threads):
            outs.append(dense.linear_int8(x, w, scale))
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(torch.cat([dense.linear_int8(x[i:i + 1], w, scale) for i in range(2)]), outs[0])


def test_int8_strided_rows_leading_dims_and_empty_shapes():
    x, w, scale = data_int8(6, 200, 40)
    base = dense.linear_int8(x, w, scale)
    wide = torch.zeros(40, 256, dtype=torch.int8)
    wide[:, 3:203] = w
    xs = torch.zeros(6, 300, dtype=torch.bfloat16)
    xs[:, 50:250] = x
    assert torch.equal(dense.linear_int8(xs[:, 50:250], wide[:, 3:203], scale), base)  # row strides != K
    assert torch.equal(dense.linear_int8(x.view(2, 3, 200), w, scale), base.view(2, 3, 40))
    assert dense.linear_int8(x[:0], w, scale).shape == (0, 40)
    assert torch.equal(dense.linear_int8(x[:, :0], w[:, :0], scale), torch.zeros(6, 40, dtype=torch.bfloat16))


def test_int8_extreme_codes_scale_and_rounding():
    x = torch.tensor([[1.0, 1.0], [2.0**-9, 1.0], [float("nan"), 1.0], [float("inf"), 0.0]]).bfloat16()
    w = torch.tensor([[-128, 127], [1, 0], [127, -128]], dtype=torch.int8)
    scale = torch.tensor([1.0, 3.0, 0.5]).bfloat16()
    out = dense.linear_int8(x, w, scale)
    assert out[0].tolist() == [-1.0, 3.0, -0.5]                   # sign extension of -128
    assert out[1, 0].item() == 127.0  # 127 - 0.25, exact in float32, a tie in bfloat16: to even
    assert out[2].view(torch.int16).tolist() == [0x7FC0] * 3      # torch's canonical NaN
    assert out[3].tolist() == [-float("inf"), float("inf"), float("inf")]
    tie = dense.linear_int8(torch.tensor([[1.0, 2.0**-9]]).bfloat16(), torch.tensor([[1, 1]], dtype=torch.int8),
                            torch.tensor([1.0]).bfloat16())
    assert tie.item() == 1.0  # 1 + 2^-9 is a tie between 1 and 1 + 2^-7: to even


@pytest.mark.parametrize("bad", [
    lambda x, w, s: (x.float(), w, s),                        # dtypes
    lambda x, w, s: (x, w.bfloat16(), s),
    lambda x, w, s: (x, w, s.float()),
    lambda x, w, s: (x[:, :10], w, s),                        # K differs
    lambda x, w, s: (x, w, s[:-1]),                           # scale not (N,)
    lambda x, w, s: (x, w, torch.stack([s, s], 1)[:, 0]),     # scale not contiguous
    lambda x, w, s: (x, w.t().contiguous().t(), s),           # weight not unit stride along K
    lambda x, w, s: (x, w[0], s),                             # weight not 2-D
])
def test_int8_refuses_what_it_cannot_take_with_typed_errors(bad):
    x, w, scale = data_int8(2, 32, 8)
    with pytest.raises(InputError):
        dense.linear_int8(*bad(x, w, scale))


def test_int8_custom_op_and_fake_under_torch_compile():
    x, w, scale = data_int8(3, 96, 50)
    torch.library.opcheck(dense._linear_int8_op, (x, w, scale))
    compiled = torch.compile(dense.linear_int8, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x, w, scale), dense.linear_int8(x, w, scale))


# ------------------------------------------------------------------ Int8Linear
def int8_module(k: int = 192, n: int = 77) -> Int8Linear:
    return Int8Linear.from_linear(nn.Linear(k, n, bias=False))


@pytest.mark.parametrize("rows", range(1, Int8Linear.native_max_rows + 1))
def test_int8_linear_takes_the_kernel_up_to_eight_rows(rows, monkeypatch):
    module = int8_module()
    x = torch.randn(1, rows, 192).bfloat16()
    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", lambda *args: pytest.fail("took torch's kernel"))
    with torch.no_grad():
        assert torch.equal(module(x), dense.linear_int8(x, module.weight, module.weight_scale))


@pytest.mark.parametrize("rows", [9, 16, 40])
def test_int8_linear_keeps_its_torch_path_beyond(rows, monkeypatch):
    module = int8_module()
    x = torch.randn(rows, 192).bfloat16()
    before = (int8_mm(x, module.weight, module.weight_scale) if rows < module._kernel_rows
              else F.linear(x, module.weight.bfloat16() * module.weight_scale[:, None]))
    monkeypatch.setattr(dense, "linear_int8", lambda *args: pytest.fail("took the kernel"))
    with torch.no_grad():
        assert torch.equal(module(x), before)


def test_int8_linear_kernel_takes_any_k():
    """K % 16 != 0 had no small-M kernel before (torch's reads past the rows); the native one takes it."""
    module = int8_module(k=200)
    x = torch.randn(3, 200).bfloat16()
    with torch.no_grad():
        assert torch.equal(module(x), dense.linear_int8(x, module.weight, module.weight_scale))


def test_int8_linear_with_autograd_or_float32_keeps_torch(monkeypatch):
    module = int8_module(k=64, n=16)
    x = torch.randn(3, 64).bfloat16().requires_grad_()
    monkeypatch.setattr(dense, "linear_int8", lambda *args: pytest.fail("took the kernel"))
    module._matmul(x)  # x needs a gradient the kernel cannot give
    float_module = Int8Linear.from_linear(nn.Linear(64, 16, bias=False), torch.float32)
    with torch.no_grad():
        float_module(torch.randn(2, 64))
    monkeypatch.undo()
    module(x).float().sum().backward()  # through the module: the kernel forward, the dequantized backward
    assert x.grad is not None and x.grad.shape == x.shape


def test_int8_linear_compiles_to_the_custom_op():
    module = int8_module(k=96, n=40)
    x = torch.randn(2, 96).bfloat16()
    compiled = torch.compile(module, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), dense.linear_int8(x, module.weight, module.weight_scale))


def test_int8_model_generates_on_the_kernel(monkeypatch):
    model = quantize_model(MistralForCausalLM(tiny_config()), BitsAndBytesConfig(load_in_8bit=True)).eval()
    calls = []
    kernel = dense.linear_int8
    monkeypatch.setattr(dense, "linear_int8", lambda *args: calls.append(1) or kernel(*args))
    prompt = torch.tensor([[1, 5, 9, 2], [1, 7, 3, 3]])
    with torch.inference_mode():
        out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 10) and torch.equal(out[:, :4], prompt)
    assert ((out >= 0) & (out < model.config.vocab_size)).all()
    assert calls  # the decode steps ran the native kernel


QUANT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def quant_weight(n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of several magnitudes, an all-zero row, a -0.0, and a row of exact ties: its largest
    |w| is 127 / 8, so its scale is 1/8 and w / scale lands on every half-integer in [-127, 127]."""
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g).mul(4).exp2()
    if n > 2 and k > 3:
        w[1], w[2, 3] = 0.0, -0.0
        ties = (torch.arange(k) % 254 - 127 + 0.5) / 8
        ties[0] = 127 / 8
        w[0] = ties
    return w.to(dtype)


@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (37, 100), (5, 576), (64, 1040), (0, 8)])
@pytest.mark.parametrize("weight_dtype", QUANT_DTYPES)
def test_int8_quantize_equals_the_torch_definition_on_every_isa(shape, weight_dtype):
    """quantize_int8 in C gives functional.quantize_int8's codes and scales bit for bit (the
    float32 division and round-half-to-even of torch's div_ and round_), for every scale dtype,
    ISA and thread count, on K off the 16-lane grid and on a row of exact ties."""
    from mistral_lm.quantization.functional import quantize_int8

    w = quant_weight(*shape, weight_dtype)
    for scale_dtype in QUANT_DTYPES:
        q, scale = quantize_int8(w, scale_dtype)
        for cap in caps():
            with capped_isa(dense._lib(), cap):
                for threads in (1, 2):
                    with torch_threads(threads):
                        got = dense.quantize_int8(w, scale_dtype)
                    assert got is not None, (cap, threads, scale_dtype)
                    assert torch.equal(got[0], q) and torch.equal(got[1], scale), (cap, threads, scale_dtype)
    if shape[0] > 2 and shape[1] > 3:
        assert (q[0].float() % 2 == 0).any() and (q[0].abs() == 127).any()  # the ties row rounded to even


def test_int8_quantize_leaves_rows_that_are_not_finite_and_odd_inputs_to_the_definition():
    for bad in (float("nan"), float("inf"), -float("inf")):
        w = torch.randn(4, 40)
        w[2, 5] = bad
        assert dense.quantize_int8(w, torch.bfloat16) is None
    tiny = torch.full((2, 8), 1e-30)  # its float16 scale rounds to 0
    assert dense.quantize_int8(tiny, torch.float16) is None
    assert dense.quantize_int8(torch.randn(4, 6).T, torch.bfloat16) is None  # strided along K
    assert dense.quantize_int8(torch.randn(4, 6, dtype=torch.float64), torch.bfloat16) is None
    strided_rows = torch.randn(8, 40)[::2]  # a row stride: read in place
    from mistral_lm.quantization.functional import quantize_int8
    got, want = dense.quantize_int8(strided_rows, torch.bfloat16), quantize_int8(strided_rows, torch.bfloat16)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

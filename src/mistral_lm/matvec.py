"""MatvecLinear: nn.Linear with shortcuts for half-precision rows on the CPU, at decode and prefill.

bfloat16, up to `MatvecLinear.native_max_rows` (8) rows, no bias: `native.dense.linear_bf16`, a
batch-invariant kernel: a row's output bits depend only on that row and the weight, not on the
other rows of the call, the thread count or the slice of the weight's rows computed, which the
fused decode step relies on (it computes each projection per thread on row slices of the weight
and must equal this module bit for bit). It is also the faster one at decode: each weight row is
streamed once for all the rows, prefetched into L2 (one row of a 1536 x 576 weight, 2 threads,
from DRAM: ~30-60 GB/s against torch.mv's ~10 here). float16, one row: `torch.mv`, which torch
vectorizes on the CPU unlike the (1, K) matmul `F.linear` becomes; so does a bfloat16 row the
kernel does not take (autograd through it, no C library). From `float_min_rows` (32) rows of a
half-precision dtype this CPU has no GEMM for (bfloat16 without AVX-512 BF16 / AMX, float16 almost
everywhere), forward and backward: float32 GEMMs on `float_chunk_rows`-row slices of the weight,
rounded once to the dtype. ATen's fallback for such a product accumulates in float32 too, so the result
differs from it only in summation order (within the dtype's rounding), at 3-4x the speed: a
512x4096x4096 bfloat16 product on an AVX2 CPU 351 -> 93 ms (bench/RESULTS.md). Everything else:
`F.linear`.

The loader installs it as its last module swap (`install_matvec`), after fusion and
quantization; the module keeps nn.Linear's parameters and state-dict keys.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .native import dense

_HALF = (torch.bfloat16, torch.float16)


@torch.library.custom_op("mistral_lm::matvec", mutates_args=())
def matvec(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """torch.mv behind an opaque op: inductor would otherwise lower it to a generic reduction,
    slower than its own bfloat16 linear, instead of calling the vectorized kernel."""
    return torch.mv(weight, x)


@matvec.register_fake
def _(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return weight.new_empty(weight.shape[0])


class MatvecLinear(nn.Linear):
    """nn.Linear whose forward takes the native bfloat16 kernel for up to `native_max_rows`
    bfloat16 rows, and `torch.mv` for one float16 row, on the CPU.

    >>> layer = install_matvec(nn.Linear(8, 4, bias=False).to(torch.bfloat16))
    >>> type(layer).__name__, layer(torch.ones(1, 1, 8, dtype=torch.bfloat16)).shape
    ('MatvecLinear', torch.Size([1, 1, 4]))
    """

    native_max_rows = 8  # decode batches; beyond, torch's GEMM is the faster one
    float_min_rows = 32  # without a native GEMM in the dtype; below, converting the weight costs more
    float_chunk_rows = 512  # weight rows converted at a time: bounds the float32 copy, keeps it in cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.device.type != "cpu" or w.dtype != x.dtype or x.dtype not in _HALF:
            return F.linear(x, w, self.bias)
        if self._via_float32(x):
            if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                            or (self.bias is not None and self.bias.requires_grad)):
                return _Float32Linear.apply(x, w, self.bias, self.float_chunk_rows)
            return linear_via_float32(x, w, self.bias, self.float_chunk_rows)
        if self.bias is not None:
            return F.linear(x, w, self.bias)
        if x.dtype == torch.bfloat16 and self._native(x):
            return dense.linear_bf16(x, w)  # the opaque op ``mistral_lm::bf16_linear`` when compiling
        if x.numel() == x.shape[-1]:
            mv = matvec if torch.compiler.is_compiling() else torch.mv
            return mv(w, x.reshape(-1)).view(*x.shape[:-1], -1)
        return F.linear(x, w)

    def _native(self, x: torch.Tensor) -> bool:
        """Few rows, a row-major weight, no autograd through it (the kernel has no backward)."""
        w = self.weight
        return (x.numel() <= self.native_max_rows * x.shape[-1] and w.stride(-1) == 1 and dense.available()
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))

    def _via_float32(self, x: torch.Tensor) -> bool:
        """Many rows, no native GEMM in the dtype, not under torch.compile (inductor picks its own GEMM)."""
        return (x.numel() >= self.float_min_rows * x.shape[-1] and not native_gemm(x.dtype, x.device)
                and not torch.compiler.is_compiling())


class _Float32Linear(torch.autograd.Function):
    """linear_via_float32 with its backward products also through float32 slices: autograd's own
    backward of F.linear multiplies grad @ W with W row-major, which ATen's half-precision fallback
    runs in a scalar loop (a 512x576 @ 576x1536 bfloat16 product: 355 ms against 22 with the
    layout changed, bench/RESULTS.md). Saves x and the weight as F.linear does, no float32 copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                chunk_rows: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.chunk_rows = bias is not None, chunk_rows
        return linear_via_float32(x, weight, bias, chunk_rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:   # grad @ W: W.T's rows are W's columns
            gx = linear_via_float32(g, weight.T, None, ctx.chunk_rows).view(x.shape)
        if ctx.needs_input_grad[1]:   # grad.T @ x
            gw = linear_via_float32(g.T, x.reshape(-1, x.shape[-1]).T, None, ctx.chunk_rows)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.float().sum(0).to(grad.dtype)
        return gx, gw, gb, None


def linear_via_float32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       chunk_rows: int = 512) -> torch.Tensor:
    """F.linear(x, weight, bias) for half-precision tensors, computed as float32 GEMMs on slices
    of `chunk_rows` weight rows and rounded once to x's dtype: the products of two half-precision
    numbers are exact in float32, so this is the dtype's product with float32 accumulation, where
    the CPU has a fast float32 GEMM and no half-precision one."""
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive; got {chunk_rows}")
    xf = x.reshape(-1, x.shape[-1]).float()
    n = weight.shape[0]
    out = torch.empty(xf.shape[0], n, dtype=x.dtype, device=x.device)
    for n0 in range(0, n, chunk_rows):
        b = None if bias is None else bias[n0:n0 + chunk_rows].float()
        out[:, n0:n0 + chunk_rows] = F.linear(xf, weight[n0:n0 + chunk_rows].float(), b)
    return out.view(*x.shape[:-1], n)


def dense_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) for x (M, K) and a weight the caller expanded for this call (the
    quantized layers' prefill and backward, with weight = W.T there): by `linear_via_float32` where
    MatvecLinear would take it (many rows of a half-precision dtype this CPU has no GEMM for), else
    F.linear itself, given a row-major weight where the GEMM is not native (F.linear multiplies by
    its transpose, and ATen's fallback runs a transposed row-major matrix in a scalar loop)."""
    if x.dtype in _HALF and not torch.compiler.is_compiling() and not native_gemm(x.dtype, x.device):
        if x.shape[0] >= MatvecLinear.float_min_rows:
            return linear_via_float32(x, weight, chunk_rows=MatvecLinear.float_chunk_rows)
        return F.linear(x, weight.contiguous())
    return F.linear(x, weight)


def gemm_rhs(b: torch.Tensor) -> torch.Tensor:
    """b, or the same matrix as a transposed view of a k-major copy where this CPU has no native
    GEMM in b's dtype: for `x @ gemm_rhs(b)` on a row-major b, which ATen's fallback would
    multiply in a scalar loop (the layout `dense_linear` gives F.linear's operand)."""
    return b if native_gemm(b.dtype, b.device) else b.T.contiguous().T


def native_gemm(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether this device multiplies `dtype` matrices in a native GEMM, fast for either operand
    layout. A GPU's BLAS does; on a CPU float32 / float64 always, bfloat16 / float16 where oneDNN has them
    (it honours ONEDNN_MAX_CPU_ISA); else ATen's fallback runs, several times slower."""
    if device.type != "cpu" or dtype in (torch.float32, torch.float64):
        return True
    if dtype not in _HALF or not torch.backends.mkldnn.enabled:
        return False
    return _mkldnn_supports(dtype)


@functools.cache
def _mkldnn_supports(dtype: torch.dtype) -> bool:
    """oneDNN's own answer, asked once per process."""
    name = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
    probe = getattr(torch.ops.mkldnn, name, None)
    return bool(probe()) if probe is not None else False


def install_matvec(model: nn.Module) -> nn.Module:
    """Turn every plain nn.Linear of `model` (or `model` itself) into a MatvecLinear in place;
    returns `model`. The swap changes the class only: parameters, hooks and state-dict keys are
    the same objects, so ties (lm_head to the embedding) and memory maps survive it."""
    for module in model.modules():  # model itself included
        if type(module) is nn.Linear:
            module.__class__ = MatvecLinear
    return model

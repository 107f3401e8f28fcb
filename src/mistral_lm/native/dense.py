"""Batch-invariant bfloat16 and int8-weight linears on CPU (dense.c), for decode.

Why: torch's bfloat16 matmul sums in an order that depends on how many rows a call has (and
its thread count), so a token's logits in a one-row decode step and in a batched or fused step
differ in the last bits. `linear_bf16` sums every output in one fixed order (attention.c's: 16
float32 lanes, then a tree), so a row's output bits depend only on that row and the weight row:
not on the other rows of the call, the thread count, or which slice of the weight's rows a call
computes. The fused decode step relies on this to equal the module path bit for bit. It is also
the faster decode path: each weight row is streamed once for up to 8 activation rows, with L2
prefetch (bench/RESULTS.md). The AVX-512, AVX2 and scalar paths are bit-identical.

`linear_int8` is the same for an int8 weight with a bfloat16 scale per output row (Int8Linear's
storage): the same dot with the int8 weights as float32 (the products are as exact), then one
float32 multiply by the row's scale and one rounding. torch's `_weight_int8pack_mm` is neither
batch-invariant nor reproducible from C, and streams a decode row's weights 1.4-2.5x slower
(M = 1, 1536 x 576 and 49152 x 576, cold, 1 and 2 threads: 17-36 against 7-23 GB/s).

`quantize_int8` makes an Int8Linear's codes and scales, bit for bit those of
`quantization.functional.quantize_int8`, in two passes over each row.

Eager calls go through ctypes; under torch.compile the same calls are the opaque ops
``mistral_lm::bf16_linear`` and ``mistral_lm::int8_linear``. `reference_linear_bf16` and
`reference_linear_int8` are the definitions in torch: a float64 dot (times the float64 scale)
rounded once to bfloat16, which the kernels' float32 arithmetic meets within 1 bfloat16 ulp
(plus the float32 summation error where a sum cancels).
"""

from __future__ import annotations

import ctypes
import functools
import math

import torch

from ..errors import InputError
from . import build

_P, _L, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = build.library("dense")
    if lib is None:
        return None
    lib.mlm_bf16_linear.argtypes = [_P, _L, _L, _L, _P, _L, _L, _P, _L, _I]
    lib.mlm_bf16_linear.restype = _I
    lib.mlm_int8_linear.argtypes = [_P, _L, _L, _L, _P, _L, _L, _P, _P, _L, _I]
    lib.mlm_int8_linear.restype = _I
    lib.mlm_int8_quantize.argtypes = [_P, _I, _L, _L, _L, _P, _P, _I, _I]
    lib.mlm_int8_quantize.restype = _I
    return lib


_available: bool | None = None


def available() -> bool:
    """Whether the C library is built and loaded (a plain global after the first call, which
    torch.compile reads without tracing the loader)."""
    global _available
    if _available is None:
        _available = _lib() is not None
    return _available


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        raise InputError(f"linear_bf16 takes bfloat16 x and weight, got {x.dtype} and {weight.dtype}")
    if x.device.type != "cpu" or weight.device.type != "cpu":
        raise InputError(f"linear_bf16 runs on the CPU, got x on {x.device} and weight on {weight.device}")
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise InputError(f"linear_bf16 needs x (..., K) and weight (N, K), got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if weight.stride(1) != 1 and weight.shape[1] > 1:
        raise InputError(f"linear_bf16 needs a weight with unit stride along K (a row-major (N, K) tensor), "
                         f"got strides {weight.stride()}: pass weight.contiguous()")


def _check_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> None:
    if x.dtype != torch.bfloat16 or weight.dtype != torch.int8 or scale.dtype != torch.bfloat16:
        raise InputError(f"linear_int8 takes bfloat16 x, int8 weight and bfloat16 scale, got {x.dtype}, "
                         f"{weight.dtype} and {scale.dtype}")
    if any(t.device.type != "cpu" for t in (x, weight, scale)):
        raise InputError(f"linear_int8 runs on the CPU, got x on {x.device}, weight on {weight.device} and "
                         f"scale on {scale.device}")
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise InputError(f"linear_int8 needs x (..., K) and weight (N, K), got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if scale.shape != weight.shape[:1] or not scale.is_contiguous():
        raise InputError(f"linear_int8 needs a contiguous scale of shape ({weight.shape[0]},), got "
                         f"{tuple(scale.shape)} with strides {scale.stride()}")
    if weight.stride(1) != 1 and weight.shape[1] > 1:
        raise InputError(f"linear_int8 needs a weight with unit stride along K (a row-major (N, K) tensor), "
                         f"got strides {weight.stride()}: pass weight.contiguous()")


def _rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """x as an (M, K) matrix with unit stride along K, and the row stride to pass."""
    x2 = x.reshape(math.prod(x.shape[:-1]), k)  # not -1: K may be 0
    x2 = x2 if x2.stride(-1) == 1 or k <= 1 else x2.contiguous()
    return x2, x2.stride(0) if x2.shape[0] > 1 else k


def _linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The bfloat16 linear, or with `scale` the int8 one (the same call but for the scales)."""
    lib = _lib()
    if lib is None:
        return reference_linear_bf16(x, weight) if scale is None else reference_linear_int8(x, weight, scale)
    n, k = weight.shape
    x2, ldx = _rows(x, k)
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=torch.bfloat16)
    ldw = weight.stride(0) if n > 1 else k
    if scale is None:
        rc = lib.mlm_bf16_linear(x2.data_ptr(), m, k, ldx, weight.data_ptr(), n, ldw, out.data_ptr(), n,
                                 torch.get_num_threads())
    else:
        rc = lib.mlm_int8_linear(x2.data_ptr(), m, k, ldx, weight.data_ptr(), n, ldw, scale.data_ptr(),
                                 out.data_ptr(), n, torch.get_num_threads())
    if rc:
        raise InputError(f"native {'bf16' if scale is None else 'int8'} linear refused x {tuple(x.shape)} and "
                         f"weight {tuple(weight.shape)}")
    return out.view(*x.shape[:-1], n)


@torch.library.custom_op("mistral_lm::bf16_linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The kernel behind an opaque op, so torch.compile calls it instead of tracing ctypes."""
    return _linear(x, weight)


@_linear_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ weight.T -> (..., N), x and weight (N, K) bfloat16 on the CPU, each output
    summed in float32 in one fixed order and rounded once (no autograd)."""
    _check(x, weight)
    if torch.compiler.is_compiling():
        return _linear_op(x, weight)
    return _linear(x, weight)


def reference_linear_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The definition in torch: the exact products summed in float64, rounded once to bfloat16."""
    return (x.double() @ weight.double().T).to(torch.bfloat16)


@torch.library.custom_op("mistral_lm::int8_linear", mutates_args=())
def _linear_int8_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The int8 kernel behind an opaque op, so torch.compile calls it instead of tracing ctypes."""
    return _linear(x, weight, scale)


@_linear_int8_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ (weight * scale[:, None]).T -> (..., N) bfloat16: x bfloat16, weight int8 (N, K)
    with unit stride along K, scale (N,) bfloat16, all on the CPU; each output is the float32 dot
    in linear_bf16's order times its row's scale, rounded once (no autograd)."""
    _check_int8(x, weight, scale)
    if torch.compiler.is_compiling():
        return _linear_int8_op(x, weight, scale)
    return _linear(x, weight, scale)


def reference_linear_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The definition in torch: the exact dot in float64 times the scale, rounded once to bfloat16."""
    return ((x.double() @ weight.double().T) * scale.double()).to(torch.bfloat16)


def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`quantization.functional.quantize_int8(weight, scale_dtype)`, bit for bit, in two passes
    over each row instead of six over the whole weight (a 7B's int8 load spent most of its time
    there). None where the definition has to decide: no library, a weight off the CPU, not 2-D
    with unit stride along K, or of a dtype the kernel does not read, or a row holding a NaN or
    an infinity (or whose scale rounds to 0 or infinity in float16)."""
    lib = _lib()
    if (lib is None or weight.device.type != "cpu" or weight.dim() != 2 or weight.dtype not in build.DTYPE_CODES
            or scale_dtype not in build.DTYPE_CODES or (weight.stride(1) != 1 and weight.shape[1] > 1)):
        return None
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.int8)
    scale = torch.empty(n, dtype=scale_dtype)
    ldw = weight.stride(0) if n > 1 else k
    rc = lib.mlm_int8_quantize(weight.data_ptr(), build.DTYPE_CODES[weight.dtype], n, k, ldw, q.data_ptr(),
                               scale.data_ptr(), build.DTYPE_CODES[scale_dtype], torch.get_num_threads())
    if rc < 0:
        raise InputError(f"native int8 quantization refused a weight of shape {tuple(weight.shape)}")
    return (q, scale) if rc == 0 else None

"""Batch-invariant bfloat16 linear on CPU (dense.c), for decode.

Why: torch's bfloat16 matmul sums in an order that depends on how many rows a call has (and
its thread count), so a token's logits in a one-row decode step and in a batched or fused step
differ in the last bits. `linear_bf16` sums every output in one fixed order (attention.c's: 16
float32 lanes, then a tree), so a row's output bits depend only on that row and the weight row:
not on the other rows of the call, the thread count, or which slice of the weight's rows a call
computes. The fused decode step relies on this to equal the module path bit for bit. It is also
the faster decode path: each weight row is streamed once for up to 8 activation rows, with L2
prefetch (bench/RESULTS.md). The AVX-512, AVX2 and scalar paths are bit-identical.

Eager calls go through ctypes; under torch.compile the same call is the opaque op
``mistral_lm::bf16_linear``. `reference_linear_bf16` is the definition in torch: a float64 dot
rounded once to bfloat16, which the kernel's float32 sum meets within 1 bfloat16 ulp.
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


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    lib = _lib()
    if lib is None:
        return reference_linear_bf16(x, weight)
    n, k = weight.shape
    x2 = x.reshape(math.prod(x.shape[:-1]), k)  # not -1: K may be 0
    x2 = x2 if x2.stride(-1) == 1 or k <= 1 else x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=torch.bfloat16)
    rc = lib.mlm_bf16_linear(x2.data_ptr(), m, k, x2.stride(0) if m > 1 else k, weight.data_ptr(), n,
                             weight.stride(0) if n > 1 else k, out.data_ptr(), n, torch.get_num_threads())
    if rc:
        raise InputError(f"native bf16 linear refused x {tuple(x.shape)} and weight {tuple(weight.shape)}")
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

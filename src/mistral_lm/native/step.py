"""The decode step of every layer in one C call (step.c), over the project's own kernels.

step.c composes ggml.c's quantize/matmul and attention.c's RMSNorm, attention and SiLU product,
reached through function pointers taken from those libraries here, so the fused step computes
what the layers compute from Python, bit for bit (tests compare the two). Which models and
steps it serves, and the layer table it reads, are `fused_step.py`'s business; this module is
the binding: the C structs and one call.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from ..errors import InputError
from . import attention, build, ggml

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class Kernels(ctypes.Structure):
    _fields_ = [("quantize", _ptr), ("matmul", _ptr), ("attention", _ptr), ("rmsnorm", _ptr), ("silu_mul", _ptr),
                ("xblock_bytes", _i64)]


class Lin(ctypes.Structure):
    _fields_ = [("type", _i64), ("n", _i64), ("k", _i64), ("ldw", _i64), ("w", _ptr), ("order", _ptr)]


class Layer(ctypes.Structure):
    _fields_ = [("ln1", _ptr), ("ln2", _ptr), ("eps1", _f32), ("eps2", _f32),
                *((name, Lin) for name in ("q", "k", "v", "o", "gate", "up", "down"))]


class Step(ctypes.Structure):
    _fields_ = [("M", _i64), ("C", _i64), ("H", _i64), ("Hkv", _i64), ("D", _i64), ("F", _i64),
                ("scale", _f32), ("cos", _ptr), ("sin", _ptr), ("mask", _ptr), ("mask_s", _i64 * 2),
                ("used", _i64), ("slot", _i64), ("keys", _ptr), ("values", _ptr), ("cache_s", _i64 * 3),
                ("nthreads", ctypes.c_int)]


@functools.cache
def _lib() -> tuple[ctypes.CDLL, Kernels] | None:
    lib, g, a = build.library("step"), ggml._lib(), attention._lib()
    if lib is None or g is None or a is None:
        return None
    lib.mlm_decode_layers.argtypes = [ctypes.POINTER(Kernels), _ptr, _i64, ctypes.POINTER(Step), _ptr]
    lib.mlm_decode_layers.restype = ctypes.c_int

    def address(fn: ctypes._CFuncPtr) -> int:
        return ctypes.cast(fn, _ptr).value  # type: ignore[return-value]

    kernels = Kernels(address(g.mlm_ggml_quantize), address(g.mlm_ggml_matmul), address(a.mlm_attention),
                      address(a.mlm_rmsnorm), address(a.mlm_silu_mul), ggml.XBLOCK_BYTES)
    return lib, kernels


def available() -> bool:
    """Whether the step library and the kernels it calls are built and loaded."""
    return _lib() is not None


def linear_entry(blocks: torch.Tensor, ggml_type: int, in_features: int, order: torch.Tensor | None) -> Lin:
    """A Linear on GGUF blocks as step.c reads it (the caller keeps `blocks` and `order` alive)."""
    nbytes = ggml.row_bytes(int(ggml_type), in_features)
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != nbytes or blocks.stride(1) != 1 \
            or (blocks.shape[0] > 1 and blocks.stride(0) < nbytes):
        raise InputError(f"blocks must be uint8 (N, {nbytes}) with contiguous rows; got {tuple(blocks.shape)}")
    if order is not None and (order.dtype != torch.int64 or not order.is_contiguous()
                              or order.shape != (blocks.shape[0],)):
        raise InputError("a row order must be a contiguous int64 vector of one entry per row")
    return Lin(int(ggml_type), blocks.shape[0], in_features, blocks.stride(0) if blocks.shape[0] > 1 else nbytes,
               blocks.data_ptr(), None if order is None else order.data_ptr())


def decode_layers(layers: ctypes.Array, count: int, step: Step, x: torch.Tensor) -> None:
    """Run `count` layers of the table on x (M, C) float32 contiguous, in place."""
    found = _lib()
    if found is None:
        raise RuntimeError("the native step library is not available (see available())")
    lib, kernels = found
    rc = lib.mlm_decode_layers(ctypes.byref(kernels), ctypes.addressof(layers), count, ctypes.byref(step),
                               x.data_ptr())
    if rc:
        raise MemoryError("the native decode step could not allocate its scratch memory") if rc == -2 else \
            InputError("a kernel of the native decode step refused its arguments")

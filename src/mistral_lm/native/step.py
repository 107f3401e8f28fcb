"""The decode step of every layer in one C call (step.c), over the project's own kernels.

step.c composes ggml.c's quantize/matmul, dense.c's bfloat16 linear, nf4.c's NF4/FP4 matmul and
attention.c's RMSNorm, attention and SiLU product, reached through function pointers taken from
those libraries here, so the fused step computes what the layers compute from Python, bit for
bit (tests compare the two). Which models and steps it serves, and the layer table it reads, are
`fused_step.py`'s business; this module is the binding: the C structs and one call.
"""

from __future__ import annotations

import ctypes
import functools
import torch

from ..errors import InputError
from . import attention, build, ggml

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
LIN_GGML, LIN_BF16, LIN_NF4, LIN_INT8 = 0, 1, 2, 3


class Elementwise(ctypes.Structure):
    _fields_ = [("attention", _ptr), ("rmsnorm", _ptr), ("silu_mul", _ptr)]


class Kernels(ctypes.Structure):
    _fields_ = [("quantize", _ptr), ("matmul", _ptr), ("bf16_linear", _ptr), ("int8_linear", _ptr), ("nf4_mm", _ptr),
                ("f32", Elementwise), ("bf16", Elementwise), ("xblock_bytes", _i64), ("attention_kv16", _ptr * 2),
                # attention.c's grouped decode attention in pieces (a key/value head shared among threads)
                ("attention_parts", _ptr), ("part_keys", _ptr), ("part_scores", _ptr), ("part_softmax", _ptr),
                ("part_weighted", _ptr)]


class Lin(ctypes.Structure):
    _fields_ = [("kind", _i64), ("type", _i64), ("n", _i64), ("k", _i64), ("ldw", _i64), ("w", _ptr),
                ("order", _ptr), ("absmax", _ptr), ("codebook", _ptr), ("blocksize", _i64), ("scale", _ptr)]


class Layer(ctypes.Structure):
    _fields_ = [("ln1", _ptr), ("ln2", _ptr), ("eps1", _f32), ("eps2", _f32),
                *((name, Lin) for name in ("q", "k", "v", "o", "gate", "up", "down"))]


class Step(ctypes.Structure):
    _fields_ = [("M", _i64), ("C", _i64), ("H", _i64), ("Hkv", _i64), ("D", _i64), ("F", _i64), ("bf16", _i64),
                ("kv16", _i64), ("scale", _f32), ("cos", _ptr), ("sin", _ptr), ("mask", _ptr), ("mask_s", _i64 * 2),
                ("used", _i64), ("slot", _i64), ("keys", _ptr), ("values", _ptr), ("cache_s", _i64 * 3),
                ("nthreads", ctypes.c_int), ("waited_ns", _i64), ("wall_ns", _i64), ("norm", _ptr), ("norm_eps", _f32),
                ("normed", _ptr), ("T", _i64), ("mask_q", _i64), ("head", ctypes.POINTER(Lin)), ("logits", _ptr)]


def _address(lib: ctypes.CDLL | None, name: str) -> int | None:
    """The address of `name` in `lib`, None where the library or the symbol is missing."""
    if lib is None or not hasattr(lib, name):
        return None
    return ctypes.cast(getattr(lib, name), _ptr).value


@functools.cache
def _lib() -> tuple[ctypes.CDLL, Kernels] | None:
    lib, g, a = build.library("step"), ggml._lib(), attention._lib()
    if lib is None or g is None or a is None:
        return None
    from . import dense, nf4  # the bfloat16 kernels: optional, the float32 step runs without them

    dense_lib = dense._lib()

    lib.mlm_decode_layers.argtypes = [ctypes.POINTER(Kernels), _ptr, _i64, ctypes.POINTER(Step), _ptr]
    lib.mlm_decode_layers.restype = ctypes.c_int
    kernels = Kernels(_address(g, "mlm_ggml_quantize"), _address(g, "mlm_ggml_matmul"),
                      _address(dense_lib, "mlm_bf16_linear"), _address(dense_lib, "mlm_int8_linear"),
                      _address(nf4.library(), "mlm_nf4_mm"),
                      Elementwise(*(_address(a, f"mlm_{op}") for op in ("attention", "rmsnorm", "silu_mul"))),
                      Elementwise(*(_address(a, f"mlm_{op}_bf16") for op in ("attention", "rmsnorm", "silu_mul"))),
                      ggml.XBLOCK_BYTES,
                      (_ptr * 2)(_address(a, "mlm_attention_kv16"), _address(a, "mlm_attention_kvf16")),
                      *(_address(a, f"mlm_attention_{name}") for name in ("parts", "part_keys", "part_scores",
                                                                            "part_softmax", "part_weighted")))
    return lib, kernels


def available(bf16: bool = False, kinds: frozenset[int] = frozenset({LIN_GGML}), kv16: int = 0) -> bool:
    """Whether the step can run here with this activation type and these linear kinds (and,
    with `kv16` 1 or 2, a bfloat16 or float16 cache under float32 activations)."""
    found = _lib()
    if found is None:
        return False
    k = found[1]
    if kv16 and not k.attention_kv16[kv16 - 1]:
        return False
    need = [k.f32.attention, k.f32.rmsnorm, k.f32.silu_mul] if not bf16 else [
        k.bf16.attention, k.bf16.rmsnorm, k.bf16.silu_mul]
    need += [{LIN_GGML: k.matmul, LIN_BF16: k.bf16_linear, LIN_NF4: k.nf4_mm, LIN_INT8: k.int8_linear}[kind]
             for kind in kinds]
    return all(need)


def ggml_entry(blocks: torch.Tensor, ggml_type: int, in_features: int, order: torch.Tensor | None) -> Lin:
    """A Linear on GGUF blocks as step.c reads it (the caller keeps `blocks` and `order` alive)."""
    nbytes = ggml.row_bytes(int(ggml_type), in_features)
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != nbytes or blocks.stride(1) != 1 \
            or (blocks.shape[0] > 1 and blocks.stride(0) < nbytes):
        raise InputError(f"blocks must be uint8 (N, {nbytes}) with contiguous rows; got {tuple(blocks.shape)}")
    if order is not None and (order.dtype != torch.int64 or not order.is_contiguous()
                              or order.shape != (blocks.shape[0],)):
        raise InputError("a row order must be a contiguous int64 vector of one entry per row")
    return Lin(LIN_GGML, int(ggml_type), blocks.shape[0], in_features,
               blocks.stride(0) if blocks.shape[0] > 1 else nbytes, blocks.data_ptr(),
               None if order is None else order.data_ptr(), None, None, 0, None)


def bf16_entry(weight: torch.Tensor) -> Lin | None:
    """A bfloat16 (N, K) weight with unit stride along K; None if it is not one."""
    if weight.dtype != torch.bfloat16 or weight.dim() != 2 or not weight.is_cpu or weight.stride(1) != 1:
        return None
    n, k = weight.shape
    return Lin(LIN_BF16, 0, n, k, 2 * (weight.stride(0) if n > 1 else k), weight.data_ptr(), None, None, None, 0, None)


def nf4_entry(packed: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor, blocksize: int,
              in_features: int) -> Lin | None:
    """NF4/FP4 nibbles (N, K/2), float32 absmax (N, K/blocksize) and the 16-value codebook as
    nf4.c reads them; None if the layout is not that one."""
    n, groups = packed.shape[0], in_features // blocksize
    if (packed.dtype != torch.uint8 or packed.shape != (n, in_features // 2) or packed.stride(1) != 1
            or absmax.dtype != torch.float32 or absmax.reshape(-1).numel() != n * groups
            or not absmax.is_contiguous() or codebook.dtype != torch.float32 or codebook.numel() != 16
            or not codebook.is_contiguous() or in_features % blocksize):
        return None
    return Lin(LIN_NF4, 0, n, in_features, packed.stride(0) if n > 1 else in_features // 2, packed.data_ptr(), None,
               absmax.data_ptr(), codebook.data_ptr(), blocksize, None)


def int8_entry(weight: torch.Tensor, scale: torch.Tensor) -> Lin | None:
    """int8 (N, K) rows with unit stride along K and bfloat16 (N,) scales; None if not that layout."""
    if (weight.dtype != torch.int8 or weight.dim() != 2 or weight.stride(1) != 1 or scale.dtype != torch.bfloat16
            or scale.shape != (weight.shape[0],) or not scale.is_contiguous()):
        return None
    n, k = weight.shape
    return Lin(LIN_INT8, 0, n, k, weight.stride(0) if n > 1 else k, weight.data_ptr(), None, None, None, 0,
               scale.data_ptr())


def decode_layers(layers: ctypes.Array, count: int, step: Step, x: torch.Tensor) -> float:
    """Run `count` layers of the table on x (M, C) contiguous (float32 or bfloat16, as `step`
    says), in place; returns the fraction of the threads' time they waited, runnable, for a CPU
    (another process had it): next to none on a quiet machine, 0 where the kernel does not say."""
    found = _lib()
    if found is None:
        raise RuntimeError("the native step library is not available (see available())")
    lib, kernels = found
    rc = lib.mlm_decode_layers(ctypes.byref(kernels), ctypes.addressof(layers), count, ctypes.byref(step),
                               x.data_ptr())
    if rc:
        raise MemoryError("the native decode step could not allocate its scratch memory") if rc == -2 else \
            InputError("a kernel of the native decode step refused its arguments")
    return step.waited_ns / max(1, step.wall_ns * step.nthreads) if step.waited_ns > 0 else 0.0

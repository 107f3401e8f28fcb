"""bitsandbytes' NF4 / FP4 matmul and quantizer in C (nf4.c), with the pure-torch reference.

`mm(x, packed, absmax, codebook, blocksize)` is ``x @ dequantize().T`` for NF4Linear's buffers:
each weight decoded as float32 codebook[q] * absmax (exactly `dequantize()`'s value), products
summed in float32, the result in x's dtype. It is batch-invariant (row m of the output does not
depend on the other rows, the thread count or how N is sliced). Eager calls go through ctypes;
under torch.compile the same call is the opaque op ``mistral_lm::nf4_mm``.

`quantize(weight, codebook, blocksize)` returns the codes and absmax that
`functional.quantize_4bit_codebook` picks, bit for bit, about 20x faster.

Both return None / are unavailable where the library cannot be built (`available()`); callers
then keep their torch path.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import build

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_P, _I, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded nf4 library with its argument types set, or None."""
    lib = build.library("nf4")
    if lib is None:
        return None
    lib.mlm_nf4_mm.argtypes = [_P, _I, _P, _P, _P, _P, _I, _L, _L, _L, _I, _I]
    lib.mlm_nf4_mm.restype = _I
    lib.mlm_nf4_quantize_from.argtypes = [_P, _I, _L, _L, _I, _P, _P, _P, _P, _I]
    lib.mlm_nf4_quantize_from.restype = _I
    return lib


def available() -> bool:
    return library() is not None


def _mm_native(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor,
               blocksize: int) -> torch.Tensor:
    work = x if x.dtype in _DTYPES else x.float()
    work = work.contiguous()
    m, k = work.shape
    n = packed.shape[0]
    out = torch.empty(m, n, dtype=work.dtype)
    code = _DTYPES[work.dtype]
    status = library().mlm_nf4_mm(work.data_ptr(), code, packed.data_ptr(), absmax.data_ptr(), codebook.data_ptr(),
                                  out.data_ptr(), code, m, n, k, blocksize, torch.get_num_threads())
    if status:
        raise MemoryError(f"nf4 kernel: no scratch memory for a ({m}, {k}) input")
    return out if out.dtype == x.dtype else out.to(x.dtype)


@torch.library.custom_op("mistral_lm::nf4_mm", mutates_args=())
def nf4_mm(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor,
           blocksize: int) -> torch.Tensor:
    """`mm` as an op torch.compile keeps whole (inductor cannot trace into ctypes)."""
    return _mm_native(x, packed, absmax, codebook, blocksize)


@nf4_mm.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor,
      blocksize: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], packed.shape[0])


def mm(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor,
       blocksize: int) -> torch.Tensor:
    """(M, N) = x (M, K) @ W.T, W (N, K) stored as `packed` (N, K/2) uint8 (even k in the high
    nibble) and `absmax` (N, K/blocksize) float32, all contiguous CPU tensors; `codebook` (16,)
    float32. Needs `available()`; blocksize a multiple of 32 dividing K."""
    if torch.compiler.is_compiling():
        return nf4_mm(x, packed, absmax, codebook, blocksize)
    return _mm_native(x, packed, absmax, codebook, blocksize)


def mm_reference(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor,
                 blocksize: int) -> torch.Tensor:
    """What `mm` computes, in plain torch and float64 (the tests' yardstick)."""
    codes = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1).long()  # (N, K)
    w = (codebook[codes].reshape(packed.shape[0], -1, blocksize) * absmax[..., None]).reshape(codes.shape)
    return (x.double() @ w.double().T).to(x.dtype)


@functools.cache
def _bucketing(codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mid-points of the sorted codebook, code of each sorted position), as quantize_4bit_codebook."""
    values, order = codebook.float().sort(stable=True)
    return ((values[1:] + values[:-1]) / 2).contiguous(), order.to(torch.uint8).contiguous()


def quantize(weight: torch.Tensor, codebook: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(packed (N, K/2) uint8, absmax (N, K/blocksize) float32) of a CPU weight, equal to
    ``pack_nibbles`` of `quantize_4bit_codebook`'s codes and its absmax; None without the library,
    off the CPU, or where no buffer for the widened rows of a 16-bit weight could be had. float32,
    bfloat16 and float16 weights are read as they are (no float32 copy of the matrix)."""
    lib = library()
    if lib is None or weight.device.type != "cpu" or weight.dim() != 2:
        return None
    w = weight.detach()
    w = (w if w.dtype in build.DTYPE_CODES else w.float()).contiguous()  # 16-bit rows are widened in C
    n, k = w.shape
    mids, order = _bucketing(codebook)
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    absmax = torch.empty(n, k // blocksize, dtype=torch.float32)
    if lib.mlm_nf4_quantize_from(w.data_ptr(), build.DTYPE_CODES[w.dtype], n, k, blocksize, mids.data_ptr(),
                                 order.data_ptr(), packed.data_ptr(), absmax.data_ptr(), torch.get_num_threads()):
        return None  # no buffer for the widened rows: the torch definition decides
    return packed, absmax

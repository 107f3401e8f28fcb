"""Linear layers computed directly on llama.cpp's GGUF quantized blocks (ggml.c), as llama.cpp does.

Numerics. Activations are quantized like llama.cpp's q8_0/q8_1, per 32 consecutive values of a row:

    d = amax / 127 (float32),   q = round-half-even(x / d) in [-127, 127],   d == 0 -> q = 0

(one rounding everywhere: `_mm256_cvtps_epi32` under the default MXCSR, `nearbyintf`, `torch.round`,
so every path produces the same codes). Weight 32-blocks are read as unsigned codes u with an
offset and scales, and multiplied with q in exact integer arithmetic:

    Q4_0  w = d (u - 8)                dot = d dx (sum u q - 8 sum q)
    Q4_1  w = d u + m                  dot = d dx sum u q + m dx sum q
    Q8_0  w = d (u - 128), u = q + 128 dot = d dx sum (u - 128) q   (VNNI: unsigned x signed + offset)
    Q4_K  w = d sc_j u - dmin m_j      dot = d sc_j dx sum u q - dmin m_j dx sum q
          (256-superblocks of eight 32-sub-blocks j with 6-bit sc_j, m_j)
    Q6_K  w = d sc_k (u - 32)          dot = d dx (sc_0 I_0 + sc_1 I_1),  I_k = sum_k (u - 32) q
          (16-element halves k with int8 sc_k; u has 6 bits; the combination is an exact int32)

Each block's integer dot product I (offset corrections folded in with the int32 code sums stored in
the activation block) is exact, converted to float exactly (|I| < 2^24) and accumulated per (m, n)
into one float32 accumulator, block after block: ``acc = fma(fl(cw * dx), I, acc)``. The min term
(Q4_1, Q4_K) has its own accumulator per (m, n), ``accm = fma(mw, ds, accm)`` with
``ds = fl(dx * sum of the block's 32 codes)`` (stored in the activation block), added last:
``out = acc + accm``. The AVX-512 VNNI, AVX2 and scalar paths do exactly these operations, so all
three give bit-identical results; and since the sequence per (m, n) does not depend on the tile, M,
the slice of N or the thread count, neither does the result (batch invariance: a 1-row decode step
equals that row of a prefill, bit for bit). The SIMD paths unpack weight panels (16 or 8 rows x 16
blocks) into a lane-per-row layout once per M chunk, so one vpdpbusd yields 16 rows' partial dots.

`reference_linear` is the definition in pure torch: the same activation codes and scales, the
integer dot products exact (float64 holds them exactly), the scaling in float64. The kernel
differs from it only by float32 rounding of the per-block products and sums.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import numpy as np
import torch

from ..checkpoints.gguf_fields import f16_field, q4_k_scale_codes
from ..checkpoints.gguf_spec import GGML_QUANT_SIZES, GGMLQuantizationType
from ..errors import CheckpointError, InputError
from . import build

Q = GGMLQuantizationType
SUPPORTED: frozenset[int] = frozenset(int(t) for t in (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q6_K))
XBLOCK_BYTES = 64  # one quantized activation block: 32 int8 codes, int32 sums of all and of the first 16, float32 d and d*sum, padding
_SIZES = {t: GGML_QUANT_SIZES[Q(t)] for t in SUPPORTED}  # type -> (weights per block, bytes per block)
# A flag on the type: the blocks are in the tiled layout (`tile`), not the file's rows.
TILED = 0x100
TILEABLE: frozenset[int] = frozenset(int(t) for t in (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q6_K))
TILE_ROWS = 16


def _t6_position(v: int) -> int:
    """Where a Q6_K superblock's 4-byte column v (ql 0-31, qh 32-47, scales 48-51) lies in its
    tiled form, in 64-byte vectors: ggml.c's `t6pos`, the order a decode first reads them."""
    if v >= 48:
        return v - 48
    if v >= 32:
        return 4 + 24 * ((v - 32) >> 3) + 2 * ((v - 32) & 7) + 1
    return 4 + 24 * (v >> 4) + (2 * (v & 15) if (v & 15) < 8 else 16 + (v & 7))


_T6_POSITIONS = torch.tensor([_t6_position(v) for v in range(52)])  # each column's position
_T6_ORDER = torch.argsort(_T6_POSITIONS)  # the column at each position


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = build.library("ggml")
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.mlm_ggml_quantize.argtypes = [ptr, i64, i64, i64, ptr, ctypes.c_int]
    lib.mlm_ggml_quantize.restype = None
    lib.mlm_ggml_matmul.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, i64, ptr, i64, ctypes.c_int]
    lib.mlm_ggml_matmul.restype = ctypes.c_int
    lib.mlm_ggml_linear.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, ptr, i64, i64, ptr, i64, ctypes.c_int]
    lib.mlm_ggml_linear.restype = ctypes.c_int
    lib.mlm_ggml_xblock_bytes.restype = ctypes.c_int
    lib.mlm_ggml_row_loads.argtypes = [ctypes.c_int]
    lib.mlm_ggml_row_loads.restype = ctypes.c_int
    lib.mlm_ggml_amx.argtypes = [ctypes.c_int]
    lib.mlm_ggml_amx.restype = ctypes.c_int
    lib.mlm_ggml_amx_panels.argtypes = [ctypes.c_int]
    lib.mlm_ggml_amx_panels.restype = ctypes.c_int
    lib.mlm_ggml_chunk_bytes.argtypes = [i64]
    lib.mlm_ggml_chunk_bytes.restype = i64
    lib.mlm_ggml_scratch_limit.argtypes = [i64]
    lib.mlm_ggml_scratch_limit.restype = i64
    lib.mlm_ggml_dequantize.argtypes = [ctypes.c_int, ptr, i64, ptr, i64, i64, ptr, ctypes.c_int]
    lib.mlm_ggml_dequantize.restype = ctypes.c_int
    lib.mlm_ggml_tile.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, ctypes.c_int]
    lib.mlm_ggml_tile.restype = ctypes.c_int
    if lib.mlm_ggml_xblock_bytes() != XBLOCK_BYTES:
        raise RuntimeError("ggml.c and ggml.py disagree on the activation block size")
    return lib


def available() -> bool:
    """Whether the C library is built and loaded (else `linear` runs `reference_linear`)."""
    return _lib() is not None


def _name(ggml_type: int) -> str:
    try:
        return Q(ggml_type & ~TILED).name + (" (tiled)" if ggml_type & TILED else "")
    except ValueError:
        return f"type {ggml_type}"


def row_bytes(ggml_type: int, in_features: int) -> int:
    """Bytes of one weight row of `in_features` values in blocks of `ggml_type` (tiled or not)."""
    if ggml_type & TILED and ggml_type & ~TILED in TILEABLE:
        ggml_type &= ~TILED
    if ggml_type not in SUPPORTED:
        raise CheckpointError(f"no ggml kernel for {_name(ggml_type)}; supported: "
                              f"{', '.join(sorted(_name(t) for t in SUPPORTED))}")
    block, size = _SIZES[ggml_type]
    if in_features <= 0 or in_features % block:
        raise CheckpointError(f"{_name(ggml_type)} rows hold whole blocks of {block} values; "
                              f"in_features={in_features} is not a positive multiple of {block}")
    return in_features // block * size


# ------------------------------------------------------------------ activations
def _check_activations(x: torch.Tensor) -> None:
    if x.dtype != torch.float32 or x.dim() != 2 or x.device.type != "cpu":
        raise InputError(f"activations must be a float32 (M, K) CPU tensor; got {x.dtype} {tuple(x.shape)} "
                         f"on {x.device}")
    if x.shape[1] % 32 or (x.shape[0] > 1 and x.stride(1) != 1) or (x.shape[1] > 1 and x.stride(1) != 1):
        raise InputError(f"activations need K % 32 == 0 and contiguous rows; got shape {tuple(x.shape)}, "
                         f"strides {x.stride()}")


def _quantize_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (M, K/32, 32), scales float32 (M, K/32)): the definition the C code matches."""
    xb = x.reshape(x.shape[0], -1, 32)
    d = xb.abs().amax(-1) / 127.0
    q = torch.round(xb / d.unsqueeze(-1)).nan_to_num_(0.0)  # d == 0: 0/0 -> nan -> code 0
    return q.to(torch.int8), d


def _pack(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Codes and scales -> the C activation blocks, uint8 (M, K/32 * 64)."""
    m, nb = d.shape
    sx = q.sum(-1, dtype=torch.int32)
    sxl = q[..., :16].sum(-1, dtype=torch.int32)
    out = torch.zeros(m, nb, XBLOCK_BYTES, dtype=torch.uint8)
    out[..., 0:32] = q.view(torch.uint8)
    out[..., 32:36] = sx.contiguous().view(torch.uint8).view(m, nb, 4)
    out[..., 36:40] = sxl.contiguous().view(torch.uint8).view(m, nb, 4)
    out[..., 40:44] = d.contiguous().view(torch.uint8).view(m, nb, 4)
    ds = d * sx.float()  # float32: one rounding, as in C
    out[..., 44:48] = ds.contiguous().view(torch.uint8).view(m, nb, 4)
    return out.view(m, nb * XBLOCK_BYTES)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """float32 (M, K), K % 32 == 0 -> uint8 (M, K/32 * 64) activation blocks (opaque to callers)."""
    _check_activations(x)
    m, k = x.shape
    lib = _lib()
    if lib is None:
        return _pack(*_quantize_torch(x))
    out = torch.empty(m, k // 32 * XBLOCK_BYTES, dtype=torch.uint8)
    lib.mlm_ggml_quantize(x.data_ptr(), m, k, x.stride(0) if m > 1 else k, out.data_ptr(), torch.get_num_threads())
    return out


# ------------------------------------------------------------------ kernel
def check_tiled(blocks: torch.Tensor, ggml_type: int) -> None:
    """Tiled blocks (`ggml_type` with TILED) must be whole contiguous 16-row groups of a tileable
    type: raises CheckpointError naming what is wrong."""
    if ggml_type & TILED and (ggml_type & ~TILED not in TILEABLE or blocks.dim() != 2
                              or blocks.shape[0] % TILE_ROWS or not blocks.is_contiguous()):
        raise CheckpointError(f"tiled {_name(ggml_type)} weights must be a whole contiguous tensor of "
                              f"{TILE_ROWS}-row groups of Q4_0, Q4_1, Q8_0 or Q6_K; got shape {tuple(blocks.shape)}, "
                              f"strides {blocks.stride()}")


def _check_blocks(blocks: torch.Tensor, ggml_type: int, in_features: int) -> int:
    nbytes = row_bytes(ggml_type, in_features)
    check_tiled(blocks, ggml_type)
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.device.type != "cpu":
        raise CheckpointError(f"{_name(ggml_type)} blocks must be a uint8 (N, bytes) CPU tensor; got "
                              f"{blocks.dtype} {tuple(blocks.shape)} on {blocks.device}")
    if blocks.shape[1] != nbytes or (nbytes > 1 and blocks.stride(1) != 1) or (
            blocks.shape[0] > 1 and blocks.stride(0) < nbytes):
        raise CheckpointError(f"{_name(ggml_type)} weights with in_features={in_features} need (N, {nbytes}) "
                              f"blocks with contiguous rows; got shape {tuple(blocks.shape)}, strides {blocks.stride()}")
    return nbytes


def matmul(xq: torch.Tensor, blocks: torch.Tensor, ggml_type: int, in_features: int,
           out: torch.Tensor) -> torch.Tensor:
    """out[m, n] = activation row m . weight row n; writes float32 `out` (M, N) and returns it.

    `blocks` may be a row slice of a bigger tensor (row stride >= row bytes) and `out` a column
    slice of a wider buffer (row stride >= N); each needs unit stride along its rows.
    """
    nbytes = _check_blocks(blocks, ggml_type, in_features)
    m, n = out.shape if out.dim() == 2 else (-1, -1)
    xbytes = in_features // 32 * XBLOCK_BYTES
    if xq.dtype != torch.uint8 or tuple(xq.shape) != (m, xbytes) or (m > 1 and xq.stride(0) != xbytes) or (
            xbytes > 1 and xq.stride(1) != 1):
        raise InputError(f"quantized activations must be contiguous uint8 (M, {xbytes}) from "
                         f"quantize_activations; got {xq.dtype} {tuple(xq.shape)} for out {tuple(out.shape)}")
    if out.dtype != torch.float32 or n != blocks.shape[0] or (n > 1 and out.stride(1) != 1) or (
            m > 1 and out.stride(0) < n):
        raise InputError(f"out must be float32 (M, N) = ({m}, {blocks.shape[0]}) with unit column stride; "
                         f"got {out.dtype} {tuple(out.shape)} strides {out.stride()}")
    lib = _lib()
    if lib is None:
        raise RuntimeError("the ggml C library is not available (see available())")
    if m and n:
        rc = lib.mlm_ggml_matmul(ggml_type, xq.data_ptr(), m, in_features, blocks.data_ptr(), n,
                                 blocks.stride(0) if n > 1 else nbytes, out.data_ptr(), out.stride(0) if m > 1 else n,
                                 torch.get_num_threads())
        if rc:
            _raise_for(rc, ggml_type, in_features)
    return out


def _raise_for(rc: int, ggml_type: int, in_features: int) -> None:
    """A kernel's error code as the error a caller can act on; its output is incomplete."""
    if rc == -2:
        raise MemoryError(f"the ggml kernel could not allocate its per-thread scratch for {_name(ggml_type)} "
                          f"with in_features={in_features}")
    raise CheckpointError(f"ggml kernel refused {_name(ggml_type)} with in_features={in_features}")


_ROW_BYTES: dict[tuple[int, int], int] = {}
_SCRATCH = threading.local()  # per thread: the activation blocks of the last call, reused


def _linear(x: torch.Tensor, blocks: torch.Tensor, ggml_type: int, bias: torch.Tensor | None) -> torch.Tensor:
    # A decode step calls this a few hundred times with M = 1: every tensor attribute read costs,
    # so each is read once (shape, stride() tuples) and the full checks run only when a fast one fails.
    lib = _lib()
    if lib is None:
        return reference_linear(x, blocks, ggml_type, bias)
    shape = x.shape
    k = shape[-1]
    x2 = x if len(shape) == 2 else x.reshape(-1, k)
    xst = x2.stride()
    if x2.dtype is not torch.float32 or xst[1] != 1:
        x2 = x2.float().contiguous()
        xst = x2.stride()
    if k % 32 or not x2.is_cpu:
        _check_activations(x2)
    nbytes = _ROW_BYTES.get((ggml_type, k))
    if nbytes is None:
        nbytes = _ROW_BYTES[(ggml_type, k)] = row_bytes(ggml_type, k)  # raises for bad types and K
    bshape, bst = blocks.shape, blocks.stride()
    if (blocks.dtype is not torch.uint8 or len(bshape) != 2 or bshape[1] != nbytes or bst[1] != 1
            or bst[0] < nbytes or not blocks.is_cpu or ggml_type & TILED and (bst[0] != nbytes or bshape[0] % TILE_ROWS)):
        _check_blocks(blocks, ggml_type, k)
    m, n = x2.shape[0], bshape[0]
    out = torch.empty(m, n, dtype=torch.float32)
    if m and n:  # the activation blocks are scratch: one buffer per thread, one call into C
        need = m * (k >> 5) * XBLOCK_BYTES
        scratch = getattr(_SCRATCH, "xq", None)
        if scratch is None or scratch[1] < need:
            t = torch.empty(need, dtype=torch.uint8)
            scratch = _SCRATCH.xq = (t, need, t.data_ptr())
        rc = lib.mlm_ggml_linear(ggml_type, x2.data_ptr(), m, k, xst[0] if m > 1 else k, scratch[2],
                                 blocks.data_ptr(), n, bst[0] if n > 1 else nbytes, out.data_ptr(), n,
                                 torch.get_num_threads())
        if rc:
            _raise_for(rc, ggml_type, k)
    if bias is not None:
        out += bias
    return out if len(shape) == 2 else out.view(*shape[:-1], n)


@torch.library.custom_op("mistral_lm::ggml_linear", mutates_args=())
def _ggml_linear_op(x: torch.Tensor, blocks: torch.Tensor, ggml_type: int,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel behind an opaque op, so torch.compile calls it instead of tracing ctypes."""
    return _linear(x, blocks, ggml_type, bias)


@_ggml_linear_op.register_fake
def _(x: torch.Tensor, blocks: torch.Tensor, ggml_type: int, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], blocks.shape[0]), dtype=torch.float32)


def linear(x: torch.Tensor, blocks: torch.Tensor, ggml_type: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float (..., K) @ dequantized(blocks).T (+ bias) -> float32 (..., N), computed on the blocks.

    >>> w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    >>> import gguf
    >>> blocks = torch.from_numpy(gguf.quants.quantize(w, Q.Q8_0))
    >>> linear(torch.ones(2, 64), blocks, Q.Q8_0).shape
    torch.Size([2, 8])
    """
    if torch.compiler.is_compiling():
        return _ggml_linear_op(x, blocks, ggml_type, bias)
    return _linear(x, blocks, ggml_type, bias)


# ------------------------------------------------------------------ reference
def _f16(raw: torch.Tensor) -> torch.Tensor:
    """(..., 2) little-endian float16 bytes -> (...) float64."""
    return f16_field(raw).double()


def _decode(blocks: torch.Tensor, ggml_type: int, in_features: int) -> tuple[torch.Tensor, ...]:
    """Weight blocks -> (u, off, scl, cw, mw) per 32-block b, the terms of the integer dot product:
    w = cw * scl * (u - off) + mw with u (N, K/32, 32) unsigned codes, scl (N, K/32, 32) integer
    scales (ones but for Q6_K), cw and mw (N, K/32) float64 (mw zero for types without a min)."""
    _check_blocks(blocks, ggml_type, in_features)
    if ggml_type & TILED:
        blocks, ggml_type = untile(blocks, ggml_type, in_features), ggml_type & ~TILED
    n, nb = blocks.shape[0], in_features // 32
    b = blocks.contiguous().view(n, -1, _SIZES[ggml_type][1])
    ones = torch.ones(n, nb, 32, dtype=torch.int64)
    zeros = torch.zeros(n, nb, dtype=torch.float64)
    if ggml_type in (Q.Q4_0, Q.Q4_1):
        qs = b[..., 2:18] if ggml_type == Q.Q4_0 else b[..., 4:20]
        u = torch.cat([qs & 15, qs >> 4], -1).long()
        mw = _f16(b[..., 2:4]) if ggml_type == Q.Q4_1 else zeros
        return u, 8 if ggml_type == Q.Q4_0 else 0, ones, _f16(b[..., 0:2]), mw
    if ggml_type == Q.Q8_0:
        return (b[..., 2:34] ^ 128).long(), 128, ones, _f16(b[..., 0:2]), zeros
    if ggml_type == Q.Q4_K:
        qs = b[..., 16:144].reshape(n, -1, 4, 1, 32)
        u = torch.cat([qs & 15, qs >> 4], 3).reshape(n, nb, 32).long()
        sc, mn = q4_k_scale_codes(b)
        cw = _f16(b[..., 0:2]).unsqueeze(-1) * sc
        mw = -(_f16(b[..., 2:4]).unsqueeze(-1) * mn)
        return u, 0, ones, cw.reshape(n, nb), mw.reshape(n, nb)
    # Q6_K: per 128-half h, ql[64 h:64 h + 64] low nibbles then high nibbles, qh 2-bit planes
    ql = b[..., 0:128].reshape(n, -1, 2, 1, 64)
    lo = torch.cat([ql & 15, ql >> 4], 3).reshape(n, -1, 2, 4, 32)
    qh = b[..., 128:192].reshape(n, -1, 2, 1, 32)
    hi = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)) & 3
    u = (lo | (hi << 4)).reshape(n, nb, 32).long()
    scl = b[..., 192:208].view(torch.int8).long().reshape(n, nb, 2, 1).expand(n, nb, 2, 16).reshape(n, nb, 32)
    cw = _f16(b[..., 208:210]).unsqueeze(-1).expand(n, -1, 8).reshape(n, nb)
    return u, 32, scl, cw, zeros


def dequantize(blocks: torch.Tensor, ggml_type: int, in_features: int,
               rows: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Weight blocks -> float32 (N, K), the values the kernels multiply with; with `rows` (int64),
    only those rows, in that order (an embedding lookup). In C where the library is built (a
    lookup per decode step: the torch definition took ~0.25 ms), else `reference_dequantize`.
    `out`: a contiguous (N, K) tensor to write into (a loader's slice of the result), float32,
    or bfloat16 / float16 to get those values rounded as `copy_` from float32 rounds them."""
    nbytes = _check_blocks(blocks, ggml_type, in_features)
    lib = _lib()
    if lib is None or blocks.stride(-1) != 1:
        if ggml_type & TILED:
            blocks, ggml_type = untile(blocks, ggml_type, in_features), ggml_type & ~TILED
        decoded = reference_dequantize(blocks if rows is None else blocks.index_select(0, rows), ggml_type, in_features)
        return decoded if out is None else out.copy_(decoded)
    if rows is not None:
        rows = rows.reshape(-1).to(torch.int64).contiguous()
        if rows.numel():
            lo, hi = torch.aminmax(rows)  # one reduction: a decode step's lookup pays it every token
            if int(lo) < 0 or int(hi) >= blocks.shape[0]:
                raise InputError(f"row index out of range for {blocks.shape[0]} rows")
    n = blocks.shape[0] if rows is None else rows.numel()
    if out is None:
        out = torch.empty(n, in_features, dtype=torch.float32)
    elif out.dtype not in build.DTYPE_CODES or out.shape != (n, in_features) or not out.is_contiguous():
        raise InputError(f"out must be a contiguous float32, bfloat16 or float16 ({n}, {in_features}) tensor; "
                         f"got {out.dtype} {tuple(out.shape)}")
    if n:
        rc = lib.mlm_ggml_dequantize(ggml_type, blocks.data_ptr(), blocks.stride(0) if blocks.shape[0] > 1 else nbytes,
                                     None if rows is None else rows.data_ptr(), n, in_features, out.data_ptr(),
                                     build.DTYPE_CODES[out.dtype])
        if rc:
            raise CheckpointError(f"cannot decode {_name(ggml_type)} rows of {in_features} values")
    return out


def reference_dequantize(blocks: torch.Tensor, ggml_type: int, in_features: int) -> torch.Tensor:
    """The definition in torch: w = (cw * scale) * (u - offset) (+ mw for Q4_1 and Q4_K) in
    float64 (exact), rounded to float32. The grouping and the missing zero min are gguf's: a zero
    code under a negative scale stays -0."""
    u, off, scl, cw, mw = _decode(blocks, ggml_type, in_features)
    w = (cw.unsqueeze(-1) * scl.double()) * (u - off).double()
    if int(ggml_type) in (Q.Q4_1, Q.Q4_K):
        w = w + mw.unsqueeze(-1)
    return w.reshape(blocks.shape[0], in_features).float()


# ------------------------------------------------------------------ the tiled layout
def _tile_fields(ggml_type: int) -> tuple[int, int, int]:
    """(bytes before the codes, code bytes, scale fields) of one block of a tileable type."""
    if ggml_type == Q.Q8_0:
        return 2, 32, 1
    return (4, 16, 2) if ggml_type == Q.Q4_1 else (2, 16, 1)


def tile(blocks: torch.Tensor, ggml_type: int, in_features: int) -> torch.Tensor:
    """The file's rows (N, row bytes) -> the tiled layout ggml_tile.h reads, the same shape and
    bytes: per 16 rows, block after block, the codes as 4-byte groups of the 16 rows side by
    side (what one vpdpbusd multiplies), then the blocks' float16 scales, then (Q4_1) their mins;
    Q6_K superblock after superblock, each its first 208 bytes as the 16 rows' 4-byte columns
    side by side (in the order a decode reads them: `_t6_position`), then the rows' float16 d.
    A decode step then reads a block of 16 rows with whole-vector loads from one stream instead
    of 16 row loads, gathers for the scales and a lane reduction. Q4_0, Q4_1, Q8_0 and Q6_K with
    N % 16 == 0; a fresh tensor (C's copy where built, else `reference_tile`)."""
    _check_tileable(blocks, ggml_type, in_features)
    lib = _lib()
    if lib is None:
        return reference_tile(blocks, ggml_type, in_features)
    src = blocks.contiguous()
    out = torch.empty_like(src)
    if lib.mlm_ggml_tile(int(ggml_type), src.data_ptr(), src.shape[0], in_features, out.data_ptr(),
                         torch.get_num_threads()):
        raise CheckpointError(f"cannot tile {_name(ggml_type)} rows of {in_features} values")
    return out


def _check_tileable(blocks: torch.Tensor, ggml_type: int, in_features: int) -> None:
    _check_blocks(blocks, ggml_type, in_features)
    if ggml_type not in TILEABLE or blocks.shape[0] % TILE_ROWS:
        raise CheckpointError(f"only {sorted(_name(t) for t in TILEABLE)} weights with a multiple of {TILE_ROWS} rows "
                              f"tile; got {_name(ggml_type)} with {blocks.shape[0]} rows")


def reference_tile(blocks: torch.Tensor, ggml_type: int, in_features: int) -> torch.Tensor:
    """`tile` in torch: the definition its C copy is tested against."""
    _check_tileable(blocks, ggml_type, in_features)
    nbytes = row_bytes(ggml_type, in_features)
    n, nb, g = blocks.shape[0] // TILE_ROWS, in_features // 32, TILE_ROWS
    if ggml_type == Q.Q6_K:
        b = blocks.contiguous().view(n, g, nb // 8, 210)
        columns = b[..., :208].reshape(n, g, nb // 8, 52, 4)[:, :, :, _T6_ORDER].permute(0, 2, 3, 1, 4)
        columns = columns.reshape(n, nb // 8, -1)
        return torch.cat([columns, b[..., 208:].permute(0, 2, 1, 3).reshape(n, nb // 8, -1)], 2).view(n * g, nbytes)
    head, cb, fields = _tile_fields(ggml_type)
    b = blocks.contiguous().view(n, g, nb, head + cb)
    codes = b[..., head:].reshape(n, g, nb, cb // 4, 4).permute(0, 2, 3, 1, 4).reshape(n, -1)
    scales = [b[..., 2 * f:2 * f + 2].permute(0, 2, 1, 3).reshape(n, -1) for f in range(fields)]
    return torch.cat([codes, *scales], 1).view(n * g, nbytes)


def untile(tiled: torch.Tensor, ggml_type: int, in_features: int) -> torch.Tensor:
    """`tile`'s inverse: the file's rows again."""
    ggml_type &= ~TILED
    nbytes = row_bytes(ggml_type, in_features)
    n, nb, g = tiled.shape[0] // TILE_ROWS, in_features // 32, TILE_ROWS
    if ggml_type == Q.Q6_K:
        t = tiled.contiguous().view(n, nb // 8, 16 * 210)
        columns = t[..., :52 * 64].reshape(n, nb // 8, 52, g, 4)[:, :, _T6_POSITIONS].permute(0, 3, 1, 2, 4)
        columns = columns.reshape(n, g, nb // 8, 208)
        d = t[..., 52 * 64:].reshape(n, nb // 8, g, 2).permute(0, 2, 1, 3)
        return torch.cat([columns, d], -1).reshape(n * g, nbytes)
    head, cb, fields = _tile_fields(ggml_type)
    flat = tiled.contiguous().view(n, g * nbytes)
    codes = flat[:, :nb * g * cb].reshape(n, nb, cb // 4, g, 4).permute(0, 3, 1, 2, 4).reshape(n, g, nb, cb)
    parts = [flat[:, nb * g * cb + nb * g * 2 * f:nb * g * cb + nb * g * 2 * (f + 1)].reshape(n, nb, g, 2)
             .permute(0, 2, 1, 3) for f in range(fields)]
    return torch.cat([*parts, codes], -1).reshape(n * g, nbytes)


def _reference(x: torch.Tensor, blocks: torch.Tensor, ggml_type: int, absolute: bool = False) -> torch.Tensor:
    """float64 (M, N) of the kernel's terms summed exactly; with `absolute`, the sum of their
    magnitudes (what a float32 accumulation error is proportional to)."""
    k = x.shape[1]
    q, d = _quantize_torch(x)
    q, d = q.double(), d.double()
    s = q.sum(-1)
    u, off, scl, cw, mw = _decode(blocks, ggml_type, k)
    out = torch.empty(x.shape[0], blocks.shape[0], dtype=torch.float64)
    step = max(1, (1 << 24) // max(1, x.shape[0] * (k // 32)))
    for n0 in range(0, blocks.shape[0], step):
        wi = (scl[n0:n0 + step] * (u[n0:n0 + step] - off)).double()  # exact signed integer weights
        if absolute:  # lane sums are what gets rounded: sum |lane| over the 8 lanes
            lanes = torch.einsum("mbge,nbge->mnbg", q.view(*q.shape[:2], 8, 4), wi.view(*wi.shape[:2], 8, 4))
            dot = lanes.abs().sum(-1)
            term = (cw[n0:n0 + step] * dot * d.unsqueeze(1)).abs() + (mw[n0:n0 + step] * d.unsqueeze(1)
                                                                      * q.abs().sum(-1).unsqueeze(1)).abs()
        else:
            dot = torch.einsum("mbe,nbe->mnb", q, wi)  # exact: integers below 2^53
            term = cw[n0:n0 + step] * dot * d.unsqueeze(1) + mw[n0:n0 + step] * (d * s).unsqueeze(1)
        out[:, n0:n0 + step] = term.sum(-1)
    return out


def reference_linear(x: torch.Tensor, blocks: torch.Tensor, ggml_type: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure torch definition of `linear`: same activation quantization, exact integer dot products,
    float64 scaling, float32 result."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).float().contiguous()
    _check_activations(x2)
    out = _reference(x2, blocks, ggml_type).float()
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], blocks.shape[0])

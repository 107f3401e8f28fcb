"""torch's weight-only int8 / int4 matmul kernels: when they apply, their layouts, their numerics.

These are private aten ops (the ones gpt-fast and torchao call). Their conventions are barely
documented; what follows was established by experiment on torch 2.13 (CPU, AVX-512) and is
pinned by tests/test_quantization.py against the pure definitions in functional.py.

``_weight_int8pack_mm(x (M, K), q int8 (N, K), scale (N,))`` = ``x @ (q * scale[:, None]).T``.
    x and scale must share a dtype. On CPU only bfloat16 is vectorized (float32 / float16 run a
    scalar loop, an order of magnitude slower: bench/RESULTS.md), and with bfloat16 and K % 16 != 0 it reads past each row and
    returns garbage (NaN / 1e23 seen for K = 24, 40, 70), so it is only called when K % 16 == 0.

``_convert_weight_to_int4pack_for_cpu(q int32 (N, K) in 0..15, inner_k_tiles)`` -> uint8 (N, K/2)
    in a blocked layout: blocks of 64 rows (32 on AVX2 builds), k-major inside a block; byte j
    of a block's k-th chunk holds row j in its low nibble and row j + 32 (j + 16) in its high
    nibble. N must be a multiple of 16; `inner_k_tiles` is ignored on CPU.
``_weight_int4pack_mm_for_cpu(x (M, K), packed, group_size, scale_and_zero (K/group_size, N, 2))``
    = ``x @ W.T`` with ``W[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n]``, g = k // group_size:
    the zero point is a float offset added after scaling (around the mid-point 8), not an integer
    subtracted from q. group_size is one of 32, 64, 128, 256; x and scale_and_zero share a dtype;
    only bfloat16 is vectorized, and it computes in float32 and rounds the output to bfloat16.

CUDA has the same pair without the suffix: ``_convert_weight_to_int4pack(uint8 (N, K/2), even k
in the high nibble, inner_k_tiles)`` and ``_weight_int4pack_mm`` with the same (q - 8) * scale +
zero convention, bfloat16 only. That path is written to the same contract but is not exercised
by the CPU test suite.

The kernels are fast for small M but re-expand the weight for every 4 rows of x, so from
INT8_DENSE_MIN_ROWS / INT4_DENSE_MIN_ROWS rows on (prefill) the modules expand the weight once
into the compute dtype and run a plain matmul (on this CPU, bfloat16 AMX) instead.
"""

from __future__ import annotations

import functools

import torch

from ..matvec import native_gemm
from .functional import pack_nibbles, unpack_nibbles

# From this many rows M on, expanding the weight and one dense matmul beat the quantized kernel
# on the CPU (crossovers measured by bench/bench_linear.py; bench/RESULTS.md).
INT8_DENSE_MIN_ROWS = 32
INT4_DENSE_MIN_ROWS = 64
INT4_ROW_ALIGN = 64  # rows are padded to whole 64-row blocks so every CPU block is a full one


def has_kernel(op: str, device: torch.device) -> bool:
    """Whether aten `op` has a kernel registered for `device` (a CPU-only build has no CUDA ones)."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", key)


# ---------------------------------------------------------------------------- int8
def int8_kernel_rows(device: torch.device, in_features: int) -> int:
    """Inputs with fewer rows than this (and bfloat16) go to `_weight_int8pack_mm`; 0: never.
    Only where it is both fast and correct: CPU, K % 16 == 0. Decided once per weight, since a
    per-call check costs as much as a small decode matmul."""
    ok = device.type == "cpu" and in_features % 16 == 0 and has_kernel("_weight_int8pack_mm", device)
    return INT8_DENSE_MIN_ROWS if ok else 0


def int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(M, K) @ (q * scale).T on the packed kernel; x and scale in the same dtype."""
    return torch.ops.aten._weight_int8pack_mm(x, q, scale)


# ---------------------------------------------------------------------------- int4
def int4_layout(device: torch.device) -> str:
    """"cpu" / "cuda": torch's packed layout for that device; "plain": `pack_nibbles` bytes."""
    if device.type == "cpu" and has_kernel("_weight_int4pack_mm_for_cpu", device):
        return "cpu"
    if device.type == "cuda" and has_kernel("_weight_int4pack_mm", device):
        return "cuda"
    return "plain"


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] (N a multiple of INT4_ROW_ALIGN) -> the layout of `q.device`."""
    layout = int4_layout(q.device)
    if layout == "cpu" and _cpu_block_rows() is not None:
        return _pack_cpu(q.to(torch.uint8), _cpu_block_rows())
    if layout == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    if layout == "cuda":
        k_tiles = next(t for t in (8, 4, 2) if q.shape[1] % (16 * t) == 0)
        return torch.ops.aten._convert_weight_to_int4pack(pack_nibbles(q.to(torch.uint8)), k_tiles)
    return pack_nibbles(q.to(torch.uint8))


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scale_and_zero: torch.Tensor) -> torch.Tensor:
    """(M, K) @ W.T for packed codes, W = (q - 8) * scale + zero; x and scale_and_zero share a dtype."""
    if packed.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_and_zero)
    return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scale_and_zero)


def int4_kernel_rows(device: torch.device) -> int:
    """Inputs with fewer rows than this (and bfloat16, the vectorized path) go to the int4
    kernel; 0: never (no packed layout). Every M does when the weight cannot be expanded cheaply."""
    if int4_layout(device) == "plain":
        return 0
    return INT4_DENSE_MIN_ROWS if fast_unpack_available(device) else 2**62


@functools.cache
def _cpu_block_rows() -> int | None:
    """Rows per block of this build's CPU int4 layout (64 AVX-512, 32 AVX2), or None if unknown.

    Learned once per process by packing a random probe and checking which blocked layout
    `_unpack_cpu` reproduces; an unrecognised layout falls back to `_unpack_through_kernel`.
    """
    probe = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    return next((rows for rows in (64, 32) if torch.equal(_unpack_cpu(packed, rows, 128, 64), probe.byte())), None)


def _unpack_cpu(packed: torch.Tensor, rows: int, n: int, k: int) -> torch.Tensor:
    blocks = packed.reshape(n // rows, k, rows // 2)                 # (N/rows, K, rows/2) bytes
    q = torch.cat([blocks & 15, blocks >> 4], dim=-1)                # (N/rows, K, rows)
    return q.transpose(1, 2).reshape(n, k)


def _pack_cpu(q: torch.Tensor, rows: int) -> torch.Tensor:
    """Inverse of `_unpack_cpu`, in three uint8 passes: the aten packer widens to int32 first,
    which made packing a large share of loading a GGUF model natively."""
    n, k = q.shape
    blocks = q.reshape(n // rows, rows, k).transpose(1, 2)           # (N/rows, K, rows)
    half = rows // 2
    return (blocks[..., :half] | (blocks[..., half:] << 4)).contiguous().reshape(n, k // 2)


def fast_unpack_available(device: torch.device) -> bool:
    """Can `unpack_int4` read codes back without running the kernel (prefill's dense path)?"""
    layout = int4_layout(device)
    return layout == "plain" or (layout == "cpu" and _cpu_block_rows() is not None)


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of `pack_int4`: the (N, K) uint8 codes, for the state dict and the dense path."""
    layout = int4_layout(packed.device)
    if layout == "plain":
        return unpack_nibbles(packed)
    if layout == "cpu" and _cpu_block_rows() is not None:
        return _unpack_cpu(packed, _cpu_block_rows(), n, k)
    return _unpack_through_kernel(packed, n, k)


def dequantize_int4_t(packed: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int, rows: int,
                      cols: int, dtype: torch.dtype) -> torch.Tensor:
    """W.T as a (cols, rows) matrix in `dtype`, W = (q - 8) * scale + zero (contiguous from the CPU
    layout): the right operand of `grad @ W`, read as a transposed view (see `int4_dense_weight`)."""
    return _dequantize_int4(packed, scale_and_zero, group_size, rows, cols, dtype, transposed=True)


def dequantize_int4_rows(packed: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int, rows: int,
                         cols: int, dtype: torch.dtype) -> torch.Tensor:
    """W as a (rows, cols) matrix in `dtype` (contiguous from the CPU layout)."""
    return _dequantize_int4(packed, scale_and_zero, group_size, rows, cols, dtype, transposed=False)


def int4_dense_weight(packed: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int, rows: int,
                      cols: int, dtype: torch.dtype) -> torch.Tensor:
    """W (rows, cols) for prefill's `F.linear(x, W)` (through `matvec.dense_linear`), laid out for
    the GEMM this CPU runs in `dtype`.

    With a native GEMM (float32; bfloat16 where oneDNN has it, AVX-512 on) either layout is as
    fast, and W as a transposed view of the k-major expansion is the cheaper one to write (the
    blocks are k-major already; about 12% of an int4 prefill). Without one (bfloat16 on AVX2:
    oneDNN declines and ATen's fallback runs) F.linear's right operand W.T must be a transposed
    view of a row-major W, which a scalar loop would otherwise multiply: 30x for the default
    model's prefill, 150x for a 7B-sized layer (bench/RESULTS.md); dense_linear then multiplies
    it in float32. The products are the same on the first kind of CPU."""
    if not native_gemm(dtype, packed.device):
        return dequantize_int4_rows(packed, scale_and_zero, group_size, rows, cols, dtype)
    return dequantize_int4_t(packed, scale_and_zero, group_size, rows, cols, dtype).T


def _dequantize_int4(packed: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int, rows: int, cols: int,
                     dtype: torch.dtype, transposed: bool) -> torch.Tensor:
    """From the CPU layout this is two passes: nibbles to `dtype`, then one fused multiply-add,
    q * scale + (zero - 8 * scale), written straight into the result in the asked layout,
    instead of unpack + dequantize + cast (+ a transpose)."""
    scale, zero = scale_and_zero.float().unbind(-1)                  # (G, rows) each
    shift = zero - 8 * scale
    block = _cpu_block_rows() if int4_layout(packed.device) == "cpu" else None
    if block is None:
        q = unpack_int4(packed, rows, cols).float().reshape(rows, -1, group_size)
        w = (q * scale.T[..., None] + shift.T[..., None]).reshape(rows, cols)
        return (w.T if transposed else w).to(dtype)
    nb, groups = rows // block, cols // group_size
    b = packed.reshape(nb, cols, block // 2)
    q = torch.cat([b & 15, b >> 4], dim=-1).to(dtype).reshape(nb, groups, group_size, block)

    def per_block(t: torch.Tensor) -> torch.Tensor:                  # (G, rows) -> (nb, G, 1, block)
        return t.to(dtype).reshape(groups, nb, block).permute(1, 0, 2)[:, :, None, :]

    if transposed:  # the blocks are k-major already: no transpose pass
        out = torch.empty(cols, rows, dtype=dtype, device=packed.device)
        view = out.view(groups, group_size, nb, block).permute(2, 0, 1, 3)
    else:
        out = torch.empty(rows, cols, dtype=dtype, device=packed.device)
        view = out.view(nb, block, groups, group_size).permute(0, 2, 3, 1)
    torch.addcmul(per_block(shift), q, per_block(scale), out=view)
    return out


def _unpack_through_kernel(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Read codes back through the kernel itself, whatever its layout: with scale 1 and zero 8,
    W = q exactly (small integers are exact in bfloat16), so eye(K) @ W.T = q.T. Costs a K-row
    matmul, so it serves only saving and device moves."""
    eye = torch.eye(k, dtype=torch.bfloat16, device=packed.device)
    unit = torch.tensor([1.0, 8.0], dtype=torch.bfloat16, device=packed.device).expand(k // 32, n, 2)
    return int4_mm(eye, packed, 32, unit.contiguous()).T.to(torch.uint8)

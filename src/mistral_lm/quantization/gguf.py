"""GGUFLinear: llama.cpp's quantized blocks kept 4-bit, repacked without loss for torch's int4 kernel.

Every supported type is affine in 4-bit codes over 32-element groups along the input, which is
exactly Int4Linear's ``w = (q - 8) * scale + zero`` with group_size 32:

    Q4_0  w = d * (q - 8)                       scale = d           zero = 0
    Q4_1  w = d * q + m                         scale = d           zero = m + 8d
    Q4_K  w = d*sc_j * q - dmin*m_j             scale = d*sc_j      zero = 8*d*sc_j - dmin*m_j
          (256-weight super-blocks of eight 32-weight sub-blocks j with 6-bit sc_j, m_j)
    Q8_0  w = d * q, q int8 in [-128, 127]: with q + 128 = 16h + l, h and l nibbles, two planes
          over the input duplicated as [x, x]: plane h has scale 16d, zero 0 (16d*h - 128d),
          plane l scale d, zero 8d (d*l); their sum is d*q. Same kernel, 1.25 bytes/param.

d, m, dmin are float16 and sc_j, m_j small integers, so with float32 compute every scale and
zero above is exact. With bfloat16 compute (the fast path) each is rounded once to bfloat16,
relative 2^-9 (for a zero-centred block about 1/30 of a quantization step). Q6_K's 16-weight sub-blocks have no
such form (the kernel's smallest group is 32); other types are not supported either:
`GGUFLinear.supports` lets a loader dequantize those instead; `install_gguf_linears` is that
loader step.

Loading: `kernel_state` writes the kernel's layout straight from the blocks (one nibble
interleave and one transposing copy per slice of rows; `reference_kernel_state`, the decoders
plus Int4Linear's packing, is its definition). The result does not depend on anything but the
file and the CPU's layout, so `KernelCache` keeps it on disk beside the .gguf: a later load maps
that file (no repacking, no copy; pages are read on first use and shared with the page cache).
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import struct
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..checkpoints.gguf import DECODE_ROWS, GGUFQuantizedTensor
from ..checkpoints.gguf_fields import f16_field as _f16
from ..checkpoints.gguf_fields import q4_k_scale_codes
from ..checkpoints.gguf_spec import GGML_QUANT_SIZES, GGMLQuantizationType
from ..errors import CheckpointError
from .kernels import INT4_ROW_ALIGN, _cpu_block_rows, int4_layout
from .modules import Int4Linear, QuantizedLinear

Q = GGMLQuantizationType


class QuantizedTensor(Protocol):
    """What `from_quantized` reads: raw blocks along the input dimension of each output row."""

    ggml_type: int
    shape: tuple[int, int]   # (out_features, in_features)
    data: np.ndarray         # uint8 (out_features, bytes_per_row)


def _nibbles_32(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes -> 32 codes: element j is the low nibble of byte j, element j + 16 the high one."""
    return torch.cat([qs & 15, qs >> 4], dim=-1)


def _q4_0(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = _f16(b[..., 0:2])
    return _nibbles_32(b[..., 2:18]), d, torch.zeros_like(d)


def _q4_1(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    return _nibbles_32(b[..., 4:20]), d, m + 8 * d


def _q4_k(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, blocks = b.shape[:2]
    # 128 bytes in 4 chunks of 32: low nibbles are sub-block 2i, high nibbles sub-block 2i + 1.
    qs = b[..., 16:144].reshape(n, blocks, 4, 1, 32)
    q = torch.cat([qs & 15, qs >> 4], dim=3).reshape(n, blocks, 8, 32)
    return (q, *_q4_k_scales(b))


def _q4_k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, blocks, 8) scale and zero of Q4_K's eight 32-weight sub-blocks per super-block."""
    d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
    sc, mn = q4_k_scale_codes(b)
    scale = d * sc
    return scale, 8 * scale - dmin * mn


def _q8_0(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = _f16(b[..., 0:2])
    u = b[..., 2:34] ^ 128  # int8 q as a byte, XOR the sign bit: u = q + 128 in [0, 255]
    return torch.stack([u >> 4, u & 15]), torch.stack([16 * d, d]), torch.stack([torch.zeros_like(d), 8 * d])


# A decoder maps blocks (N, blocks, bytes) to codes, scale and zero in Int4Linear's convention,
# 32 codes per scale; Q8_0's carry a leading plane dimension of 2.
_Decoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
_DECODERS: dict[Q, _Decoder] = {Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q4_K: _q4_k, Q.Q8_0: _q8_0}


class GGUFLinear(Int4Linear):
    """A Linear computing directly on llama.cpp blocks (see the module docstring for the maths).

    >>> import numpy as np
    >>> from types import SimpleNamespace
    >>> w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    >>> import gguf
    >>> qt = SimpleNamespace(ggml_type=Q.Q4_1, shape=(64, 64), data=gguf.quants.quantize(w, Q.Q4_1))
    >>> GGUFLinear.from_quantized(qt)(torch.ones(1, 64)).shape
    torch.Size([1, 64])
    """

    def __init__(self, in_features: int, out_features: int, ggml_type: int, bias: bool = False,
                 compute_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:
        if not self.supports(ggml_type):
            raise _unsupported(ggml_type)
        self._planes = 2 if ggml_type == Q.Q8_0 else 1  # read by Int4Linear.__init__ to size buffers
        super().__init__(in_features, out_features, bias, 32, compute_dtype, device)
        self.ggml_type = Q(ggml_type)

    @staticmethod
    def supports(ggml_type: int) -> bool:
        """Whether blocks of this type can be kept quantized (else a loader should dequantize)."""
        return ggml_type in {int(t) for t in _DECODERS}

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: torch.Tensor | None = None,
                       compute_dtype: torch.dtype = torch.bfloat16) -> GGUFLinear:
        """Build from raw blocks; `qt.shape` is (out_features, in_features)."""
        ggml_type, out_features, in_features = _check_blocks(qt)
        if _block_rows() is not None:
            packed, scale_and_zero = kernel_state(qt, compute_dtype)
        else:
            packed, scale_and_zero = reference_kernel_state(qt, compute_dtype)
        module = cls.from_kernel_state(ggml_type, in_features, out_features, packed, scale_and_zero, compute_dtype)
        if bias is not None:
            module.bias = torch.nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        return module

    @classmethod
    def from_kernel_state(cls, ggml_type: int, in_features: int, out_features: int, packed: torch.Tensor,
                          scale_and_zero: torch.Tensor, compute_dtype: torch.dtype = torch.bfloat16) -> GGUFLinear:
        """Wrap tensors already in the kernel's layout (`kernel_state`'s, or the cache's mapped
        copies) without touching them. Skips Int4Linear's placeholder storage: building that on
        meta runs meta kernels whose first use imports sympy and dynamo (seconds per process)."""
        if not cls.supports(ggml_type):
            raise _unsupported(ggml_type)
        want = _kernel_shapes(ggml_type, out_features, in_features)
        if (tuple(packed.shape), tuple(scale_and_zero.shape)) != want or packed.dtype != torch.uint8:
            raise CheckpointError(f"kernel tensors of shapes {tuple(packed.shape)}, {tuple(scale_and_zero.shape)} "
                                  f"do not fit a {_name(ggml_type)} ({out_features}, {in_features}) weight: "
                                  f"expected {want[0]}, {want[1]}")
        module = cls.__new__(cls)
        QuantizedLinear.__init__(module, in_features, out_features, False, compute_dtype, None)
        module._planes = 2 if ggml_type == Q.Q8_0 else 1
        module.group_size = 32
        module.ggml_type = Q(ggml_type)
        for name in module._buffer_names:
            module.register_buffer(name, None, persistent=False)
        module._set_packed(packed, scale_and_zero)
        return module

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ggml_type={self.ggml_type.name}"


# ------------------------------------------------------------------ blocks -> kernel layout
def _check_blocks(qt: QuantizedTensor) -> tuple[int, int, int]:
    """(ggml_type, out_features, in_features) of blocks whose size matches their shape."""
    ggml_type = int(qt.ggml_type)
    out_features, in_features = (int(v) for v in qt.shape)
    if not GGUFLinear.supports(ggml_type):
        raise _unsupported(ggml_type)
    block, type_size = GGML_QUANT_SIZES[Q(ggml_type)]
    size = getattr(qt, "stored", None)
    size = np.asarray(qt.data).size if size is None else size.size
    if in_features % block or size != out_features * in_features // block * type_size:
        raise CheckpointError(
            f"{_name(ggml_type)} tensor of shape {tuple(qt.shape)} needs {in_features // block * type_size} "
            f"bytes per row in blocks of {block} weights; got {np.shape(getattr(qt, 'stored', qt.data))}"
        )
    return ggml_type, out_features, in_features


def _kernel_shapes(ggml_type: int, out_features: int, in_features: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of (packed, scale_and_zero): rows padded to whole blocks, Q8_0's two planes."""
    rows = -(-out_features // INT4_ROW_ALIGN) * INT4_ROW_ALIGN
    columns = (2 if ggml_type == Q.Q8_0 else 1) * in_features
    return (rows, columns // 2), (columns // 32, rows, 2)


def _block_rows() -> int | None:
    """Rows per block of this build's CPU int4 layout, or None where `kernel_state` cannot write it."""
    return _cpu_block_rows() if int4_layout(torch.device("cpu")) == "cpu" else None


def _row_range(qt: QuantizedTensor, start: int, end: int) -> torch.Tensor:
    """Rows start..end of the blocks as a uint8 tensor, in HF order, without copying a mapped file
    (only Q/K's reordered rows are gathered, a slice at a time)."""
    rows = qt.rows(start, end) if isinstance(qt, GGUFQuantizedTensor) else \
        np.asarray(qt.data, dtype=np.uint8).reshape(int(qt.shape[0]), -1)[start:end]
    with warnings.catch_warnings():  # a read-only map: nothing below writes to its rows
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(rows)


def _scales(b: torch.Tensor, ggml_type: Q) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, groups) float32 scale and zero of every 32 codes, planes side by side (Q8_0)."""
    rows = b.shape[0]
    if ggml_type == Q.Q4_K:
        return tuple(t.reshape(rows, -1) for t in _q4_k_scales(b))  # type: ignore[return-value]
    d = _f16(b[..., 0:2])
    if ggml_type == Q.Q4_0:
        return d, torch.zeros_like(d)
    if ggml_type == Q.Q4_1:
        return d, _f16(b[..., 2:4]) + 8 * d
    return torch.cat([16 * d, d], dim=1), torch.cat([torch.zeros_like(d), 8 * d], dim=1)  # Q8_0


def _code_bytes(b: torch.Tensor, ggml_type: Q) -> tuple[torch.Tensor, bool]:
    """(rows, *runs, s) bytes of the codes: each byte's low nibble is a weight of one run of s
    columns and its high nibble the same place in the next run; `True` when the high nibbles'
    run comes first (Q8_0's planes: plane h, then plane l). See `_decode`'s layouts."""
    if ggml_type == Q.Q4_0:
        return b[..., 2:18], False                                      # (rows, G, 16)
    if ggml_type == Q.Q4_1:
        return b[..., 4:20], False                                      # (rows, G, 16)
    if ggml_type == Q.Q4_K:
        return b[..., 16:144].unflatten(-1, (4, 32)), False             # (rows, S, 4, 32)
    return (b[..., 2:34] ^ 128).reshape(b.shape[0], 1, -1), True        # (rows, 1, K): u = q + 128


_LOW_NIBBLES = 0x0F0F0F0F0F0F0F0F
_HIGH_NIBBLES = 0xF0F0F0F0F0F0F0F0 - (1 << 64)  # as a signed int64 (torch has no uint64 and/or)


def _interleave(u: torch.Tensor, out: torch.Tensor, block_rows: int, high_first: bool) -> None:
    """Write code bytes `u` (rows, *runs, s) into `out` (rows, codes/2) in the CPU int4 layout.

    The layout (kernels.py) stores, per block of R rows, column k as R/2 bytes: byte j holds
    row j's code in its low nibble and row j + R/2's in the high one. With a = row j's bytes and
    b = row j + R/2's, (a & 15) | (b << 4) is that byte for the low-nibble run and
    (a >> 4) | (b & 0xF0) for the high-nibble run: byte operations (done 8 bytes at a time on
    int64 words, masks keeping each byte's nibbles apart) and one transposing copy, no (rows, K)
    array of single codes. E.g. Q4_0 (s = 16): columns 32g + t and 32g + 16 + t.
    """
    rows, s, half = u.shape[0], u.shape[-1], block_rows // 2
    if not u.is_contiguous() or u.storage_offset() % 8:  # int64 words need aligned, dense bytes
        u = u.clone(memory_format=torch.contiguous_format)
    words = u.view(torch.int64)                                        # s is a multiple of 8
    pairs = words.reshape(rows // block_rows, 2, half, *words.shape[1:])  # (nb, 2, R/2, *runs, s/8)
    a, b = pairs[:, 0], pairs[:, 1]
    low = (a & _LOW_NIBBLES).bitwise_or_((b << 4).bitwise_and_(_HIGH_NIBBLES)).view(torch.uint8)
    high = (a >> 4).bitwise_and_(_LOW_NIBBLES).bitwise_or_(b & _HIGH_NIBBLES).view(torch.uint8)  # (nb, R/2, *runs, s)
    target = out.view(rows // block_rows, *u.shape[1:-1], 2, s, half)   # (nb, *runs, 2, s, R/2)
    to_k_major = (0, *range(2, low.dim()), 1)
    for plane, codes in enumerate((high, low) if high_first else (low, high)):
        target.select(-3, plane).copy_(codes.permute(to_k_major))


def kernel_state(qt: QuantizedTensor, compute_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF blocks -> (packed, scale_and_zero) in the CPU int4 kernel's layout, straight from the
    blocks a slice of rows at a time: equal to `reference_kernel_state`, several times faster."""
    block_rows = _block_rows()
    if block_rows is None:
        raise CheckpointError("this torch build has no recognised CPU int4 layout; use reference_kernel_state")
    packed_shape, scale_zero_shape = _kernel_shapes(*_check_blocks(qt))
    packed = torch.empty(packed_shape, dtype=torch.uint8)
    scale_and_zero = torch.zeros(scale_zero_shape, dtype=compute_dtype)   # padding rows: 0, 0
    _fill(qt, packed, scale_and_zero, block_rows)
    return packed, scale_and_zero


def _fill(qt: QuantizedTensor, packed: torch.Tensor, scale_and_zero: torch.Tensor, block_rows: int) -> None:
    """Write one part's kernel layout into `packed` (rows, codes/2) and `scale_and_zero` (G, rows, 2)."""
    t = Q(int(qt.ggml_type))
    out_features, in_features = (int(v) for v in qt.shape)
    block, type_size = GGML_QUANT_SIZES[t]
    rows = packed.shape[0]
    for start in range(0, rows, DECODE_ROWS):  # a multiple of 64: slices hold whole blocks
        end = min(rows, start + DECODE_ROWS)
        real = min(end, out_features) - start
        b = _row_range(qt, start, start + real).view(real, in_features // block, type_size)
        scale, zero = _scales(b, t)
        scale_and_zero[:, start:start + real] = torch.stack([scale, zero], dim=-1).transpose(0, 1)
        u, high_first = _code_bytes(b, t)
        if real < end - start:  # padding rows: code 8 in both nibbles, as Int4Linear pads
            u = torch.cat([u, u.new_full((end - start - real, *u.shape[1:]), 0x88)])
        _interleave(u, packed[start:end], block_rows, high_first)


def reference_kernel_state(qt: QuantizedTensor, compute_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """The same through the block decoders and Int4Linear's own packing (any device layout):
    the definition `kernel_state` is tested against, and the path where it does not apply."""
    ggml_type, out_features, in_features = _check_blocks(qt)
    module = GGUFLinear(in_features, out_features, ggml_type, False, compute_dtype, "meta")
    block, type_size = GGML_QUANT_SIZES[Q(ggml_type)]
    packed, scale_zero = [], []
    # a slice of rows at a time: a whole large head at once would hold several float copies
    for start in range(0, out_features, DECODE_ROWS):
        end = min(out_features, start + DECODE_ROWS)
        blocks = _row_range(qt, start, end).clone().reshape(end - start, in_features // block, type_size)
        q, scale, zero = _plane_major(*_DECODERS[Q(ggml_type)](blocks), module._planes, end - start)
        pad = module._rows - out_features if end == out_features else 0
        p, sz = module._pack_rows(q, scale.to(compute_dtype), zero.to(compute_dtype), pad)
        packed.append(p)
        scale_zero.append(sz)
    return torch.cat(packed), torch.cat(scale_zero, dim=1).contiguous()


# ------------------------------------------------------------------ the loader step
def _made_tensors(plan: dict[str, tuple[GGUFQuantizedTensor, bool]], dtype: torch.dtype,
                  source: str | os.PathLike | None) -> dict[str, torch.Tensor]:
    """Every tensor `plan` needs: from the cache when it holds them, else made (and cached).
    Names: `<module>.packed` / `<module>.scale_and_zero` for kept blocks, `<key>:<dtype>` for
    dequantized ones (a load in another dtype rebuilds the cache rather than mixing them)."""
    block_rows = _block_rows()
    cache = None
    if plan and source is not None and block_rows is not None and os.environ.get(CACHE_ENV, "1") not in ("0", "off"):
        cache = KernelCache(Path(source), {"block_rows": block_rows, "row_align": INT4_ROW_ALIGN,
                                           "compute_dtype": str(torch.bfloat16)})
    found = cache.read() if cache is not None else None
    if found is not None and all(name in found and tuple(found[name].shape) == shape
                                 for name, shape in _shapes(plan, dtype).items()):
        return found
    writer = cache.writer() if cache is not None else None
    made: dict[str, torch.Tensor] = {}
    for key, (qt, linear) in plan.items():
        if linear:
            packed, scale_and_zero = kernel_state(qt) if block_rows is not None else reference_kernel_state(qt)
            parts = dict(zip(_shapes({key: (qt, True)}, dtype), (packed, scale_and_zero)))
        else:
            parts = {f"{key}:{dtype}": qt.dequantize(dtype)}
        getattr(qt, "release", lambda: None)()  # its pages of the GGUF map are read: out of our RSS
        if writer is not None and not writer.add(parts):
            return _made_tensors(plan, dtype, None)  # could not write (disk full?): all in memory
        if writer is None:
            made.update(parts)
    if writer is not None:
        found = writer.commit()
        return found if found is not None else _made_tensors(plan, dtype, None)
    return made


def _shapes(plan: dict[str, tuple[GGUFQuantizedTensor, bool]], dtype: torch.dtype) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor `plan` makes."""
    shapes: dict[str, tuple[int, ...]] = {}
    for key, (qt, linear) in plan.items():
        module = key.removesuffix(".weight")
        if linear:
            shapes[module + ".packed"], shapes[module + ".scale_and_zero"] = _kernel_shapes(qt.ggml_type, *qt.shape)
        else:
            shapes[f"{key}:{dtype}"] = tuple(qt.shape)
    return shapes


# ------------------------------------------------------------------ the on-disk cache
CACHE_ENV = "MISTRAL_LM_GGUF_CACHE"  # "0" / "off": never read or write kernel caches
_CACHE_SUFFIX = ".mistral_lm-cache"
_CACHE_MAGIC = b"MLKCACHE"
_CACHE_VERSION = 1
_CACHE_ALIGN = 4096  # every tensor starts on a page: mapped views need no copy
_TRAILER = struct.Struct("<Q8s")  # header length, magic; the file's last 16 bytes
_DTYPES = {str(t): t for t in (torch.uint8, torch.bfloat16, torch.float16, torch.float32)}


class KernelCache:
    """What a GGUF file becomes in the kernels' layout, in one file beside it: `<name>.gguf` +
    `.mistral_lm-cache`. Tensors are page-aligned runs of bytes; a JSON header at the end lists
    them with the key they were made under: this format version, the layout (CPU block rows,
    compute dtype) and the source's size and mtime. Any difference, or a file that is short or
    malformed, is a miss: the loader rebuilds it, so a stale cache can never change a result.
    The file is written under a temporary name and renamed, so readers see all or nothing.
    """

    def __init__(self, source: Path, layout: dict[str, Any], suffix: str = _CACHE_SUFFIX) -> None:
        self.source = source
        self.path = source.with_name(source.name + suffix)
        stat = source.stat()
        self.key = {"version": _CACHE_VERSION, "source_size": stat.st_size,
                    "source_mtime_ns": stat.st_mtime_ns, **layout}

    def read(self) -> dict[str, torch.Tensor] | None:
        """The cached tensors as views of a private map of the file, or None on any mismatch."""
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < _TRAILER.size:
                    return None
                buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable views, file untouched
        except (OSError, ValueError):
            return None
        try:
            return self._views(buffer, size)
        except (ValueError, KeyError, TypeError, RuntimeError):  # malformed: a miss, rebuilt
            return None

    def _views(self, buffer: mmap.mmap, size: int) -> dict[str, torch.Tensor] | None:
        length, magic = _TRAILER.unpack_from(buffer, size - _TRAILER.size)
        end = size - _TRAILER.size
        if magic != _CACHE_MAGIC or length > end:
            return None
        header = json.loads(bytes(buffer[end - length:end]))
        if header.get("key") != self.key:
            return None
        tensors = {}
        for name, (offset, dtype_name, shape) in header["tensors"].items():
            dtype = _DTYPES[dtype_name]
            count = math.prod(shape)
            if not (isinstance(offset, int) and 0 <= offset and offset + count * dtype.itemsize <= end - length):
                return None
            tensors[name] = torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset).view(shape)
        if hasattr(mmap, "MADV_WILLNEED"):
            buffer.madvise(mmap.MADV_WILLNEED)  # start reading ahead; pages map in on first use
        return tensors

    def writer(self) -> _CacheWriter | None:
        """A writer of a new cache file, or None where the folder is not writable. Temporary
        files that a killed writer left behind (named after its pid) are removed first."""
        for stale in self.path.parent.glob(self.path.name + ".*.tmp"):
            pid = stale.name[len(self.path.name) + 1:].split(".", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    stale.unlink()
        try:
            fd, temp = tempfile.mkstemp(prefix=f"{self.path.name}.{os.getpid()}.", suffix=".tmp", dir=self.path.parent)
            os.fchmod(fd, 0o644)  # readable like the model beside it (mkstemp makes it private)
        except OSError:
            return None
        return _CacheWriter(self, os.fdopen(fd, "wb"), Path(temp))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


class _CacheWriter:
    def __init__(self, cache: KernelCache, file: Any, temp: Path) -> None:
        self.cache, self.file, self.temp = cache, file, temp
        self.entries: dict[str, tuple[int, str, list[int]]] = {}

    def add(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Append tensors; False (the file removed) if writing failed."""
        try:
            for name, tensor in tensors.items():
                offset = -(-self.file.tell() // _CACHE_ALIGN) * _CACHE_ALIGN
                self.file.seek(offset)
                self.file.write(tensor.contiguous().view(torch.uint8).numpy().data)
                self.entries[name] = (offset, str(tensor.dtype), list(tensor.shape))
            return True
        except OSError:
            self.abort()
            return False

    def commit(self, read_back: bool = True) -> dict[str, torch.Tensor] | None:
        """Write the header, move the file into place and map it (`read_back`); None if any step
        failed or nothing is read back."""
        header = json.dumps({"key": self.cache.key, "tensors": self.entries}).encode()
        try:
            self.file.write(header)
            self.file.write(_TRAILER.pack(len(header), _CACHE_MAGIC))
            self.file.close()
            os.replace(self.temp, self.cache.path)
        except OSError:
            self.abort()
            return None
        return self.cache.read() if read_back else None

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            self.temp.unlink()


def _plane_major(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, planes: int,
                 rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(planes, n, blocks, ...) decoder output -> (n, planes * K) codes and (n, planes * K/32)
    scales and zeros, each row's planes side by side (the kernel sees x repeated per plane)."""
    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(planes, rows, -1).permute(1, 0, 2).reshape(rows, -1)

    return flat(q), flat(scale), flat(zero)


def _unsupported(ggml_type: int) -> CheckpointError:
    return CheckpointError(
        f"GGML type {_name(ggml_type)} has no int4-kernel form; supported: "
        f"{', '.join(t.name for t in _DECODERS)}. Dequantize it (gguf.quants.dequantize) instead"
    )


def _name(ggml_type: int) -> str:
    try:
        return Q(ggml_type).name
    except ValueError:
        return str(ggml_type)

"""GGUF (llama.cpp's single-file format) -> MistralConfig + tensors under Hugging Face names.

Three tables carry the translation: `_CONFIG_TABLE` (metadata key -> config field), `_TENSOR_TABLE`
(GGUF tensor name -> HF name, expected shape, RoPE heads) and `SUPPORTED_TYPES` (the storage types
we dequantize). `unpermute_rope_rows` undoes the one layout change llama.cpp makes to the weights.

Why we parse the header ourselves instead of using `gguf.GGUFReader`: the reader builds a numpy
view per string and item, far slower on a 49k-token vocabulary than this parser
(bench/RESULTS.md, "Measurements behind the code"), and it trusts every count, length and offset in the file. Here each of those is checked against the file
size *before* it is used, so a truncated or corrupt file fails fast with a `CheckpointError` that
names the path and never makes us allocate more than the file could hold. The format's numbers
are in gguf_spec.py; the `gguf` package still provides the block decoders of the types without a
decoder of ours (`gguf.quants.dequantize`), imported when first used.

File layout (little-endian): magic "GGUF", u32 version, u64 tensor_count, u64 kv_count, the
key/value metadata, the tensor infos (name, dims with ne[0] innermost, ggml type, offset), padding
to `general.alignment`, then the tensor data.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import mmap
import os
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .._util import is_int
from ..config import MistralConfig
from ..errors import CheckpointError, ConfigError
from .gguf_spec import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from .safetensors import LazyTensor

__all__ = [
    "SUPPORTED_ARCHITECTURES", "SUPPORTED_TYPES", "GGUFCheckpoint", "GGUFFile", "GGUFQuantizedTensor",
    "TensorInfo", "config_from_gguf", "load_gguf", "read_gguf", "unpermute_rope_rows",
]

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # v1 counted with u32 and is long gone
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS
_HEADER = struct.Struct("<4sIQQ")
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_SCALARS: dict[int, struct.Struct] = {
    GGUFValueType.UINT8: struct.Struct("<B"), GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"), GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: struct.Struct("<I"), GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.UINT64: struct.Struct("<Q"), GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT32: struct.Struct("<f"), GGUFValueType.FLOAT64: struct.Struct("<d"),
    GGUFValueType.BOOL: struct.Struct("<?"),
}
# The fewest bytes one record can take: used to reject counts that a file this size cannot hold.
_MIN_BYTES = {GGUFValueType.STRING: 8, **{t: s.size for t, s in _SCALARS.items()}}
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset
_LISTED_ARRAY_LEN = 64  # longer arrays (vocabularies, merges) are left out of GGUFCheckpoint.metadata

SUPPORTED_ARCHITECTURES = ("llama", "mistral")
_T = GGMLQuantizationType
_FLOAT_TYPES = (_T.F32, _T.F16, _T.BF16)
SUPPORTED_TYPES = (*_FLOAT_TYPES, _T.Q8_0, _T.Q4_0, _T.Q4_1, _T.Q4_K, _T.Q5_K, _T.Q6_K)  # each tested


def _gguf_dequantize(data: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """Float32 values of (rows, bytes) blocks: the float types by a view, the others by the gguf
    package's numpy decoder, imported on first use (gguf_spec says why)."""
    if ggml_type == GGMLQuantizationType.F32:
        return data.view(np.float32)
    if ggml_type == GGMLQuantizationType.F16:
        return data.view(np.float16).astype(np.float32)
    if ggml_type == GGMLQuantizationType.BF16:
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    from gguf.quants import dequantize

    return dequantize(data, ggml_type)


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class GGUFQuantizedTensor:
    """A weight kept in its GGUF blocks, for kernels that compute on them directly.

    `data` is (out_features, bytes_per_row) uint8: one row of blocks per output feature, blocks
    running along the input dimension, in HF row order. `stored` is the rows as the file has
    them, a read-only view into the memory-mapped file (loading costs no memory: copy before
    writing); for Q/K, whose rows llama.cpp reordered, `row_order` maps them back and `data` is
    a gathered copy made on first use (`rows` gathers a slice without making it).
    """

    ggml_type: int  # a gguf.GGMLQuantizationType value
    shape: tuple[int, int]  # (out_features, in_features), as the HF weight
    stored: np.ndarray
    row_order: np.ndarray | None = None  # data = stored[row_order]
    release: Callable[[], None] = field(default=lambda: None, repr=False, compare=False)
    # release(): drop the file's pages this tensor touched from the process (re-read if used again)

    @functools.cached_property
    def data(self) -> np.ndarray:
        return self.stored if self.row_order is None else self.stored[self.row_order]

    def rows(self, start: int, end: int) -> np.ndarray:
        """HF rows start..end (a view where no reordering applies)."""
        return self.stored[start:end] if self.row_order is None else self.stored[self.row_order[start:end]]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out_features, in_features) weight in `dtype`."""
        return _dequantize_rows(self.stored, GGMLQuantizationType(self.ggml_type), self.shape, dtype, self.row_order)


@dataclass
class GGUFCheckpoint:
    """What a GGUF file holds, translated: config, HF-named tensors, scalar metadata, chat template."""

    config: MistralConfig
    tensors: dict[str, torch.Tensor | GGUFQuantizedTensor]
    metadata: dict[str, Any]  # scalars and short arrays (as lists); vocabularies left out
    chat_template: str | None


class TensorInfo(NamedTuple):
    """Where one tensor lives in a GGUF file and how it is stored."""

    name: str
    dims: tuple[int, ...]  # GGUF order: dims[0] is the innermost (input-feature) dimension
    ggml_type: GGMLQuantizationType
    offset: int  # absolute, from the start of the file
    nbytes: int


@dataclass
class GGUFFile:
    """A parsed and validated GGUF header over a memory map of the whole file."""

    path: Path
    metadata: dict[str, Any]  # scalars as Python values, numeric arrays as numpy, string arrays as lists
    tensors: dict[str, TensorInfo]
    buffer: mmap.mmap = field(repr=False)

    def rows(self, info: TensorInfo) -> np.ndarray:
        """The tensor's raw bytes as (rows, bytes_per_row) uint8, a view into the map."""
        raw = np.frombuffer(self.buffer, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return raw.reshape(math.prod(info.dims[1:]), -1)

    def release(self, info: TensorInfo) -> None:
        """Unmap the pages holding this tensor from the process (MADV_DONTNEED on a read-only
        shared map: they stay in the page cache and fault back in if read again). A loader
        that has turned a tensor into something else calls it, so reading a whole file does
        not leave the whole file in its RSS."""
        if not hasattr(mmap, "MADV_DONTNEED") or self.buffer.closed:
            return
        start = info.offset - info.offset % mmap.PAGESIZE
        self.buffer.madvise(mmap.MADV_DONTNEED, start, info.offset + info.nbytes - start)


# --------------------------------------------------------------------------- header parsing
class _Cursor:
    """Reads GGUF fields from a buffer, checking every length against the bytes that remain."""

    def __init__(self, buffer: mmap.mmap, path: Path) -> None:
        self.buffer, self.path, self.pos, self.end = buffer, path, 0, len(buffer)

    def error(self, reason: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {reason} (at byte {self.pos} of {self.end})")

    def need(self, nbytes: int, what: str) -> None:
        if nbytes > self.end - self.pos:
            raise self.error(f"{what} needs {nbytes} bytes but the file ends first (truncated or corrupt)")

    def unpack(self, st: struct.Struct, what: str) -> Any:
        self.need(st.size, what)
        value = st.unpack_from(self.buffer, self.pos)[0]
        self.pos += st.size
        return value

    def string(self, what: str) -> str:
        n = self.unpack(_U64, what)
        self.need(n, f"{what} ({n} bytes)")
        raw = self.buffer[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.error(f"{what} is not valid UTF-8: {exc}") from exc

    def value(self, vtype: int, key: str) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(f"value of {key!r}")
        if vtype == GGUFValueType.ARRAY:
            return self.array(key)
        if vtype not in _SCALARS:
            raise self.error(f"metadata {key!r} has unknown value type {vtype}")
        return self.unpack(_SCALARS[vtype], f"value of {key!r}")

    def array(self, key: str) -> np.ndarray | list[str]:
        item_type = self.unpack(_U32, f"array type of {key!r}")
        count = self.unpack(_U64, f"array length of {key!r}")
        if item_type not in _MIN_BYTES:  # unknown, or an array of arrays (no tokenizer key uses one)
            raise self.error(f"metadata {key!r} is an array of unsupported type {item_type}")
        self.need(count * _MIN_BYTES[item_type], f"array {key!r} of {count} items")
        if item_type == GGUFValueType.STRING:
            return [self.string(f"item {i} of {key!r}") for i in range(count)]
        st = _SCALARS[item_type]
        items = np.frombuffer(self.buffer, dtype=np.dtype(st.format), count=count, offset=self.pos).copy()
        self.pos += count * st.size
        return items


# Within `shared_headers()`: the files read so far, by (device, inode, size, mtime).
_SHARED: contextvars.ContextVar[dict[tuple[int, ...], GGUFFile] | None] = contextvars.ContextVar(
    "mistral_lm_gguf_headers", default=None)


@contextlib.contextmanager
def shared_headers() -> Iterator[None]:
    """Within the block read_gguf parses each file once: loading a model and then its tokenizer
    from one .gguf (the CLI, the server) read the default model's 49k-token vocabulary twice.
    The parsed header is read-only; a file changed on disk in between is read again."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse and validate a GGUF header; tensor data stays in the memory map until asked for.

    Raises CheckpointError naming the path on anything malformed: wrong magic or version, counts
    or lengths the file cannot hold, unknown value or tensor types, tensors past the end of file.
    """
    path = Path(path)
    shared = _SHARED.get()
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
            if shared is not None and key in shared:
                return shared[key]
            if stat.st_size < _HEADER.size:
                raise CheckpointError(f"{path}: {stat.st_size} bytes is too short for a GGUF header (truncated?)")
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise CheckpointError(f"cannot read GGUF file {path}: {exc}") from exc
    try:
        file = _parse(_Cursor(buffer, path))
    except BaseException:
        buffer.close()  # nothing exported a view yet: metadata arrays are copies
        raise
    if shared is not None:
        shared[key] = file
    return file


def _parse(cur: _Cursor) -> GGUFFile:
    magic, version, n_tensors, n_kv = _HEADER.unpack_from(cur.buffer, 0)
    cur.pos = _HEADER.size
    if magic != _MAGIC:
        raise cur.error(f"not a GGUF file: magic {magic!r}, expected {_MAGIC!r}")
    if version not in _VERSIONS:
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise cur.error(f"GGUF version {version} is not supported{hint}; supported: {_VERSIONS}")
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > cur.end - cur.pos:
        raise cur.error(f"header claims {n_kv} metadata entries and {n_tensors} tensors, "
                        f"more than {cur.end} bytes can hold")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("metadata key")
        if key in metadata:
            raise cur.error(f"metadata key {key!r} appears twice")
        metadata[key] = cur.value(cur.unpack(_U32, f"value type of {key!r}"), key)
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not is_int(alignment) or alignment <= 0 or alignment & (alignment - 1):
        raise cur.error(f"general.alignment must be a positive power of two, got {alignment!r}")
    infos = [_tensor_info(cur) for _ in range(n_tensors)]
    data_start = -(-cur.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for info in infos:
        if info.name in tensors:
            raise cur.error(f"tensor {info.name!r} appears twice")
        if info.offset % alignment:
            raise cur.error(f"tensor {info.name!r} offset {info.offset} is not {alignment}-byte aligned")
        start = data_start + info.offset
        if start + info.nbytes > cur.end:
            raise cur.error(f"tensor {info.name!r} ({info.nbytes} bytes at {start}) runs past the end of "
                            f"the file (truncated?)")
        tensors[info.name] = info._replace(offset=start)
    return GGUFFile(cur.path, metadata, tensors, cur.buffer)


def _tensor_info(cur: _Cursor) -> TensorInfo:
    name = cur.string("tensor name")
    n_dims = cur.unpack(_U32, f"rank of tensor {name!r}")
    if not 1 <= n_dims <= _MAX_DIMS:
        raise cur.error(f"tensor {name!r} has rank {n_dims}; GGUF allows 1..{_MAX_DIMS}")
    dims = tuple(cur.unpack(_U64, f"shape of tensor {name!r}") for _ in range(n_dims))
    raw_type = cur.unpack(_U32, f"type of tensor {name!r}")
    offset = cur.unpack(_U64, f"offset of tensor {name!r}")
    if raw_type not in SUPPORTED_TYPES:
        known = next((t.name for t in GGMLQuantizationType if t == raw_type), f"unknown type {raw_type}")
        raise cur.error(f"tensor {name!r} is stored as {known}; supported types: "
                        f"{', '.join(t.name for t in SUPPORTED_TYPES)} (re-quantize the file, e.g. to Q8_0)")
    ggml_type = GGMLQuantizationType(raw_type)
    block, block_bytes = GGML_QUANT_SIZES[ggml_type]
    if min(dims) < 1 or dims[0] % block:
        raise cur.error(f"tensor {name!r} has shape {list(dims)}; {ggml_type.name} needs positive dims and "
                        f"rows that are a multiple of {block}")
    nbytes = math.prod(dims) // block * block_bytes
    if nbytes > cur.end:
        raise cur.error(f"tensor {name!r} of shape {list(dims)} would take {nbytes} bytes, more than the file")
    return TensorInfo(name, dims, ggml_type, offset, nbytes)


# --------------------------------------------------------------------------- metadata -> config
_REQUIRED = object()
# GGUF key ("{arch}" = general.architecture) -> (MistralConfig field, kind, default when absent).
_CONFIG_TABLE: dict[str, tuple[str, type, Any]] = {
    "{arch}.context_length": ("max_position_embeddings", int, _REQUIRED),
    "{arch}.embedding_length": ("hidden_size", int, _REQUIRED),
    "{arch}.feed_forward_length": ("intermediate_size", int, _REQUIRED),
    "{arch}.block_count": ("num_hidden_layers", int, _REQUIRED),
    "{arch}.attention.head_count": ("num_attention_heads", int, _REQUIRED),
    "{arch}.attention.head_count_kv": ("num_key_value_heads", int, None),  # absent: one kv head per head
    "{arch}.attention.layer_norm_rms_epsilon": ("rms_norm_eps", float, _REQUIRED),
    "{arch}.rope.freq_base": ("rope_theta", float, 10000.0),  # llama.cpp's default base
    "{arch}.attention.sliding_window": ("sliding_window", int, None),  # absent: full attention (Llama)
    "{arch}.attention.key_length": ("head_dim", int, None),  # absent: hidden_size // heads
    "{arch}.vocab_size": ("vocab_size", int, None),  # absent: the length of the token list
    "tokenizer.ggml.bos_token_id": ("bos_token_id", int, None),
    "tokenizer.ggml.eos_token_id": ("eos_token_id", int, None),
    "tokenizer.ggml.padding_token_id": ("pad_token_id", int, None),
}


def config_from_gguf(file: GGUFFile) -> MistralConfig:
    """The MistralConfig a GGUF header describes (one table, checked types, teaching errors)."""
    md = file.metadata
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{file.path}: general.architecture {arch!r} is not supported; "
                              f"supported: {SUPPORTED_ARCHITECTURES}")
    fields: dict[str, Any] = {"model_type": arch, "tie_word_embeddings": "output.weight" not in file.tensors}
    for template, (name, kind, default) in _CONFIG_TABLE.items():
        key = template.format(arch=arch)
        value = md.get(key, default)
        if value is _REQUIRED:
            raise CheckpointError(f"{file.path}: metadata {key!r} is missing")
        if value is not None and not (is_int(value) or (kind is float and isinstance(value, float))):
            raise CheckpointError(f"{file.path}: metadata {key!r} must be {kind.__name__}, got {value!r}")
        fields[name] = value
    if fields["vocab_size"] is None:
        fields["vocab_size"] = len(md.get("tokenizer.ggml.tokens", ()))
    try:
        config = MistralConfig(**fields)
    except ConfigError as exc:
        raise CheckpointError(f"{file.path}: metadata does not describe a valid model: {exc}") from exc
    # Two RoPE variants llama.cpp can describe and MistralConfig cannot: refuse them by name.
    scaling = md.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise CheckpointError(f"{file.path}: RoPE scaling {scaling!r} is not supported; only plain RoPE is")
    rope_dims = md.get(f"{arch}.rope.dimension_count", config.head_dim)
    if rope_dims != config.head_dim:
        raise CheckpointError(f"{file.path}: {arch}.rope.dimension_count={rope_dims!r} differs from head_dim "
                              f"{config.head_dim}; partial rotary embeddings are not supported")
    return config


# --------------------------------------------------------------------------- tensors
class _Entry(NamedTuple):
    hf_name: str
    shape: Callable[[MistralConfig], tuple[int, ...]]  # expected HF shape
    rope_heads: str | None = None  # config field: heads whose rows llama.cpp permuted


def _q_rows(c: MistralConfig) -> int:
    return c.num_attention_heads * c.head_dim


def _kv_rows(c: MistralConfig) -> int:
    return c.num_key_value_heads * c.head_dim


_TENSOR_TABLE: dict[str, _Entry] = {
    "token_embd.weight": _Entry("model.embed_tokens.weight", lambda c: (c.vocab_size, c.hidden_size)),
    "output_norm.weight": _Entry("model.norm.weight", lambda c: (c.hidden_size,)),
    "output.weight": _Entry("lm_head.weight", lambda c: (c.vocab_size, c.hidden_size)),
    "blk.{i}.attn_norm.weight": _Entry("model.layers.{i}.input_layernorm.weight", lambda c: (c.hidden_size,)),
    "blk.{i}.attn_q.weight": _Entry("model.layers.{i}.self_attn.q_proj.weight",
                                    lambda c: (_q_rows(c), c.hidden_size), "num_attention_heads"),
    "blk.{i}.attn_k.weight": _Entry("model.layers.{i}.self_attn.k_proj.weight",
                                    lambda c: (_kv_rows(c), c.hidden_size), "num_key_value_heads"),
    "blk.{i}.attn_v.weight": _Entry("model.layers.{i}.self_attn.v_proj.weight",
                                    lambda c: (_kv_rows(c), c.hidden_size)),
    "blk.{i}.attn_output.weight": _Entry("model.layers.{i}.self_attn.o_proj.weight",
                                         lambda c: (c.hidden_size, _q_rows(c))),
    "blk.{i}.ffn_norm.weight": _Entry("model.layers.{i}.post_attention_layernorm.weight",
                                      lambda c: (c.hidden_size,)),
    "blk.{i}.ffn_gate.weight": _Entry("model.layers.{i}.mlp.gate_proj.weight",
                                      lambda c: (c.intermediate_size, c.hidden_size)),
    "blk.{i}.ffn_up.weight": _Entry("model.layers.{i}.mlp.up_proj.weight",
                                    lambda c: (c.intermediate_size, c.hidden_size)),
    "blk.{i}.ffn_down.weight": _Entry("model.layers.{i}.mlp.down_proj.weight",
                                      lambda c: (c.hidden_size, c.intermediate_size)),
}


def unpermute_rope_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation: `hf_weight = gguf_weight[index]`.

    HF rotates the two halves of each head (rows i and i + D/2 form a pair); llama.cpp's
    converter reorders each head's D rows so pairs sit next to each other (rows 2i, 2i+1) for
    ggml's interleaved RoPE. So HF row j*D/2 + i of a head is GGUF row 2i + j. For D=4:
    GGUF rows [a0, b0, a1, b1] -> HF [a0, a1, b0, b1], index [0, 2, 1, 3] (+ head * D).
    A pure row gather: it applies to float rows and to rows of quantized blocks alike.
    """
    head_dim = n_rows // n_heads
    gguf_row = np.arange(n_rows).reshape(n_heads, head_dim // 2, 2)  # (head, i, j)
    return gguf_row.transpose(0, 2, 1).reshape(n_rows)  # listed in HF order (head, j, i)


def _expected_tensors(config: MistralConfig) -> dict[str, tuple[str, _Entry]]:
    """GGUF name -> (HF name, table entry) for every tensor this config needs."""
    expected = {}
    for gguf_name, entry in _TENSOR_TABLE.items():
        for i in range(config.num_hidden_layers) if "{i}" in gguf_name else (0,):
            expected[gguf_name.format(i=i)] = (entry.hf_name.format(i=i), entry)
    if config.tie_word_embeddings:
        del expected["output.weight"]
    return expected


def _match_tensors(file: GGUFFile, config: MistralConfig) -> dict[str, tuple[str, _Entry]]:
    per_layer = sum("{i}" in name for name in _TENSOR_TABLE)
    if config.num_hidden_layers * per_layer > len(file.tensors):  # before listing names per layer
        raise CheckpointError(f"{file.path}: block_count {config.num_hidden_layers} needs "
                              f"{config.num_hidden_layers * per_layer} layer tensors, the file has "
                              f"{len(file.tensors)} tensors in all")
    expected = _expected_tensors(config)
    for problem, names in (("unknown tensors (not part of a Mistral/Llama model)", file.tensors.keys() - expected),
                           ("missing tensors", expected.keys() - file.tensors.keys())):
        if names:
            listed = ", ".join(sorted(names)[:8]) + (" ..." if len(names) > 8 else "")
            raise CheckpointError(f"{file.path}: {len(names)} {problem}: {listed}")
    for gguf_name, (hf_name, entry) in expected.items():
        got, want = tuple(reversed(file.tensors[gguf_name].dims)), entry.shape(config)
        if got != want:
            raise CheckpointError(f"{file.path}: tensor {gguf_name!r} ({hf_name}) has shape {list(got)}, "
                                  f"the metadata implies {list(want)}")
    # in the file's order: its data is then read front to back, and a loader that quantizes a
    # layer's q/k/v or gate/up together (loading.QuantizeAsRead) finds a layer's tensors together
    return {name: expected[name] for name in file.tensors}


# Rows of a quantized matrix decoded at a time, here and by quantization.gguf.GGUFLinear:
# decoders hold several float32 copies of what they decode. A multiple of 64, the int4 packing block.
DECODE_ROWS = 4096


# Float32 values decoded per pass where the decoder cannot write the result's dtype itself (the
# float32 scratch of a slice; the native decoder writes float32, bfloat16 and float16 directly).
_SCRATCH_VALUES = 1 << 22


def _native_decoder(ggml_type: GGMLQuantizationType) -> Any:
    """The native kernels' ggml module where its C decoder covers the type, else None. It gives
    gguf's values: both round each block's exact value once (every product of a float16 scale
    and the integer codes fits float32's mantissa but Q6_K's, which either rounds once;
    tests/test_gguf.py)."""
    from ..native import ggml  # at first use: the library is built or found then

    return ggml if int(ggml_type) in ggml.SUPPORTED and ggml.available() else None


def _dequantize_rows(rows: np.ndarray, ggml_type: GGMLQuantizationType, shape: tuple[int, ...],
                     dtype: torch.dtype, order: np.ndarray | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, bytes_per_row) blocks, as GGUFFile.rows gives them, -> `shape` in `dtype`, in `out`
    where given (a loader's reused buffer: fresh memory costs a page fault per 4 KiB written); with
    `order`, row i of the result is stored row order[i]. The native decoder writes a slice at a
    time straight into the result (float32, bfloat16, float16: it rounds as `copy_` from float32
    would) or, for other dtypes, through one bounded float32 scratch reused for every slice."""
    if out is not None and (tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(shape)}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    n = rows.shape[0]
    native = _native_decoder(ggml_type) if rows.ndim == 2 and n else None
    if native is None:
        values = _gguf_rows(rows, ggml_type, shape, dtype, order)
        return values if out is None else out.copy_(values)
    out = (torch.empty(shape, dtype=dtype) if out is None else out).view(n, -1)
    k = out.shape[1]
    with warnings.catch_warnings():  # a read-only map: the decoder only reads it
        warnings.simplefilter("ignore", UserWarning)
        blocks = torch.from_numpy(np.ascontiguousarray(rows))
    index = None if order is None else torch.from_numpy(np.asarray(order, dtype=np.int64))
    step = max(1, min(DECODE_ROWS, _SCRATCH_VALUES // max(1, k)))
    direct = dtype in native.build.DTYPE_CODES  # what the decoder writes itself
    scratch = None if direct else torch.empty(min(step, n), k, dtype=torch.float32)
    for start in range(0, n, step):
        end = min(n, start + step)
        part = index[start:end] if index is not None else None
        src = blocks if part is not None else blocks[start:end]
        dst = out[start:end] if direct else scratch[:end - start]
        native.dequantize(src, int(ggml_type), k, rows=part, out=dst)
        if not direct:
            out[start:end].copy_(dst)
    return out.view(shape)


def _gguf_rows(rows: np.ndarray, ggml_type: GGMLQuantizationType, shape: tuple[int, ...], dtype: torch.dtype,
               order: np.ndarray | None) -> torch.Tensor:
    """_dequantize_rows by the gguf package's decoder: a matrix of up to DECODE_ROWS rows at
    once (a float32 result is then numpy's array itself, not a copy), a larger one (the
    embedding) slice by slice straight into the target dtype: decoded at once, its float32
    temporaries are several times the result (bench/RESULTS.md)."""
    if rows.shape[0] <= DECODE_ROWS:
        values = _gguf_dequantize(rows if order is None else rows[order], ggml_type)  # float32 (rows, elements)
        if not values.flags.writeable:  # F32 comes back as a view of the read-only map
            values = values.copy()
        return torch.from_numpy(values.reshape(shape)).to(dtype)
    out = torch.empty(shape, dtype=dtype).view(rows.shape[0], -1)
    for start in range(0, rows.shape[0], DECODE_ROWS):
        part = rows[start:start + DECODE_ROWS] if order is None else rows[order[start:start + DECODE_ROWS]]
        chunk = _gguf_dequantize(part, ggml_type)
        out[start:start + len(chunk)] = torch.from_numpy(np.array(chunk, copy=not chunk.flags.writeable))
    return out.view(shape)


def _load_tensor(file: GGUFFile, info: TensorInfo, entry: _Entry, config: MistralConfig,
                 dequantize: bool, dtype: torch.dtype, out: torch.Tensor | None = None
                 ) -> torch.Tensor | GGUFQuantizedTensor:
    rows = file.rows(info)
    order = None if entry.rope_heads is None else unpermute_rope_rows(rows.shape[0], getattr(config, entry.rope_heads))
    shape = tuple(reversed(info.dims))
    if dequantize or info.ggml_type in _FLOAT_TYPES or len(shape) != 2:
        return _dequantize_rows(rows, info.ggml_type, shape, dtype, order, out)
    return GGUFQuantizedTensor(int(info.ggml_type), (shape[0], shape[1]), rows, order,
                               functools.partial(file.release, info))


def _open_for_tensors(path: str | os.PathLike, dtype: torch.dtype
                      ) -> tuple[GGUFFile, MistralConfig, list[tuple[TensorInfo, str, _Entry]]]:
    """The file, its config and, per tensor of the state dict, (its info, its Transformers name,
    how to read it): what `load_gguf` and `lazy_float_tensors` both walk."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    file = read_gguf(path)
    config = config_from_gguf(file)
    return file, config, [(file.tensors[gguf_name], hf_name, entry)
                          for gguf_name, (hf_name, entry) in _match_tensors(file, config).items()]


def load_gguf(path: str | os.PathLike, *, dequantize: bool = True,
              dtype: torch.dtype = torch.float32) -> GGUFCheckpoint:
    """Read a Llama/Mistral GGUF file into a config and a state dict with Transformers' keys.

    With `dequantize=False`, 2-D quantized weights stay as `GGUFQuantizedTensor` (raw blocks,
    nothing decoded); float tensors and norms are always returned as torch tensors in `dtype`.
    Q/K rows come back in HF order either way. With tied embeddings there is no `lm_head.weight`.

    >>> ckpt = load_gguf(default_model_path(), dequantize=False)  # doctest: +SKIP
    >>> ckpt.config.num_hidden_layers, type(ckpt.tensors["model.layers.0.mlp.up_proj.weight"]).__name__
    (30, 'GGUFQuantizedTensor')
    """
    file, config, matched = _open_for_tensors(path, dtype)
    tensors = {hf_name: _load_tensor(file, info, entry, config, dequantize, dtype) for info, hf_name, entry in matched}
    template = file.metadata.get("tokenizer.chat_template")
    return GGUFCheckpoint(config, tensors, _plain_metadata(file.metadata),
                          template if isinstance(template, str) else None)


def lazy_float_tensors(path: str | os.PathLike, dtype: torch.dtype = torch.float32
                       ) -> tuple[MistralConfig, list[LazyTensor]]:
    """The config and, per tensor of `load_gguf`'s state dict, its name, shape and dtype with a
    function that decodes it then: a writer that holds one shard at a time writes a 7B, whose
    float32 state dict alone is 29 GB; a loader that quantizes each Linear as it is read never
    holds the float model. `load(out=tensor)` decodes into a buffer the caller reuses. Each
    decoded tensor's file pages leave the process."""
    file, config, matched = _open_for_tensors(path, dtype)

    def decode(info: TensorInfo, entry: _Entry, out: torch.Tensor | None = None) -> torch.Tensor:
        tensor = _load_tensor(file, info, entry, config, True, dtype, out)
        file.release(info)
        return tensor

    return config, [LazyTensor(hf_name, tuple(reversed(info.dims)), dtype, functools.partial(decode, info, entry))
                    for info, hf_name, entry in matched]


def _plain_metadata(md: dict[str, Any]) -> dict[str, Any]:
    plain = {}
    for key, value in md.items():
        if isinstance(value, (list, np.ndarray)):
            if len(value) > _LISTED_ARRAY_LEN:
                continue
            value = value.tolist() if isinstance(value, np.ndarray) else value
        plain[key] = value
    return plain

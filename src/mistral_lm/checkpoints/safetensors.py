"""Hugging Face checkpoint folders in PyTorch: lazy (mmapped) reading, sharded writing.

Which files a folder holds (and the shard index's guard) is `hf_folder`'s, shared with Flax.

Reading never unpickles: safetensors files are parsed by the safetensors library, and the
legacy `pytorch_model.bin` only through `torch.load(weights_only=True)`, which refuses
arbitrary Python objects. Every failure becomes a CheckpointError that names the file.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import json
import math
import mmap
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from .hf_folder import SAFE_INDEX, SAFE_WEIGHTS, weight_files

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_FLOAT_CODES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def iter_tensors(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of a checkpoint folder, one shard at a time.

    With `dtype`, floating tensors come converted to it, one at a time (see iter_safetensors_file).
    """
    for file in weight_files(folder):
        if file.suffix == ".safetensors":
            yield from iter_safetensors_file(file, dtype)
        else:
            for name, tensor in _load_pickle_free(file).items():
                yield name, _cast(tensor, dtype)


def iter_safetensors_file(file: Path, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors mmapped as they are; tensors to convert are read with pread instead.

    Pages of a mapping stay resident until the file is closed, so converting from the mapping
    would hold the whole source shard and its converted copy at once (1.5x a float32 file when
    loading it as bfloat16); pread holds only one source tensor at a time.
    """
    try:
        with safe_open(str(file), framework="pt") as handle:
            names = list(handle.keys())
            convert = dtype is not None and any(_needs_cast(handle.get_slice(n).get_dtype(), dtype) for n in names)
        with safe_open(str(file), framework="pt", backend="pread" if convert else "mmap") as handle:
            for name in names:
                yield name, _cast(handle.get_tensor(name), dtype)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{file} is not a valid safetensors file: {exc}") from exc


def release_file_pages(tensor: torch.Tensor) -> bool:
    """Drop the pages of `tensor` that lie in a mapping of a file from this process (MADV_DONTNEED:
    they stay in the page cache, and fault back in from the file if read again); whether it did.
    A loader that quantized a weight it read from a folder's mapped shard calls it, so a 7B read
    whole does not stay whole in its RSS while its embedding keeps the shards mapped. Only for a
    tensor never written since it was mapped (torch maps safetensors shards private and
    writable: a written page would go back to the file's bytes); memory that is not a file's
    mapping (the heap) is left alone."""
    if tensor.device.type != "cpu" or not hasattr(mmap, "MADV_DONTNEED") or _libc() is None:
        return False
    start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes
    if not (_FILE_MAPS.covers(start, end) or _FILE_MAPS.refresh().covers(start, end)):
        return False
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    return last <= first or _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first),
                                            mmap.MADV_DONTNEED) == 0


class _FileMaps:
    """The address ranges of this process's mappings of files (/proc/self/maps), read again when
    an address is not in them."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def refresh(self) -> _FileMaps:
        ranges = []
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and fields[1].startswith("r") and fields[4] != "0" and fields[5].startswith("/"):
                        lo, hi = fields[0].split("-")
                        ranges.append((int(lo, 16), int(hi, 16)))
        except OSError:
            pass
        ranges.sort()
        self.starts, self.ends = [r[0] for r in ranges], [r[1] for r in ranges]
        return self

    def covers(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.starts, start) - 1
        return i >= 0 and end <= self.ends[i]


_FILE_MAPS = _FileMaps()


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def _needs_cast(code: str, dtype: torch.dtype) -> bool:
    """Whether a tensor stored as safetensors dtype `code` ('F32', 'BF16', 'I64', ...) becomes `dtype`."""
    return code.startswith(("F", "BF")) and _FLOAT_CODES.get(code) != dtype


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or not tensor.dtype.is_floating_point or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


def _load_pickle_free(file: Path) -> dict[str, torch.Tensor]:
    try:
        # mmap needs the zip format of torch >= 1.6; older (legacy) files are read whole
        data = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(
            f"{file} could not be loaded with torch.load(weights_only=True) (it is truncated, or holds "
            f"objects other than tensors, which we never unpickle): {exc}"
        ) from exc
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{file} does not hold a flat name -> tensor dictionary")
    return data


def parse_size(size: int | str) -> int:
    """'5GB' -> 5_000_000_000, '200MiB' -> 209_715_200, ints pass through."""
    if isinstance(size, int):
        return size
    match = _SIZE.match(size)
    if not match:
        raise CheckpointError(f"cannot parse size {size!r}; use e.g. '5GB', '500MB' or a byte count")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


class LazyTensor(NamedTuple):
    """A tensor to write or load, known by name, shape and dtype before `load` makes it (a
    GGUF's decoded ones also take `load(out=tensor)`, a buffer of that shape and dtype)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[..., torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def lazy_tensors(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> list[LazyTensor] | None:
    """Every tensor of a safetensors checkpoint folder, in file order, as a LazyTensor that reads
    it (with pread: one tensor's bytes, not a mapping's pages that stay resident) and casts it to
    `dtype` when made; a writer then holds one shard at a time. None where a file is pickled or
    a tensor is not floating point (a quantized checkpoint): those are loaded whole."""
    files = weight_files(folder)
    if any(file.suffix != ".safetensors" for file in files):
        return None
    entries = []
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                slices = [(name, handle.get_slice(name)) for name in handle.keys()]
                stored = [(name, _FLOAT_CODES.get(s.get_dtype()), tuple(s.get_shape())) for name, s in slices]
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{file} is not a valid safetensors file: {exc}") from exc
        if any(kind is None for _, kind, _ in stored):
            return None
        entries += [LazyTensor(name, shape, dtype or kind, lambda f=file, n=name: _read(f, n, dtype))
                    for name, kind, shape in stored]
    return entries


def _read(file: Path, name: str, dtype: torch.dtype | None) -> torch.Tensor:
    try:
        with safe_open(str(file), framework="pt", backend="pread") as handle:
            return _cast(handle.get_tensor(name), dtype)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{file}: cannot read {name}: {exc}") from exc


def split_shards(tensors: list[LazyTensor], max_shard_size: int | str) -> list[list[LazyTensor]]:
    """`tensors` in order, cut into shards of at most `max_shard_size` bytes each (a tensor
    larger than that gets a shard of its own)."""
    limit = parse_size(max_shard_size)
    shards: list[list[LazyTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def eager(state_dict: dict[str, torch.Tensor]) -> list[LazyTensor]:
    """A state dict's tensors as LazyTensors that are already made."""
    return [LazyTensor(k, tuple(t.shape), t.dtype, lambda t=t: t) for k, t in state_dict.items()]


def write_shard(shard: list[LazyTensor], file: Path) -> None:
    """One shard's tensors made, written, and let go: a writer holds one shard at a time."""
    tensors = {}
    for entry in shard:
        tensor = entry.load().detach().to("cpu").contiguous()
        if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise CheckpointError(f"{entry.name}: made {tuple(tensor.shape)} {tensor.dtype}, "
                                  f"announced {entry.shape} {entry.dtype}")
        tensors[entry.name] = tensor
    save_file(tensors, str(file), metadata={"format": "pt"})


def save_state_dict(
    state_dict: dict[str, torch.Tensor] | list[LazyTensor], folder: str | os.PathLike,
    max_shard_size: int | str = "5GB",
) -> list[Path]:
    """Write safetensors, sharded with an index above `max_shard_size` (Transformers' layout).
    LazyTensors are made one shard at a time."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob("model*.safetensors"), folder / SAFE_INDEX]:
        stale.unlink(missing_ok=True)
    entries = eager(state_dict) if isinstance(state_dict, dict) else state_dict
    shards = split_shards(entries, max_shard_size)
    if len(shards) == 1:
        write_shard(shards[0], folder / SAFE_WEIGHTS)
        return [folder / SAFE_WEIGHTS]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        write_shard(shard, folder / name)
        weight_map.update(dict.fromkeys((entry.name for entry in shard), name))
    index = {"metadata": {"total_size": sum(entry.nbytes for entry in entries)}, "weight_map": weight_map}
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return [folder / n for n in names]

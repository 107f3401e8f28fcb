"""Read rank r's tensors from safetensors files: `get_slice` of its rows or columns only.

A column-parallel slice is contiguous rows of the file; a row-parallel one is a strided read of
the rank's columns into a fresh tensor; replicated tensors are mmapped whole. A rank never holds
another rank's slices. Nothing here imports modeling.py or loading.py.

GGUF files are read through checkpoints/gguf.py with its blocks left in the memory map
(`load_gguf(dequantize=False)`); `gguf_shard` cuts each block tensor to the rank's rows (Q/K
rows, which llama.cpp reordered within each head, gathered back for the rank's heads only) or
block-aligned columns, and copies only that.
"""

from __future__ import annotations

from collections.abc import Container
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

import numpy as np

from ..checkpoints.gguf import GGUFQuantizedTensor
from ..checkpoints.hf_folder import model_key, skippable
from ..errors import CheckpointError
from .plan import Split, TensorParallelPlan
from .quantize import shard_gguf_blocks


def read_shard(files: list[Path], plan: TensorParallelPlan, full_shapes: dict[str, torch.Size],
               dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The rank's tensors under the model's names: slices read with `get_slice`, replicated
    tensors mmapped whole, floats converted to `dtype` (None: as stored). A tensor whose full
    shape differs from the model's is a CheckpointError naming it, before any slice is read."""
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix != ".safetensors":
            raise CheckpointError(f"{file}: tensor-parallel loading reads slices of safetensors files; "
                                  "save the checkpoint as safetensors first")
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    key = _model_key(name, full_shapes, file)
                    if key is not None:
                        tensors[key] = cast(_read(handle, name, key, plan, full_shapes[key], file), dtype)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file} is not a valid safetensors file: {exc}") from exc
    return tensors


def _model_key(name: str, expected: Container[str], file: Path) -> str | None:
    key = model_key(name, expected)
    if key is None and not skippable(name, expected):
        raise CheckpointError(f"unexpected tensor {name!r} in {file}: the model has no such parameter")
    return key


def _read(handle: Any, name: str, key: str, plan: TensorParallelPlan, shape: torch.Size, file: Path) -> torch.Tensor:
    piece = handle.get_slice(name)
    stored = tuple(piece.get_shape())
    if stored != tuple(shape):
        raise CheckpointError(f"tensor {name!r} in {file} has shape {stored}, the model expects {tuple(shape)}")
    split = plan.split(key)
    if split.dim is None:
        return handle.get_tensor(name)
    if split.dim == 0:
        return piece[split.start:split.stop]
    return piece[:, split.start:split.stop]


def cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or not tensor.dtype.is_floating_point or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


def gguf_shard(tensors: dict[str, Any], plan: TensorParallelPlan) -> tuple[dict[str, torch.Tensor],
                                                                         dict[str, GGUFQuantizedTensor]]:
    """A `load_gguf(dequantize=False)` state dict cut to the rank: (float tensors, block tensors)."""
    floats: dict[str, torch.Tensor] = {}
    blocks: dict[str, GGUFQuantizedTensor] = {}
    for name, tensor in tensors.items():
        split = plan.split(name)
        if isinstance(tensor, torch.Tensor):
            floats[name] = tensor if split.dim is None else split.apply(tensor).clone()
        else:
            blocks[name] = tensor if split.dim is None else _shard_blocks(tensor, split)
    return floats, blocks


def _shard_blocks(tensor: GGUFQuantizedTensor, split: Split) -> GGUFQuantizedTensor:
    rows, columns = tensor.shape
    if split.dim == 0:  # HF rows: rows() gathers reordered Q/K rows for this slice only
        return GGUFQuantizedTensor(tensor.ggml_type, (split.stop - split.start, columns),
                                   np.ascontiguousarray(tensor.rows(split.start, split.stop)))
    if tensor.row_order is not None:
        raise CheckpointError("a column slice of reordered Q/K rows: the plan never asks for one")
    part = shard_gguf_blocks(SimpleNamespace(ggml_type=tensor.ggml_type, shape=tensor.shape, data=tensor.stored), split)
    return GGUFQuantizedTensor(tensor.ggml_type, part.shape, np.ascontiguousarray(part.data))

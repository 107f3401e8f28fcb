"""Tiny helpers shared by modules that must not import each other (config, checkpoints, flax)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import torch


def is_int(value: Any) -> bool:
    """An int that is not a bool: `True` is an int to Python but never a count or a token id."""
    return isinstance(value, int) and not isinstance(value, bool)


class Output:
    """Frozen-ish dataclass outputs with attribute access, `out[0]` and `out["logits"]`, as
    Transformers' ModelOutput: the model's outputs and generate()'s share it."""

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)  # type: ignore[arg-type]

    def __getitem__(self, key: int | str) -> Any:
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]  # type: ignore[arg-type]


def stacked_view(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One tensor viewing `tensors` stacked along rows, where each already follows the previous
    one in one storage (contiguous, same dtype and row shape); else None. What `torch.cat` would
    return, without the copy: a loader that decoded or quantized a fusable group at once leaves
    its parts so."""
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        if (t.device != first.device or t.device.type == "meta" or t.dtype != first.dtype or t.dim() == 0
                or not t.is_contiguous() or t.shape[1:] != first.shape[1:] or t.storage_offset() != offset
                or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):
            return None
        offset += t.numel()
    return first.as_strided((sum(t.shape[0] for t in tensors), *first.shape[1:]), first.stride())

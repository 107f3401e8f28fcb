"""Tiny helpers shared by modules that must not import each other (config, checkpoints, flax)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any


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

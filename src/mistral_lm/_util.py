"""Tiny helpers shared by modules that must not import each other (config, checkpoints, flax)."""

from __future__ import annotations

from typing import Any


def is_int(value: Any) -> bool:
    """An int that is not a bool: `True` is an int to Python but never a count or a token id."""
    return isinstance(value, int) and not isinstance(value, bool)

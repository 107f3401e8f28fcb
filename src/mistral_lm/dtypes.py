"""The one parser of float dtype names: `torch_dtype=`, `bnb_4bit_compute_dtype=` and the Flax
twin's `dtype=` alike. The name table is framework-free; each framework maps the canonical name."""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

# Every spelling Transformers users pass (with or without a "torch." prefix) -> canonical name.
FLOAT_NAMES = {"float32": "float32", "float": "float32", "fp32": "float32",
               "float16": "float16", "half": "float16", "fp16": "float16",
               "bfloat16": "bfloat16", "bf16": "bfloat16"}


def float_name(value: Any, field: str = "torch_dtype") -> str:
    """"float32", "float16" or "bfloat16" for any accepted spelling or dtype object (torch's,
    numpy's or jax's); anything else (None and "auto" included: callers decide what those
    mean) is a ConfigError naming `field`.

    >>> float_name("torch.bfloat16"), float_name("half")
    ('bfloat16', 'float16')
    """
    text = value if isinstance(value, str) else str(getattr(value, "name", value))
    name = FLOAT_NAMES.get(text.removeprefix("torch."))
    if name is None:
        raise ConfigError(
            f"{field} must be a float32, float16 or bfloat16 dtype, or one of the names "
            f"{', '.join(FLOAT_NAMES)}; got {value!r}"
        )
    return name


def resolve_dtype(value: Any, field: str = "torch_dtype") -> Any:
    """torch.float16, "float16", "fp16" or "torch.float16" -> torch.float16 (see float_name).

    >>> resolve_dtype("torch.bfloat16"), resolve_dtype("half")
    (torch.bfloat16, torch.float16)
    """
    import torch

    if isinstance(value, str) or isinstance(value, torch.dtype):
        return getattr(torch, float_name(value, field))
    raise ConfigError(f"{field} must be a torch float dtype or its name, got {value!r}")

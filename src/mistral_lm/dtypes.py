"""The one parser of torch dtype names, for `torch_dtype=` and `bnb_4bit_compute_dtype=` alike."""

from __future__ import annotations

from typing import Any

import torch

from .errors import ConfigError

# Every spelling Transformers users pass, with or without a "torch." prefix.
FLOAT_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
                "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(value: Any, field: str = "torch_dtype") -> torch.dtype:
    """torch.float16, "float16", "fp16" or "torch.float16" -> torch.float16; anything else
    (None and "auto" included: callers decide what those mean) is a ConfigError naming `field`.

    >>> resolve_dtype("torch.bfloat16"), resolve_dtype("half")
    (torch.bfloat16, torch.float16)
    """
    if isinstance(value, torch.dtype) and value in FLOAT_DTYPES.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in FLOAT_DTYPES:
        return FLOAT_DTYPES[value.removeprefix("torch.")]
    raise ConfigError(
        f"{field} must be torch.float32, torch.float16 or torch.bfloat16, or one of the names "
        f"{', '.join(FLOAT_DTYPES)}; got {value!r}"
    )

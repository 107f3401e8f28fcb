"""BitsAndBytesConfig: Transformers' quantization options, validated, mapped onto our kernels.

The constructor takes Transformers' keywords so user code written for `bitsandbytes` runs
unchanged; what each option means here:

- `load_in_8bit` -> `Int8Linear` (symmetric per-output-channel int8, weight-only).
- `load_in_4bit` with `bnb_4bit_quant_type` "fp4" / "nf4" -> `NF4Linear` (bitsandbytes'
  codebooks and absmax blocks of `group_size`, default 64 = bitsandbytes' blocksize), or
  "int4" (ours) -> `Int4Linear` (group-wise affine 4-bit on torch's int4 kernels; the fast one;
  groups of 32 by default, 0.625 bytes/param with bfloat16 scales and zeros).
- `bnb_4bit_compute_dtype` (also used by the int8 path): the dtype the matmul runs in. None
  means bfloat16, not bitsandbytes' float32, because torch's CPU int4/int8 kernels are
  vectorized only for bfloat16 activations (float32 and float16 go through a scalar loop;
  bench/RESULTS.md). Inputs are cast to it and outputs cast back.

Accepted but not honored (each warns once when set to a non-default value):
`llm_int8_threshold` (weight-only int8 never quantizes activations, so there are no activation
outliers to split off), `bnb_4bit_use_double_quant` (absmax stays float32: 0.0625 B/param, the
double-quantized form would save 0.055), `llm_int8_enable_fp32_cpu_offload`,
`llm_int8_has_fp16_weight` and `bnb_4bit_quant_storage` (storage is always uint8).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..dtypes import resolve_dtype
from ..errors import ConfigError

QUANT_TYPES = ("fp4", "nf4", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 kernels accept
# Transformers keys we read and ignore, with the value that means "nothing asked for".
_IGNORED = {"llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "bnb_4bit_quant_storage": None}
_SERIALIZATION_ONLY = ("quant_method", "_load_in_8bit", "_load_in_4bit")
_warned: set[str] = set()


def _warn_once(option: str, why: str) -> None:
    if option not in _warned:
        _warned.add(option)
        warnings.warn(f"BitsAndBytesConfig: {option} is accepted but not honored: {why}", stacklevel=3)


class BitsAndBytesConfig:
    """Weight-only quantization options with Transformers' names (see the module docstring).

    >>> cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="int4", group_size=64)
    >>> cfg.compute_dtype, BitsAndBytesConfig.from_dict(cfg.to_dict()).group_size
    (torch.bfloat16, 64)
    """

    def __init__(
        self,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        llm_int8_threshold: float = 6.0,
        llm_int8_skip_modules: list[str] | None = None,
        llm_int8_enable_fp32_cpu_offload: bool = False,
        llm_int8_has_fp16_weight: bool = False,
        bnb_4bit_compute_dtype: torch.dtype | str | None = None,
        bnb_4bit_quant_type: str = "fp4",
        bnb_4bit_use_double_quant: bool = False,
        bnb_4bit_quant_storage: Any = None,
        group_size: int | None = None,
    ) -> None:
        for name, value in (("load_in_8bit", load_in_8bit), ("load_in_4bit", load_in_4bit),
                            ("bnb_4bit_use_double_quant", bnb_4bit_use_double_quant)):
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be True or False, got {value!r}")
        if load_in_8bit and load_in_4bit:
            raise ConfigError("load_in_8bit and load_in_4bit are both True; choose one of them")
        if isinstance(llm_int8_threshold, bool) or not isinstance(llm_int8_threshold, (int, float)) \
                or not llm_int8_threshold >= 0:
            raise ConfigError(f"llm_int8_threshold must be a number >= 0, got {llm_int8_threshold!r}")
        if llm_int8_skip_modules is not None and (
                isinstance(llm_int8_skip_modules, str)
                or not all(isinstance(m, str) and m for m in llm_int8_skip_modules)):
            raise ConfigError(
                f"llm_int8_skip_modules must be a list of module names, got {llm_int8_skip_modules!r}"
            )
        if bnb_4bit_quant_type not in QUANT_TYPES:
            raise ConfigError(f"bnb_4bit_quant_type must be one of {QUANT_TYPES}, got {bnb_4bit_quant_type!r}")
        if group_size is None:
            # int4: 32, the block of llama.cpp's Q4 formats: re-quantizing weights that already sit
            # on a 32-block grid (e.g. a Q4_1 GGUF) onto 64-blocks loses far more accuracy
            # (bench/ACCURACY.md). The codebook formats keep bitsandbytes' blocksize, 64.
            group_size = 32 if bnb_4bit_quant_type == "int4" else 64
        if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
            raise ConfigError(
                f"group_size must be one of {GROUP_SIZES} (the group sizes torch's int4 kernels "
                f"accept), got {group_size!r}"
            )
        self.load_in_8bit = load_in_8bit
        self.load_in_4bit = load_in_4bit
        self.llm_int8_threshold = float(llm_int8_threshold)
        self.llm_int8_skip_modules = list(llm_int8_skip_modules) if llm_int8_skip_modules is not None else None
        self.bnb_4bit_compute_dtype = (
            None if bnb_4bit_compute_dtype is None else resolve_dtype(bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype")
        )
        self.bnb_4bit_quant_type = bnb_4bit_quant_type
        self.bnb_4bit_use_double_quant = bnb_4bit_use_double_quant
        self.group_size = group_size
        if llm_int8_threshold != 6.0:
            _warn_once("llm_int8_threshold", "weight-only int8 never quantizes activations")
        if bnb_4bit_use_double_quant:
            _warn_once("bnb_4bit_use_double_quant", "absmax is kept in float32")
        given = {"llm_int8_enable_fp32_cpu_offload": llm_int8_enable_fp32_cpu_offload,
                 "llm_int8_has_fp16_weight": llm_int8_has_fp16_weight,
                 "bnb_4bit_quant_storage": bnb_4bit_quant_storage}
        for name, value in given.items():
            if value not in (_IGNORED[name], "uint8", torch.uint8):
                _warn_once(name, "quantized weights are always stored as uint8/int8 on the model's device")

    @property
    def compute_dtype(self) -> torch.dtype:
        """The matmul dtype: `bnb_4bit_compute_dtype`, or bfloat16 (see the module docstring)."""
        return self.bnb_4bit_compute_dtype or torch.bfloat16

    @property
    def skip_modules(self) -> list[str]:
        """Module-name suffixes left in full precision; bitsandbytes' default keeps `lm_head`."""
        return self.llm_int8_skip_modules if self.llm_int8_skip_modules is not None else ["lm_head"]

    def to_dict(self) -> dict[str, Any]:
        """The `quantization_config` entry of config.json (Transformers' keys plus `group_size`)."""
        dtype = self.bnb_4bit_compute_dtype
        return {
            "quant_method": "bitsandbytes",
            "load_in_8bit": self.load_in_8bit,
            "load_in_4bit": self.load_in_4bit,
            "llm_int8_threshold": self.llm_int8_threshold,
            "llm_int8_skip_modules": self.llm_int8_skip_modules,
            "bnb_4bit_compute_dtype": None if dtype is None else str(dtype).removeprefix("torch."),
            "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
            "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
            "group_size": self.group_size,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BitsAndBytesConfig:
        """Inverse of `to_dict`; also reads the dict Transformers writes (extra keys ignored)."""
        if not isinstance(data, dict):
            raise ConfigError(f"quantization_config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        method = data.get("quant_method", "bitsandbytes")
        if method != "bitsandbytes":
            raise ConfigError(f"quant_method {method!r} is not supported; only 'bitsandbytes' options are")
        for key in _SERIALIZATION_ONLY:
            data.pop(key, None)
        try:
            return cls(**data)
        except TypeError as exc:  # an unknown key: name it as a config problem
            raise ConfigError(f"quantization_config: {exc}") from exc

    def __repr__(self) -> str:
        return f"BitsAndBytesConfig({self.to_dict()})"

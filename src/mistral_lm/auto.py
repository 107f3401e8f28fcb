"""Auto classes: dispatch on `config.model_type` ("mistral" or "llama"), nothing else.

Llama checkpoints are Mistral without a sliding window, so both map onto the same classes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import SUPPORTED_MODEL_TYPES, MistralConfig
from .errors import ConfigError


def _config_for(path: str | os.PathLike, gguf_file: str | None = None, **overrides: Any) -> MistralConfig:
    target = Path(path) / gguf_file if gguf_file else Path(path)
    if target.suffix == ".gguf":
        from .checkpoints.gguf import config_from_gguf, read_gguf

        return config_from_gguf(read_gguf(target))
    from .checkpoints.mistral_format import config_from_params, is_mistral_folder, read_params

    if is_mistral_folder(target):  # params.json, no config.json: Mistral's own layout
        return config_from_params(read_params(target), **overrides)
    return MistralConfig.from_pretrained(target, **overrides)


class AutoConfig:
    @staticmethod
    def from_pretrained(path: str | os.PathLike, **kwargs: Any) -> MistralConfig:
        return _config_for(path, **kwargs)

    @staticmethod
    def for_model(model_type: str, **kwargs: Any) -> MistralConfig:
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
        return MistralConfig.from_dict({"model_type": model_type, **kwargs})


class _AutoModel:
    _class_name = ""

    @classmethod
    def _cls(cls) -> type:
        from . import modeling

        return getattr(modeling, cls._class_name)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *args: Any, **kwargs: Any):
        """`tp_plan="auto"` (or `tp_size=N`), Transformers' keywords, under `torchrun`: this rank's
        tensor-parallel shard, read slice by slice (`mistral_lm.parallel.from_pretrained`)."""
        if kwargs.get("tp_plan") is not None or kwargs.get("tp_size") is not None:
            from .parallel import from_pretrained as sharded

            if args:
                raise TypeError("with tp_plan, pass from_pretrained's options as keywords")
            kwargs.setdefault("tp_plan", "auto")
            return sharded(path, cls=cls._cls(), **kwargs)
        return cls._cls().from_pretrained(path, *args, **kwargs)

    @classmethod
    def from_config(cls, config: MistralConfig, **kwargs: Any):
        return cls._cls().from_config(config, **kwargs)


class AutoModel(_AutoModel):
    _class_name = "MistralModel"


class AutoModelForCausalLM(_AutoModel):
    _class_name = "MistralForCausalLM"


class AutoModelForSequenceClassification(_AutoModel):
    _class_name = "MistralForSequenceClassification"


class AutoTokenizer:
    @staticmethod
    def from_pretrained(path: str | os.PathLike, *args: Any, gguf_file: str | None = None, **kwargs: Any):
        from .tokenizer import MistralTokenizer

        target = Path(path) / gguf_file if gguf_file else path
        return MistralTokenizer.from_pretrained(target, *args, **kwargs)

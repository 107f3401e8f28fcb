"""mistral_lm: a small, fast, Hugging Face-compatible implementation of the Mistral family.

Public names resolve lazily (PEP 562), so `import mistral_lm` stays cheap and never imports jax
or the server stack unless a Flax or serving name is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "MistralConfig": "config",
    "MistralPreTrainedModel": "pretrained",
    "MistralModel": "modeling",
    "MistralForCausalLM": "modeling",
    "MistralForSequenceClassification": "modeling",
    "AutoConfig": "auto",
    "AutoModel": "auto",
    "AutoModelForCausalLM": "auto",
    "AutoModelForSequenceClassification": "auto",
    "AutoTokenizer": "auto",
    "MistralTokenizer": "tokenizer",
    "LlamaTokenizer": "tokenizer",
    "LlamaTokenizerFast": "tokenizer",
    "BatchEncoding": "tokenizer",
    "GenerationConfig": "generation",
    "TextStreamer": "streamers",
    "TextIteratorStreamer": "streamers",
    "BitsAndBytesConfig": "quantization",
    "FlaxMistralModel": "flax.modeling",
    "FlaxMistralForCausalLM": "flax.modeling",
    "MistralLMError": "errors",
    "ConfigError": "errors",
    "CheckpointError": "errors",
    "TokenizerError": "errors",
    "GenerationError": "errors",
    "InputError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mistral_lm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

"""MistralConfig: the Transformers field names and Mistral-7B defaults, validated at construction.

A config is the contract between checkpoint files and modules, so it is checked eagerly: a bad
value fails here with the field's name rather than later as a shape error inside torch. Keys of
`config.json` that we do not model (quantization notes, Transformers bookkeeping) are kept and
written back, so a load/save round trip loses nothing.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

from ._util import is_int
from .errors import ConfigError

CONFIG_NAME = "config.json"
SUPPORTED_MODEL_TYPES = ("mistral", "llama")
SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")

# Field -> default (Mistral-7B-v0.1 as in Transformers' MistralConfig).
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": None,
    "hidden_act": "silu",
    "max_position_embeddings": 4096 * 32,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "use_cache": True,
    "pad_token_id": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "attention_dropout": 0.0,
    "attention_bias": False,
    "mlp_bias": False,
    "num_labels": 2,
    "problem_type": None,
    "output_attentions": False,
    "output_hidden_states": False,
    "return_dict": True,
}
_PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")


class MistralConfig:
    """Hyper-parameters of a Mistral (or Llama, with `sliding_window=None`) model.

    >>> cfg = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                     num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    >>> cfg.head_dim
    16
    """

    model_type = "mistral"

    def __init__(self, **kwargs: Any) -> None:
        self.model_type = kwargs.pop("model_type", type(self).model_type)
        rope_parameters = kwargs.pop("rope_parameters", None)
        rope_scaling = kwargs.pop("rope_scaling", None)
        id2label = kwargs.pop("id2label", None)
        kwargs.pop("label2id", None)
        if id2label is not None and kwargs.get("num_labels", len(id2label)) != len(id2label):
            # as in Transformers: an explicit num_labels (e.g. from_pretrained(..., num_labels=5))
            # wins over the id2label of config.json, and the labels become LABEL_0, LABEL_1, ...
            warnings.warn(f"num_labels={kwargs['num_labels']!r} does not match id2label's {len(id2label)} "
                          "labels; using generic labels", stacklevel=2)
            id2label = None
        for name, default in _DEFAULTS.items():
            setattr(self, name, kwargs.pop(name, default))
        self.architectures: list[str] | None = kwargs.pop("architectures", None)
        self.torch_dtype = kwargs.pop("torch_dtype", kwargs.pop("dtype", None))
        # Transformers 5 stores rope_theta inside rope_parameters; 4.x used rope_scaling.
        for rope in (rope_parameters, rope_scaling):
            if isinstance(rope, dict):
                if "rope_theta" in rope:
                    self.rope_theta = rope["rope_theta"]
                kind = rope.get("rope_type", rope.get("type", "default"))
                if kind not in ("default", None):
                    raise ConfigError(
                        f"rope scaling type {kind!r} is not supported; only plain RoPE "
                        "(rope_type='default') is implemented"
                    )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if id2label is not None:
            self.num_labels = len(id2label)
        self.id2label = {int(k): v for k, v in (id2label or {}).items()} or {
            i: f"LABEL_{i}" for i in range(self.num_labels)
        }
        self.extra: dict[str, Any] = kwargs  # unknown keys, kept for the round trip
        self.validate()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ConfigError naming the first field whose value cannot describe a model."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            _check_positive_int(name, getattr(self, name))
        if self.head_dim is not None:
            _check_positive_int("head_dim", self.head_dim)
            if self.head_dim % 2:
                raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        elif self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}), or head_dim must be given explicitly"
            )
        elif (self.hidden_size // self.num_attention_heads) % 2:
            raise ConfigError("hidden_size // num_attention_heads must be even for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.sliding_window is not None:
            _check_positive_int("sliding_window", self.sliding_window)
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not one of {SUPPORTED_ACTIVATIONS}")
        if not isinstance(self.rms_norm_eps, (int, float)) or not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if not isinstance(self.rope_theta, (int, float)) or not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        if not isinstance(self.attention_dropout, (int, float)) or not 0 <= self.attention_dropout < 1:
            raise ConfigError(f"attention_dropout must be in [0, 1), got {self.attention_dropout!r}")
        if self.attention_bias or self.mlp_bias:
            raise ConfigError("attention_bias / mlp_bias are not part of the Mistral architecture")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
        if self.problem_type not in _PROBLEM_TYPES:
            raise ConfigError(f"problem_type {self.problem_type!r} is not one of {_PROBLEM_TYPES}")
        _check_positive_int("num_labels", self.num_labels)
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and not is_int(value):
                raise ConfigError(f"{name} must be an int or None, got {value!r}")

    # ------------------------------------------------------------------ derived values
    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def label2id(self) -> dict[str, int]:
        return {v: k for k, v in self.id2label.items()}

    @property
    def rope_parameters(self) -> dict[str, Any]:
        return {"rope_type": "default", "rope_theta": self.rope_theta}

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> MistralConfig:
        """The config of the text model: this one (Transformers' multimodal configs nest it)."""
        return self

    @property
    def is_encoder_decoder(self) -> bool:
        return False

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(copy.deepcopy(self.extra))
        out.update({name: getattr(self, name) for name in _DEFAULTS})
        out["rope_parameters"] = self.rope_parameters
        out["model_type"] = self.model_type
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["label2id"] = self.label2id
        if self.architectures is not None:
            out["architectures"] = list(self.architectures)
        if self.torch_dtype is not None:
            out["torch_dtype"] = str(self.torch_dtype).replace("torch.", "")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> MistralConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        data = {**data, **overrides}
        if data.get("model_type", "mistral") == "llama" and "sliding_window" not in data:
            data["sliding_window"] = None  # Llama has no window: full causal attention
        for key in ("transformers_version", "_name_or_path"):
            data.pop(key, None)
        return cls(**data)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> MistralConfig:
        """Read `config.json` from a folder (or the file itself)."""
        file = Path(path)
        if file.is_dir():
            file = file / CONFIG_NAME
        if not file.is_file():
            raise ConfigError(f"no {CONFIG_NAME} found at {path}")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read {file}: {exc}") from exc
        return cls.from_dict(data, **overrides)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(self.to_json_string(), encoding="utf-8")

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MistralConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


def _check_positive_int(name: str, value: Any) -> None:
    if not is_int(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")

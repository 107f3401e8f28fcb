"""MistralPreTrainedModel: the base of every model class (init, ties, device/dtype, generate, save).

Loading lives in loading.py (a pipeline of named steps) and device maps in placement.py;
`from_pretrained` and `from_config` here only hand over to them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoints.safetensors import save_state_dict
from .config import MistralConfig
from .errors import CheckpointError, ConfigError
from .placement import module_device

__all__ = ["MistralPreTrainedModel", "module_device"]


class MistralPreTrainedModel(nn.Module):
    """Base of every model class: config, weight init, from/save_pretrained, generate."""

    config_class = MistralConfig
    base_model_prefix = "model"

    def __init__(self, config: MistralConfig) -> None:
        super().__init__()
        if not isinstance(config, MistralConfig):
            raise ConfigError(f"expected a MistralConfig, got {type(config).__name__}")
        self.config = config
        self.attn_implementation = "sdpa"
        self.quantization_config: Any = None

    @property
    def attn_implementation(self) -> str:
        return self._attn_implementation

    @attn_implementation.setter
    def attn_implementation(self, name: str) -> None:
        """Set for the whole model: a head model and the decoder inside it run the same kernels."""
        for module in self.modules():
            if isinstance(module, MistralPreTrainedModel):
                object.__setattr__(module, "_attn_implementation", name)

    # ------------------------------------------------------------------ init and ties
    def post_init(self) -> None:
        """Initialize weights not yet initialized (as Transformers does), then tie embeddings."""
        for module in self.modules():
            if getattr(module, "_weights_initialized", False):
                continue
            self._init_weights(module)
            module._weights_initialized = True
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        weight = getattr(module, "weight", None)
        if weight is None or weight.is_meta:
            return
        with torch.no_grad():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()

    def tie_weights(self) -> None:
        """Share the embedding with a float lm_head; a quantized head holds its own codes."""
        head = getattr(self, "lm_head", None)
        if isinstance(head, nn.Linear) and self.config.tie_word_embeddings:  # Linear or MatvecLinear
            head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens if hasattr(self, "model") else self.embed_tokens  # type: ignore[return-value]

    def get_output_embeddings(self) -> nn.Module | None:
        return getattr(self, "lm_head", None)

    @property
    def device(self) -> torch.device:
        return module_device(self)

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.parameters() if p.dtype.is_floating_point)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        seen: set[int] = set()
        total = 0
        for name, p in self.named_parameters():
            if id(p) in seen or (exclude_embeddings and "embed_tokens" in name):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Greedy or sampled continuation; see mistral_lm.generation.generate."""
        from .generation import generate

        return generate(self, *args, **kwargs)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_config(cls, config: MistralConfig, **kwargs: Any):
        """A randomly initialized model; see `mistral_lm.loading.from_config`."""
        from . import loading

        return loading.from_config(cls, config, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """Load an HF folder or a .gguf file; the keywords are `mistral_lm.loading.from_pretrained`'s
        (torch_dtype, device_map, quantization_config, gguf_native, fuse_projections, ...)."""
        from . import loading

        return loading.from_pretrained(cls, pretrained_model_name_or_path, **kwargs)

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self, save_directory: str | os.PathLike, *, max_shard_size: int | str = "5GB",
        safe_serialization: bool = True, state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write config.json and safetensors weights in the Transformers layout."""
        if not safe_serialization:
            raise CheckpointError("only safetensors output is written (safe_serialization=True)")
        from .quantization.gguf import GGUFLinear

        if any(isinstance(m, GGUFLinear) for m in self.modules()):
            raise CheckpointError(
                "this model computes on GGUF blocks (gguf_native=True), which have no safetensors form; "
                "load the file without gguf_native to save it (or run `mistral-lm convert`)"
            )
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        state = dict(state_dict if state_dict is not None else self.state_dict())
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        self.config.architectures = [type(self).__name__]
        self.config.torch_dtype = self.dtype
        if self.quantization_config is not None:
            self.config.extra["quantization_config"] = self.quantization_config.to_dict()
        self.config.save_pretrained(folder)
        save_state_dict(state, folder, max_shard_size)

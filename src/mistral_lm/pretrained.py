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

from .attention import default_implementation
from .checkpoints.safetensors import save_state_dict
from .config import MistralConfig
from .errors import CheckpointError, ConfigError
from .placement import module_device

__all__ = ["MistralPreTrainedModel", "module_device"]


class MistralPreTrainedModel(nn.Module):
    """Base of every model class: config, weight init, from/save_pretrained, generate, and the
    part of Transformers' PreTrainedModel surface that pipelines, peft and trl call
    (`can_generate`, `generation_config`, gradient checkpointing, input grads)."""

    config_class = MistralConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    input_modalities = ("text",)
    output_modalities = ("text",)
    _generates = False  # heads with a language-model output set True

    def __init__(self, config: MistralConfig) -> None:
        super().__init__()
        if not isinstance(config, MistralConfig):
            raise ConfigError(f"expected a MistralConfig, got {type(config).__name__}")
        self.config = config
        self.attn_implementation = default_implementation(None)  # what from_pretrained / from_config pick
        self.kv_cache_dtype = None
        self.quantization_config: Any = None

    @property
    def attn_implementation(self) -> str:
        return self._attn_implementation

    @attn_implementation.setter
    def attn_implementation(self, name: str) -> None:
        """Set for the whole model: a head model and the decoder inside it run the same kernels."""
        self._set_on_every_model("_attn_implementation", name)

    def _set_on_every_model(self, name: str, value: Any) -> None:
        """One setting for this model and every MistralPreTrainedModel inside it (a head's decoder)."""
        for module in self.modules():
            if isinstance(module, MistralPreTrainedModel):
                object.__setattr__(module, name, value)

    @property
    def kv_cache_dtype(self) -> torch.dtype | None:
        """The dtype `make_cache` stores keys and values in; None: the model's activations' dtype.
        A GGUF model on the native kernels stores them in float16 by default, as llama.cpp does:
        half the memory and half the bytes a long decode step reads, at a rounding well under what
        the kernels' 8-bit activations already cost (bench/RESULTS.md).
        `from_pretrained(kv_cache_dtype=torch.float32)` keeps float32."""
        return self._kv_cache_dtype

    @kv_cache_dtype.setter
    def kv_cache_dtype(self, dtype: torch.dtype | None) -> None:
        if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"kv_cache_dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
        self._set_on_every_model("_kv_cache_dtype", dtype)

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

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Greedy, sampled or beam-search continuation: token ids, or an output object with
        `return_dict_in_generate=True`; see mistral_lm.generation.generate."""
        from .generation import generate

        return generate(self, *args, **kwargs)

    def train(self, mode: bool = True) -> MistralPreTrainedModel:
        """Training mode also releases the fused inference projections (fusion.py): the parts are
        separate tensors while training; the next eval-mode step fuses them again."""
        if mode:
            from .fusion import release_fusions

            release_fusions(self)
        return super().train(mode)

    # ------------------------------------------------------------------ Transformers surface
    @classmethod
    def can_generate(cls) -> bool:
        """Whether `generate` makes sense for this head (a pipeline asks before calling it)."""
        return cls._generates

    @property
    def generation_config(self) -> Any:
        """The defaults `generate` starts from: the config's special token ids, unless set."""
        config = self.__dict__.get("_generation_config")
        if config is None:
            from .training import ModelGenerationConfig

            cfg = self.config
            config = ModelGenerationConfig(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
                                           bos_token_id=cfg.bos_token_id)
            self.__dict__["_generation_config"] = config
        return config

    @generation_config.setter
    def generation_config(self, value: Any) -> None:
        self.__dict__["_generation_config"] = value

    @property
    def is_quantized(self) -> bool:
        """Whether any Linear computes on quantized codes (a quantization config or GGUF blocks).
        Those weights are frozen buffers: Transformers' Trainer then refuses a fine-tune without
        adapters ("purely quantized models") instead of training only the float rest."""
        from .quantization.modules import QuantizedLinear

        return any(isinstance(m, QuantizedLinear) for m in self.modules())

    @property
    def hf_quantizer(self) -> Any:
        """What Transformers' Trainer reads of a quantized model: adapters on it can train."""
        if not self.is_quantized:
            return None
        from types import SimpleNamespace

        method = "gguf" if self.quantization_config is None else "bitsandbytes"
        return SimpleNamespace(is_trainable=True, is_qat_trainable=False,
                               quantization_config=SimpleNamespace(quant_method=method))

    @property
    def base_model(self) -> nn.Module:
        """The decoder under a head (`base_model_prefix`), or the model itself."""
        return getattr(self, self.base_model_prefix, self)

    def add_model_tags(self, tags: str | list[str]) -> None:
        """Tags a trainer attaches for a model card (trl does); kept in `model_tags`."""
        known = self.__dict__.setdefault("model_tags", [])
        known.extend(t for t in ([tags] if isinstance(tags, str) else tags) if t not in known)

    @property
    def name_or_path(self) -> str:
        return str(self.config.extra.get("_name_or_path", ""))

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict[str, Any] | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute decoder layers' activations in the backward pass instead of storing them
        (torch.utils.checkpoint with these kwargs; `use_reentrant=False` unless given), every
        `every_n_layers`-th layer from the first. Applies in training mode with autograd on; no KV
        cache is kept meanwhile. `offload` (activations in host memory) is what a CPU model does
        anyway; on an accelerator it is refused rather than ignored."""
        if not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ConfigError(f"every_n_layers must be a positive integer, got {every_n_layers!r}")
        if offload and self.device.type != "cpu":
            raise ConfigError("offload=True (saved activations in host memory) is not implemented on "
                              f"{self.device.type}; pass offload=False")
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = {"kwargs": kwargs, "every_n_layers": every_n_layers}

    def activation_checkpointing_disable(self) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = None

    @property
    def is_activation_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", None) for m in self.modules())

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None,
                                      every_n_layers: int = 1, offload: bool = False) -> None:
        """Transformers' older name of `activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, every_n_layers, offload)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing

    def enable_input_require_grads(self) -> None:
        """Make the embeddings' output require grad, so reentrant checkpointing of a model whose
        weights are frozen (LoRA) still has a graph to recompute (as Transformers does)."""
        self.disable_input_require_grads()
        self._require_grads_hook = self.get_input_embeddings().register_forward_hook(
            lambda module, args, output: output.requires_grad_(True))

    def disable_input_require_grads(self) -> None:
        hook = self.__dict__.pop("_require_grads_hook", None)
        if hook is not None:
            hook.remove()

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
        if getattr(self, "tensor_parallel", None) is not None:  # one rank's slices, with divided head counts
            raise CheckpointError("this model is one rank's tensor-parallel shard; save the checkpoint it was "
                                  "loaded from, or load it in one process to save it")
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
        state = _unshared(state)
        self.config.architectures = [type(self).__name__]
        self.config.torch_dtype = self.dtype
        if self.quantization_config is not None:
            self.config.extra["quantization_config"] = self.quantization_config.to_dict()
        self.config.save_pretrained(folder)
        save_state_dict(state, folder, max_shard_size)


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors that share storage with another entry (fused parts viewing one buffer, fusion.py)
    cloned: safetensors refuses to write shared memory."""
    owners: dict[int, int] = {}
    for tensor in state.values():
        key = tensor.untyped_storage().data_ptr()
        owners[key] = owners.get(key, 0) + 1
    return {k: t.clone() if owners[t.untyped_storage().data_ptr()] > 1 else t for k, t in state.items()}

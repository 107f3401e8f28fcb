"""Glue for the Hugging Face training stack: peft (LoRA, QLoRA), trl and Transformers' pipelines.

Nothing here imports peft or transformers at module level; both are the optional `train` extra.

- `ModelGenerationConfig`: our GenerationConfig with the `to_dict`/`to_diff_dict` that
  Transformers' pipelines read from `model.generation_config`.
- `QuantizedLoraLinear` and `register_lora_layers(lora_config)`: LoRA over our quantized base
  layers (Int8Linear, Int4Linear, NF4Linear, GGUFLinear) through peft's custom-module mechanism
  (`LoraConfig._register_custom_module`), peft itself unchanged. The base stays quantized and
  frozen; the adapters train in float32 (QLoRA).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, fields
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .generation import GenerationConfig
from .quantization.modules import QuantizedLinear


class ModelGenerationConfig(GenerationConfig):
    """A model's generation defaults, readable by Transformers' pipelines (`to_diff_dict`)."""

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values.update(values.pop("extra"))
        return values

    def to_diff_dict(self) -> dict[str, Any]:
        """The settings that differ from a default GenerationConfig, as Transformers' method."""
        default = GenerationConfig()
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {k: v for k, v in own.items() if v != getattr(default, k)} | dict(self.extra)

    def update(self, **kwargs: Any) -> ModelGenerationConfig:  # type: ignore[override]
        updated = super().update(**kwargs)
        return ModelGenerationConfig(**{f.name: getattr(updated, f.name) for f in fields(updated)})


def _lora_linear_class() -> type:
    """peft's lora.Linear subclassed for a quantized base; built on first use (peft optional)."""
    global _QUANTIZED_LORA
    if _QUANTIZED_LORA is not None:
        return _QUANTIZED_LORA
    from peft.tuners.lora.layer import Linear

    class QuantizedLoraLinear(Linear):
        """LoRA adapters over a frozen QuantizedLinear: y = base(x) + B(A(dropout(x))) * scale.

        peft's Linear computes exactly that for any base module; what it cannot do for a
        quantized base is merge, which writes `base.weight`. Merging here dequantizes, adds the
        adapters' delta and quantizes again in the base's own format (lossy, as peft's
        bitsandbytes layers are); GGUF blocks have no quantizer here, so merging them is refused.
        """

        def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
            with warnings.catch_warnings():  # peft's "Unsupported layer type": this class is the support
                warnings.filterwarnings("ignore", message="Unsupported layer type")
                super().__init__(base_layer, adapter_name, **kwargs)

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            from peft.tuners.tuners_utils import check_adapters_to_merge

            adapter_names = check_adapters_to_merge(self, adapter_names)
            base = self.get_base_layer()
            weight = base.dequantize()
            for name in adapter_names:
                if name in self.lora_A:
                    weight = weight + self.get_delta_weight(name).float().to(weight.device)
                    self.merged_adapters.append(name)
            if safe_merge and not torch.isfinite(weight).all():
                raise ConfigError(f"merging adapters {adapter_names} gives non-finite weights")
            _requantize(base, weight)

        def unmerge(self) -> None:
            raise ConfigError("adapters merged into quantized weights cannot be unmerged exactly; "
                              "reload the base model instead")

        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
            return (b.float() @ a.float()) * self.scaling[adapter]

    _QUANTIZED_LORA = QuantizedLoraLinear
    return QuantizedLoraLinear


_QUANTIZED_LORA: type | None = None


def _requantize(base: QuantizedLinear, weight: torch.Tensor) -> None:
    """Quantize float `weight` into `base` in place, in base's own format and settings."""
    from .quantization.gguf import GGUFLinear
    from .quantization.modules import Int4Linear, Int8Linear, NF4Linear

    if isinstance(base, GGUFLinear):
        raise ConfigError("cannot merge LoRA adapters into GGUF blocks (no GGUF quantizer here): load the "
                          "model without gguf_native=True to merge into float weights, or keep the adapter")
    linear = nn.Linear(base.in_features, base.out_features, bias=False, device=weight.device)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if isinstance(base, Int8Linear):
        fresh: QuantizedLinear = Int8Linear.from_linear(linear, base.compute_dtype)
    elif isinstance(base, NF4Linear):
        fresh = NF4Linear.from_linear(linear, base.quant_type, base.blocksize, base.compute_dtype)
    elif isinstance(base, Int4Linear):
        fresh = Int4Linear.from_linear(linear, base.group_size, base.compute_dtype)
    else:
        raise ConfigError(f"no quantizer for {type(base).__name__}; cannot merge adapters into it")
    base._load_portable(fresh._portable_state())


def register_lora_layers(lora_config: Any) -> Any:
    """Teach a peft `LoraConfig` our quantized layers (peft's `_register_custom_module`), so
    `get_peft_model` can put LoRA adapters on a quantized model (QLoRA); returns the config.

    >>> config = register_lora_layers(LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))  # doctest: +SKIP
    """
    lora_config._register_custom_module({QuantizedLinear: _lora_linear_class()})
    return lora_config


# ------------------------------------------------------------------ chat data for supervised fine-tuning
def _chat_ids(tokenizer: Any, messages: Any, add_generation_prompt: bool = False) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # Transformers 5 may answer a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]


def chat_example(tokenizer: Any, messages: list[dict[str, Any]]) -> dict[str, list[int]]:
    """`input_ids` and `labels` of one conversation rendered by the tokenizer's chat template,
    with the loss on assistant turns only: each assistant message's tokens, including what the
    template closes the turn with (end-of-turn / EOS, so the model learns to stop), keep their
    ids as labels; everything else is -100.

    The span of assistant turn i is [render(messages[:i], generation prompt), render(messages[:i+1])),
    so the template must render a conversation's prefixes as prefixes of its ids; one that does
    not is refused (TokenizerError) rather than masked at the wrong places.
    """
    from .errors import TokenizerError

    ids = _chat_ids(tokenizer, messages)
    labels = [-100] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start_ids = _chat_ids(tokenizer, messages[:i], add_generation_prompt=True)
        end_ids = _chat_ids(tokenizer, messages[: i + 1])
        start, end = len(start_ids), len(end_ids)
        if ids[:start] != start_ids or ids[:end] != end_ids or start >= end:
            raise TokenizerError(
                f"the chat template does not render message {i}'s conversation prefix as a prefix of the "
                "whole conversation's ids, so its assistant tokens cannot be located for the loss mask")
        labels[start:end] = ids[start:end]
    return {"input_ids": ids, "labels": labels}


def pad_batch(examples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `chat_example`s into tensors: input_ids with `pad_token_id`, labels with -100,
    attention_mask 1 on real tokens. Padding is found by length, never by id, so a pad id equal to
    EOS (a common choice) does not take the EOS tokens out of the loss."""
    if pad_token_id is None or pad_token_id < 0:
        raise ConfigError(f"pad_token_id must be a token id, got {pad_token_id!r}")
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ------------------------------------------------------------------ adapters
def load_adapter(model: nn.Module, folder: str | Any, adapter_name: str = "default") -> Any:
    """A peft adapter folder (adapter_config.json + adapter_model.safetensors) put on `model`,
    checked first: every adapter tensor must sit on a module the model has, with matching
    input/output sizes, else CheckpointError naming the first mismatch before anything loads
    (peft alone reports a size mismatch deep inside load_state_dict, or loads a subset).
    Returns the PeftModel (peft.PeftModel.from_pretrained); quantized bases are registered."""
    import json
    from pathlib import Path

    import peft
    from safetensors import safe_open

    from .errors import CheckpointError

    folder = Path(folder)
    config_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise CheckpointError(f"{folder} is not a peft adapter folder (needs adapter_config.json and "
                              "adapter_model.safetensors)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{folder}: only LoRA adapters are supported, got peft_type {config.get('peft_type')!r}")
    modules = dict(model.named_modules())
    with safe_open(str(weights), framework="pt") as file:
        for key in file.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            name = key.split(".lora_")[0].removeprefix("base_model.model.")
            target = modules.get(name)
            shape = tuple(file.get_slice(key).get_shape())  # lora_A: (r, in), lora_B: (out, r)
            if target is None or not hasattr(target, "in_features"):
                raise CheckpointError(f"adapter tensor {key!r}: the model has no linear module {name!r}; "
                                      "the adapter was made for another architecture")
            want, got = (target.in_features, shape[1]) if ".lora_A." in key else (target.out_features, shape[0])
            if want != got:
                raise CheckpointError(
                    f"adapter tensor {key!r} has shape {shape}, but {name} has {'in' if '.lora_A.' in key else 'out'}"
                    f"_features={want}: the adapter was trained on another base model "
                    f"({config.get('base_model_name_or_path') or 'unnamed'})")
    lora_config = register_lora_layers(peft.LoraConfig.from_pretrained(str(folder)))
    return peft.PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name, config=lora_config)

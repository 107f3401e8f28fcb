"""The decode step and the chunked prefill every driver runs (generate(), beam search, the server).

`Decoder` is one token per row at explicit positions into a cache; `prefill` reads prompts in
chunks; `compiled_layers` is the opt-in torch.compile of the layers' decode path.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch

from . import fused_step
from .cache import KVCache
from .errors import ConfigError

_DEFAULT_CHUNK = 1024  # prefill chunk for models without a window: bounds the mask's size


def left_padding(mask: torch.Tensor) -> torch.Tensor:
    """(B,) the length of each row's leading padding: the repetition penalty skips it."""
    return (mask != 0).int().argmax(dim=1)


def prefill(model: Any, cache: KVCache, ids: torch.Tensor, mask: torch.Tensor, chunk: int) -> torch.Tensor:
    """Read the prompts (B, T) into `cache` in chunks of at most `chunk` tokens; the logits
    (B, V) after the last one. A rolling cache needs chunks of at most W to stay O(W) in memory."""
    out = None
    for start in range(0, ids.shape[1], chunk):
        end = min(start + chunk, ids.shape[1])
        out = model(ids[:, start:end], attention_mask=mask[:, :end], past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
    assert out is not None
    return out.logits[:, -1]


def _recompute(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """use_cache=False: the whole sequence again every step."""
    return model(ids, attention_mask=mask, use_cache=False, logits_to_keep=1).logits[:, -1]


class Decoder:
    """The decode step every driver runs (generate() and the server's engine): one token per
    row at explicit absolute positions into a cache; returns the next logits (B, V).

    `compile=True` runs the layers through torch.compile: a decode step of a small model on
    4-bit weights is mostly fixed per-operator cost that compiling fuses away (bench/RESULTS.md);
    the first call pays the compile, so it is opt-in. The compiled layers are made once per
    model and reused by later calls. A model whose steps the fused native step takes (GGUF
    blocks, bfloat16, int8, NF4/FP4: fused_step.py) is not compiled: that step is faster than
    the compiled layers and computes the same tokens (a warning says so once).
    """

    def __init__(self, model: Any, compile: bool = False) -> None:
        self.model = model
        if compile and model.model.fused_step_available():
            warnings.warn("compile=True: this model's decode steps run the fused native step, faster than "
                          "torch.compile's layers; not compiling", RuntimeWarning, stacklevel=3)
            compile = False
        self.layers = compiled_layers(model.model) if compile else None
        # the model's own one-token step (MistralForCausalLM.next_token_logits), found on its class:
        # a wrapper that forwards attributes to a model (peft's) has a forward of its own to run
        self.direct = getattr(model, "next_token_logits", None) if hasattr(type(model), "next_token_logits") else None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens, positions (B,) -> logits (B, V), on fewer threads while the machine is busy
        (fused_step.Threads)."""
        with fused_step.step_threads(self.model.model):
            return self._step(tokens, positions, cache)

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if self.layers is None:
            if self.direct is not None:
                logits = self.direct(tokens, positions, cache)
                if logits is not None:
                    return logits
            out = self.model(tokens[:, None], position_ids=positions[:, None], past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
            return out.logits[:, -1]
        decoder = self.model.model
        h = decoder.embed_tokens(tokens[:, None])
        step = decoder.prepare_step(h, None, positions[:, None], cache)
        h = self.layers(h, step, cache)
        cache.commit(step.plan)
        return self.model.lm_head(h)[:, -1]


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_layers(decoder: Any) -> Any:
    """`torch.compile(decoder.decode_layers)`, made once per decoder (idempotent)."""
    if len({layer.input_layernorm.weight.device for layer in decoder.layers}) > 1:
        raise ConfigError("compiled decoding needs every layer on one device; drop compile=True "
                          "for a model split by device_map")
    if decoder not in _COMPILED:
        _COMPILED[decoder] = torch.compile(decoder.decode_layers)
    return _COMPILED[decoder]

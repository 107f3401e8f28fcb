"""JAX/Flax twins of the Mistral models (needs the `[flax]` extra: jax and flax).

Importing `mistral_lm` never imports this package; `mistral_lm.FlaxMistralForCausalLM` does.
"""

from __future__ import annotations

from .modeling import (
    FlaxMistralCache,
    FlaxMistralForCausalLM,
    FlaxMistralModel,
    FlaxMistralPreTrainedModel,
)

__all__ = ["FlaxMistralCache", "FlaxMistralForCausalLM", "FlaxMistralModel", "FlaxMistralPreTrainedModel"]

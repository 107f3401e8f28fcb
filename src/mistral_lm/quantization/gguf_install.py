"""The loader step that turns a GGUF's quantized tensors into modules computing on them.

Where the native kernels are built and support the type, a Linear becomes a GGUFBlockLinear and
the embedding a GGUFBlockEmbedding over the file's own pages; otherwise a Linear becomes a
GGUFLinear on torch's int4 kernel (repacked once, kept in a KernelCache beside the file), and
what neither can hold is dequantized.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..checkpoints.gguf import GGUFQuantizedTensor
from .gguf import GGUFLinear, _made_tensors
from .gguf_blocks import GGUFBlockEmbedding, GGUFBlockLinear, as_tensor, available


def install_gguf_linears(model: nn.Module, blocks: dict[str, GGUFQuantizedTensor], tensors: dict[str, torch.Tensor],
                         dtype: torch.dtype, source: str | os.PathLike | None = None) -> set[str]:
    """Swap each Linear (and the embedding) whose weight came as GGUF blocks for a module
    computing on those blocks; put the rest into `tensors` dequantized to `dtype`. Returns the
    swapped module names. A tied lm_head computes on the embedding's blocks: the same numbers
    as the float tie, at the quantized size.

    Block modules view the file's map: nothing is copied. For the GGUFLinear fallback, with
    `source` (the .gguf path), the repacked kernel layout is kept in a `KernelCache` file next
    to it and mapped from there on later loads."""
    config: Any = getattr(model, "config", None)
    head = getattr(model, "lm_head", None)
    tied = head is not None and config.tie_word_embeddings and "lm_head.weight" not in blocks
    embedding = "model.embed_tokens.weight"
    if tied and embedding in blocks:
        blocks = {**blocks, "lm_head.weight": blocks[embedding]}
    plan: dict[str, tuple[GGUFQuantizedTensor, bool]] = {}  # key -> (blocks, kept as a GGUFLinear)
    native: set[str] = set()
    for key, qt in blocks.items():
        name = key.removesuffix(".weight")
        module = model.get_submodule(name) if key.endswith(".weight") else None
        rows, order = _as_stored(qt)
        if isinstance(module, nn.Linear) and available(qt.ggml_type):  # the file's pages, computed on as they are
            model.set_submodule(name, GGUFBlockLinear(as_tensor(rows), qt.ggml_type, qt.shape[1], order))
            native.add(name)
        elif isinstance(module, nn.Embedding) and available(qt.ggml_type) and order is None:
            model.set_submodule(name, GGUFBlockEmbedding(as_tensor(rows), qt.ggml_type, qt.shape[1],
                                                         module.padding_idx, dtype))
            native.add(name)
        elif isinstance(module, nn.Linear) and GGUFLinear.supports(qt.ggml_type):
            plan[key] = (qt, True)
        elif key != "lm_head.weight" or not tied:
            plan[key] = (qt, False)
    made = _made_tensors(plan, dtype, source)
    for key, (qt, linear) in plan.items():
        if not linear:
            tensors[key] = made[f"{key}:{dtype}"]
            continue
        name = key.removesuffix(".weight")
        out_features, in_features = qt.shape
        model.set_submodule(name, GGUFLinear.from_kernel_state(
            qt.ggml_type, in_features, out_features, made[name + ".packed"], made[name + ".scale_and_zero"]))
        native.add(name)
    return native


def _as_stored(qt: Any) -> tuple[Any, Any]:
    """(rows as the file stores them, their order or None): a file's tensor keeps llama.cpp's
    Q/K row order for the module to undo; a tensor-parallel slice (parallel/quantize.py) comes
    already in HF order."""
    stored = getattr(qt, "stored", None)
    return (qt.data, None) if stored is None else (stored, qt.row_order)

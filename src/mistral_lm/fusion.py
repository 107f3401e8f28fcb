"""Fused input projections: q/k/v as one matmul, gate/up as another.

At batch 1 a decode step is about 210 small matmuls whose fixed cost (dispatch, waking the
thread pool) rivals their arithmetic; one (q|k|v) product instead of three and one (gate|up)
instead of two removes 90 of them per token on a 30-layer model. Nothing outside the module
sees the fusion: the state dict keeps Transformers' names and shapes (hooks split the fused
rows on save and merge them back on load).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .matvec import MatvecLinear
from .quantization.modules import QuantizedLinear

# parent module attribute -> (fused name, the Linears it replaces, in output order)
FUSIONS = {"self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
           "mlp": ("gate_up_proj", ("gate_proj", "up_proj"))}
_FLOAT_LINEARS = (nn.Linear, MatvecLinear)  # float classes fused into one of their own kind


def concat_linears(parts: Sequence[nn.Module], float_linears: bool = True) -> nn.Module | None:
    """One module computing cat([p(x) for p in parts], -1), or None if they cannot be fused
    (different classes, settings, dtypes or devices, hooks, weights not materialized, or float
    Linears with `float_linears=False`)."""
    first = parts[0]
    if type(first) in _FLOAT_LINEARS and not float_linears:
        return None
    if any(type(p) is not type(first) or p._forward_hooks or p._forward_pre_hooks for p in parts):
        return None
    if any((p.bias is None) != (first.bias is None) for p in parts):  # type: ignore[union-attr]
        return None
    tensors = [t for p in parts for t in (*p.parameters(), *p.buffers())]
    if any(t.is_meta or t.device != tensors[0].device for t in tensors):
        return None
    if type(first) in _FLOAT_LINEARS:
        if any(p.weight.dtype != first.weight.dtype for p in parts):  # type: ignore[union-attr]
            return None
        fused = type(first)(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None,
                            device="meta")
        fused.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=False)
        if first.bias is not None:
            fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
        return fused
    if isinstance(first, QuantizedLinear):
        return QuantizedLinear.concat(parts)  # type: ignore[arg-type]
    return None


def fuse_projections(model: nn.Module, float_linears: bool = True, skip: Sequence[str] = ()) -> int:
    """Fuse q/k/v and gate/up in every layer where the parts allow it; returns how many fusions
    were made. Idempotent. The fused parent keeps `_fused = {name: [(part, rows), ...]}`.

    Fusing copies the weights. Quantized modules own their memory anyway, but float weights
    assigned straight from a memory-mapped checkpoint would then be held twice (the file's
    pages stay mapped for the tensors left unfused): loaders pass `float_linears=False` there.
    A group any of whose parts is named in `skip` (module names or suffixes, as a quantization
    skip list) is left alone, so fusing before quantizing keeps such parts apart."""
    count = 0
    for module_name, module in list(model.named_modules()):
        for attribute, (fused_name, part_names) in FUSIONS.items():
            parent = getattr(module, attribute, None)
            if not isinstance(parent, nn.Module) or fused_name in parent._modules:
                continue
            names = [".".join(filter(None, (module_name, attribute, name))) for name in part_names]
            if any(n == s or n.endswith("." + s) for n in names for s in skip):
                continue
            parts = [parent._modules.get(name) for name in part_names]
            if any(p is None for p in parts):
                continue
            fused = concat_linears(parts, float_linears)  # type: ignore[arg-type]
            if fused is None:
                continue
            for name in part_names:
                delattr(parent, name)
            setattr(parent, fused_name, fused)
            if not hasattr(parent, "_fused"):
                parent._fused = {}
                parent._register_state_dict_hook(_split_on_save)
                parent.register_load_state_dict_pre_hook(_merge_on_load)
            parent._fused[fused_name] = [(name, p.out_features) for name, p in zip(part_names, parts)]
            count += 1
    return count


def _split_on_save(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """Fused rows back under the parts' names; cloned, as safetensors refuses shared storage."""
    for fused_name, parts in module._fused.items():
        head = prefix + fused_name + "."
        for key in [k for k in state if k.startswith(head)]:
            tensor = state.pop(key)
            leaf = key[len(head):]
            for (name, _), piece in zip(parts, tensor.split([rows for _, rows in parts])):
                state[prefix + name + "." + leaf] = piece.clone()


def _merge_on_load(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """Parts' tensors (a Transformers-shaped state dict) stacked into the fused module's."""
    for fused_name, parts in module._fused.items():
        first = prefix + parts[0][0] + "."
        for leaf in [k[len(first):] for k in state if k.startswith(first)]:
            keys = [prefix + name + "." + leaf for name, _ in parts]
            if all(k in state for k in keys):
                state[prefix + fused_name + "." + leaf] = torch.cat([state.pop(k) for k in keys])

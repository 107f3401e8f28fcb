"""Fused input projections: q/k/v as one matmul, gate/up as another, for inference only.

At batch 1 a decode step is about 210 small matmuls whose fixed cost (dispatch, waking the
thread pool) rivals their arithmetic; one (q|k|v) product instead of three and one (gate|up)
instead of two removes 90 of them per token on a 30-layer model.

The parts stay the model. `q_proj`, `k_proj`, `v_proj`, `gate_proj` and `up_proj` remain
submodules with their own Parameters, so `parameters()`, optimizers, peft and the state dict see
every checkpoint weight under its Transformers name. Fusing moves the parts' storage into one
buffer (or takes the one a loader decoded them into already: `stacked_view`) and leaves each part
a row view of it: the fused module is a second reader of the same
memory, not a copy, and an optimizer's in-place step or a `load_state_dict` copy reaches both.

Fusion is for inference: `model.train()` gives the parts their own storage back and drops the
fused modules (`release_fusions`); the first eval-mode step fuses again. `fused_module` hands
the fused module out only where it computes exactly what the parts would:
- eval mode, and autograd off or no part trainable (gradients must reach the parts' leaves);
- the parts are the very modules fused, without hooks (peft's LoRA wrappers, user hooks);
- every part still views the buffer. A `.to()`, an `assign=True` load or peft's safe merge give a
  part new storage; the group is then fused again, from the parts, on the next inference call.
Anything else runs the parts one by one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
import torch
from torch import nn

from .matvec import MatvecLinear
from .quantization.modules import QuantizedLinear, stacked_view

# parent module attribute -> (fused name, the Linears it stands for, in output order)
FUSIONS = {"self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
           "mlp": ("gate_up_proj", ("gate_proj", "up_proj"))}
_FLOAT_LINEARS = (nn.Linear, MatvecLinear)


@dataclass
class Fusion:
    """One fused group of a parent module: the parts by name, the module reading their rows, and
    where each part keeps the tensor that views the fused storage, with the address it had then
    (a part whose tensor moved away makes the group stale)."""

    names: tuple[str, ...]
    parts: tuple[nn.Module, ...]
    module: nn.Module | None  # None: stale (the parent was moved), fused again on the next use
    # per part: (name, part, its _parameters or _buffers, the key of the viewing tensor, its data_ptr);
    # one flat tuple, as the decode step checks every group (zip() alone costs a microsecond)
    checks: tuple[tuple[str, nn.Module, dict[str, Any], str, int], ...]


def _anchor(part: nn.Module) -> tuple[dict[str, Any], str, int]:
    """Where the part's storage-viewing tensor lives, read as a dict lookup per call (decode
    steps check every group: nn.Module attribute access would cost more than the check)."""
    if isinstance(part, QuantizedLinear):
        store, key = part._buffers, part._buffer_names[0]
    else:
        store, key = part._parameters, "weight"
    return store, key, store[key].data_ptr()  # type: ignore[union-attr]


def concat_linears(parts: Sequence[nn.Module], float_linears: bool = True) -> nn.Module | None:
    """One module computing cat([p(x) for p in parts], -1), or None if they cannot be fused
    (different classes, settings, dtypes or devices, hooks, weights not materialized, or float
    Linears with `float_linears=False`). The parts are not changed."""
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
        # MatvecLinear whatever the parts are: the fused module is never in model.modules(), so
        # the loader's later matvec swap would not reach it
        fused = MatvecLinear(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None,
                             device="meta")
        fused.weight = nn.Parameter(_stacked([p.weight.detach() for p in parts]), requires_grad=False)
        if first.bias is not None:
            fused.bias = nn.Parameter(_stacked([p.bias.detach() for p in parts]), requires_grad=False)
        return fused
    if isinstance(first, QuantizedLinear):
        if not all(p.can_view_rows(sum(q.out_features for q in parts[:i]))  # type: ignore[attr-defined]
                   for i, p in enumerate(parts)):
            return None
        return QuantizedLinear.concat(parts)  # type: ignore[arg-type]
    return None


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The parts' rows in one tensor: a view where a loader decoded them into one buffer already,
    else a copy."""
    view = stacked_view(tensors)
    return torch.cat(tensors) if view is None else view


def _view_rows(part: nn.Module, fused: nn.Module, start: int) -> None:
    """Make `part`'s storage rows start.. of `fused`'s; Parameters keep their identity (and
    requires_grad), so optimizers and peft holding them are unaffected."""
    if isinstance(part, QuantizedLinear):
        part.view_rows(fused, start)  # type: ignore[arg-type]
        return
    end = start + part.out_features  # type: ignore[operator]
    part.weight.data = fused.weight.detach()[start:end]  # type: ignore[union-attr]
    if part.bias is not None:
        part.bias.data = fused.bias.detach()[start:end]  # type: ignore[union-attr]


def _fuse_group(parent: nn.Module, names: Sequence[str], float_linears: bool = True) -> Fusion | None:
    parts = [parent._modules.get(name) for name in names]
    if any(p is None for p in parts):
        return None
    fused = concat_linears(parts, float_linears)  # type: ignore[arg-type]
    if fused is None:
        return None
    start = 0
    for part in parts:
        _view_rows(part, fused, start)  # type: ignore[arg-type]
        start += part.out_features  # type: ignore[union-attr]
    return Fusion(tuple(names), tuple(parts), fused,  # type: ignore[arg-type]
                  tuple((n, p, *_anchor(p)) for n, p in zip(names, parts)))  # type: ignore[arg-type,misc]


def fuse_projections(model: nn.Module, float_linears: bool = True, skip: Sequence[str] = ()) -> int:
    """Fuse q/k/v and gate/up in every layer where the parts allow it; returns how many groups
    are fused afterwards. Idempotent. The parent keeps `_fusions = {fused name: Fusion}`.

    Fusing copies the parts into one buffer and makes them views of it, so memory afterwards
    is one copy. Float weights assigned straight from a memory-mapped checkpoint are left
    alone with `float_linears=False` (the copy would turn file pages into private memory).
    A group any of whose parts is named in `skip` (module names or suffixes, as a quantization
    skip list) is left alone."""
    count = 0
    for module_name, module in list(model.named_modules()):
        for attribute, (fused_name, part_names) in FUSIONS.items():
            parent = getattr(module, attribute, None)
            if not isinstance(parent, nn.Module):
                continue
            fusions: dict[str, Fusion] = parent.__dict__.setdefault("_fusions", {})
            if fused_name in fusions:
                count += _current(parent, fused_name, fusions[fused_name]) is not None
                continue
            names = [".".join(filter(None, (module_name, attribute, name))) for name in part_names]
            if any(n == s or n.endswith("." + s) for n in names for s in skip):
                continue
            fusion = _fuse_group(parent, part_names, float_linears)
            if fusion is not None:
                fusions[fused_name] = fusion
                count += 1
    return count


# The fused modules validated for the decode step this thread runs: {(parent, name): module}.
_STEP = threading.local()


def fused_module(parent: nn.Module, name: str) -> nn.Module | None:
    """The module computing `parent`'s group `name` in one matmul, if it computes exactly what
    the parts would right now (see the module docstring); else None: run the parts.

    Inside `exact_fusions` (a decode step) this is one lookup of what it validated; elsewhere
    (a layer called on its own) the parts run, except in a compiled step, which checks all but
    the storage addresses (not traceable) at trace time."""
    if torch.compiler.is_compiling():
        fusion = parent.__dict__.get("_fusions", {}).get(name)
        ok = fusion is not None and not parent.training and _parts_exact(parent, fusion)
        return fusion.module if ok else None  # type: ignore[union-attr]
    fast = getattr(_STEP, "fast", None)
    return None if fast is None else fast.get((parent, name))


def exact_fusions(parents: Iterable[nn.Module]) -> dict[tuple[nn.Module, str], nn.Module] | None:
    """Validate every fused group of `parents` once (a decode step's worth of layers) and let
    `fused_module` hand out the exact ones on this thread until `end_fusions(returned value)`.

    Once per step, in one loop, because between a step's matmuls the CPU caches hold weights,
    not interpreter state: checks spread over the layer calls cost ~5% of a 4-bit decode step."""
    grad = torch.is_grad_enabled()
    fast: dict[tuple[nn.Module, str], nn.Module] = {}
    for parent in parents:
        fusions = parent.__dict__.get("_fusions")
        if not fusions or parent.training:  # training mode runs the parts (release_fusions)
            continue
        modules = parent._modules
        for name, fusion in fusions.items():
            exact, moved = True, fusion.module is None
            for part_name, part, store, key, address in fusion.checks:
                if (modules.get(part_name) is not part or part._forward_hooks or part._forward_pre_hooks
                        or (grad and any(t is not None and t.requires_grad for t in part._parameters.values()))):
                    exact = False
                    break
                tensor = store.get(key)
                moved = moved or tensor is None or tensor.data_ptr() != address
            module = (_refuse(parent, name, fusion) if moved else fusion.module) if exact else None
            if module is not None:
                fast[(parent, name)] = module
    previous = getattr(_STEP, "fast", None)
    _STEP.fast = fast
    return previous


def end_fusions(previous: dict[tuple[nn.Module, str], nn.Module] | None) -> None:
    _STEP.fast = previous


def _parts_exact(parent: nn.Module, fusion: Fusion) -> bool:
    """The parts are the modules fused, without hooks, and frozen unless autograd is off."""
    grad = torch.is_grad_enabled()
    modules = parent._modules
    for part_name, part, _, _, _ in fusion.checks:
        if modules.get(part_name) is not part or part._forward_hooks or part._forward_pre_hooks:
            return False
        if grad and any(t is not None and t.requires_grad for t in part._parameters.values()):
            return False
    return True


def _current(parent: nn.Module, name: str, fusion: Fusion) -> nn.Module | None:
    """The group's fused module, fused again first if a part's storage moved away."""
    if fusion.module is None:
        return _refuse(parent, name, fusion)
    for _, _, store, key, address in fusion.checks:
        tensor = store.get(key)
        if tensor is None or tensor.data_ptr() != address:
            return _refuse(parent, name, fusion)
    return fusion.module


def _refuse(parent: nn.Module, name: str, fusion: Fusion) -> nn.Module | None:
    """Fuse a stale group again from its parts (normal tensors even under inference_mode, as the
    parts' storage is replaced and training may follow); drop the group if it no longer fuses."""
    with torch.inference_mode(False), torch.no_grad():
        fresh = _fuse_group(parent, fusion.names)
    if fresh is None:
        del parent.__dict__["_fusions"][name]
        return None
    parent.__dict__["_fusions"][name] = fresh
    return fresh.module


def release_fusions(model: nn.Module) -> None:
    """Give every fused part its own storage again and drop the fused modules (fusion is for
    inference: a model put in training mode computes, saves and steps its parts as separate
    tensors, e.g. for savers that refuse shared memory). The next eval-mode step fuses again."""
    for module in model.modules():
        for fusion in module.__dict__.get("_fusions", {}).values():
            if fusion.module is None:
                continue
            with torch.no_grad():
                for _, part, store, key, _ in fusion.checks:
                    if isinstance(part, QuantizedLinear):
                        for name in part._buffer_names:
                            setattr(part, name, getattr(part, name).clone(memory_format=torch.contiguous_format))
                    else:
                        for tensor in part._parameters.values():
                            if tensor is not None:
                                tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)
            fusion.module = None


def mark_stale(parent: nn.Module) -> None:
    """Release `parent`'s fused modules (their parts are about to move, e.g. `.to()`); they are
    fused again from the parts on the next inference call."""
    for fusion in parent.__dict__.get("_fusions", {}).values():
        fusion.module = None


def fused_names(model: nn.Module) -> list[str]:
    """Qualified names of the fused groups, e.g. 'model.layers.0.self_attn.qkv_proj'."""
    return [f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
            for name, fusion in module.__dict__.get("_fusions", {}).items() if fusion.module is not None]

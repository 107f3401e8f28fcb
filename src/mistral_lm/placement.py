"""`device_map`: where each module's weights live, and the hooks that carry activations between devices.

A model on one device gets a plain `.to(device)` and no hooks. A model split over several
devices keeps its forward device-free: every block (the embedding, each decoder layer, the
final norm, the heads) gets a forward pre-hook that moves its tensor arguments to the block's
own device, as accelerate's hooks do for Transformers.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

AUTO_MAPS = ("auto", "balanced", "sequential")
_BLOCK_NAMES = ("embed_tokens", "norm", "lm_head", "score")


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first tensor, parameter or buffer (quantized linears hold only buffers)."""
    return next(itertools.chain(module.parameters(), module.buffers())).device


def single_device(device_map: Any) -> bool:
    """Whether `device_map` puts the whole model on one device (what fusion needs)."""
    if isinstance(device_map, dict):
        return len({str(v) for v in device_map.values()}) == 1
    return device_map not in AUTO_MAPS


def place_model(model: nn.Module, device_map: Any) -> None:
    """Move the model per `device_map`: None/"cpu", a device, "auto" or a dict of module-name
    prefixes to devices. Blocks on different devices get `move_arguments` hooks."""
    if device_map is None or isinstance(device_map, (torch.device, int)) or (
        isinstance(device_map, str) and device_map not in AUTO_MAPS
    ):
        model.to(torch.device("cpu" if device_map is None else device_map))
        return
    if isinstance(device_map, str):
        device_map = auto_device_map(model)
    if not isinstance(device_map, dict):
        raise ConfigError(f"device_map must be 'auto', a device or a dict, got {type(device_map).__name__}")
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if not own:
            continue
        device = _device_for(name, device_map)
        # the module's own _apply: quantized linears re-pack for the target device there
        module._apply(lambda t, d=device: t.to(d), recurse=False)
    model.tie_weights()  # type: ignore[operator]
    install_device_hooks(model)


def install_device_hooks(model: nn.Module) -> int:
    """Give each block a pre-hook moving its arguments to its device, if the blocks span more
    than one device; returns how many hooks were installed (0 on a single device)."""
    blocks = [module for _, module in _blocks(model)]
    if len({module_device(m) for m in blocks}) <= 1:
        return 0
    for module in blocks:
        module.register_forward_pre_hook(_MoveArguments(module_device(module)), with_kwargs=True)
    return len(blocks)


class _MoveArguments:
    """Forward pre-hook: the module's tensor arguments (and tensors inside dataclass arguments)
    moved to `device`; anything else, a KV cache for one, passes through."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, module: nn.Module, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (tuple(move_to_device(a, self.device) for a in args),
                {k: move_to_device(v, self.device) for k, v in kwargs.items()})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.device})"


def move_to_device(value: Any, device: torch.device) -> Any:
    """A tensor `.to(device)`; a dataclass instance copied (`dataclasses.replace`) with its
    tensor fields moved, recursively; the same object when nothing had to move; any other
    value unchanged.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Step:
    ...     cos: torch.Tensor
    ...     window: int
    >>> move_to_device(Step(torch.ones(2), 4), torch.device("meta")).cos.device
    device(type='meta')
    """
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        return value
    changes = {}
    for field in dataclasses.fields(value):
        if field.init:
            old = getattr(value, field.name)
            new = move_to_device(old, device)
            if new is not old:
                changes[field.name] = new
    return dataclasses.replace(value, **changes) if changes else value


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The units a device map places and hooks: embedding, decoder layers, final norm, heads
    (never a module inside another block, such as a layer's own norms)."""
    blocks: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        inside = blocks and name.startswith(blocks[-1][0] + ".")
        if not inside and name.count(".") <= 2 and (name.endswith(_BLOCK_NAMES) or name.rsplit(".", 1)[-1].isdigit()):
            blocks.append((name, module))
    return blocks


def _device_for(name: str, device_map: dict[str, Any]) -> torch.device:
    best = None
    for prefix in device_map:
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    if best is None:
        raise ConfigError(f"device_map has no entry for module {name!r}")
    value = device_map[best]
    return torch.device(f"cuda:{value}" if isinstance(value, int) else value)


def auto_device_map(model: nn.Module) -> dict[str, str]:
    """Fill GPUs (most free memory first) layer by layer, then the CPU."""
    if not torch.cuda.is_available():
        return {"": "cpu"}
    free = sorted(((torch.cuda.mem_get_info(i)[0] * 0.9, f"cuda:{i}") for i in range(torch.cuda.device_count())),
                  reverse=True)
    device_map: dict[str, str] = {}
    for name, module in _blocks(model):
        size = sum(p.numel() * p.element_size() for p in module.parameters())
        while free and free[0][0] < size:
            free.pop(0)
        device = free[0][1] if free else "cpu"
        if free:
            free[0] = (free[0][0] - size, device)
        device_map[name] = device
    return device_map

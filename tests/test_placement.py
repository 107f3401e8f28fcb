"""placement.py: device maps, and the pre-hooks that carry activations between devices."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from mistral_lm import MistralForCausalLM
from mistral_lm.placement import install_device_hooks, move_to_device, place_model

from .conftest import tiny_config


@dataclass(frozen=True)
class Inner:
    mask: torch.Tensor


@dataclass(frozen=True)
class Step:
    cos: torch.Tensor
    inner: Inner
    window: int | None


def test_move_to_device_moves_tensors_and_dataclass_fields_recursively():
    step = Step(torch.ones(2), Inner(torch.zeros(3, dtype=torch.bool)), window=4)
    moved = move_to_device(step, torch.device("meta"))
    assert moved is not step and moved.window == 4
    assert moved.cos.device.type == moved.inner.mask.device.type == "meta"
    assert moved.inner.mask.dtype == torch.bool
    assert step.cos.device.type == "cpu"  # the caller's step is left alone
    assert move_to_device(step, torch.device("cpu")) is step  # nothing to move: no copy
    cache = object()
    assert move_to_device(cache, torch.device("meta")) is cache


class _Block(nn.Module):
    """Returns what it was called with, to show what the hook handed it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor, step: Step, cache: object, *, extra: torch.Tensor) -> tuple:
        return x, step, cache, extra


class _Toy(nn.Module):
    """Two 'layers' and a head, like the blocks of a decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.lm_head = nn.Linear(4, 2)

    def tie_weights(self) -> None:
        pass


def test_multi_device_map_hooks_move_arguments_to_each_block():
    toy = _Toy()
    place_model(toy, {"layers.0": "cpu", "layers.1": "meta", "lm_head": "cpu"})
    assert toy.layers[1].weight.is_meta and not toy.lm_head.weight.is_meta
    step, cache = Step(torch.ones(4), Inner(torch.ones(4)), None), object()
    x, got, same, extra = toy.layers[1](torch.ones(1, 4), step, cache, extra=torch.ones(1))
    assert x.device.type == got.cos.device.type == got.inner.mask.device.type == extra.device.type == "meta"
    assert same is cache
    x, got, _, _ = toy.layers[0](torch.ones(1, 4), step, cache, extra=torch.ones(1))
    assert got is step and x.device.type == "cpu"  # already on the block's device
    assert toy.lm_head._forward_pre_hooks  # the head too


@pytest.mark.parametrize("device_map", [None, "cpu", "auto", {"": "cpu"}, {"model": "cpu", "lm_head": "cpu"}])
def test_single_device_models_get_no_hooks(device_map):
    model = MistralForCausalLM(tiny_config())
    place_model(model, device_map)
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert install_device_hooks(model) == 0


def test_split_mistral_hooks_layers_norm_and_head():
    model = MistralForCausalLM(tiny_config())
    place_model(model, {"": "cpu", "model.layers.1": "meta"})
    hooked = {n for n, m in model.named_modules() if m._forward_pre_hooks}
    layers = {f"model.layers.{i}" for i in range(model.config.num_hidden_layers)}
    assert hooked == {"model.embed_tokens", "model.norm", "lm_head"} | layers
    assert model.model.layers[1].input_layernorm.weight.is_meta

"""Turn a model into rank r's shard of it, without touching modeling.py.

`shard_model(model, plan)` does four things, each visible from outside the module (modules
are found by their Transformers names, so nothing here imports modeling.py):
1. slices every column- and row-parallel Linear's weight to the rank's rows or columns (on the
   meta device this only changes shapes: the loader fills them from the file's slices);
2. sets each MistralAttention's `num_heads` / `num_kv_heads` to the rank's counts;
3. gives every module that held the config the rank's copy (`plan.rank_config`): head counts
   and feed-forward width divided, so `make_cache` sizes the rank's own KV cache;
4. registers a forward hook on each `self_attn` and `mlp` that all-reduces their output in place
   (inference only: an output that requires grad is refused, as autograd would miss the sum): those
   end in `o_proj` / `down_proj`, the row-parallel Linears whose outputs are partial sums.
   Hooking the parents (as gpt-fast's tp.py does) rather than the Linears survives the module
   swaps that come after sharding (quantization replaces the Linears; fusion and the matvec
   swap run on the rank's parts).

With `plan.vocab_rows`, embed_tokens and lm_head hold a slice of the vocabulary: a pre/post hook
pair masks the lookup of ids held elsewhere and sums it, and an lm_head hook all-gathers the
logits, so every rank still sees (B, T, V).

The result's `tensor_parallel` attribute keeps the plan, the full config and a count of the
collectives run (`stats`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import MistralConfig
from ..errors import ConfigError
from ..quantization.modules import QuantizedLinear
from .plan import TensorParallelPlan
from .process import all_gather_last, all_reduce_


@dataclass
class CollectiveStats:
    """Collectives run by this rank (all-reduces; all-gathers of logits with vocab_parallel) and
    the bytes it contributed to them."""

    calls: int = 0
    bytes: int = 0

    def reset(self) -> None:
        self.calls, self.bytes = 0, 0


@dataclass
class TensorParallel:
    """What `shard_model` did to a model: `model.tensor_parallel`."""

    plan: TensorParallelPlan
    full_config: MistralConfig  # the checkpoint's config; `model.config` is the rank's
    stats: CollectiveStats = field(default_factory=CollectiveStats)
    handles: list[Any] = field(default_factory=list, repr=False)


class _AllReduceOutput:
    """Forward hook: sum the module's output (or the first item of its output tuple) over ranks."""

    def __init__(self, where: str, stats: CollectiveStats) -> None:
        self.where, self.stats = where, stats

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        tensor = output[0] if isinstance(output, tuple) else output  # attention: (out, weights)
        _refuse_grad(tensor, self.where)
        self.stats.calls += 1
        self.stats.bytes += tensor.numel() * tensor.element_size()
        all_reduce_(tensor, self.where)  # in place: the output object is returned unchanged


def _refuse_grad(tensor: torch.Tensor, where: str) -> None:
    """The in-place sums are invisible to autograd: gradients through them would be wrong."""
    if tensor.requires_grad:
        raise ConfigError(f"{where}: tensor-parallel models run inference only; call them under "
                          "torch.inference_mode() or torch.no_grad(), or freeze the parameters "
                          "(parallel.from_pretrained does)")


class _VocabParallelLookup:
    """Embedding rows [start, stop) on this rank: ids elsewhere look up row 0 and are zeroed,
    then the ranks' lookups are summed (exactly one rank contributes each id's row)."""

    def __init__(self, where: str, rows: range, stats: CollectiveStats) -> None:
        self.where, self.rows, self.stats = where, rows, stats
        self.outside: torch.Tensor | None = None

    def before(self, module: nn.Module, args: tuple) -> tuple:
        ids = args[0] - self.rows.start
        self.outside = (ids < 0) | (ids >= len(self.rows))
        return (ids.masked_fill(self.outside, 0), *args[1:])

    def after(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        _refuse_grad(output, self.where)
        output = output.masked_fill(self.outside[..., None], 0)  # type: ignore[index]
        self.outside = None
        self.stats.calls += 1
        self.stats.bytes += output.numel() * output.element_size()
        return all_reduce_(output, self.where)


class _GatherLogits:
    """lm_head rows [start, stop) give this rank's slice of the logits; all-gather the vocabulary."""

    def __init__(self, where: str, stats: CollectiveStats) -> None:
        self.where, self.stats = where, stats

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        self.stats.calls += 1
        self.stats.bytes += output.numel() * output.element_size()
        return all_gather_last(output.contiguous(), self.where)


def shard_model(model: nn.Module, plan: TensorParallelPlan) -> nn.Module:
    """Make `model` (a MistralForCausalLM / MistralModel, float and unfused, on any device or
    meta) rank `plan.rank`'s shard, in place; returns it. See the module docstring."""
    if getattr(model, "tensor_parallel", None) is not None:
        raise ConfigError("this model is already sharded for tensor parallel")
    full = model.config
    _check_unfused(model)
    local = plan.rank_config(full)
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear) and plan.split(f"{name}.weight").dim is not None:
            raise ConfigError(f"{name} is already quantized: shard the float model, then quantize "
                              "(parallel.from_pretrained(quantization_config=...) does both in that order)")
        if isinstance(module, nn.Linear):
            _slice_linear(module, name, plan)
        if isinstance(module, nn.Embedding) and plan.split(f"{name}.weight").dim is not None:
            weight = plan.split(f"{name}.weight").apply(module.weight.detach()).clone()
            module.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
            module.num_embeddings, module.padding_idx = weight.shape[0], None  # padding_idx only masks grads
        if getattr(module, "config", None) is full:
            module.config = local
        if _is(name, "self_attn"):  # MistralAttention keeps its head counts as attributes
            module.num_heads, module.num_kv_heads = len(plan.q_heads), len(plan.kv_heads)
    record = TensorParallel(plan, full)
    if plan.world_size > 1:
        for name, module in model.named_modules():
            if _is(name, "self_attn") or _is(name, "mlp"):
                where = f"{name}.{'o_proj' if _is(name, 'self_attn') else 'down_proj'}"
                record.handles.append(module.register_forward_hook(_AllReduceOutput(where, record.stats)))
            if plan.vocab_rows is not None and isinstance(module, nn.Embedding):
                lookup = _VocabParallelLookup(name, plan.vocab_rows, record.stats)
                record.handles += [module.register_forward_pre_hook(lookup.before),
                                   module.register_forward_hook(lookup.after)]
            if plan.vocab_rows is not None and name.endswith("lm_head"):
                record.handles.append(module.register_forward_hook(_GatherLogits(name, record.stats)))
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # a tied head and embedding were sliced separately: one tensor again
    model.tensor_parallel = record
    return model


def _is(name: str, attribute: str) -> bool:
    """Modules are known by their Transformers names (model.layers.{i}.self_attn / .mlp), not by
    class: this package imports nothing from modeling.py, so loading.py can import it."""
    return name == attribute or name.endswith("." + attribute)


def _slice_linear(module: nn.Linear, name: str, plan: TensorParallelPlan) -> None:
    split = plan.split(f"{name}.weight")
    if split.dim is None:
        return
    if module.bias is not None:
        module.bias = nn.Parameter(plan.split(f"{name}.bias").apply(module.bias.detach()).clone(),
                                   requires_grad=module.bias.requires_grad)
    weight = split.apply(module.weight.detach()).clone()  # a copy: the full weight can be freed
    module.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    module.out_features, module.in_features = weight.shape


def _check_unfused(model: nn.Module) -> None:
    """Fused q/k/v or gate/up (fusion.py) would keep a copy of the full weights: shard first."""
    for name, module in model.named_modules():
        fused = [k for k in ("qkv_proj", "gate_up_proj") if k in module._modules]
        fused += [k for k, f in module.__dict__.get("_fusions", {}).items() if getattr(f, "module", None) is not None]
        if fused:
            raise ConfigError(f"{name}.{fused[0]} is fused: shard the model before fusing its projections "
                              "(load with fuse_projections=False, or use parallel.from_pretrained)")


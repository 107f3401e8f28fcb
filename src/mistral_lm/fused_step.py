"""A decode step's layers in one native call, for GGUF block models (the CLI's, the server's and
`generate()`'s path on a .gguf).

Why: on a small model a decode step from Python is ~400 kernel calls, each paying dispatch and
tensor bookkeeping; the Python side costs three times the arithmetic (bench/RESULTS.md). step.c
runs the same kernels in the same order from a C loop, so its hidden states equal the module
path's bit for bit, and the module path stays the definition (tests compare the two).

`decode_layers` takes a step only when the modules would compute exactly what step.c does:
- every layer is the stock decoder layer, its seven projections `GGUFBlockLinear`s without bias,
  its norms float32 `MistralRMSNorm`s on the CPU, its activation SiLU;
- no forward hook or pre-hook on any of them (nor a global one), no attention dropout in training, no
  autograd through a norm weight, no per-layer outputs asked for (hidden states, attentions);
- one token per row, a cache step that writes one slot then reads (`StepMode.WRITE_THEN_READ`),
  a float32 CPU cache, the native attention.
Anything else returns None and the modules run. The layer table (pointers to the blocks and norm
weights) is built once per decoder and checked against the modules at every step, so swapping a
module, wrapping it (peft), hooking it or re-pointing a weight's storage is seen at once.
"""

from __future__ import annotations

import ctypes
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .cache import CachePlan, KVCache, StepMode
from .native import step as native_step
from .quantization.gguf_blocks import GGUFBlockLinear

_PROJECTIONS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                ("mlp", ("gate_proj", "up_proj", "down_proj")))


def _parts(layer: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
    """The layer's modules in table order."""
    mods = layer._modules
    a, m = mods["self_attn"]._modules, mods["mlp"]._modules  # type: ignore[union-attr]
    return (layer, mods["self_attn"], mods["mlp"], mods["input_layernorm"],  # type: ignore[return-value]
            mods["post_attention_layernorm"], a["q_proj"], a["k_proj"], a["v_proj"], a["o_proj"],
            m["gate_proj"], m["up_proj"], m["down_proj"])


@dataclass
class _Table:
    """step.c's layer table and what it was built from. The links are (dict, key, value) triples,
    held as three tuples, true while the modules are the ones the table describes: every module
    under its parent, every weight under its module, the attributes step.c copied (epsilons,
    scale, activation). Checked with C-level iteration: a step checks ~1400 of them."""

    dicts: tuple[dict, ...]
    keys: tuple[str, ...]
    values: tuple[Any, ...]
    hooks: tuple[dict, ...]  # every module's forward hook and pre-hook dicts: one non-empty, the modules run
    attention: tuple[torch.nn.Module, ...]  # in training mode with attention dropout, the modules run
    norms: tuple[torch.Tensor, ...]  # norm weights (autograd through them: the modules run)
    pointers: tuple[int, ...]  # the norm weights' storage, which the table points to
    layers: ctypes.Array  # step.c's Layer entries
    dims: tuple[int, int, int, int, int, int]  # C, H, H_kv, D, F, L
    scale: float
    cache_arrays: tuple[list, Any, Any] | None = None  # the last cache buffers and their pointer arrays

    def current(self) -> bool:
        return all(map(operator.is_, map(dict.get, self.dicts, self.keys), self.values)) and all(
            map(operator.eq, map(torch.Tensor.data_ptr, self.norms), self.pointers))


def _links(decoder: Any, parts: list[torch.nn.Module]) -> list[tuple[dict, str, Any]]:
    links: list[tuple[dict, str, Any]] = [(decoder._modules, "layers", decoder.layers)]
    links += [(decoder.layers._modules, key, layer) for key, layer in decoder.layers._modules.items()]
    for i in range(0, len(parts), 12):
        layer, attn, mlp, ln1, ln2, *lins = parts[i:i + 12]
        links += [(layer._modules, name, part) for name, part in
                  (("self_attn", attn), ("mlp", mlp), ("input_layernorm", ln1), ("post_attention_layernorm", ln2))]
        links += [(attn._modules, name, lin) for name, lin in zip(_PROJECTIONS[0][1], lins[:4])]
        links += [(mlp._modules, name, lin) for name, lin in zip(_PROJECTIONS[1][1], lins[4:])]
        links += [(mlp.__dict__, "act_fn", mlp.act_fn), (attn.__dict__, "scaling", attn.scaling)]
        for norm in (ln1, ln2):
            links += [(norm._parameters, "weight", norm.weight), (norm.__dict__, "variance_epsilon",
                                                                  norm.variance_epsilon)]
        for lin in lins:
            links += [(lin._buffers, "blocks", lin.blocks), (lin._buffers, "row_order", lin.row_order),
                      (lin._parameters, "bias", lin.bias), (lin.__dict__, "compute_dtype", lin.compute_dtype)]
    return links


def _build(decoder: Any, stock: tuple[type, type, type, type]) -> _Table | None:
    if not native_step.available():
        return None
    try:
        parts = [p for layer in decoder.layers._modules.values() for p in _parts(layer)]
    except (KeyError, AttributeError):
        return None
    layer_kind, attention_kind, mlp_kind, norm_kind = stock
    kinds = (layer_kind, attention_kind, mlp_kind, norm_kind, norm_kind, *(GGUFBlockLinear,) * 7)
    if not parts or any(type(p) is not kind for p, kind in zip(parts, kinds * (len(parts) // 12))):
        return None
    cfg = decoder.config
    c, d, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    hd, kd = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    if d % 2 or c % 32 or hd % 32:
        return None
    entries = []
    for i in range(0, len(parts), 12):
        layer, attn, mlp, ln1, ln2, *lins = parts[i:i + 12]
        if mlp.act_fn is not F.silu or attn.scaling != parts[1].scaling or (
                attn.num_heads, attn.num_kv_heads, attn.head_dim) != (cfg.num_attention_heads,
                                                                      cfg.num_key_value_heads, d):
            return None
        for norm in (ln1, ln2):
            w = norm.weight
            if w.dtype != torch.float32 or not w.is_cpu or w.shape != (c,) or not w.is_contiguous():
                return None
        shapes = [(lin.out_features, lin.in_features) for lin in lins]
        if shapes != [(hd, c), (kd, c), (kd, c), (c, hd), (f, c), (f, c), (c, f)] or any(
                lin.compute_dtype != torch.float32 or lin.bias is not None for lin in lins):
            return None
        linears = [native_step.linear_entry(lin.blocks, lin.ggml_type, lin.in_features, lin.row_order)
                   for lin in lins]
        entries.append(native_step.Layer(ln1.weight.data_ptr(), ln2.weight.data_ptr(), ln1.variance_epsilon,
                                         ln2.variance_epsilon, *linears))
    norms = tuple(w for i in range(0, len(parts), 12) for w in (parts[i + 3].weight, parts[i + 4].weight))
    dims = (c, cfg.num_attention_heads, cfg.num_key_value_heads, d, f, len(entries))
    dicts, keys, values = zip(*_links(decoder, parts))
    hooks = tuple(d for p in parts for d in (p._forward_hooks, p._forward_pre_hooks))
    return _Table(dicts, keys, values, hooks, tuple(parts[1::12]), norms, tuple(w.data_ptr() for w in norms),
                  (native_step.Layer * len(entries))(*entries), dims, float(parts[1].scaling))


def _may_qualify(decoder: Any) -> bool:
    """A quick no for models of other layer kinds (int4, dense, peft-wrapped), before any table is built."""
    first = next(iter(decoder.layers._modules.values()), None)
    attn = None if first is None else first._modules.get("self_attn")
    return attn is not None and type(attn._modules.get("q_proj")) is GGUFBlockLinear


def _table(decoder: Any, stock: tuple[type, type, type, type]) -> _Table | None:
    """The decoder's layer table if it still describes its modules, else built anew (None: the
    modules are not all of the kinds step.c computes)."""
    cached = decoder.__dict__.get("_fused_step")
    if cached is not None and cached.current():
        return cached
    table = _build(decoder, stock)
    decoder.__dict__["_fused_step"] = table
    return table


def _runnable(table: _Table, dropout: float) -> bool:
    """No hooks, no attention dropout in training, no autograd through a norm weight: the
    modules would compute just what step.c does."""
    hooks = torch.nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks or any(table.hooks):
        return False
    if dropout > 0 and any(attn.training for attn in table.attention):
        return False
    return not (torch.is_grad_enabled() and any(w.requires_grad for w in table.norms))


def _cache_arrays(table: _Table, cache: KVCache, plan: CachePlan) -> tuple[Any, Any, tuple[int, ...]] | None:
    """Pointer arrays to every layer's key and value buffers (reused while the buffers are the same)."""
    keys, values = cache.step_buffers(plan)
    buffers = [*keys, *values]
    last = table.cache_arrays
    if last is not None and len(last[0]) == len(buffers) and all(a is b for a, b in zip(last[0], buffers)):
        return last[1], last[2], keys[0].stride()
    layers = table.dims[5]
    if len(keys) != layers:
        return None
    stride = keys[0].stride()
    if any(t.dtype != torch.float32 or not t.is_cpu or t.stride() != stride for t in buffers):
        return None
    pointers = ctypes.c_void_p * layers
    key_ptrs, value_ptrs = pointers(*(k.data_ptr() for k in keys)), pointers(*(v.data_ptr() for v in values))
    table.cache_arrays = (buffers, key_ptrs, value_ptrs)
    return key_ptrs, value_ptrs, stride


def decode_layers(decoder: Any, h: torch.Tensor, step: Any, cache: KVCache | None,
                  stock: tuple[type, type, type, type]) -> torch.Tensor | None:
    """h (B, 1, C) after every layer (before the final norm), by step.c; None where the modules
    must run (see the module docstring). `stock` names the module classes step.c computes
    (decoder layer, attention, MLP, RMSNorm): a subclass may compute something else. The
    cache's slot is written as `update` would."""
    if torch.compiler.is_compiling() or cache is None or step.plan is None:
        return None
    plan, mask = step.plan, step.mask
    if (plan.mode is not StepMode.WRITE_THEN_READ or plan.write_slots.numel() != 1 or h.dim() != 3
            or h.shape[1] != 1 or h.dtype != torch.float32 or not h.is_cpu or mask is None
            or step.attn_implementation != "native" or mask.dtype != torch.bool or mask.shape[-1] != plan.used):
        return None
    if decoder.__dict__.get("_fused_step") is None and not _may_qualify(decoder):
        return None
    table = _table(decoder, stock)
    if table is None or not _runnable(table, decoder.config.attention_dropout) or (torch.is_grad_enabled() and h.requires_grad):
        return None
    c, heads, kv_heads, d, f, layers = table.dims
    b = h.shape[0]
    if h.shape[2] != c or mask.shape[0] != b or step.cos.shape[0] != b:
        return None
    arrays = _cache_arrays(table, cache, plan)
    if arrays is None:
        return None
    keys, values, stride = arrays
    x = h.reshape(b, c).contiguous().clone()  # the input may be the caller's inputs_embeds
    cos, sin = step.cos.reshape(b, d).contiguous(), step.sin.reshape(b, d).contiguous()
    run = native_step.Step(b, c, heads, kv_heads, d, f, table.scale, cos.data_ptr(), sin.data_ptr(),
                           mask.data_ptr(), (ctypes.c_int64 * 2)(mask.stride(0), mask.stride(3)), plan.used,
                           int(plan.write_slots[0]), ctypes.cast(keys, ctypes.c_void_p),
                           ctypes.cast(values, ctypes.c_void_p), (ctypes.c_int64 * 3)(stride[0], stride[1], stride[2]),
                           torch.get_num_threads())
    native_step.decode_layers(table.layers, layers, run, x)
    return x.view(b, 1, c)

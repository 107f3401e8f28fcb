"""A decode step's layers in one native call: GGUF block models (the CLI's, the server's and
`generate()`'s path on a .gguf), bfloat16 models, and int8/NF4/FP4 models computing in bfloat16.

Why: on a small model a decode step from Python is ~400 kernel calls, each paying dispatch and
tensor bookkeeping; the Python side costs more than the arithmetic (bench/RESULTS.md). step.c
runs the same kernels in the same order from a C loop, so its hidden states equal the module
path's bit for bit, and the module path stays the definition (tests compare the two).

`decode_layers` takes a step only when the modules would compute exactly what step.c does:
- every layer is the stock decoder layer, its norms (and the model's final norm, which step.c
  applies too) `MistralRMSNorm`s on the CPU, its activation SiLU, and its seven projections,
  without bias, one of:
  float32 activations: `GGUFBlockLinear`s (q8 activations, as llama.cpp);
  bfloat16 activations: `MatvecLinear`s with bfloat16 weights (dense.c below
  `MatvecLinear.native_max_rows` rows), `Int8Linear`s computing in bfloat16 (dense.c, likewise)
  or `NF4Linear`s computing in bfloat16 on nf4.c (below `NF4Linear.native_max_rows`), and norm
  weights in bfloat16;
- no forward hook or pre-hook on any of them (nor a global one), no attention dropout in
  training, no autograd through a weight, no per-layer outputs asked for (hidden states,
  attentions);
- a cache step that writes then reads (`StepMode.WRITE_THEN_READ`): one token per row, or a
  prompt's chunk of up to `MAX_CHUNK_ROWS` tokens (all prompts together) into consecutive slots of a cache without a
  rolling window (a short prompt's prefill: its Python would cost more than its arithmetic); a
  CPU cache in the activation type, the native attention.
Anything else returns None and the modules run. For one token per row, `decode_logits` also
computes a causal LM's head in the same call, where the head is a projection of the kinds above
(no row order, no hook). The layer table (pointers to weights and norms)
is built once per decoder and checked against the modules at every step, so swapping a module,
wrapping it (peft), hooking it or re-pointing a weight's storage (`.data =`, a fusion released)
is seen at once; a driver that runs no code of the user's between its steps (the server's engine
thread, generate() without a callback of the user's) vouches for a span of its thread's steps
instead (`vouched`), which checks at the span's first fused step.
"""

from __future__ import annotations

import contextlib
import ctypes
import operator
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .cache import CachePlan, KVCache, StepMode
from .matvec import MatvecLinear
from .native import links as native_links
from .native import step as native_step
from .quantization.gguf_blocks import GGUFBlockLinear
from .quantization.modules import Int8Linear, NF4Linear

_PROJECTIONS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                ("mlp", ("gate_proj", "up_proj", "down_proj")))
_ACTIVATION = {False: torch.float32, True: torch.bfloat16}


def _parts(layer: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
    """The layer's modules in table order."""
    mods = layer._modules
    a, m = mods["self_attn"]._modules, mods["mlp"]._modules  # type: ignore[union-attr]
    return (layer, mods["self_attn"], mods["mlp"], mods["input_layernorm"],  # type: ignore[return-value]
            mods["post_attention_layernorm"], a["q_proj"], a["k_proj"], a["v_proj"], a["o_proj"],
            m["gate_proj"], m["up_proj"], m["down_proj"])


@dataclass
class Threads:
    """How many threads the next step runs on: the caller's count (torch's), or fewer while the
    machine is busy. A step waits at its barriers for every thread; when another process holds a
    core, one of the step's threads is off its CPU for whole scheduler slices while the others
    wait at a barrier (bench/RESULTS.md: a 2-thread decode with one core busy ran at a fraction
    of the 1-thread rate). So after two steps in a row whose threads waited, runnable, for a CPU
    for more than 15% of their time (the kernel's run delay; on a quiet machine next to none, but
    for a rare step that loses a millisecond), the next steps run on one thread fewer; the
    caller's count is tried again after `hold` steps, a wait that doubles while the machine stays
    busy. The count changes no bit of a result: no kernel's output depends on how its rows are
    split."""

    fewer: int = 0  # threads taken off the caller's count
    hold: int = 0  # steps left before the caller's count is tried again
    backoff: int = 32  # the next hold
    strikes: int = 0  # busy steps in a row
    waited: float = 0.0  # the last fused step's measure (0 where the modules ran)

    def count(self, wanted: int) -> int:
        return max(1, wanted - self.fewer)

    def update(self, wanted: int, used: int, waited: float) -> None:
        """After a step on `used` of `wanted` threads that waited for a CPU that fraction of their time."""
        busy = used > 1 and waited > 0.15
        self.strikes = self.strikes + 1 if busy else 0
        if self.strikes >= 2:
            self.fewer, self.hold, self.strikes = wanted - used + 1, self.backoff, 0
            self.backoff = min(2 * self.backoff, 1024)
        elif self.hold:
            self.hold -= 1
            self.fewer = self.fewer if self.hold else 0
        elif used == wanted and not busy:
            self.backoff = 32


def threads_of(decoder: Any) -> Threads:
    """The decoder's thread policy (one per model, kept across generate calls and requests)."""
    found = decoder.__dict__.get("_step_threads")
    if found is None:
        found = decoder.__dict__["_step_threads"] = Threads()
    return found


@contextlib.contextmanager
def step_threads(decoder: Any) -> Iterator[None]:
    """Run one decode step, the head and torch's own operators included, on the count the
    decoder's `Threads` chose (torch's thread count is lowered for the step and put back), and
    feed the step's measure back to it."""
    threads = threads_of(decoder)
    wanted = torch.get_num_threads()
    used = threads.count(wanted)
    threads.waited = 0.0
    if used != wanted:
        torch.set_num_threads(used)
    try:
        yield
    finally:
        if used != wanted:
            torch.set_num_threads(wanted)
    threads.update(wanted, used, threads.waited)


@dataclass
class _Links:
    """The modules a table was built from, or could not be built for: (dict, key, value) triples,
    held as three tuples, true while the modules are those: every module under its parent, every
    weight under its module, the attributes step.c copies (epsilons, scale, activation). Checked
    in C (native/links.c): a step checks over a thousand of them."""

    dicts: tuple[dict, ...]
    keys: tuple[str, ...]
    values: tuple[Any, ...]

    def current(self) -> bool:
        return native_links.current(self.dicts, self.keys, self.values)

    def __reduce__(self) -> tuple:
        """A copy of the model (copy.deepcopy, pickle) starts without this cache: it points into
        the original's modules and tensors, and its ctypes pointers cannot be copied; the copy's
        first step builds its own."""
        return _absent, ()


def _absent() -> None:
    return None


def _same_storage(pointed: tuple[torch.Tensor, ...], pointers: tuple[int, ...]) -> bool:
    """Whether each tensor still points where a table recorded (`.data =` re-points one)."""
    return all(map(operator.eq, map(torch.Tensor.data_ptr, pointed), pointers))


@dataclass
class _Table(_Links):
    """step.c's layer table and the links of the modules it describes."""

    hooks: tuple[dict, ...]  # every module's forward hook and pre-hook dicts: one non-empty, the modules run
    attention: tuple[torch.nn.Module, ...]  # in training mode with attention dropout, the modules run
    pointed: tuple[torch.Tensor, ...]  # tensors the table points into (autograd through one: the modules run)
    pointers: tuple[int, ...]  # and their storage
    layers: ctypes.Array  # step.c's Layer entries
    dims: tuple[int, int, int, int, int, int]  # C, H, H_kv, D, F, L
    scale: float
    bf16: bool  # the activation type: bfloat16, else float32
    max_rows: int  # the most rows the modules run on the kernels step.c calls
    norm: tuple[int, float]  # the final norm's weight (its address) and epsilon: step.c applies it too
    cache_arrays: tuple[list, Any, Any] | None = None  # the last cache buffers and their pointer arrays

    def current(self) -> bool:
        return super().current() and _same_storage(self.pointed, self.pointers)


def _links(decoder: Any, parts: list[torch.nn.Module]) -> list[tuple[dict, str, Any]]:
    norm = decoder._modules.get("norm")
    links: list[tuple[dict, str, Any]] = [(decoder._modules, "layers", decoder.layers), (decoder._modules, "norm", norm),
                                          (norm._parameters, "weight", norm.weight),
                                          (norm.__dict__, "variance_epsilon", norm.variance_epsilon)]
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
            links += _linear_links(lin)
    return links


def _linear_links(lin: torch.nn.Module) -> list[tuple[dict, str, Any]]:
    """A projection's weights, bias and the attributes its entry copies."""
    links: list[tuple[dict, str, Any]] = [(lin._parameters, "bias", lin.bias)]
    links += [(lin._parameters, name, t) for name, t in lin._parameters.items()]
    links += [(lin._buffers, name, t) for name, t in lin._buffers.items()]
    links += [(lin.__dict__, name, lin.__dict__[name]) for name in ("compute_dtype", "quant_type", "_native",
                                                                   "kernel_type") if name in lin.__dict__]
    return links


def _entry(lin: torch.nn.Module, bf16: bool) -> tuple[Any, list[torch.Tensor], int] | None:
    """(step.c's entry, the tensors it points into, the most rows the module computes with the
    same kernel) for one projection, or None if step.c cannot compute it as the module does."""
    if lin.bias is not None:
        return None
    if not bf16:
        if type(lin) is not GGUFBlockLinear or lin.compute_dtype != torch.float32:
            return None
        entry = native_step.ggml_entry(lin.blocks, lin.kernel_type, lin.in_features, lin.row_order)
        return entry, [t for t in (lin.blocks, lin.row_order) if t is not None], 1 << 30
    if type(lin) is MatvecLinear and lin.weight.dtype == torch.bfloat16:
        entry = native_step.bf16_entry(lin.weight)
        return None if entry is None else (entry, [lin.weight], MatvecLinear.native_max_rows)
    if type(lin) is Int8Linear and lin.compute_dtype == torch.bfloat16:
        entry = native_step.int8_entry(lin.weight, lin.weight_scale)
        return None if entry is None else (entry, [lin.weight, lin.weight_scale], Int8Linear.native_max_rows)
    if type(lin) is NF4Linear and lin.compute_dtype == torch.bfloat16 and lin._native:
        from .quantization.functional import CODEBOOKS

        codebook = CODEBOOKS[lin.quant_type]
        entry = native_step.nf4_entry(lin.weight_packed, lin.weight_absmax, codebook, lin.blocksize, lin.in_features)
        if entry is None:
            return None
        return entry, [lin.weight_packed, lin.weight_absmax, codebook], lin.native_max_rows - 1
    return None


def _all_parts(decoder: Any) -> list[torch.nn.Module] | None:
    """Every layer's `_parts`, flat; None where a layer lacks one of them."""
    try:
        return [p for layer in decoder.layers._modules.values() for p in _parts(layer)]
    except (KeyError, AttributeError):
        return None


def _build(decoder: Any, stock: tuple[type, type, type, type]) -> _Table | None:
    parts = _all_parts(decoder)
    kinds = (*stock, stock[3])  # layer, attention, MLP, both norms: the first five of each layer's parts
    if not parts or any(type(p) is not kinds[i % 12] for i, p in enumerate(parts) if i % 12 < 5):
        return None
    cfg = decoder.config
    c, d, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    hd, kd = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    bf16 = parts[3].weight.dtype == torch.bfloat16
    linear_kinds = set()
    if d % 2 or c % 32 or hd % 32:
        return None
    entries, pointed, max_rows = [], [], 1 << 30
    final = decoder._modules.get("norm")
    if type(final) is not stock[3] or not _norm_ok(final.weight, bf16, c):
        return None
    for i in range(0, len(parts), 12):
        layer, attn, mlp, ln1, ln2, *lins = parts[i:i + 12]
        if mlp.act_fn is not F.silu or attn.scaling != parts[1].scaling or (
                attn.num_heads, attn.num_kv_heads, attn.head_dim) != (cfg.num_attention_heads,
                                                                      cfg.num_key_value_heads, d):
            return None
        if not (_norm_ok(ln1.weight, bf16, c) and _norm_ok(ln2.weight, bf16, c)):
            return None
        shapes = [(lin.out_features, lin.in_features) for lin in lins]
        if shapes != [(hd, c), (kd, c), (kd, c), (c, hd), (f, c), (f, c), (c, f)]:
            return None
        found = [_entry(lin, bf16) for lin in lins]
        if any(e is None for e in found):
            return None
        for entry, tensors, rows in found:  # type: ignore[misc]
            linear_kinds.add(entry.kind)
            pointed += tensors
            max_rows = min(max_rows, rows)
        entries.append(native_step.Layer(ln1.weight.data_ptr(), ln2.weight.data_ptr(), ln1.variance_epsilon,
                                         ln2.variance_epsilon, *(e[0] for e in found)))  # type: ignore[index]
        pointed += [ln1.weight, ln2.weight]
    if not native_step.available(bf16, frozenset(linear_kinds)):
        return None
    dims = (c, cfg.num_attention_heads, cfg.num_key_value_heads, d, f, len(entries))
    dicts, keys, values = zip(*_links(decoder, parts))
    pointed.append(final.weight)
    hooks = tuple(d for p in (*parts, final) for d in (p._forward_hooks, p._forward_pre_hooks))
    return _Table(dicts, keys, values, hooks, tuple(parts[1::12]), tuple(pointed), tuple(t.data_ptr() for t in pointed),
                  (native_step.Layer * len(entries))(*entries), dims, float(parts[1].scaling), bf16, max_rows,
                  (final.weight.data_ptr(), float(final.variance_epsilon)))


def _norm_ok(w: torch.Tensor, bf16: bool, c: int) -> bool:
    """An RMSNorm weight step.c reads: (C,) contiguous on the CPU, in the activation type."""
    return w.dtype == _ACTIVATION[bf16] and w.is_cpu and w.shape == (c,) and w.is_contiguous()


def _may_qualify(decoder: Any) -> bool:
    """A quick no for models of other layer kinds (int4, float32 or float16 dense, peft-wrapped),
    before any table is built."""
    first = next(iter(decoder.layers._modules.values()), None)
    attn = None if first is None else first._modules.get("self_attn")
    q = None if attn is None else attn._modules.get("q_proj")
    return type(q) in (GGUFBlockLinear, NF4Linear, Int8Linear) or (
        type(q) is MatvecLinear and q.weight.dtype == torch.bfloat16)


def _refused(decoder: Any) -> _Links | None:
    """The links of modules a table could not be built for: while they hold, the step runs the
    modules without trying again."""
    parts = _all_parts(decoder)
    try:  # modules of other kinds may lack what the links read (an MLP without act_fn)
        return None if parts is None else _Links(*zip(*_links(decoder, parts)))
    except AttributeError:
        return None


def _table(decoder: Any, stock: tuple[type, type, type, type]) -> _Table | None:
    """The decoder's layer table if it still describes its modules, else built anew (None: the
    modules are not all of the kinds step.c computes)."""
    cached = decoder.__dict__.get("_fused_step")
    if cached is not None and cached.current():
        return cached if isinstance(cached, _Table) else None
    table = _build(decoder, stock)
    decoder.__dict__["_fused_step"] = table if table is not None else _refused(decoder)
    return table


def table_for(decoder: Any, stock: tuple[type, type, type, type]) -> _Table | None:
    """The decoder's layer table, or None where the fused step cannot take its modules."""
    if "_fused_step" not in decoder.__dict__ and not _may_qualify(decoder):
        return None
    return _table(decoder, stock)


@dataclass
class _Head(_Links):
    """A causal LM's output projection as step.c reads it (computed in the step's threads on the
    final norm), and the links of the module it was built from."""

    hooks: tuple[dict, dict]  # the head's forward hook and pre-hook dicts: one non-empty, the module runs
    pointed: tuple[torch.Tensor, ...]
    pointers: tuple[int, ...]
    entry: Any  # native_step.Lin
    bf16: bool
    max_rows: int

    def current(self) -> bool:
        return super().current() and _same_storage(self.pointed, self.pointers)


_HEAD_KINDS = (GGUFBlockLinear, MatvecLinear, Int8Linear, NF4Linear)


def _head_links(model: Any, lin: Any) -> tuple[tuple, tuple, tuple]:
    return tuple(zip(*[(model._modules, "lm_head", lin), *_linear_links(lin)]))  # type: ignore[return-value]


def _head(model: Any, bf16: bool, c: int) -> _Head | None:
    """`model.lm_head` as step.c computes it under this activation type, if it can compute
    exactly what the module does (one of the kinds `_entry` takes, no row order, C inputs);
    the answer is kept on the model while the links hold."""
    cached = model.__dict__.get("_fused_head")
    if cached is not None and cached.current() and (not isinstance(cached, _Head) or cached.bf16 == bf16):
        return cached if isinstance(cached, _Head) else None
    lin = model._modules.get("lm_head")
    if type(lin) not in _HEAD_KINDS:
        model.__dict__.pop("_fused_head", None)
        return None
    found = None
    if lin.in_features == c and getattr(lin, "row_order", None) is None:
        found = _entry(lin, bf16)
    links = _head_links(model, lin)
    if found is None or not native_step.available(bf16, frozenset({found[0].kind})):
        model.__dict__["_fused_head"] = _Links(*links)
        return None
    entry, tensors, rows = found
    head = _Head(*links, (lin._forward_hooks, lin._forward_pre_hooks), tuple(tensors),
                 tuple(t.data_ptr() for t in tensors), entry, bf16, rows)
    model.__dict__["_fused_head"] = head
    return head


_UNVOUCHED = object()  # a thread's entry in decoder.__dict__["_fused_vouched"] outside a `vouched` span


class _Spans(dict):
    """A decoder's open `vouched` spans: thread -> None (not checked yet) or the table. A copy of
    the model has none: its threads' spans are the original's, not its own."""

    def __reduce__(self) -> tuple:
        return _absent, ()


@contextlib.contextmanager
def vouched(decoder: Any) -> Iterator[None]:
    """Steps on the calling thread inside are vouched for by a driver that runs no code that
    could change the decoder's modules, hooks or training flags while the span lasts (the
    server's engine thread; generate() without callbacks of the user's). The span's first fused
    step checks the table against the modules as always; the thread's later steps reuse that
    check. Steps on other threads check as always, so a forward of the user's elsewhere still
    sees its hooks. Outside a span every step checks: the check touches ~1,700 module objects,
    which the step's weights push out of the caches, 0.1-0.5 ms a token (bench/RESULTS.md)."""
    if decoder.__dict__.get("_fused_vouched", _UNVOUCHED) is None:
        decoder.__dict__.pop("_fused_vouched", None)  # a copy's: none open
    spans = decoder.__dict__.setdefault("_fused_vouched", _Spans())  # thread -> None (not checked yet) or the table
    thread = threading.get_ident()
    outer = spans.get(thread, _UNVOUCHED)
    spans[thread] = None
    try:
        yield
    finally:
        if outer is _UNVOUCHED:
            spans.pop(thread, None)
            if not spans:
                decoder.__dict__.pop("_fused_vouched", None)
        else:  # an enclosing span goes on, checking again: code of its own ran before this one
            spans[thread] = None


def vouched_model(model: Any) -> contextlib.AbstractContextManager:
    """`vouched` for a model's decoder (`model.model`: a causal LM's); no span for a model without one."""
    decoder = getattr(model, "model", None)
    return vouched(decoder) if decoder is not None else contextlib.nullcontext()


def _runnable(table: _Table, dropout: float) -> bool:
    """No hooks, no attention dropout in training: the modules would compute just what step.c
    does (a `vouched` span checks this once; autograd is checked every step, in decode_layers)."""
    hooks = torch.nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks or any(table.hooks):
        return False
    return not (dropout > 0 and any(attn.training for attn in table.attention))


_KV16 = {torch.bfloat16: 1, torch.float16: 2}  # a 16-bit cache under float32 activations: step.c's kv16


def _cache_arrays(table: _Table, cache: KVCache, plan: CachePlan) -> tuple[Any, Any, tuple[int, ...], int] | None:
    """Pointer arrays to every layer's key and value buffers (reused while the buffers are the
    same), their strides, and the 16-bit kind they hold under float32 activations (0: none, 1:
    bfloat16, 2: float16)."""
    keys, values = cache.step_buffers(plan)
    buffers = [*keys, *values]
    kv16 = 0 if table.bf16 else _KV16.get(keys[0].dtype, 0)
    last = table.cache_arrays
    if last is not None and len(last[0]) == len(buffers) and all(a is b for a, b in zip(last[0], buffers)):
        return last[1], last[2], keys[0].stride(), kv16
    layers = table.dims[5]
    if len(keys) != layers or (kv16 and not native_step.available(kv16=kv16)):
        return None
    stride, dtype = keys[0].stride(), keys[0].dtype if kv16 else _ACTIVATION[table.bf16]
    if any(t.dtype != dtype or not t.is_cpu or t.stride() != stride for t in buffers):
        return None
    pointers = ctypes.c_void_p * layers
    key_ptrs, value_ptrs = pointers(*(k.data_ptr() for k in keys)), pointers(*(v.data_ptr() for v in values))
    table.cache_arrays = (buffers, key_ptrs, value_ptrs)
    return key_ptrs, value_ptrs, stride, kv16


# the most tokens a prompt chunk's step reads (batch x chunk): past it the modules read them faster
# (bench/RESULTS.md), and the step's scratch grows with them
MAX_CHUNK_ROWS = 128


def _chunk_mask(plan: CachePlan, mask: torch.Tensor | None, t: int) -> torch.Tensor | None:
    """The (B or 1, 1, T, used) mask step.c reads: the step's own, or for a first chunk left
    plain causal (mask None: every key its own token, none padded) the causal one it stands for;
    None where the mask is not of that shape."""
    if mask is None:
        return torch.ones(t, t, dtype=torch.bool).tril_()[None, None] if t > 1 and plan.used == t else None
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[2] != t or mask.shape[-1] != plan.used:
        return None
    return mask


def decode_layers(decoder: Any, h: torch.Tensor, step: Any, cache: KVCache | None,
                  stock: tuple[type, type, type, type]) -> torch.Tensor | None:
    """h (B, T, C) after every layer and the final norm, by step.c; None where the modules
    must run (see the module docstring). `stock` names the module classes step.c computes
    (decoder layer, attention, MLP, RMSNorm): a subclass may compute something else. The
    cache's slots are written as `update` would. T > 1 (a prompt's chunk of at most
    `MAX_CHUNK_ROWS` tokens in all) runs as B * T rows, each token attending the chunk's earlier ones
    through the cache, as the modules' write-then-read step does."""
    found = _fused(decoder, h, step, cache, stock, None)
    return None if found is None else found[0]


def decode_logits(model: Any, h: torch.Tensor, step: Any, cache: KVCache | None,
                  stock: tuple[type, type, type, type]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`decode_layers` on `model.model` for one token per row (T = 1), with `model.lm_head`
    applied in the same native call where step.c computes what the head module does:
    (normed h (B, 1, C), logits (B, V) or None where the head module must run), or None where
    the layers' modules must run. The head in the step's own threads spares a parallel region
    of its own and a call from Python a token (bench/RESULTS.md)."""
    return _fused(model.model, h, step, cache, stock, model) if h.dim() == 3 and h.shape[1] == 1 else None


def _fused(decoder: Any, h: torch.Tensor, step: Any, cache: KVCache | None, stock: tuple[type, type, type, type],
           model: Any) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    if torch.compiler.is_compiling() or cache is None or step.plan is None or h.dim() != 3:
        return None
    plan, t = step.plan, h.shape[1]
    if (plan.mode is not StepMode.WRITE_THEN_READ or plan.write_slots.numel() != t
            or (t > 1 and h.shape[0] * t > MAX_CHUNK_ROWS)
            or (t > 1 and cache.rolling) or h.dtype not in (torch.float32, torch.bfloat16) or not h.is_cpu
            or step.attn_implementation != "native"):
        return None
    mask = _chunk_mask(plan, step.mask, t)
    if mask is None:
        return None
    spans, thread = decoder.__dict__.get("_fused_vouched"), threading.get_ident()
    vouch = spans.get(thread, _UNVOUCHED) if spans else _UNVOUCHED
    checked = vouch is not _UNVOUCHED and vouch is not None
    table = vouch if checked else table_for(decoder, stock)
    b = h.shape[0]
    if (table is None or h.dtype != _ACTIVATION[table.bf16] or b * t > table.max_rows
            or not (checked or _runnable(table, decoder.config.attention_dropout))
            or (torch.is_grad_enabled() and (h.requires_grad or any(w.requires_grad for w in table.pointed)))):
        return None
    if vouch is None:  # the span's first check passed: the thread's later steps reuse it
        spans[thread] = table  # type: ignore[index]
    c, heads, kv_heads, d, f, layers = table.dims
    if h.shape[2] != c or mask.shape[0] not in (1, b) or step.cos.shape[:2] != (b, t):
        return None
    arrays = _cache_arrays(table, cache, plan)
    if arrays is None:
        return None
    head = None if model is None else _head(model, table.bf16, c)
    if head is not None and (b > head.max_rows or any(head.hooks) or (
            torch.is_grad_enabled() and any(w.requires_grad for w in head.pointed))):
        head = None
    logits = None if head is None else torch.empty(b, head.entry.n, dtype=h.dtype)
    keys, values, stride, kv16 = arrays
    x = h.reshape(b * t, c).contiguous().clone()  # the input may be the caller's inputs_embeds
    normed = torch.empty_like(x)
    cos, sin = step.cos.reshape(b * t, d).contiguous(), step.sin.reshape(b * t, d).contiguous()
    mask_s = (ctypes.c_int64 * 2)(mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(3))
    run = native_step.Step(b * t, c, heads, kv_heads, d, f, int(table.bf16), int(kv16), table.scale, cos.data_ptr(),
                           sin.data_ptr(), mask.data_ptr(), mask_s, plan.used, int(plan.write_slots[0]),
                           ctypes.cast(keys, ctypes.c_void_p), ctypes.cast(values, ctypes.c_void_p),
                           (ctypes.c_int64 * 3)(stride[0], stride[1], stride[2]), torch.get_num_threads(), 0, 0,
                           table.norm[0], table.norm[1], normed.data_ptr(), t, mask.stride(2),
                           None if head is None else ctypes.pointer(head.entry),
                           None if logits is None else logits.data_ptr())
    threads_of(decoder).waited = native_step.decode_layers(table.layers, layers, run, x)
    return normed.view(b, t, c), logits

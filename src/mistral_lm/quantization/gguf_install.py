"""The loader step that turns a GGUF's quantized tensors into modules computing on them.

Where the native kernels are built and support the type, a Linear becomes a GGUFBlockLinear (on a
tiled copy of its blocks for Q4_0, Q4_1, Q8_0 and Q6_K, else on the file's own pages) and the embedding
a GGUFBlockEmbedding over the file's pages; otherwise a Linear becomes a
GGUFLinear on torch's int4 kernel (repacked once, kept in a KernelCache beside the file), and
what neither can hold is dequantized.
"""

from __future__ import annotations

import atexit
import os
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints.gguf import GGUFQuantizedTensor
from ..native import ggml
from .gguf import CACHE_ENV, GGUFLinear, KernelCache, _made_tensors
from .gguf_blocks import GGUFBlockEmbedding, GGUFBlockLinear, as_tensor, available


def install_gguf_linears(model: nn.Module, blocks: dict[str, GGUFQuantizedTensor], tensors: dict[str, torch.Tensor],
                         dtype: torch.dtype, source: str | os.PathLike | None = None) -> set[str]:
    """Swap each Linear (and the embedding) whose weight came as GGUF blocks for a module
    computing on those blocks; put the rest into `tensors` dequantized to `dtype`. Returns the
    swapped module names. A tied lm_head computes on the embedding's blocks: the same numbers
    as the float tie, at the quantized size.

    Block modules view the file's map, or hold a tiled copy of their rows whose file pages are
    then dropped from the process (one copy resident either way). For the GGUFLinear fallback, with
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
    modules = {key: model.get_submodule(key.removesuffix(".weight")) if key.endswith(".weight") else None
               for key in blocks}
    tiled = _tiled_tensors({key: qt for key, qt in blocks.items()
                            if isinstance(modules[key], nn.Linear) and available(qt.ggml_type)}, source)
    if tied and "lm_head.weight" in tiled:
        tiled[embedding] = tiled["lm_head.weight"]  # one table for the lookup and the head
    for key, qt in blocks.items():
        name, module = key.removesuffix(".weight"), modules[key]
        rows, order = _as_stored(qt)
        stored = tiled.get(key)
        if isinstance(module, nn.Linear) and available(qt.ggml_type):
            model.set_submodule(name, GGUFBlockLinear(as_tensor(rows) if stored is None else stored, qt.ggml_type,
                                                      qt.shape[1], order, tiled=stored is not None))
            native.add(name)
        elif isinstance(module, nn.Embedding) and available(qt.ggml_type) and order is None:
            model.set_submodule(name, GGUFBlockEmbedding(as_tensor(rows) if stored is None else stored, qt.ggml_type,
                                                         qt.shape[1], module.padding_idx, dtype,
                                                         tiled=stored is not None))
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


TILED_ENV = "MISTRAL_LM_GGUF_TILED"  # "0": keep every weight in the file's rows (for comparisons)
_TILED_SUFFIX = ".mistral_lm-tiled"


def _tiled_tensors(candidates: dict[str, GGUFQuantizedTensor], source: str | os.PathLike | None
                   ) -> dict[str, torch.Tensor]:
    """The tiled layout (`ggml.tile`) of every candidate whose type and row count allow it, by key.

    A decode step then reads 16 rows' blocks as one stream, which is faster where the weights
    come from DRAM (a 7B); the products are the same bits. With `source`, later loads map the
    tiles from a `KernelCache` file beside the GGUF (shared pages, as the file's own: nothing is
    copied); the first load tiles into memory and writes that file behind it (`_write_behind`),
    so it waits for the tiling only, not for the disk. Each tensor's file pages are dropped from
    the process once tiled."""
    keys = [key for key, qt in candidates.items() if int(qt.ggml_type) in ggml.TILEABLE
            and qt.shape[0] % ggml.TILE_ROWS == 0]
    if not keys or os.environ.get(TILED_ENV, "1") in ("0", "off"):
        return {}
    cache = None
    if source is not None and os.environ.get(CACHE_ENV, "1") not in ("0", "off"):
        cache = KernelCache(Path(source), {"layout": "ggml-tiled", "layout_version": 1, "rows": ggml.TILE_ROWS},
                            suffix=_TILED_SUFFIX)
    found = cache.read() if cache is not None else None
    if found is not None and all(key in found and tuple(found[key].shape) == _as_stored(candidates[key])[0].shape
                                 for key in keys):
        return {key: found[key] for key in keys}
    made: dict[str, torch.Tensor] = {}
    for key in keys:
        qt = candidates[key]
        made[key] = ggml.tile(as_tensor(_as_stored(qt)[0]), int(qt.ggml_type), qt.shape[1])
        getattr(qt, "release", lambda: None)()  # its file pages are read: out of our RSS
    if cache is not None:
        _write_behind(cache, made)
    return made


_WRITERS: list[threading.Thread] = []  # tile caches being written behind a load


def _write_behind(cache: KernelCache, tensors: dict[str, torch.Tensor]) -> None:
    """Write `tensors` to `cache` on a background thread (a 7B's 4 GB take seconds once the
    kernel holds the writer to the disk's pace). The load does not wait for it; the process's
    exit does (`_finish_cache_writes`). A write that fails (a read-only folder, a full disk)
    leaves no cache, and a later load tiles again; a cut writer's temporary file is removed by
    the next writer. The writer iterates its own copy of the dict: the loader goes on to add to
    the one it was given (a tied head's embedding entry), which would end the iteration with an
    error and the cache unwritten."""
    tensors = dict(tensors)

    def write() -> None:
        writer = cache.writer()
        if writer is None:
            return
        if all(writer.add({key: tensor}) for key, tensor in tensors.items()):
            writer.commit(read_back=False)

    thread = threading.Thread(target=write, name="mistral-lm-tile-cache", daemon=True)
    _WRITERS.append(thread)
    thread.start()


def cache_writes_pending() -> bool:
    """Whether a tile cache is still being written behind a load."""
    return any(thread.is_alive() for thread in _WRITERS)


def wait_for_cache_writes(timeout: float | None = None) -> None:
    """Block until the tile caches being written behind loads are on disk (or have failed)."""
    for thread in list(_WRITERS):
        thread.join(timeout)
    _WRITERS[:] = [thread for thread in _WRITERS if thread.is_alive()]


@atexit.register
def _finish_cache_writes() -> None:
    """At exit, the writes still under way finish. The writers are daemon threads, which the
    interpreter's exit would cut: a one-shot process on a 7B (`mistral-lm generate`) ended
    before its 4 GB were written, left no cache, and every later run tiled again. A second
    Ctrl-C while waiting gives the wait up, and the exit cuts the write."""
    try:
        wait_for_cache_writes()
    except KeyboardInterrupt:
        pass


def _as_stored(qt: Any) -> tuple[Any, Any]:
    """(rows as the file stores them, their order or None): a file's tensor keeps llama.cpp's
    Q/K row order for the module to undo; a tensor-parallel slice (parallel/quantize.py) comes
    already in HF order."""
    stored = getattr(qt, "stored", None)
    return (qt.data, None) if stored is None else (stored, qt.row_order)

"""The engine's model and cache operations in one place, so tensor parallel can run them on every rank.

`Runner` runs them here. Under torchrun the engine (rank 0) uses `MirroredRunner`: before each
operation it broadcasts the operation and its small arguments (token ids, positions, row lists,
cache handles) and then runs it itself; the other ranks sit in `serve_worker`, replaying the same
operations on their shard of the model and their own caches, so the all-reduces inside every
forward pair up. Caches are named by handles rank 0 hands out; when rank 0 drops a cache (a
finished prefill, a prefix-cache eviction), its handle is freed on the workers with the next
operation.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

import torch

from ..cache import KVCache
from ..errors import DistributedError
from ..generation import Decoder

log = logging.getLogger(__name__)

Join = tuple[KVCache, int, int]  # (a prefilled cache, its next position, copies): KVCache.append_rows


class Runner:
    """The model and cache operations the engine needs, in this process."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._decode = Decoder(model)
        # the model's device, read once: `model.device` walks the modules to the first weight,
        # ~0.05 ms a decode step on a GGUF model (the server never moves its model)
        self.device = model.device

    def make_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        return self.model.make_cache(batch_size, max_length=max_length)

    def prefill(self, ids: list[int], cache: KVCache, logits_to_keep: int) -> torch.Tensor:
        """(1, kept, V) logits of one prompt chunk read into `cache`."""
        chunk = torch.tensor([ids], device=self.device)
        return self.model(chunk, past_key_values=cache, use_cache=True, logits_to_keep=logits_to_keep).logits

    def decode(self, tokens: list[int], positions: list[int], cache: KVCache) -> torch.Tensor:
        """(B, V) logits of one decode step: row i reads tokens[i] at positions[i]."""
        return self._decode(torch.tensor(tokens, device=self.device), torch.tensor(positions, device=self.device), cache)

    def append_rows(self, cache: KVCache, joins: list[Join]) -> None:
        cache.append_rows(joins)

    def select_rows(self, cache: KVCache, rows: list[int]) -> None:
        cache.select_rows(rows)

    def copy(self, cache: KVCache) -> KVCache:
        return cache.copy()

    def close(self) -> None:
        """Nothing to release here; `MirroredRunner` stops its workers."""


class MirroredRunner(Runner):
    """`Runner` on rank 0 of a tensor-parallel group: each operation is first sent to the other ranks."""

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self._handles: weakref.WeakKeyDictionary[KVCache, int] = weakref.WeakKeyDictionary()
        self._next = 0
        self._freed: list[int] = []  # handles of caches rank 0 no longer holds (weakref callbacks)
        self._lock = threading.Lock()

    def _send(self, op: str, *args: Any) -> None:
        import torch.distributed as dist

        with self._lock:
            freed, self._freed = self._freed, []
        try:
            dist.broadcast_object_list([(op, args, freed)], src=0)
        except RuntimeError as exc:  # gloo/NCCL: a peer is gone or timed out
            raise DistributedError(f"rank 0 could not send {op!r} to the other ranks: {exc}") from exc

    def _name(self, cache: KVCache) -> int:
        return self._handles[cache]

    def _register(self, cache: KVCache, handle: int) -> KVCache:
        self._handles[cache] = handle
        weakref.finalize(cache, self._release, handle)
        return cache

    def _release(self, handle: int) -> None:
        with self._lock:
            self._freed.append(handle)

    def _new_handle(self) -> int:
        self._next += 1
        return self._next

    def make_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        handle = self._new_handle()
        self._send("make_cache", handle, batch_size, max_length)
        return self._register(super().make_cache(batch_size, max_length), handle)

    def prefill(self, ids: list[int], cache: KVCache, logits_to_keep: int) -> torch.Tensor:
        self._send("prefill", ids, self._name(cache), logits_to_keep)
        return super().prefill(ids, cache, logits_to_keep)

    def decode(self, tokens: list[int], positions: list[int], cache: KVCache) -> torch.Tensor:
        self._send("decode", tokens, positions, self._name(cache))
        return super().decode(tokens, positions, cache)

    def append_rows(self, cache: KVCache, joins: list[Join]) -> None:
        self._send("append_rows", self._name(cache), [(self._name(c), position, copies) for c, position, copies in joins])
        super().append_rows(cache, joins)

    def select_rows(self, cache: KVCache, rows: list[int]) -> None:
        self._send("select_rows", self._name(cache), rows)
        super().select_rows(cache, rows)

    def copy(self, cache: KVCache) -> KVCache:
        handle = self._new_handle()
        self._send("copy", self._name(cache), handle)
        return self._register(super().copy(cache), handle)

    def close(self) -> None:
        """Tell the workers to leave `serve_worker`."""
        self._send("stop")


def serve_worker(model: Any) -> None:
    """Ranks 1..N-1 of a tensor-parallel server: replay rank 0's operations until it stops."""
    import torch.distributed as dist

    runner = Runner(model)
    caches: dict[int, KVCache] = {}
    with torch.inference_mode():
        while True:
            message: list[Any] = [None]
            dist.broadcast_object_list(message, src=0)
            op, args, freed = message[0]
            for handle in freed:
                caches.pop(handle, None)
            if op == "stop":
                return
            if op == "make_cache":
                handle, batch_size, max_length = args
                caches[handle] = runner.make_cache(batch_size, max_length)
            elif op == "prefill":
                ids, handle, keep = args
                runner.prefill(ids, caches[handle], keep)
            elif op == "decode":
                tokens, positions, handle = args
                runner.decode(tokens, positions, caches[handle])
            elif op == "append_rows":
                handle, joins = args
                runner.append_rows(caches[handle], [(caches[h], position, copies) for h, position, copies in joins])
            elif op == "select_rows":
                handle, rows = args
                runner.select_rows(caches[handle], rows)
            elif op == "copy":
                source, handle = args
                caches[handle] = runner.copy(caches[source])
            else:  # pragma: no cover - rank 0 only sends the operations above
                raise RuntimeError(f"unknown operation {op!r} from rank 0")

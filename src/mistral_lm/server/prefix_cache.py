"""The server's prefix cache: prefilled prompts kept for the requests that start with them.

Engine thread only; see `PrefixCache`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..cache import KVCache

DEFAULT_PREFIX_CACHE_BYTES = 256 << 20  # ~5 conversations of 1,500 tokens of SmolLM2-135M (46 KB per token)


class PrefixCache:
    """Prefilled prompts for reuse: token ids -> (batch-1 KVCache, the logits after the last one).

    A prompt that starts with a stored one (the next turn of a chat, the same document asked
    again) continues from a copy of its keys instead of reading them again. Results are exact:
    the stored keys are the ones a fresh prefill computes for those positions (a rolling cache
    holds the last W, all that any later token attends). Entries are never changed once stored
    (continuations run on copies). Memory is bounded by `max_bytes`, least recently used first out.
    Engine thread only.
    """

    def __init__(self, max_bytes: int, min_tokens: int = 16) -> None:
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens  # shorter prompts are cheap to read again
        self.entries: OrderedDict[tuple[int, ...], tuple[KVCache, torch.Tensor]] = OrderedDict()
        self.nbytes = 0

    def lookup(self, ids: list[int]) -> tuple[int, KVCache, torch.Tensor] | None:
        """(tokens reused, the cache holding them, the logits after them) of the longest stored prefix."""
        best = max((key for key in self.entries if len(key) <= len(ids) and tuple(ids[:len(key)]) == key),
                   key=len, default=None)
        if best is None:
            return None
        self.entries.move_to_end(best)
        cache, logits = self.entries[best]
        return len(best), cache, logits

    def add(self, ids: list[int], cache: KVCache, logits: torch.Tensor) -> None:
        key, size = tuple(ids), cache.nbytes()
        if len(key) < self.min_tokens or size > self.max_bytes or key in self.entries:
            return
        self.entries[key] = (cache, logits.detach().clone())
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, (old, _) = self.entries.popitem(last=False)
            self.nbytes -= old.nbytes()

"""Key/value caches: a rolling buffer of `sliding_window` slots, or a growable static buffer.

One class serves both. Its bookkeeping (which slot each new token goes to, which absolute
position each attended key has) is computed once per forward by `plan`, so layers only copy
tensors. Masks are built from the key positions the plan returns (masks.py), which is why the
ring buffer never has to be "unrotated".

Two ways to serve a step, chosen by the plan:
- write first, then attend over the buffer: exact when no key this step overwrites is still
  needed by one of its queries. Always true for a static buffer, and for a rolling buffer when
  the step has one token: token t lands in the slot of token t - W, which is outside t's window.
- attend over (buffer ∪ new keys), then store the last W new keys: needed for multi-token steps
  on a rolling buffer. With W=4 and tokens 0-3 cached, a chunk 4-5 written first would put 5
  over 1, yet query 4 still sees 1-4.

Worked example, W=4, rolling, after 6 single-token steps: slots hold positions [4, 5, 2, 3];
the 7th token (position 6) goes to slot 6 % 4 = 2 and attends to keys at positions [4, 5, 6, 3].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import GenerationError


@dataclass(frozen=True)
class CachePlan:
    """What one forward step does with the cache (shared by every layer)."""

    key_positions: torch.Tensor  # (B, K) absolute position of each key attended
    key_valid: torch.Tensor  # (B, K) False for padding and empty slots
    write_slots: torch.Tensor  # (T_kept,) buffer slots receiving the last T_kept new tokens
    keep_from: int  # new tokens [keep_from:] are stored
    write_first: bool  # attend over the buffer after writing (else over buffer ∪ new)
    used: int  # buffer slots attended in write-first mode
    fresh: bool = False  # attend-then-store into an empty buffer: the keys are the new tokens alone


class KVCache:
    """Per-layer key/value buffers with shared position bookkeeping.

    `size` slots per layer. `rolling=True` (a model with a sliding window) keeps exactly `size`
    slots forever: memory is constant however long generation runs. `rolling=False` (no window)
    grows by doubling when a step would not fit, so manual decoding loops work without knowing
    the final length; `generate` preallocates the exact size instead.
    """

    def __init__(
        self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, size: int, *,
        rolling: bool, dtype: torch.dtype, device: torch.device | str | list,
    ) -> None:
        if size <= 0:
            raise GenerationError(f"cache size must be positive, got {size}")
        devices = device if isinstance(device, list) else [device] * num_layers
        shape = (batch_size, num_kv_heads, size, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.values = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.positions = torch.zeros(batch_size, size, dtype=torch.long, device=devices[0])
        self.valid = torch.zeros(batch_size, size, dtype=torch.bool, device=devices[0])
        self.rolling = rolling
        self.seen = 0  # tokens stored so far; rows of a left-padded batch advance together

    @property
    def size(self) -> int:
        return self.positions.shape[1]

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    def get_seq_length(self) -> int:
        """Tokens processed so far (Transformers' name), not the number of slots held."""
        return self.seen

    def nbytes(self) -> int:
        tensors = [*self.keys, *self.values, self.positions, self.valid]
        return sum(t.numel() * t.element_size() for t in tensors)

    def plan(self, positions: torch.Tensor, valid: torch.Tensor) -> CachePlan:
        """Book T new tokens with absolute `positions` (B, T) and `valid` (B, T)."""
        if positions.shape[0] != self.batch_size:
            raise GenerationError(
                f"the cache was made for batch size {self.batch_size}, but the input has {positions.shape[0]} rows"
            )
        t = positions.shape[1]
        write_first = not self.rolling or t == 1
        if not self.rolling and self.seen + t > self.size:
            self._grow(self.seen + t)
        keep_from = max(0, t - self.size)
        slots = (self.seen + torch.arange(keep_from, t, device=positions.device)) % self.size
        if write_first:
            self._book(slots, positions, valid, keep_from)
            # a static buffer's single-token steps attend it whole (empty slots are masked): the
            # same shapes every step, which a compiled decode step needs, for a few masked keys
            used = self.size if self.rolling or t == 1 else self.seen + t
            plan = CachePlan(self.positions[:, :used], self.valid[:, :used], slots, keep_from, True, used)
        elif self.seen == 0:  # nothing stored yet: no empty slots to attend (or mask) first
            plan = CachePlan(positions, valid, slots, keep_from, False, self.size, fresh=True)
            self._book(slots, positions, valid, keep_from)
        else:
            key_positions = torch.cat([self.positions, positions], dim=1)
            key_valid = torch.cat([self.valid, valid], dim=1)
            plan = CachePlan(key_positions, key_valid, slots, keep_from, False, self.size)
            self._book(slots, positions, valid, keep_from)
        self.seen += t
        return plan

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: CachePlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (B, H_kv, T, D) for `layer`; return the keys and values to attend."""
        keys, values = self.keys[layer], self.values[layer]
        k_kept = k[:, :, plan.keep_from:].to(keys.dtype)
        v_kept = v[:, :, plan.keep_from:].to(values.dtype)
        if plan.write_first:
            keys.index_copy_(2, plan.write_slots, k_kept)
            values.index_copy_(2, plan.write_slots, v_kept)
            return keys[:, :, : plan.used], values[:, :, : plan.used]
        if plan.fresh:
            k_all, v_all = k.to(keys.dtype), v.to(values.dtype)
        else:
            k_all = torch.cat([keys, k.to(keys.dtype)], dim=2)
            v_all = torch.cat([values, v.to(values.dtype)], dim=2)
        keys.index_copy_(2, plan.write_slots, k_kept)
        values.index_copy_(2, plan.write_slots, v_kept)
        return k_all, v_all

    def _book(self, slots: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, keep_from: int) -> None:
        self.positions.index_copy_(1, slots, positions[:, keep_from:])
        self.valid.index_copy_(1, slots, valid[:, keep_from:])

    def _grow(self, needed: int) -> None:
        size = max(needed, 2 * self.size)

        def grown(t: torch.Tensor, dim: int) -> torch.Tensor:
            pad_shape = list(t.shape)
            pad_shape[dim] = size - t.shape[dim]
            return torch.cat([t, t.new_zeros(pad_shape)], dim=dim)

        self.keys = [grown(t, 2) for t in self.keys]
        self.values = [grown(t, 2) for t in self.values]
        self.positions = grown(self.positions, 1)
        self.valid = grown(self.valid, 1)

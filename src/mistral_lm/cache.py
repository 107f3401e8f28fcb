"""Key/value caches: a rolling buffer of `sliding_window` slots, or a growable static buffer.

One class serves both, and it is the only owner of its rows, slots and positions: the model
asks for a plan, layers hand it their keys, and the server moves rows with `select_rows` and
`append_rows`; nobody else reads or writes its tensors.

A forward step is a transaction:
1. `plan(positions, valid)` is pure: which slot each new token goes to, which absolute position
   each attended key has (masks are built from those, masks.py, which is why the ring buffer
   never has to be "unrotated"), and the bookkeeping the cache will hold afterwards.
2. Each layer calls `update(layer, k, v, plan)` and attends over what it returns.
3. `commit(plan)` after the last layer books the positions and stores any deferred keys. A
   forward interrupted before it leaves the cache claiming exactly the keys it held before.

Three modes (`StepMode`), chosen by the plan:
- WRITE_THEN_READ: write the new keys into their slots, then attend over the buffer. Exact when
  no key the step overwrites is still needed: always true for a static buffer (it writes free
  slots), and for a rolling buffer when the step has one token: token t lands in the slot of
  token t - W, which is outside the window of t and of every later query. The same argument
  makes the early write safe if the step is interrupted: the slot it spoils is dead.
- FIRST_CHUNK: a multi-token step into an empty rolling buffer attends over its own keys alone
  (no empty slots to mask) and stores the last W of them at commit.
- READ_THEN_WRITE: a multi-token step on a non-empty rolling buffer attends over
  (buffer ∪ new keys) and stores the last W new keys at commit. With W=4 and tokens 0-3
  cached, a chunk 4-5 written first would put 5 over 1, yet query 4 still sees 1-4.

Worked example, W=4, rolling, after 6 single-token steps: slots hold positions [4, 5, 2, 3];
the 7th token (position 6) goes to slot 6 % 4 = 2 and attends to keys at positions [4, 5, 6, 3].
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import GenerationError


class StepMode(enum.Enum):
    WRITE_THEN_READ = "write then read"
    FIRST_CHUNK = "first chunk"
    READ_THEN_WRITE = "read then write"


@dataclass(frozen=True)
class CachePlan:
    """What one forward step does with the cache (shared by every layer)."""

    mode: StepMode
    key_positions: torch.Tensor  # (B, K) absolute position of each key attended
    key_valid: torch.Tensor  # (B, K) False for padding and empty slots
    write_slots: torch.Tensor  # (T_kept,) buffer slots receiving the last T_kept new tokens
    keep_from: int  # new tokens [keep_from:] are stored
    used: int  # WRITE_THEN_READ: buffer slots attended
    positions: torch.Tensor  # (B, S) the buffer's key positions once committed
    valid: torch.Tensor  # (B, S) and their validity
    seen: int  # tokens stored once committed

    @property
    def size(self) -> int:
        """Slots the buffer needs for this step (a static buffer grows to it)."""
        return self.positions.shape[1]


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
        self._deferred: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> keys stored at commit

    @property
    def size(self) -> int:
        return self.positions.shape[1]

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    def get_seq_length(self) -> int:
        """Tokens processed so far (Transformers' name), not the number of slots held."""
        return self.seen

    def copy(self) -> KVCache:
        """An independent copy: steps on it leave this cache as it is (the server's prefix cache
        continues a stored prompt's keys in a copy, so the stored ones serve the next request too)."""
        if self._deferred:
            raise GenerationError("copy() in the middle of a step: commit() it first")
        out = object.__new__(KVCache)
        out.__dict__.update(self.__dict__)
        out.keys, out.values = [k.clone() for k in self.keys], [v.clone() for v in self.values]
        out.positions, out.valid, out._deferred = self.positions.clone(), self.valid.clone(), {}
        return out

    def nbytes(self) -> int:
        tensors = [*self.keys, *self.values, self.positions, self.valid]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------------ one forward step
    def plan(self, positions: torch.Tensor, valid: torch.Tensor) -> CachePlan:
        """The step for T new tokens with absolute `positions` (B, T) and `valid` (B, T); changes nothing."""
        if positions.shape[0] != self.batch_size:
            raise GenerationError(
                f"the cache was made for batch size {self.batch_size}, but the input has {positions.shape[0]} rows"
            )
        t = positions.shape[1]
        size = self.size if self.rolling else _grown_size(self.size, self.seen + t)
        keep_from = max(0, t - size)
        slots = (self.seen + torch.arange(keep_from, t, device=positions.device)) % size
        after_positions = _pad(self.positions, 1, size).index_copy(1, slots, positions[:, keep_from:])
        after_valid = _pad(self.valid, 1, size).index_copy(1, slots, valid[:, keep_from:])
        if not self.rolling or t == 1:
            # a static buffer's single-token steps attend it whole (empty slots are masked): the
            # same shapes every step, which a compiled decode step needs, for a few masked keys
            used = size if self.rolling or t == 1 else self.seen + t
            mode, key_positions, key_valid = StepMode.WRITE_THEN_READ, after_positions[:, :used], after_valid[:, :used]
        elif self.seen == 0:
            used, mode, key_positions, key_valid = 0, StepMode.FIRST_CHUNK, positions, valid
        else:
            used, mode = 0, StepMode.READ_THEN_WRITE
            key_positions = torch.cat([self.positions, positions], dim=1)
            key_valid = torch.cat([self.valid, valid], dim=1)
        return CachePlan(mode, key_positions, key_valid, slots, keep_from, used, after_positions, after_valid,
                         self.seen + t)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: CachePlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Hand this step's k, v (B, H_kv, T, D) for `layer`; returns the keys and values to attend."""
        k, v = k.to(self.keys[layer].dtype), v.to(self.values[layer].dtype)
        if plan.mode is StepMode.WRITE_THEN_READ:
            keys, values = self._reserve(layer, plan.size)
            keys.index_copy_(2, plan.write_slots, k[:, :, plan.keep_from:])
            values.index_copy_(2, plan.write_slots, v[:, :, plan.keep_from:])
            return keys[:, :, : plan.used], values[:, :, : plan.used]
        self._deferred[layer] = (k[:, :, plan.keep_from:], v[:, :, plan.keep_from:])
        if plan.mode is StepMode.FIRST_CHUNK:
            return k, v
        return torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)

    def step_buffers(self, plan: CachePlan) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every layer's key and value buffers, with at least `plan.size` slots, for a fused
        step (fused_step.py) that writes its T tokens into the consecutive slots from
        `plan.write_slots[0]` of each itself, as `update` does layer by layer, then attends slots
        `:plan.used`."""
        slots = plan.write_slots
        if plan.mode is not StepMode.WRITE_THEN_READ or plan.keep_from or (
                slots.numel() > 1 and int(slots[-1]) - int(slots[0]) != slots.numel() - 1):
            raise GenerationError("step_buffers() serves steps that write consecutive slots, then read")
        self._reserve_all(plan.size)
        return self.keys, self.values

    def commit(self, plan: CachePlan) -> None:
        """Make the step's keys part of the cache: book positions, store deferred keys, advance."""
        deferred, self._deferred = self._deferred, {}  # an interrupted step's leftovers go too
        if plan.mode is not StepMode.WRITE_THEN_READ:
            if len(deferred) != len(self.keys):
                raise GenerationError("commit() of a step whose layers did not all run update()")
            for layer, (k, v) in deferred.items():
                slots = plan.write_slots.to(self.keys[layer].device)
                self.keys[layer].index_copy_(2, slots, k)
                self.values[layer].index_copy_(2, slots, v)
        self._reserve_all(plan.size)  # layers that a static step grew, and any it did not reach
        self.positions, self.valid, self.seen = plan.positions, plan.valid, plan.seen

    # ------------------------------------------------------------------ rows (continuous batching)
    def select_rows(self, rows: Sequence[int]) -> None:
        """Keep only `rows`, in this order; the others' slots are freed.

        A static buffer is compacted (valid keys first, half of it headroom) so it tracks the
        longest live row instead of growing with the server's uptime; a rolling buffer keeps its
        slot layout, which every row shares.
        """
        index = torch.tensor(list(rows), dtype=torch.long, device=self.valid.device)
        if self.rolling or not len(rows):
            self.keys = [k.index_select(0, index.to(k.device)) for k in self.keys]
            self.values = [v.index_select(0, index.to(v.device)) for v in self.values]
            self.positions, self.valid = self.positions[index], self.valid[index]
            if not len(rows):
                self.seen = 0
            return
        valid = self.valid[index]
        used = int(valid.sum(1).max())
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices[:, :used]  # valid slots first
        size = max(2 * used, 1)  # headroom, so the next steps do not grow the buffer at once

        def compacted(t: torch.Tensor) -> torch.Tensor:
            picked, slots = t.index_select(0, index.to(t.device)), order.to(t.device)
            if t.dim() == 4:  # (B, H_kv, S, D)
                slots = slots[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])
                return _pad(picked.gather(2, slots), 2, size)
            return _pad(picked.gather(1, slots), 1, size)

        self.keys = [compacted(k) for k in self.keys]
        self.values = [compacted(v) for v in self.values]
        self.positions, self.valid = compacted(self.positions), compacted(self.valid)
        self.seen = used

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Row i becomes old row `beam_idx[i]` (Transformers' name; beam search calls it every
        step). Rows may repeat or go, and the batch may grow: the slot layout, shared by every
        row, stays as it is, so a rolling buffer keeps its next write slot."""
        if self._deferred:
            raise GenerationError("reorder_cache() in the middle of a step: commit() it first")
        self.keys = [k.index_select(0, beam_idx.to(k.device)) for k in self.keys]
        self.values = [v.index_select(0, beam_idx.to(v.device)) for v in self.values]
        index = beam_idx.to(self.valid.device)
        self.positions, self.valid = self.positions[index], self.valid[index]

    def append_rows(self, joins: Sequence[tuple[KVCache, int, int]]) -> None:
        """Append rows: for each (batch-1 `source` cache, its row's next position, copies),
        `copies` rows holding the source's keys, placed so that the next steps' writes (one slot
        per step, shared by all rows) never clobber a key still in use.

        - rolling buffer of W slots: a step writes slot `seen % W` in every row, so a joining
          key at position x goes to slot `(seen + x - next) % W`: the next write then lands on
          position next - W, the one key the new token's window no longer sees. Example, W=4,
          seen=6, a row whose prompt is positions 0-4 (next=5): positions 1, 2, 3, 4 go to slots
          2, 3, 0, 1, and the write at 6 % 4 = 2 replaces 1.
        - static buffer: writes go to slot `seen`, so a joining row's m keys go to slots 0..m-1
          and `seen` rises to m if needed (slots at or past `seen` are invalid in every row).
        """
        placed = []  # (source, its slots to copy, their slots here, copies)
        for source, next_position, copies in joins:
            if source.batch_size != 1 or len(source.keys) != len(self.keys):
                raise GenerationError("append_rows takes batch-1 caches of the same model")
            positions, valid = source.positions[0], source.valid[0]
            if self.rolling:
                src = (valid & (positions >= next_position - self.size)).nonzero().squeeze(1)
                dst = (self.seen + positions[src] - next_position) % self.size
            else:
                src = valid.nonzero().squeeze(1)
                dst = torch.arange(len(src), device=src.device)
                self.seen = max(self.seen, len(src))
            placed.append((source, src, dst, copies))
        size = self.size if self.rolling else max(self.size, self.seen)

        def joined(batch: torch.Tensor, sources: list[torch.Tensor], dim: int) -> torch.Tensor:
            """`batch` padded to `size` slots along `dim`, then the new rows with each source at its `dst`.
            A layer that a step cut short had grown keeps its slots (all empty past `size`)."""
            width = max(size, batch.shape[dim])
            blocks = [_pad(batch, dim, width)]
            for source, (_, src, dst, copies) in zip(sources, placed):
                shape = list(batch.shape)
                shape[0], shape[dim] = copies, width
                block = batch.new_zeros(shape)
                picked = source.index_select(dim - 1, src.to(source.device))
                block[(slice(None),) * dim + (dst.to(batch.device),)] = picked
                blocks.append(block)
            return torch.cat(blocks)

        sources = [p[0] for p in placed]
        # (B + joined copies, H_kv, size, D)
        self.keys = [joined(k, [s.keys[i][0] for s in sources], 2) for i, k in enumerate(self.keys)]
        self.values = [joined(v, [s.values[i][0] for s in sources], 2) for i, v in enumerate(self.values)]
        self.positions = joined(self.positions, [s.positions[0] for s in sources], 1)
        self.valid = joined(self.valid, [s.valid[0] for s in sources], 1)

    # ------------------------------------------------------------------ storage
    def _reserve_all(self, size: int) -> None:
        """Every layer's buffers with at least `size` slots. Every layer holds at least `self.size`
        slots at all times (each operation that replaces the buffers sizes them with the
        bookkeeping; a step only grows them), so only a step that grows the cache walks the
        layers: a decode step does not, and it runs this twice a token."""
        if size > self.size:
            for layer in range(len(self.keys)):
                self._reserve(layer, size)

    def _reserve(self, layer: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's buffers with at least `size` slots (new slots are empty: never valid)."""
        if self.keys[layer].shape[2] < size:
            self.keys[layer] = _pad(self.keys[layer], 2, size)
            self.values[layer] = _pad(self.values[layer], 2, size)
        return self.keys[layer], self.values[layer]


def _grown_size(size: int, needed: int) -> int:
    """A static buffer grows by doubling, so a manual loop reallocates O(log n) times."""
    return size if needed <= size else max(needed, 2 * size)


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """`t` with zeros appended along `dim` up to `size` (zeros are invalid, empty slots)."""
    if t.shape[dim] >= size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)

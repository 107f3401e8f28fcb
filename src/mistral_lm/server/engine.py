"""The batching engine: one thread owns the model and its KV cache (continuous batching).

Requests join and leave the running batch between decode steps, so N concurrent requests share
each forward pass instead of queueing behind each other. Every loop iteration:

1. drops the rows of cancelled requests (a client that went away frees its rows at once);
2. prefills up to `prefill_tokens` prompt tokens of waiting requests, each alone in its own
   batch-1 cache; when a prompt is done, the first token of each of its `n` choices is sampled
   and the cache row is copied into `n` free rows of the batch cache (`_Batch.add`);
3. runs one forward of every active row, (B, 1) tokens at per-row positions, samples each
   request's rows with its own settings and generator, and retires finished rows.

The prefill budget lets a burst of short prompts join together, while a long prompt is read over
several iterations so running streams keep flowing. Only the engine thread touches tensors;
other threads call `submit` (tokenization and validation happen in the caller's thread) and
`Submission.cancel`, and receive results through their `emit` callback, called from the engine
thread.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import sampling
from ..cache import KVCache
from ..generation import GenerationConfig
from ..tokenizer import StreamingDetokenizer
from .protocol import CompletionRequest, ProtocolError

log = logging.getLogger(__name__)

CANCELLED = "the request was cancelled"  # Finished.error of a request whose client went away


@dataclass(frozen=True)
class Delta:
    """New text of choice `index`; `finish_reason` ("stop" or "length") is set on its last delta."""

    index: int
    text: str
    finish_reason: str | None = None


@dataclass(frozen=True)
class Finished:
    """The last event of every request, whatever happened to it (so no waiter is left hanging)."""

    prompt_tokens: int
    completion_tokens: int
    error: str | None = None  # set when the request was cancelled or the engine failed


Event = Delta | Finished
Emit = Callable[[list[Event]], None]


class Submission:
    """A request in the engine. `cancel()` is safe from any thread; its rows go at the next step."""

    def __init__(self, request: CompletionRequest, prompt_ids: list[int], config: GenerationConfig, emit: Emit,
                 device: torch.device) -> None:
        self.request = request
        self.prompt_ids = prompt_ids
        self.config = config
        self.emit = emit
        self.max_new_tokens: int = config.max_new_tokens or 0  # always set by Engine.submit
        self.cancelled = False
        self.finished = False  # the Finished event was sent (engine thread only)
        # Its own generator: a seeded request samples the same text however it is batched.
        seed = config.seed if config.seed is not None else secrets.randbits(62)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.choices: list[_Choice] = []

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    """Continuous batching over one model; see the module docstring for the loop.

    `max_batch_size` bounds the rows decoded together (a request with `n` choices takes `n`);
    `max_queue` bounds requests waiting for rows: beyond it `submit` refuses with a 429, so a
    burst degrades into fast refusals rather than unbounded memory and latency.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_batch_size: int = 32, max_queue: int = 128,
                 prefill_tokens: int = 512) -> None:
        if max_batch_size < 1 or max_queue < 1 or prefill_tokens < 1:
            raise ValueError("max_batch_size, max_queue and prefill_tokens must be positive")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        config = model.config
        self.context = config.max_position_embeddings
        self.prefill_tokens = prefill_tokens
        # A rolling buffer keeps `window` keys: longer chunks would only cost memory (cache.py).
        self.chunk = config.sliding_window or prefill_tokens
        eos = {config.eos_token_id, getattr(tokenizer, "eos_token_id", None)}
        self.eos = sorted(i for i in eos if isinstance(i, int))
        self._incoming: queue.Queue[Submission] = queue.Queue(maxsize=max_queue)
        self._waiting: Submission | None = None  # taken from the queue, waiting for free rows
        self._prefill: _Prefill | None = None
        self._rows: list[_Choice] = []  # batch row i decodes self._rows[i]
        self._joining: list[tuple[KVCache, list[_Choice]]] = []  # prefilled this iteration, joining together
        self._batch = _Batch(model.model)
        self._lock = threading.Lock()  # orders submit() against close()
        self._closing = False
        self._thread: threading.Thread | None = None
        # Lifetime totals; decoded_rows / decode_steps is the mean batch, i.e. how well requests share forwards.
        self.counts = dict.fromkeys(
            ("submitted", "completed", "cancelled", "failed", "decode_steps", "decoded_rows"), 0)

    # ------------------------------------------------------------------ any thread
    def submit(self, request: CompletionRequest, emit: Emit) -> Submission:
        """Tokenize and check `request`, then queue it. Raises ProtocolError (400, 429 or 503)."""
        ids, field_name = self._encode(request)
        if len(ids) >= self.context:
            raise ProtocolError(
                f"the prompt is {len(ids)} tokens but the model's context (max_position_embeddings) is "
                f"{self.context}, which must also hold at least one new token; shorten the {field_name}", field_name)
        room = self.context - len(ids)
        if request.max_tokens is not None and request.max_tokens > room:
            raise ProtocolError(
                f"max_tokens={request.max_tokens} plus the prompt's {len(ids)} tokens exceeds the context of "
                f"{self.context} tokens; ask for at most {room}", "max_tokens")
        if request.n > self.max_batch_size:
            raise ProtocolError(f"n={request.n} exceeds the server's batch of {self.max_batch_size} rows", "n")
        config = request.generation_config(request.max_tokens or room, self.eos)
        submission = Submission(request, ids, config, emit, self.model.device)
        with self._lock:
            if self._closing:  # before start() requests wait in the queue; after close() nothing will serve them
                raise ProtocolError("the server is shutting down", status=503, type="server_error")
            try:
                self._incoming.put_nowait(submission)
            except queue.Full:
                raise ProtocolError("too many requests are waiting; retry later", status=429,
                                    type="rate_limit_error", code="queue_full") from None
            self.counts["submitted"] += 1
        return submission

    def stats(self) -> dict[str, int]:
        """Counters for /health: active rows, waiting requests and lifetime totals."""
        waiting = self._incoming.qsize() + (self._waiting is not None) + (self._prefill is not None)
        return {"active_rows": len(self._rows), "waiting": waiting, **self.counts}

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mistral-lm-engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the loop; every request not yet finished receives a Finished event with an error."""
        with self._lock:
            self._closing = True
        if self._thread is not None:
            self._thread.join()

    def _encode(self, request: CompletionRequest) -> tuple[list[int], str]:
        """Prompt token ids, and the request field they came from (for error messages)."""
        if request.messages is not None:
            try:
                ids = self.tokenizer.apply_chat_template(list(request.messages), add_generation_prompt=True)
            except ValueError as exc:  # the template refused the conversation (e.g. roles out of order)
                raise ProtocolError(f"messages cannot be rendered with the model's chat template: {exc}",
                                    "messages") from exc
            return list(ids), "messages"
        if isinstance(request.prompt, str):
            ids = list(self.tokenizer.encode(request.prompt))
        else:
            ids = list(request.prompt or ())
            vocab = self.model.config.vocab_size
            if any(t >= vocab for t in ids):
                raise ProtocolError(f"prompt holds token ids outside [0, {vocab}) (vocab_size)", "prompt")
        if not ids:
            raise ProtocolError("prompt encodes to no tokens", "prompt")
        return ids, "prompt"

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        with torch.inference_mode():
            while not self._closing:
                try:
                    self._iterate()
                except Exception:  # a failed step must not take the server down with it
                    log.exception("engine step failed; failing the requests in flight")
                    self._fail_in_flight("the engine failed while generating; see the server log")
            self._fail_in_flight("the server is shutting down")
            while not self._incoming.empty():
                self._finish(self._incoming.get_nowait(), "the server is shutting down")

    def _iterate(self) -> None:
        self._drop_cancelled()
        budget = self.prefill_tokens  # per iteration: a burst of short prompts joins at once, a long one in pieces
        while budget > 0 and (used := self._prefill_step(budget)):
            budget -= used
        if self._joining:  # one copy of the batch cache for all of them
            self._batch.add([(cache, choices[0].position, len(choices)) for cache, choices in self._joining])
            self._rows.extend(c for _, choices in self._joining for c in choices)
            self._joining = []
        if self._rows:
            self._decode_step()

    def _next_submission(self) -> Submission | None:
        """The oldest waiting request once there are rows for all its choices (FIFO: no overtaking)."""
        if self._waiting is None:
            try:
                idle = not self._rows and not self._joining
                self._waiting = self._incoming.get(block=idle, timeout=0.05 if idle else None)
            except queue.Empty:
                return None
        if self._waiting.cancelled:
            self._finish(self._waiting, CANCELLED)
            self._waiting = None
            return None
        taken = len(self._rows) + sum(len(choices) for _, choices in self._joining)
        if self._waiting.request.n > self.max_batch_size - taken:
            return None
        submission, self._waiting = self._waiting, None
        return submission

    def _prefill_step(self, budget: int) -> int:
        """Prefill up to `budget` tokens of the request being admitted; returns how many it read."""
        if self._prefill is None:
            submission = self._next_submission()
            if submission is None:
                return 0
            cache = self.model.model.make_cache(1, max_length=len(submission.prompt_ids))
            self._prefill = _Prefill(submission, cache)
        p, s = self._prefill, self._prefill.submission
        if s.cancelled:
            self._prefill = None
            self._finish(s, CANCELLED)
            return 0
        start, end = p.done, min(p.done + budget, p.done + self.chunk, len(s.prompt_ids))
        chunk = torch.tensor([s.prompt_ids[start:end]], device=self.model.device)
        out = self.model(chunk, past_key_values=p.cache, use_cache=True, logits_to_keep=1)
        p.done = end
        if end < len(s.prompt_ids):
            return end - start
        self._prefill = None
        s.choices = [_Choice(s, i, self.tokenizer) for i in range(s.request.n)]
        tokens = self._pick(s, out.logits[:, -1].float().expand(s.request.n, -1))
        events = [e for choice, t in zip(s.choices, tokens) if (e := choice.add(t)) is not None]
        joining = [c for c in s.choices if c.finish_reason is None]
        if joining:
            self._joining.append((p.cache, joining))
        self._send(s, events)
        return end - start

    def _decode_step(self) -> None:
        device = self.model.device
        tokens = torch.tensor([[c.tokens[-1]] for c in self._rows], device=device)  # (B, 1)
        positions = torch.tensor([[c.position] for c in self._rows], device=device)  # (B, 1)
        out = self.model(tokens, position_ids=positions, past_key_values=self._batch.cache, use_cache=True)
        logits = out.logits[:, -1].float()  # (B, V)
        self.counts["decode_steps"] += 1
        self.counts["decoded_rows"] += len(self._rows)
        groups: dict[Submission, list[int]] = {}
        for row, choice in enumerate(self._rows):
            groups.setdefault(choice.submission, []).append(row)
        for s, rows in groups.items():
            picks = self._pick(s, logits[rows])
            events = [e for row, t in zip(rows, picks) if (e := self._rows[row].add(t)) is not None]
            self._send(s, events)
        self._keep_rows([i for i, c in enumerate(self._rows)
                         if c.finish_reason is None and not c.submission.cancelled])

    def _pick(self, s: Submission, logits: torch.Tensor) -> list[int]:
        """Next token of each of `s`'s rows, with its settings and its own generator."""
        gen = s.config
        # OpenAI's API has no repetition penalty, so the processors need no token history.
        no_history = torch.empty(logits.shape[0], 0, dtype=torch.long, device=logits.device)
        scores = sampling.process(logits, no_history, do_sample=gen.do_sample, temperature=gen.temperature,
                                  top_k=gen.top_k, top_p=gen.top_p, repetition_penalty_value=gen.repetition_penalty)
        picked = sampling.sample(scores, s.generator) if gen.do_sample else sampling.greedy(scores)
        return picked.tolist()

    def _send(self, s: Submission, events: list[Event]) -> None:
        if all(c.finish_reason is not None for c in s.choices):
            produced = sum(len(c.tokens) for c in s.choices)
            events.append(Finished(len(s.prompt_ids), produced))
            s.finished = True
            self.counts["completed"] += 1
        if events:
            self._emit(s, events)

    def _emit(self, s: Submission, events: list[Event]) -> None:
        try:
            s.emit(events)
        except Exception:  # the receiver is gone (e.g. its event loop closed): stop generating for it
            log.exception("could not deliver events; cancelling the request")
            s.cancel()

    def _finish(self, s: Submission, error: str) -> None:
        """End `s` early (cancelled, failed or shutting down) with a Finished event naming why."""
        if s.finished:
            return
        s.finished = True
        self.counts["cancelled" if error == CANCELLED else "failed"] += 1
        self._emit(s, [Finished(len(s.prompt_ids), sum(len(c.tokens) for c in s.choices), error)])

    def _drop_cancelled(self) -> None:
        if any(c.submission.cancelled for c in self._rows):
            self._keep_rows([i for i, c in enumerate(self._rows) if not c.submission.cancelled])

    def _keep_rows(self, keep: list[int]) -> None:
        if len(keep) == len(self._rows):
            return
        for c in self._rows:
            if c.submission.cancelled:
                self._finish(c.submission, CANCELLED)
        self._batch.keep(keep)
        self._rows = [self._rows[i] for i in keep]

    def _fail_in_flight(self, error: str) -> None:
        pending = [c.submission for c in self._rows]
        pending += [c.submission for _, choices in self._joining for c in choices]
        pending += [p.submission for p in (self._prefill,) if p is not None]
        pending += [s for s in (self._waiting,) if s is not None]
        for s in dict.fromkeys(pending):
            self._finish(s, error)
        self._rows, self._joining, self._prefill, self._waiting = [], [], None, None
        self._batch = _Batch(self.model.model)


@dataclass
class _Prefill:
    submission: Submission
    cache: KVCache
    done: int = 0  # prompt tokens already in the cache


class _Choice:
    """One of a request's `n` answers: its tokens, its text so far, and why it ended."""

    def __init__(self, submission: Submission, index: int, tokenizer: Any) -> None:
        self.submission = submission
        self.index = index
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self._text = StreamingDetokenizer(tokenizer, skip_special_tokens=True)  # never splits a character
        self._stops = _StopMatcher(submission.request.stop)

    @property
    def position(self) -> int:
        """Absolute position of the last token, the one the next forward reads."""
        return len(self.submission.prompt_ids) + len(self.tokens) - 1

    def add(self, token: int) -> Delta | None:
        """Record a sampled token; the Delta to send, if any text or the end came of it."""
        config = self.submission.config
        self.tokens.append(token)
        eos = token in config.eos_ids  # ends the answer; its text is not part of it
        at_limit = len(self.tokens) >= self.submission.max_new_tokens
        piece = "" if eos else self._text.add(token)
        if eos or at_limit:
            piece += self._text.finish()
        text, stopped = self._stops.feed(piece)
        if stopped or eos:
            self.finish_reason = "stop"
        elif at_limit:
            self.finish_reason = "length"
        if self.finish_reason is not None and not stopped:
            text += self._stops.release()
        return Delta(self.index, text, self.finish_reason) if text or self.finish_reason else None


class _StopMatcher:
    """Finds stop strings in streamed text, even when one arrives split across tokens.

    Text that could be the start of a stop string is held back until the next piece decides.
    Nothing before a hold can be part of a match: a stop starting earlier would make a longer
    held suffix, so a stop is always found whole inside `held + new`. The stop text itself, and
    everything after it, is never returned.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to send, whether a stop string was reached)."""
        if not self.stops:
            return text, False
        buffer = self.held + text
        found = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if found:
            self.held = ""
            return buffer[:min(found)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if buffer.endswith(s[:k])), default=0)
        self.held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep], False

    def release(self) -> str:
        """At the end of an answer that no stop string ended: the held text, which is no stop after all."""
        held, self.held = self.held, ""
        return held


class _Batch:
    """The batch KV cache: one row per active choice, rows joining and leaving between steps.

    Rows advance in lockstep (one `seen` counter) but hold different requests at different
    absolute positions; the cache's masks are built from each key's position, so rows only need
    their keys placed where the next writes will not clobber keys still in use:

    - rolling buffer of W slots: a step writes slot `seen % W` in every row, so a joining row's
      key at position x goes to slot `(seen + x - next) % W` where `next` is the row's next
      position: the next write then lands on position next - W, the one key the new token's
      window no longer sees. Example, W=4, seen=6, a row whose prompt is positions 0-4
      (next=5): positions 1, 2, 3, 4 go to slots 2, 3, 0, 1, and the write at 6 % 4 = 2 replaces 1.
    - static buffer: writes go to slot `seen`, so a joining row's m keys go to slots 0..m-1 and
      `seen` rises to m if needed (slots at or past `seen` are invalid in every row). When rows
      leave, the rest are compacted (valid keys first) so the buffer tracks the longest live row
      instead of growing with the server's uptime.
    """

    def __init__(self, decoder: Any) -> None:
        self.decoder = decoder
        self.cache: KVCache = decoder.make_cache(0)

    def add(self, joins: list[tuple[KVCache, int, int]]) -> None:
        """Append rows: for each (batch-1 cache, its next position, copies), `copies` rows holding its keys."""
        cache = self.cache
        placed = []  # (row cache, its slots to copy, their slots in the batch, copies)
        for row, next_position, copies in joins:
            positions, valid = row.positions[0], row.valid[0]
            if cache.rolling:
                src = (valid & (positions >= next_position - cache.size)).nonzero().squeeze(1)
                dst = (cache.seen + positions[src] - next_position) % cache.size
            else:
                src = valid.nonzero().squeeze(1)
                dst = torch.arange(len(src), device=src.device)
                cache.seen = max(cache.seen, len(src))
            placed.append((row, src, dst, copies))
        size = cache.size if cache.rolling else max(cache.size, cache.seen)

        def joined(batch: torch.Tensor, sources: list[torch.Tensor], dim: int) -> torch.Tensor:
            """`batch` padded to `size` slots along `dim`, then the new rows with each source at its `dst`."""
            blocks = [_pad(batch, dim, size)]
            for source, (_, src, dst, copies) in zip(sources, placed):
                shape = list(batch.shape)
                shape[0], shape[dim] = copies, size
                block = batch.new_zeros(shape)
                picked = source.index_select(dim - 1, src.to(source.device))
                block[(slice(None),) * dim + (dst.to(batch.device),)] = picked
                blocks.append(block)
            return torch.cat(blocks)

        rows = [p[0] for p in placed]
        # (B + joined copies, H_kv, size, D)
        cache.keys = [joined(k, [r.keys[i][0] for r in rows], 2) for i, k in enumerate(cache.keys)]
        cache.values = [joined(v, [r.values[i][0] for r in rows], 2) for i, v in enumerate(cache.values)]
        cache.positions = joined(cache.positions, [r.positions[0] for r in rows], 1)
        cache.valid = joined(cache.valid, [r.valid[0] for r in rows], 1)

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows`, in this order; the others' slots are freed."""
        if not rows:
            self.cache = self.decoder.make_cache(0)
            return
        cache = self.cache
        index = torch.tensor(rows, device=cache.valid.device)
        if cache.rolling:
            cache.keys = [k.index_select(0, index.to(k.device)) for k in cache.keys]
            cache.values = [v.index_select(0, index.to(v.device)) for v in cache.values]
            cache.positions, cache.valid = cache.positions[index], cache.valid[index]
            return
        valid = cache.valid[index]
        used = int(valid.sum(1).max())
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices[:, :used]  # valid slots first
        size = 2 * used  # headroom, so the next steps do not grow the buffer at once

        def compacted(t: torch.Tensor) -> torch.Tensor:
            picked = t.index_select(0, index.to(t.device))
            slots = order.to(t.device)
            if t.dim() == 4:  # (B, H_kv, size, D)
                slots = slots[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])
                return _pad(picked.gather(2, slots), 2, size)
            return _pad(picked.gather(1, slots), 1, size)

        cache.keys = [compacted(k) for k in cache.keys]
        cache.values = [compacted(v) for v in cache.values]
        cache.positions, cache.valid = compacted(cache.positions), compacted(cache.valid)
        cache.seen = used


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """`t` with zeros appended along `dim` up to `size` (zeros are invalid, empty slots)."""
    if t.shape[dim] >= size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)

"""The batching engine: one thread owns the model and its KV cache (continuous batching).

Requests join and leave the running batch between decode steps, so N concurrent requests share
each forward pass instead of queueing behind each other. Every loop iteration:

1. drops the rows of cancelled requests (a client that went away frees its rows at once);
2. prefills up to `prefill_tokens` prompt tokens of waiting requests, each alone in its own
   batch-1 cache; when a prompt is done, the first token of each of its `n` choices is sampled
   and the cache row is copied into `n` free rows of the batch cache (`KVCache.append_rows`).
   A request with several prompts (a completions list) is one `Submission` per prompt, queued
   together; their Finished events merge into one (`_Gather`);
3. runs the decode step shared with generate() (`generation.Decoder`) on every active row at
   its own position, samples each request's rows with its own picker and generator, and retires
   finished rows (`KVCache.select_rows`).

The prefill budget lets a burst of short prompts join together, while a long prompt is read over
several iterations so running streams keep flowing. Only the engine thread touches tensors, and
nothing may change the model (its modules, weights, hooks, training flags) while the engine runs:
its fused steps check the modules at the first step only (`fused_step.vouched`);
other threads call `submit` (tokenization and validation happen in the caller's thread) and
`Submission.cancel`, and receive results through their `emit` callback, called from the engine
thread.

Log-probabilities come from the logits of the same forward that picks the token (the prefill's
last position, or the shared decode step): log-softmax of the raw logits, before the picker's
penalties and temperature. `echo` with logprobs keeps every prefill position's logits
(`logits_to_keep=0`) for the prompt's teacher-forced log-probabilities.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import fused_step, grammar, sampling
from ..cache import KVCache
from ..errors import DistributedError, GenerationError
from ..generation import GenerationConfig
from ..tokenizer import StreamingDetokenizer
from .prefix_cache import DEFAULT_PREFIX_CACHE_BYTES, PrefixCache
from .protocol import CompletionRequest, ProtocolError, TokenizeRequest, TokenLogprob, token_text
from .runner import Runner
from .tools import (ToolRequest, generic_messages, generic_reply, mistral_messages, parse_tools, reply_message,
                    supports_tools, tool_call_constraint)

log = logging.getLogger(__name__)

CANCELLED = "the request was cancelled"  # Finished.error of a request whose client went away
ECHO_CHUNK = 128  # prefill chunk when every position's logits are kept: (chunk, vocab) floats at once


@dataclass(frozen=True)
class Delta:
    """New text of choice `index`; `finish_reason` ("stop" or "length") is set on its last delta.
    `logprobs` holds the entries of the tokens added since the previous delta (when asked for)."""

    index: int
    text: str
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    tool_calls: tuple[dict[str, Any], ...] | None = None  # OpenAI's tool calls, on the last delta


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
                 device: torch.device, first_index: int = 0, echo_text: str = "",
                 tools: ToolRequest | None = None, constraint: grammar.Constraint | None = None) -> None:
        self.request = request
        self.tools = tools  # the answer is parsed for tool calls (server/tools.py)
        self.constraint = constraint  # response_format's grammar; each choice decodes under a fork of it
        self.prompt_ids = prompt_ids
        self.first_index = first_index  # response index of choice 0: prompt number * n
        self.echo_text = echo_text  # `echo`: the prompt's text, sent before the answer
        self.config = config
        self.emit = emit
        self.max_new_tokens: int = config.max_new_tokens or 0  # always set by Engine.submit
        self.cancelled = False
        self.finished = False  # the Finished event was sent (engine thread only)
        # Its own generator: a seeded request samples the same text however it is batched.
        seed = config.seed if config.seed is not None else secrets.randbits(62)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.pick = sampling.make_picker(config, presence_penalty=request.presence_penalty,
                                         frequency_penalty=request.frequency_penalty,
                                         logit_bias=dict(request.logit_bias))
        self.choices: list[_Choice] = []
        self.counts_tokens = bool(request.presence_penalty or request.frequency_penalty)  # the picker reads history
        self._offsets: list[int] | None = None

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def prompt_logprobs(self) -> bool:
        return self.request.echo and self.request.logprobs is not None

    def echo_offsets(self, first: int, count: int, tokenizer: Any) -> list[int]:
        """Text offsets of prompt tokens first .. first+count-1: the prompt's decoded text before each
        (a streaming detokenizer over the prompt, so a character split over byte tokens counts once)."""
        if self._offsets is None:
            detok = StreamingDetokenizer(tokenizer, skip_special_tokens=True)
            self._offsets, chars = [], 0
            for token in self.prompt_ids:
                self._offsets.append(chars)
                chars += len(detok.add(token))
        return self._offsets[first: first + count]


class Ticket:
    """What `Engine.submit` returns: the request's submissions (one per prompt); `cancel()` from any thread."""

    def __init__(self, submissions: list[Submission]) -> None:
        self.submissions = submissions

    def cancel(self) -> None:
        for s in self.submissions:
            s.cancel()


class _Gather:
    """The emit of a request's submissions: one Finished (summed counts, first error) after the last
    prompt's; a failed or cancelled prompt cancels its siblings, whose answer is then moot."""

    def __init__(self, emit: Emit) -> None:
        self.emit = emit
        self.submissions: list[Submission] = []
        self.done = self.prompt_tokens = self.completion_tokens = 0
        self.error: str | None = None

    def __call__(self, events: list[Event]) -> None:  # engine thread
        out: list[Event] = []
        for e in events:
            if not isinstance(e, Finished):
                out.append(e)
                continue
            self.done += 1
            self.prompt_tokens += e.prompt_tokens
            self.completion_tokens += e.completion_tokens
            if e.error is not None and self.error is None:
                self.error = e.error
                for s in self.submissions:
                    s.cancel()
            if self.done == len(self.submissions):
                out.append(Finished(self.prompt_tokens, self.completion_tokens, self.error))
        if out:
            self.emit(out)


class Engine:
    """Continuous batching over one model; see the module docstring for the loop.

    `max_batch_size` bounds the rows decoded together (a request with `n` choices takes `n`);
    `max_queue` bounds requests waiting for rows: beyond it `submit` refuses with a 429, so a
    burst degrades into fast refusals rather than unbounded memory and latency.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_batch_size: int = 32, max_queue: int = 128,
                 prefill_tokens: int = 512, prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
                 runner: Runner | None = None) -> None:
        if max_batch_size < 1 or max_queue < 1 or prefill_tokens < 1 or prefix_cache_bytes < 0:
            raise ValueError("max_batch_size, max_queue and prefill_tokens must be positive, "
                             "prefix_cache_bytes non-negative")
        self.model = model
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
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
        # every model and cache operation goes through the runner (all ranks run them under tensor parallel)
        self.runner = runner or Runner(model)
        self.on_fatal: Callable[[], None] | None = None  # called when the engine cannot go on (a lost rank)
        self.lost = False  # a tensor-parallel rank failed: the engine stopped
        self._cache: KVCache = self.runner.make_cache(0)  # row i holds the keys of self._rows[i]
        self._lock = threading.Lock()  # orders submit() against close()
        self._closing = False
        self._thread: threading.Thread | None = None
        # torch's intra-op thread count is per thread, and a new thread starts at 1: the engine
        # thread takes the count of the thread that made the engine (`--threads`, torch's default)
        self.threads = torch.get_num_threads()
        # Lifetime totals; decoded_rows / decode_steps is the mean batch, i.e. how well requests share forwards.
        self.counts = dict.fromkeys(
            ("submitted", "completed", "cancelled", "failed", "decode_steps", "decoded_rows", "prefix_hits",
             "prefix_tokens"), 0)

    # ------------------------------------------------------------------ any thread
    def submit(self, request: CompletionRequest, emit: Emit) -> Ticket:
        """Tokenize and check `request`, then queue it. Raises ProtocolError (400, 429 or 503)."""
        tools = parse_tools(dict(request.tool_fields), self.tokenizer) if request.tool_fields else None
        try:
            constraint = grammar.response_format_constraint(self.tokenizer, request.response_format)
        except grammar.ResponseFormatError as exc:
            raise ProtocolError(str(exc), exc.param) from exc
        calls = tool_call_constraint(self.tokenizer, tools) if tools is not None else None
        if calls is not None and constraint is not None:
            raise ProtocolError("tool_choice \"required\" or a named function and a JSON response_format both "
                                "decide the reply's form; send one of them", "response_format")
        constraint = constraint or calls
        prompts = self._encode(request, tools)
        if request.n > self.max_batch_size:
            raise ProtocolError(f"n={request.n} exceeds the server's batch of {self.max_batch_size} rows", "n")
        vocab = self.model.config.vocab_size
        bad = next((t for t, _ in request.logit_bias if t >= vocab), None)
        if bad is not None:
            raise ProtocolError(f"logit_bias names token {bad}, outside [0, {vocab}) (vocab_size)", "logit_bias")
        if len(prompts) > self._incoming.maxsize:
            raise ProtocolError(f"prompt holds {len(prompts)} prompts; this server queues at most "
                                f"{self._incoming.maxsize} per request", "prompt")
        gather = _Gather(emit)
        for p, (ids, field_name, echo_text) in enumerate(prompts):
            config = request.generation_config(self._max_new(request, ids, field_name), self.eos)
            gather.submissions.append(Submission(request, ids, config, gather, self.model.device,
                                                 first_index=p * request.n, echo_text=echo_text, tools=tools,
                                                 constraint=constraint))
        with self._lock:
            if self._closing:  # before start() requests wait in the queue; after close() nothing will serve them
                raise ProtocolError("the server is shutting down", status=503, type="server_error")
            if self._incoming.maxsize - self._incoming.qsize() < len(gather.submissions):  # only we put
                raise ProtocolError("too many requests are waiting; retry later", status=429,
                                    type="rate_limit_error", code="queue_full")
            for submission in gather.submissions:
                self._incoming.put_nowait(submission)
            self.counts["submitted"] += len(gather.submissions)
        return Ticket(gather.submissions)

    def _max_new(self, request: CompletionRequest, ids: list[int], field_name: str) -> int:
        """The request's max_tokens for this prompt, checked against the context (None: all the room left)."""
        needed = 0 if request.max_tokens == 0 else 1  # max_tokens 0 (echo): only the prompt is read
        if len(ids) + needed > self.context:
            raise ProtocolError(
                f"the prompt is {len(ids)} tokens but the model's context (max_position_embeddings) is "
                f"{self.context}, which must also hold at least one new token; shorten the {field_name}", field_name)
        room = self.context - len(ids)
        if request.max_tokens is not None and request.max_tokens > room:
            raise ProtocolError(
                f"max_tokens={request.max_tokens} plus the prompt's {len(ids)} tokens exceeds the context of "
                f"{self.context} tokens; ask for at most {room}", "max_tokens")
        return room if request.max_tokens is None else request.max_tokens

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

    def _chat_messages(self, messages: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
        """Messages as the chat format takes them: for Mistral formats, call ids as 9 alphanumerics."""
        return mistral_messages(list(messages)) if supports_tools(self.tokenizer) else list(messages)

    def _encode(self, request: CompletionRequest, tools: ToolRequest | None = None
                ) -> list[tuple[list[int], str, str]]:
        """(token ids, the request field they came from, the text `echo` sends) of each prompt."""
        if request.messages is not None:
            messages = self._chat_messages(request.messages)
            extra = {}
            if tools is not None and tools.generic:  # the template has no tools: the JSON reply format
                messages = generic_messages(messages, tools)
            elif tools is not None and tools.choice != "none":  # "none": the model is not shown the tools
                extra = {"tools": list(tools.tools)}
            try:
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra)
            except ValueError as exc:  # the template refused the conversation (e.g. roles out of order)
                raise ProtocolError(f"messages cannot be rendered with the model's chat template: {exc}",
                                    "messages") from exc
            return [(list(ids), "messages", "")]
        out = []
        for prompt in request.prompts or ():
            if isinstance(prompt, str):
                ids, text = list(self.tokenizer.encode(prompt)), prompt
            else:
                ids, vocab = list(prompt), self.model.config.vocab_size
                if any(t >= vocab for t in ids):
                    raise ProtocolError(f"prompt holds token ids outside [0, {vocab}) (vocab_size)", "prompt")
                text = self.tokenizer.decode(ids, skip_special_tokens=True) if request.echo else ""
            if not ids:
                raise ProtocolError("prompt encodes to no tokens", "prompt")
            out.append((ids, "prompt", text if request.echo else ""))
        return out

    # The tokenizer endpoints (vLLM's shapes); any thread, the tokenizer is not the engine thread's.
    def tokenize(self, request: TokenizeRequest) -> dict[str, Any]:
        """POST /tokenize: {"count", "max_model_len", "tokens", "token_strs"}."""
        if request.messages is not None:
            try:
                ids = list(self.tokenizer.apply_chat_template(self._chat_messages(request.messages),
                                                              add_generation_prompt=request.add_generation_prompt))
            except ValueError as exc:
                raise ProtocolError(f"messages cannot be rendered with the model's chat template: {exc}",
                                    "messages") from exc
        else:  # control-token strings become their ids, as in vLLM (see protocol.parse_tokenize)
            ids = list(self.tokenizer.encode(request.prompt or "", add_special_tokens=request.add_special_tokens,
                                             split_special_tokens=False))
        strs = [token_text(self.token_bytes(t)) for t in ids] if request.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.context, "tokens": ids, "token_strs": strs}

    def detokenize(self, tokens: tuple[int, ...]) -> str:
        """POST /detokenize: the text of `tokens` (special tokens included, as vLLM does)."""
        if any(t >= len(self.tokenizer) for t in tokens):
            raise ProtocolError(f"tokens holds ids outside [0, {len(self.tokenizer)}) (the tokenizer's size)",
                                "tokens")
        return self.tokenizer.decode(list(tokens))

    def tokenizer_info(self) -> dict[str, Any]:
        """GET /tokenizer_info: the special tokens, chat template and context, as vLLM reports them."""
        t = self.tokenizer
        return {"tokenizer_class": type(t).__name__, "bos_token": t.bos_token, "eos_token": t.eos_token,
                "pad_token": t.pad_token, "unk_token": t.unk_token, "chat_template": t.chat_template,
                "model_max_length": self.context, "vocab_size": len(t)}

    def token_bytes(self, token: int) -> bytes:
        """The bytes token `token` stands for (b"" for ids past the tokenizer's vocabulary)."""
        raw = self.tokenizer.token_table.raw
        return raw[token] if 0 <= token < len(raw) else b""

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        lost = False  # a tensor-parallel peer failed: no collective can run any more (self.lost)
        torch.set_num_threads(self.threads)
        # the engine thread owns the model: its fused steps check the modules once (fused_step.vouched)
        with torch.inference_mode(), fused_step.vouched_model(self.model):
            while not self._closing:
                try:
                    self._iterate()
                except DistributedError:
                    log.critical("a tensor-parallel rank failed; the server stops", exc_info=True)
                    lost = self.lost = True
                    self._fail_in_flight("a tensor-parallel rank failed; the server is stopping", rebuild=False)
                    with self._lock:
                        self._closing = True
                    if self.on_fatal is not None:
                        self.on_fatal()
                except Exception:  # a failed step must not take the server down with it
                    log.exception("engine step failed; failing the requests in flight")
                    self._fail_in_flight("the engine failed while generating; see the server log")
            self._fail_in_flight("the server is shutting down", rebuild=not lost)
            while not self._incoming.empty():
                self._finish(self._incoming.get_nowait(), "the server is shutting down")
            if not lost:
                self.runner.close()

    def _iterate(self) -> None:
        self._drop_cancelled()
        budget = self.prefill_tokens  # per iteration: a burst of short prompts joins at once, a long one in pieces
        while budget > 0 and (used := self._prefill_step(budget)):
            budget -= used
        if self._joining:  # one copy of the batch cache for all of them
            self.runner.append_rows(self._cache, [(cache, choices[0].position, len(choices))
                                                  for cache, choices in self._joining])
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
        """Prefill up to `budget` tokens of the request being admitted; returns how many it read
        (at least 1 when it admitted a request whose whole prompt the prefix cache held)."""
        if self._prefill is None:
            submission = self._next_submission()
            if submission is None:
                return 0
            self._prefill = self._start_prefill(submission)
        p, s = self._prefill, self._prefill.submission
        if s.cancelled:
            self._prefill = None
            self._finish(s, CANCELLED)
            return 0
        start = p.done
        if p.done < len(s.prompt_ids):
            chunk_limit = min(self.chunk, ECHO_CHUNK) if s.prompt_logprobs else self.chunk
            end = min(p.done + budget, p.done + chunk_limit, len(s.prompt_ids))
            keep = 0 if s.prompt_logprobs else 1
            logits = self.runner.prefill(s.prompt_ids[start:end], p.cache, keep)
            if s.prompt_logprobs:
                p.logprobs += self._prompt_logprobs(s, logits[0, : len(s.prompt_ids) - 1 - start], start)
            p.done, p.last_logits = end, logits[:, -1]
            if end < len(s.prompt_ids):
                return end - start
            self.prefix_cache.add(s.prompt_ids, p.cache, p.last_logits)
        self._prefill = None
        self._admit(s, p)
        return max(1, p.done - start)

    def _start_prefill(self, s: Submission) -> _Prefill:
        """The prefill of `s`, continuing a copy of the longest cached prefix of its prompt if any
        (not for echo with logprobs, which needs every prompt position's logits)."""
        hit = None if s.prompt_logprobs else self.prefix_cache.lookup(s.prompt_ids)
        if hit is None:
            p = _Prefill(s, self.runner.make_cache(1, max_length=len(s.prompt_ids)))
            if s.prompt_logprobs:  # nothing predicts the first token
                p.logprobs.append(TokenLogprob(s.prompt_ids[0], None, (), 0))
            return p
        cached, cache, logits = hit
        self.counts["prefix_hits"] += 1
        self.counts["prefix_tokens"] += cached
        # A whole cached prompt is shared as it is: joining the batch only reads it.
        return _Prefill(s, cache if cached == len(s.prompt_ids) else self.runner.copy(cache), cached, logits)

    def _admit(self, s: Submission, p: _Prefill) -> None:
        """The prompt is read: sample each choice's first token and queue the rows to join the batch."""
        s.choices = [_Choice(s, s.first_index + i, self.tokenizer, p.logprobs) for i in range(s.request.n)]
        if s.constraint is not None:
            for choice in s.choices:
                choice.constraint = s.constraint.fork()
        if s.max_new_tokens == 0:  # echo only: the prompt and its log-probabilities
            events: list[Event] = [e for c in s.choices if (e := c.close()) is not None]
        else:
            assert p.last_logits is not None
            try:
                tokens, entries = self._pick(s, p.last_logits.expand(s.request.n, -1), s.choices)
            except GenerationError as exc:
                self._fail_one(s, exc)
                return
            events = [e for choice, t, lp in zip(s.choices, tokens, entries) if (e := choice.add(t, lp)) is not None]
        joining = [c for c in s.choices if c.finish_reason is None]
        if joining:
            self._joining.append((p.cache, joining))
        self._send(s, events)

    def _prompt_logprobs(self, s: Submission, logits: torch.Tensor, start: int) -> list[TokenLogprob]:
        """Teacher-forced entries of prompt tokens start+1 .. start+len(logits) from their predictions' logits."""
        targets = s.prompt_ids[start + 1: start + 1 + logits.shape[0]]
        logp = torch.log_softmax(logits.float(), dim=-1)  # (T, V)
        chosen = logp.gather(1, torch.tensor(targets, device=logp.device)[:, None])[:, 0].tolist()
        top = self._top(logp, s.request.logprobs or 0)
        offsets = s.echo_offsets(start + 1, len(targets), self.tokenizer)
        return [TokenLogprob(t, lp, alts, off) for t, lp, alts, off in zip(targets, chosen, top, offsets)]

    @staticmethod
    def _top(logp: torch.Tensor, k: int) -> list[tuple[tuple[int, float], ...]]:
        if k == 0:
            return [()] * logp.shape[0]
        values, ids = logp.topk(k, dim=-1)
        return [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]

    def _decode_step(self) -> None:
        logits = self.runner.decode([c.tokens[-1] for c in self._rows], [c.position for c in self._rows],
                                    self._cache)  # (B, V)
        self.counts["decode_steps"] += 1
        self.counts["decoded_rows"] += len(self._rows)
        groups: dict[Submission, list[int]] = {}
        for row, choice in enumerate(self._rows):
            groups.setdefault(choice.submission, []).append(row)
        for s, rows in groups.items():
            # a request's rows are usually adjacent: a view of them, not a (rows, V) copy
            mine = logits[rows[0]:rows[-1] + 1] if rows[-1] - rows[0] + 1 == len(rows) else logits[rows]
            try:
                picks, entries = self._pick(s, mine, [self._rows[row] for row in rows])
            except GenerationError as exc:
                self._fail_one(s, exc)
                continue
            events = [e for row, t, lp in zip(rows, picks, entries) if (e := self._rows[row].add(t, lp)) is not None]
            self._send(s, events)
        self._keep_rows([i for i, c in enumerate(self._rows)
                         if c.finish_reason is None and not c.submission.cancelled])

    def _pick(self, s: Submission, logits: torch.Tensor, choices: list[_Choice]
              ) -> tuple[list[int], list[tuple[float, tuple[tuple[int, float], ...]] | None]]:
        """Next token of each of `s`'s rows, with its settings and its own generator, and (when
        asked for) each token's log-probability and the top alternatives, from the same logits."""
        # The picker's history is what OpenAI's penalties count: the tokens generated so far (the
        # rows of one request stay in step, so they have equal lengths); without penalties, none.
        generated = [c.tokens for c in choices] if s.counts_tokens else [[] for _ in choices]
        history = torch.tensor(generated, dtype=torch.long, device=logits.device).reshape(len(choices), -1)
        pick = s.pick if s.constraint is None else grammar.constrained(s.pick, [c.constraint for c in choices])
        tokens = pick(logits, history, s.generator)
        if s.request.logprobs is None:
            return tokens.tolist(), [None] * len(choices)
        logp = torch.log_softmax(logits.float(), dim=-1)  # the raw logits: before penalties and temperature
        chosen = logp.gather(1, tokens[:, None])[:, 0].tolist()
        return tokens.tolist(), list(zip(chosen, self._top(logp, s.request.logprobs)))

    def _fail_one(self, s: Submission, exc: Exception) -> None:
        """One request's picking failed (its grammar, its settings): it alone ends, with the reason;
        its rows leave at the next `_keep_rows`, and the other requests go on."""
        log.warning("request failed while picking a token: %s", exc)
        self._finish(s, f"generation failed: {exc}")
        s.cancel()

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
        self.runner.select_rows(self._cache, keep)
        self._rows = [self._rows[i] for i in keep]

    def _fail_in_flight(self, error: str, rebuild: bool = True) -> None:
        pending = [c.submission for c in self._rows]
        pending += [c.submission for _, choices in self._joining for c in choices]
        pending += [p.submission for p in (self._prefill,) if p is not None]
        pending += [s for s in (self._waiting,) if s is not None]
        for s in dict.fromkeys(pending):
            self._finish(s, error)
        self._rows, self._joining, self._prefill, self._waiting = [], [], None, None
        if rebuild:  # not when the ranks can no longer agree on anything (a lost tensor-parallel rank)
            self._cache = self.runner.make_cache(0)


@dataclass
class _Prefill:
    submission: Submission
    cache: KVCache
    done: int = 0  # prompt tokens already in the cache
    last_logits: torch.Tensor | None = None  # (1, V) after the last token read
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the prompt's, with echo and logprobs


class _Choice:
    """One of a request's `n` answers: its tokens, its text so far, and why it ended.

    With `echo`, the first delta carries the prompt's text (and its log-probabilities) before the
    answer's; text offsets count from the start of that text."""

    def __init__(self, submission: Submission, index: int, tokenizer: Any,
                 prompt_logprobs: list[TokenLogprob] | None = None) -> None:
        self.submission = submission
        self.index = index
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self._text = StreamingDetokenizer(tokenizer, skip_special_tokens=True)  # never splits a character
        self._stops = _StopMatcher(submission.request.stop)
        self._prefix = submission.echo_text
        self._chars = len(self._prefix)  # text so far, before stop strings cut it: the next token's offset
        self._logprobs: list[TokenLogprob] = list(prompt_logprobs or ())  # not yet sent
        # With tools, the text stops at the format's [TOOL_CALLS] token: what follows is parsed at the end.
        self._tokenizer = tokenizer
        tools = submission.tools
        self._generic = tools is not None and tools.generic  # the reply is JSON, parsed at the end
        self._held = ""  # the generic reply's text so far
        self._call_token = (tokenizer.convert_tokens_to_ids("[TOOL_CALLS]")
                            if tools and not tools.generic and tools.choice != "none" else None)
        self._call_start: int | None = None  # index in self.tokens of the [TOOL_CALLS] token
        self._tool_calls: tuple[dict[str, Any], ...] | None = None
        self.constraint: grammar.Constraint | None = None  # response_format's grammar state (set on admission)

    @property
    def position(self) -> int:
        """Absolute position of the last token, the one the next forward reads."""
        return len(self.submission.prompt_ids) + len(self.tokens) - 1

    def add(self, token: int, logprob: tuple[float, tuple[tuple[int, float], ...]] | None = None) -> Delta | None:
        """Record a sampled token; the Delta to send, if any text, log-probability or the end came of it."""
        config = self.submission.config
        self.tokens.append(token)
        eos = token in config.eos_ids  # ends the answer; neither its text nor its logprob is part of it
        at_limit = len(self.tokens) >= self.submission.max_new_tokens
        if logprob is not None and not eos:
            self._logprobs.append(TokenLogprob(token, logprob[0], logprob[1], self._chars))
        calling = self._call_start is not None
        if not calling and token == self._call_token:
            self._call_start, calling = len(self.tokens) - 1, True
            piece = self._text.finish()  # the text before the calls
        else:
            piece = "" if eos or calling else self._text.add(token)
            if (eos or at_limit) and not calling:
                piece += self._text.finish()
        if calling and (eos or at_limit):
            piece += self._read_calls(eos)
        if self._generic:  # nothing streams: {"response": ...} or {"tool_calls": [...]} is read whole
            self._held, piece = self._held + piece, ""
            if eos or at_limit:
                content, calls = generic_reply(self._held)
                piece, self._tool_calls = content or "", tuple(calls) if calls else None
        self._chars += len(piece)
        text, stopped = self._stops.feed(piece)
        if self._tool_calls:
            self.finish_reason = "tool_calls"
        elif stopped or eos:
            self.finish_reason = "stop"
        elif at_limit:
            self.finish_reason = "length"
        if self.finish_reason is not None and not stopped:
            text += self._stops.release()
        return self._delta(text)

    def _read_calls(self, eos: bool) -> str:
        """At the end of an answer that reached [TOOL_CALLS]: parse the calls; when they do not parse
        (cut short, malformed), the text after the token is the answer's, as the model wrote it."""
        ids = self.tokens[self._call_start: len(self.tokens) - eos]
        text, calls = reply_message(self._tokenizer, ids)
        self._tool_calls = tuple(calls) if calls else None
        return "" if calls else text or ""

    def close(self) -> Delta | None:
        """End an answer of max_tokens 0 (only the echoed prompt)."""
        self.finish_reason = "length"
        return self._delta("")

    def _delta(self, text: str) -> Delta | None:
        text, self._prefix = self._prefix + text, ""
        logprobs, self._logprobs = tuple(self._logprobs), []
        if text or logprobs or self.finish_reason:
            return Delta(self.index, text, self.finish_reason, logprobs, self._tool_calls)
        return None


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

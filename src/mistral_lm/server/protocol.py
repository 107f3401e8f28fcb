"""OpenAI wire format: request parsing with validation, and response/chunk bodies.

Pure functions of JSON-shaped values, no HTTP and no tensors, so every rule here is testable
without a server. A bad request raises `ProtocolError` naming the offending field (`param`, as
OpenAI does), which the transport turns into a 400 with OpenAI's error body; the official client
then raises `BadRequestError` with `.param` set.

Fields OpenAI defines but this server does not implement are accepted only at their neutral value
(`tools: []`, `response_format: {"type": "text"}`, ...), so a client never gets silently different
behaviour from what it asked for. Unknown fields are rejected for the same reason.

Log-probabilities are the log-softmax of the model's raw logits, before temperature, penalties and
`logit_bias` (what vLLM reports by default): the model's own belief, comparable across requests.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from .._util import is_int
from ..generation import GenerationConfig

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_N = 16  # choices per request; each one is a batch row
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat; vLLM's default max_logprobs for completions too
MAX_PROMPTS = 128  # prompts in one /v1/completions request (lm-eval batches send dozens)


class ProtocolError(ValueError):
    """A request the server refuses; `status` and the OpenAI error fields travel with it."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class CompletionRequest:
    """One validated /v1/completions or /v1/chat/completions request.

    Exactly one of `messages` (chat: rendered with the model's chat template) and `prompts`
    (texts or token-id lists; a completion answers each with `n` choices, choice index
    `prompt * n + i`) is set. `max_tokens=None` means "up to the context length"; 0 is allowed
    only with `echo`. `logprobs` is None (no log-probabilities) or how many alternatives to list
    per token (chat's `top_logprobs`, completions' integer `logprobs`).
    """

    chat: bool
    messages: tuple[dict[str, Any], ...] | None
    prompts: tuple[str | tuple[int, ...], ...] | None
    max_tokens: int | None
    temperature: float
    top_p: float
    n: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    model: str | None = None
    logprobs: int | None = None
    echo: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    # chat's `tools`, `tool_choice` and `parallel_tool_calls` as sent: the engine checks them
    # against the model's chat format (server/tools.py)
    tool_fields: tuple[tuple[str, Any], ...] = ()
    response_format: Any = None  # chat's, as sent: the engine compiles it (grammar.response_format_constraint)

    @property
    def choices(self) -> int:
        """Choices in the response: `n` per prompt."""
        return self.n * (len(self.prompts) if self.prompts is not None else 1)

    def generation_config(self, max_new_tokens: int, eos_token_id: list[int]) -> GenerationConfig:
        """The library's settings for this request: temperature 0 is greedy, and no top-k (OpenAI has none)."""
        sampled = self.temperature > 0
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=sampled, temperature=self.temperature if sampled else 1.0,
            top_p=self.top_p, top_k=0, seed=self.seed, eos_token_id=eos_token_id, sampler="inverse_cdf",
        )
        config.validate()
        return config


# Fields accepted only at a neutral value: name -> the values that change nothing (empty: any value,
# for fields that only label a request).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "user": (), "suffix": (None, ""),
    "response_format": (None, {"type": "text"}), "service_tier": (None, "auto", "default"), "store": (None, False),
    "metadata": (), "best_of": (None, 1),
}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream", "stream_options",
           "logprobs", "presence_penalty", "frequency_penalty", "logit_bias"}
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                          "parallel_tool_calls", "response_format"}
_COMPLETION_FIELDS = _COMMON | {"prompt", "echo"}
_ROLES = ("system", "user", "assistant", "developer", "tool")  # developer: OpenAI's newer name for system
_ROLE_FIELDS = {"assistant": {"tool_calls", "refusal"}, "tool": {"tool_call_id"}}


def parse_chat(body: Any) -> CompletionRequest:
    """Validate a /v1/chat/completions body."""
    body = _object(body, _CHAT_FIELDS)
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise ProtocolError("set max_tokens or max_completion_tokens, not both", "max_completion_tokens")
    max_field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    wants = _boolean(body, "logprobs")
    top = body.get("top_logprobs")
    if top not in (None, 0) and not wants:
        raise ProtocolError("top_logprobs needs logprobs: true", "top_logprobs")
    logprobs = _count(body, "top_logprobs", MAX_TOP_LOGPROBS) if wants else None
    request = _request(body, chat=True, messages=_messages(body.get("messages")), prompts=None,
                       max_tokens=_positive_int(body, max_field, None), logprobs=logprobs, echo=False)
    fields = tuple((k, body[k]) for k in ("tools", "tool_choice", "parallel_tool_calls") if body.get(k) is not None)
    return replace(request, tool_fields=fields, response_format=body.get("response_format"))


def parse_completion(body: Any) -> CompletionRequest:
    """Validate a /v1/completions body. OpenAI's default max_tokens here is 16."""
    body = _object(body, _COMPLETION_FIELDS)
    echo = _boolean(body, "echo")
    if body.get("logprobs") is True:  # chat's boolean sent to the legacy endpoint
        raise ProtocolError("logprobs must be an integer in [0, 20] here (how many alternatives per token)",
                            "logprobs")
    if body.get("logprobs") is False:
        body = {**body, "logprobs": None}
    max_tokens = _count(body, "max_tokens", None) if echo else _positive_int(body, "max_tokens", 16)
    return _request(body, chat=False, messages=None, prompts=_prompts(body.get("prompt")),
                    max_tokens=16 if max_tokens is None else max_tokens,
                    logprobs=_count(body, "logprobs", MAX_TOP_LOGPROBS, default=None), echo=echo)


def _request(body: dict[str, Any], *, chat: bool, messages: tuple[dict[str, str], ...] | None,
             prompts: tuple[str | tuple[int, ...], ...] | None, max_tokens: int | None, logprobs: int | None,
             echo: bool) -> CompletionRequest:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ProtocolError("model must be a string", "model")
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise ProtocolError("stream_options must be {\"include_usage\": bool} and needs stream: true", "stream_options")
    include_usage = bool(options and _boolean(options, "include_usage"))
    n = _positive_int(body, "n", 1)
    if n > MAX_N:
        raise ProtocolError(f"n must be at most {MAX_N}, got {n}", "n")
    return CompletionRequest(
        chat=chat, messages=messages, prompts=prompts, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, low=0.0, high=2.0, low_open=False),
        top_p=_number(body, "top_p", 1.0, low=0.0, high=1.0, low_open=True),
        n=n, seed=_seed(body.get("seed")), stop=_stop(body.get("stop")), stream=stream, include_usage=include_usage,
        model=model, logprobs=logprobs, echo=echo,
        presence_penalty=_number(body, "presence_penalty", 0.0, low=-2.0, high=2.0, low_open=False),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, low=-2.0, high=2.0, low_open=False),
        logit_bias=_logit_bias(body.get("logit_bias")),
    )


def _object(body: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ProtocolError(f"the request body must be a JSON object, got {type(body).__name__}")
    for name in body:
        if name in allowed:
            continue
        if name not in _NEUTRAL:
            raise ProtocolError(f"unknown field {name!r}", name)
        neutral = _NEUTRAL[name]
        if neutral and body[name] not in neutral:
            raise ProtocolError(f"{name}={body[name]!r} is not supported by this server", name)
    return body


def _messages(value: Any) -> tuple[dict[str, Any], ...]:
    """OpenAI's messages: roles system/developer/user/assistant/tool; an assistant's `tool_calls`
    (then `content` may be null) and a tool message's `tool_call_id` are kept for the chat format."""
    if not isinstance(value, list) or not value:
        raise ProtocolError("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ProtocolError(f"{where} must be an object", where)
        role = message.get("role")
        if role not in _ROLES:
            raise ProtocolError(f"{where}.role must be one of {list(_ROLES)}, got {role!r}", f"{where}.role")
        allowed = {"role", "content", "name"} | _ROLE_FIELDS.get(role, set())
        unknown = set(message) - allowed
        if unknown:
            raise ProtocolError(f"{where} has unsupported fields {sorted(unknown)}", f"{where}.{min(unknown)}")
        if message.get("refusal") is not None:  # openai-python echoes `refusal: null` back
            raise ProtocolError(f"{where}.refusal is not supported", f"{where}.refusal")
        role = "system" if role == "developer" else role
        parsed: dict[str, Any] = {"role": role}
        calls = message.get("tool_calls")
        if calls is not None:
            parsed["tool_calls"] = _tool_calls(calls, f"{where}.tool_calls")
        if message.get("content") is None and parsed.get("tool_calls"):
            parsed["content"] = None
        else:
            parsed["content"] = _content(message.get("content"), f"{where}.content")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise ProtocolError(f"{where}.tool_call_id must be the id of the tool call it answers",
                                    f"{where}.tool_call_id")
            parsed["tool_call_id"] = call_id
        if isinstance(message.get("name"), str):
            parsed["name"] = message["name"]
        out.append(parsed)
    return tuple(out)


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ProtocolError(f"{where} must be a list of tool calls", where)
    out = []
    for k, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function" \
                or not isinstance(function.get("name"), str) or not isinstance(call.get("id"), str):
            raise ProtocolError(f"{where}[{k}] must be {{id, type: 'function', function: {{name, arguments}}}}",
                                f"{where}[{k}]")
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            raise ProtocolError(f"{where}[{k}].function.arguments must be a JSON string", f"{where}[{k}].function")
        out.append({"id": call["id"], "type": "function",
                    "function": {"name": function["name"], "arguments": arguments}})
    return out


def _content(value: Any, where: str) -> str:
    """A string, or OpenAI's list of content parts of which only text parts are supported."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
            return "".join(p["text"] for p in value)
        raise ProtocolError(f"{where}: only text content parts are supported", where)
    raise ProtocolError(f"{where} must be a string or a list of text parts", where)


def _prompts(value: Any) -> tuple[str | tuple[int, ...], ...]:
    """OpenAI's four prompt shapes: a string, a list of strings, a list of ids, a list of id lists."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(is_int(t) for t in value):
        return (_ids(value, "prompt"),)
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        if len(value) > MAX_PROMPTS:
            raise ProtocolError(f"prompt holds {len(value)} prompts; at most {MAX_PROMPTS} per request", "prompt")
        return tuple(p if isinstance(p, str) else _ids(p, f"prompt[{i}]") for i, p in enumerate(value))
    raise ProtocolError("prompt must be a string, a list of strings, a list of token ids or a list of token-id "
                        "lists", "prompt")


def _ids(value: list[Any], where: str) -> tuple[int, ...]:
    if not value or not all(is_int(t) and t >= 0 for t in value):
        raise ProtocolError(f"{where} must be a non-empty list of non-negative token ids", "prompt")
    return tuple(value)


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias in [-100, 100]}; ids are checked against the vocabulary by the engine."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ProtocolError("logit_bias must be an object mapping token ids to numbers in [-100, 100]", "logit_bias")
    out = []
    for key, bias in value.items():
        ok = isinstance(bias, (int, float)) and not isinstance(bias, bool) and math.isfinite(bias)
        if not (isinstance(key, str) and key.isdigit()) or not ok or not -100 <= bias <= 100:
            raise ProtocolError(f"logit_bias[{key!r}]={bias!r}: keys must be token ids, values numbers in "
                                "[-100, 100]", "logit_bias")
        out.append((int(key), float(bias)))
    return tuple(out)


def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ProtocolError("stop must be a non-empty string or a list of non-empty strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise ProtocolError(f"stop holds at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    return tuple(stops)


def _positive_int(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not is_int(value) or value < 1:
        raise ProtocolError(f"{name} must be a positive integer, got {value!r}", name)
    return value


def _count(body: dict[str, Any], name: str, high: int | None, default: int | None = 0) -> int | None:
    """A non-negative integer of at most `high`, or `default` when absent."""
    value = body.get(name)
    if value is None:
        return default
    if not is_int(value) or value < 0 or (high is not None and value > high):
        limit = f"[0, {high}]" if high is not None else ">= 0"
        raise ProtocolError(f"{name} must be an integer in {limit}, got {value!r}", name)
    return value


def _seed(value: Any) -> int | None:
    if value is not None and (not is_int(value) or not -2**63 <= value < 2**64):
        raise ProtocolError(f"seed must be a 64-bit integer, got {value!r}", "seed")
    return None if value is None else value % 2**63  # torch seeds are non-negative int64


def _number(body: dict[str, Any], name: str, default: float, *, low: float, high: float, low_open: bool) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ProtocolError(f"{name} must be a number in {interval}, got {value!r}", name)
    return float(value)


def _boolean(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ProtocolError(f"{name} must be true or false, got {value!r}", name)
    return value


# --------------------------------------------------------------------------- responses
class TokenLogprob(NamedTuple):
    """One token's log-probability as the engine reports it (ids and floats; the writer formats them)."""

    token: int
    logprob: float | None  # None for a prompt's first token: nothing predicts it
    top: tuple[tuple[int, float], ...]  # the most likely tokens at this position, best first
    offset: int  # characters of the choice's text (echoed prompt included) before this token


def token_text(raw: bytes) -> str:
    """A token's bytes as text; a piece of a UTF-8 character is written as OpenAI does, "bytes:\\xe2"."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class ResponseWriter:
    """Builds the bodies of one response: a whole JSON object, or the chunks of a stream.

    Takes the engine's events as plain values (`index, text, finish_reason, logprobs` per delta;
    token counts at the end), so the transport never assembles OpenAI shapes itself.
    `token_bytes(id)` renders log-probability entries (the tokenizer's bytes of a token).
    """

    def __init__(self, request: CompletionRequest, model: str, token_bytes: Callable[[int], bytes]) -> None:
        self.request = request
        self.model = model
        self.token_bytes = token_bytes
        self.id = ("chatcmpl-" if request.chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.object = "chat.completion" if request.chat else "text_completion"

    def first_chunks(self) -> list[dict[str, Any]]:
        """Chat streams open each choice with the assistant role, as OpenAI does."""
        if not self.request.chat:
            return []
        return [self._chunk([self._choice(i, {"role": "assistant", "content": ""}, None, None)])
                for i in range(self.request.choices)]

    def delta_chunk(self, index: int, text: str, finish_reason: str | None,
                    logprobs: tuple[TokenLogprob, ...] = (),
                    tool_calls: tuple[dict[str, Any], ...] | None = None) -> dict[str, Any]:
        delta: Any = ({"content": text} if text else {}) if self.request.chat else text
        if tool_calls:  # each call whole in one fragment: index, id, type and the arguments string
            delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(tool_calls)]
        return self._chunk([self._choice(index, delta, finish_reason, self.logprobs(logprobs))])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any] | None:
        """The extra last chunk `stream_options.include_usage` asks for: no choices, just usage."""
        if not self.request.include_usage:
            return None
        return {**self._chunk([]), "usage": usage(prompt_tokens, completion_tokens)}

    def body(self, texts: list[str], finish_reasons: list[str | None], prompt_tokens: int,
             completion_tokens: int, logprobs: list[list[TokenLogprob]] | None = None,
             tool_calls: list[tuple[dict[str, Any], ...] | None] | None = None) -> dict[str, Any]:
        """The non-streaming response, with every choice's whole text (and tool calls)."""
        entries = logprobs if logprobs is not None else [[] for _ in texts]
        calls = tool_calls if tool_calls is not None else [None] * len(texts)
        key = "message" if self.request.chat else "text"
        choices = [{"index": i, key: self._message(text, call) if self.request.chat else text,
                    "finish_reason": reason, "logprobs": self.logprobs(tuple(lp))}
                   for i, (text, reason, lp, call) in enumerate(zip(texts, finish_reasons, entries, calls))]
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}

    @staticmethod
    def _message(text: str, tool_calls: tuple[dict[str, Any], ...] | None) -> dict[str, Any]:
        if not tool_calls:
            return {"role": "assistant", "content": text}
        return {"role": "assistant", "content": text or None, "tool_calls": list(tool_calls)}

    def logprobs(self, entries: tuple[TokenLogprob, ...]) -> dict[str, Any] | None:
        """Chat's `{"content": [...]}` or the completions' legacy `{tokens, token_logprobs, ...}`."""
        if self.request.logprobs is None:
            return None
        if self.request.chat:
            return {"content": [{**self._entry(e.token, e.logprob),
                                 "top_logprobs": [self._entry(t, lp) for t, lp in e.top]} for e in entries],
                    "refusal": None}
        texts = [token_text(self.token_bytes(e.token)) for e in entries]
        tops: list[dict[str, float] | None] = []
        for e, text in zip(entries, texts):  # OpenAI: the alternatives, plus the chosen token
            tops.append(None if e.logprob is None else
                        {**{token_text(self.token_bytes(t)): lp for t, lp in e.top}, text: e.logprob})
        return {"tokens": texts, "token_logprobs": [e.logprob for e in entries], "top_logprobs": tops,
                "text_offset": [e.offset for e in entries]}

    def _entry(self, token: int, logprob: float | None) -> dict[str, Any]:
        raw = self.token_bytes(token)
        return {"token": token_text(raw), "logprob": logprob, "bytes": list(raw)}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.request.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def _choice(self, index: int, delta: Any, finish_reason: str | None, logprobs: Any) -> dict[str, Any]:
        key = "delta" if self.request.chat else "text"
        return {"index": index, key: delta, "finish_reason": finish_reason, "logprobs": logprobs}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_body(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "mistral_lm"}


def models_body(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_body(model, created)]}


def check_model(requested: str | None, served: str) -> None:
    """A request naming another model gets OpenAI's 404 `model_not_found` (no name: the served one)."""
    if requested is not None and requested != served:
        raise ProtocolError(f"the model {requested!r} does not exist; this server serves {served!r}", "model",
                            status=404, code="model_not_found")


# --------------------------------------------------------------------------- tokenizer endpoints
@dataclass(frozen=True)
class TokenizeRequest:
    """vLLM's /tokenize body: a `prompt`, or chat `messages` rendered with the chat template."""

    model: str | None
    prompt: str | None
    messages: tuple[dict[str, str], ...] | None
    add_special_tokens: bool
    add_generation_prompt: bool
    return_token_strs: bool


def parse_tokenize(body: Any) -> TokenizeRequest:
    body = _object(body, {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                          "return_token_strs"})
    if ("prompt" in body) == ("messages" in body):
        raise ProtocolError("send exactly one of prompt (a string) and messages", "prompt")
    prompt = body.get("prompt")
    if "prompt" in body and not isinstance(prompt, str):
        raise ProtocolError("prompt must be a string", "prompt")
    messages = _messages(body["messages"]) if "messages" in body else None
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ProtocolError("model must be a string", "model")
    # vLLM's defaults: a prompt gets the tokenizer's special tokens, a chat rendering has them already.
    # Unlike a completion's prompt text, control-token strings here become their ids (as in vLLM:
    # lm-eval finds the EOS id by tokenizing the EOS string).
    add_special = body.get("add_special_tokens", messages is None)
    add_generation = body.get("add_generation_prompt", True)
    for name, value in (("add_special_tokens", add_special), ("add_generation_prompt", add_generation)):
        if not isinstance(value, bool):
            raise ProtocolError(f"{name} must be true or false, got {value!r}", name)
    return TokenizeRequest(model, prompt, messages, add_special, add_generation, _boolean(body, "return_token_strs"))


def parse_detokenize(body: Any) -> tuple[str | None, tuple[int, ...]]:
    """vLLM's /detokenize body: {"tokens": [ids]} -> (model, ids)."""
    body = _object(body, {"model", "tokens"})
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(is_int(t) and t >= 0 for t in tokens):
        raise ProtocolError("tokens must be a list of non-negative token ids", "tokens")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ProtocolError("model must be a string", "model")
    return model, tuple(tokens)

"""OpenAI wire format: request parsing with validation, and response/chunk bodies.

Pure functions of JSON-shaped values, no HTTP and no tensors, so every rule here is testable
without a server. A bad request raises `ProtocolError` naming the offending field (`param`, as
OpenAI does), which the transport turns into a 400 with OpenAI's error body; the official client
then raises `BadRequestError` with `.param` set.

Fields OpenAI defines but this server does not implement are accepted only at their neutral value
(`logprobs: false`, `presence_penalty: 0`, ...), so a client never gets silently different
behaviour from what it asked for. Unknown fields are rejected for the same reason.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

from .._util import is_int
from ..generation import GenerationConfig

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_N = 16  # choices per request; each one is a batch row


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

    Exactly one of `messages` (chat: rendered with the model's chat template) and `prompt`
    (text, or token ids) is set. `max_tokens=None` means "up to the context length".
    """

    chat: bool
    messages: tuple[dict[str, str], ...] | None
    prompt: str | tuple[int, ...] | None
    max_tokens: int | None
    temperature: float
    top_p: float
    n: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool

    def generation_config(self, max_new_tokens: int, eos_token_id: list[int]) -> GenerationConfig:
        """The library's settings for this request: temperature 0 is greedy, and no top-k (OpenAI has none)."""
        sampled = self.temperature > 0
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=sampled, temperature=self.temperature if sampled else 1.0,
            top_p=self.top_p, top_k=0, seed=self.seed, eos_token_id=eos_token_id,
        )
        config.validate()
        return config


# Fields accepted only at a neutral value: name -> the values that change nothing (empty: any value,
# for fields that only label a request).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "logit_bias": (None, {}), "user": (), "echo": (None, False), "suffix": (None, ""),
    "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None, False, True),
    "response_format": (None, {"type": "text"}), "service_tier": (None, "auto", "default"), "store": (None, False),
    "metadata": (), "best_of": (None, 1),
}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream", "stream_options"}
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens"}
_COMPLETION_FIELDS = _COMMON | {"prompt"}
_ROLES = ("system", "user", "assistant")


def parse_chat(body: Any) -> CompletionRequest:
    """Validate a /v1/chat/completions body."""
    body = _object(body, _CHAT_FIELDS)
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise ProtocolError("set max_tokens or max_completion_tokens, not both", "max_completion_tokens")
    max_field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return _request(body, chat=True, messages=_messages(body.get("messages")), prompt=None,
                    max_tokens=_positive_int(body, max_field, None))


def parse_completion(body: Any) -> CompletionRequest:
    """Validate a /v1/completions body. OpenAI's default max_tokens here is 16."""
    body = _object(body, _COMPLETION_FIELDS)
    return _request(body, chat=False, messages=None, prompt=_prompt(body.get("prompt")),
                    max_tokens=_positive_int(body, "max_tokens", 16))


def _request(body: dict[str, Any], *, chat: bool, messages: tuple[dict[str, str], ...] | None,
             prompt: str | tuple[int, ...] | None, max_tokens: int | None) -> CompletionRequest:
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
        chat=chat, messages=messages, prompt=prompt, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, low=0.0, high=2.0, low_open=False),
        top_p=_number(body, "top_p", 1.0, low=0.0, high=1.0, low_open=True),
        n=n, seed=_seed(body.get("seed")), stop=_stop(body.get("stop")), stream=stream, include_usage=include_usage,
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


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise ProtocolError("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ProtocolError(f"{where} must be an object", where)
        unknown = set(message) - {"role", "content", "name"}
        if unknown:
            raise ProtocolError(f"{where} has unsupported fields {sorted(unknown)}", f"{where}.{min(unknown)}")
        role = message.get("role")
        if role not in _ROLES:
            raise ProtocolError(f"{where}.role must be one of {list(_ROLES)}, got {role!r}", f"{where}.role")
        out.append({"role": role, "content": _content(message.get("content"), f"{where}.content")})
    return tuple(out)


def _content(value: Any, where: str) -> str:
    """A string, or OpenAI's list of content parts of which only text parts are supported."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
            return "".join(p["text"] for p in value)
        raise ProtocolError(f"{where}: only text content parts are supported", where)
    raise ProtocolError(f"{where} must be a string or a list of text parts", where)


def _prompt(value: Any) -> str | tuple[int, ...]:
    """A string or a list of token ids; a batch of one is unwrapped."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(is_int(t) and t >= 0 for t in value):
        return tuple(value)
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise ProtocolError("prompt: batches of prompts are not supported; send one request per prompt "
                            "(concurrent requests share the model's forward passes anyway)", "prompt")
    raise ProtocolError("prompt must be a string or a non-empty list of token ids", "prompt")


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
class ResponseWriter:
    """Builds the bodies of one response: a whole JSON object, or the chunks of a stream.

    Takes the engine's events as plain values (`index, text, finish_reason` per delta; token
    counts at the end), so the transport never assembles OpenAI shapes itself.
    """

    def __init__(self, request: CompletionRequest, model: str) -> None:
        self.request = request
        self.model = model
        self.id = ("chatcmpl-" if request.chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.object = "chat.completion" if request.chat else "text_completion"

    def first_chunks(self) -> list[dict[str, Any]]:
        """Chat streams open each choice with the assistant role, as OpenAI does."""
        if not self.request.chat:
            return []
        return [self._chunk([self._choice(i, {"role": "assistant", "content": ""}, None)])
                for i in range(self.request.n)]

    def delta_chunk(self, index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
        delta: Any = ({"content": text} if text else {}) if self.request.chat else text
        return self._chunk([self._choice(index, delta, finish_reason)])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any] | None:
        """The extra last chunk `stream_options.include_usage` asks for: no choices, just usage."""
        if not self.request.include_usage:
            return None
        return {**self._chunk([]), "usage": usage(prompt_tokens, completion_tokens)}

    def body(self, texts: list[str], finish_reasons: list[str | None], prompt_tokens: int,
             completion_tokens: int) -> dict[str, Any]:
        """The non-streaming response, with every choice's whole text."""
        if self.request.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                        "logprobs": None} for i, (text, reason) in enumerate(zip(texts, finish_reasons))]
        else:
            choices = [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
                       for i, (text, reason) in enumerate(zip(texts, finish_reasons))]
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.request.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def _choice(self, index: int, delta: Any, finish_reason: str | None) -> dict[str, Any]:
        key = "delta" if self.request.chat else "text"
        return {"index": index, key: delta, "finish_reason": finish_reason, "logprobs": None}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def models_body(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "mistral_lm"}]}

"""mistral-common's chat encoding, straight from messages to ids (no template, no text round trip).

`encode_chat(messages, version, encode_text, special_id)` reproduces
`MistralTokenizer.encode_chat_completion(...).tokens` of mistral-common for the instruct tokenizers
it ships: SentencePiece v1 (`tokenizer.model.v1`), v2, v3, v7 (`*.model.v2`/`.v3`/`.v7`) and Tekken
files whose `config.version` is v3 or v7. Control tokens ([INST], [SYSTEM_PROMPT], </s>, ...) are
looked up with `special_id`, never parsed from text, so message text cannot inject them.

The rules, as mistral-common applies them:

- validation: at least one message; one message alone is a user or system message; roles follow
  system -> {system, user, assistant}, user -> {user, system, assistant}, assistant -> {assistant,
  user, tool}, tool -> {tool, assistant, user}; assistant messages have text or tool calls (up to
  v3 not both); an assistant's tool calls are answered by as many tool messages before the next
  assistant message; from v3 call ids are 9 alphanumerics. Unlike mistral-common's chat-completion API (which serves a
  reply), a conversation may end with an assistant message: it is encoded as mistral-common's
  instruct encoder does, closed by </s>.
- normalisation: consecutive messages of one role merge (tool results never do), their non-empty
  texts joined by "\\n\\n" and their tool calls concatenated.
  Up to v3 system messages leave the conversation: their non-empty texts, joined by "\\n\\n",
  become the system prompt, and an empty user message is put first when the conversation does not
  start with a user message. From v7 each system message stays where it is.
- encoding (after <s>):
  v1: user "[INST] {text} [/INST]" as plain text (v1 has no [INST] control token), with the system
  prompt + "\\n\\n" before the FIRST user text; assistant text + </s>.
  v2/v3: [INST] text [/INST], the system prompt + "\\n\\n" before the LAST user text; assistant
  text with trailing spaces removed + </s>.
  v7: [SYSTEM_PROMPT] text [/SYSTEM_PROMPT] in place; [INST] text [/INST]; assistant as v3.

Tools (`tools=[{"type": "function", "function": {...}}]`, from v2 on) go as
[AVAILABLE_TOOLS] json [/AVAILABLE_TOOLS] right before the last user turn's [INST]. Assistant tool
calls (OpenAI's `tool_calls`) and tool results (role `tool`):
  v2: [TOOL_CALLS] [{"name", "arguments"}] </s>; [TOOL_RESULTS] [{"name", "content"}] [/TOOL_RESULTS];
      both only after the last user turn (earlier exchanges are dropped), one result per call turn.
  v3: [TOOL_CALLS] [{"name", "arguments", "id"}] </s>; [TOOL_RESULTS] {"content", "call_id"} [/TOOL_RESULTS].
  v7: text, then the v3 calls, </s>; [TOOL_RESULTS] id [TOOL_CONTENT] content [/TOOL_RESULTS].
Arguments and (up to v3) results that are JSON strings are embedded parsed, as mistral-common
re-dumps them. `parse_tool_calls` reads a generated reply back into OpenAI-shaped calls.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import TokenizerError, ToolCallError

__all__ = ["CHAT_VERSIONS", "encode_chat", "parse_tool_calls", "sentencepiece_chat_version", "tekken_chat_version"]

CHAT_VERSIONS = ("v1", "v2", "v3", "v7")
_TEKKEN_CHAT_VERSIONS = ("v3", "v7")  # the Tekken files mistral-common ships are v3
_JOIN = "\n\n"
_NEXT_ROLES = {"system": {"system", "user", "assistant"}, "user": {"user", "system", "assistant"},
               "assistant": {"assistant", "user", "tool"}, "tool": {"tool", "assistant", "user"}}
# mistral-common's rules for tool call ids (v3+) and function names; server/tools.py checks by them too
CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
CALL_ID_ALPHABET = string.ascii_letters + string.digits
_SP_NAME = re.compile(r"\.model\.(v\d+)(m\d+)?$")


def sentencepiece_chat_version(path: str | Path | None) -> str | None:
    """The chat version of a SentencePiece file named as mistral-common names them
    (`tokenizer.model.v1`, `mistral_instruct_tokenizer_240323.model.v3`, `...model.v7m1`), else None.

    A bare `tokenizer.model` (a Transformers folder) gives None: it keeps the Jinja template path.
    """
    if path is None:
        return None
    match = _SP_NAME.search(Path(str(path)).name)
    return match.group(1) if match and match.group(1) in CHAT_VERSIONS else None


def tekken_chat_version(config_version: str | None) -> str | None:
    """The chat version of a Tekken file from its `config.version` (v3 and v7 are supported)."""
    return config_version if config_version in _TEKKEN_CHAT_VERSIONS else None


@dataclass(frozen=True)
class _Call:
    """One assistant tool call; `arguments` is the value mistral-common embeds: the parsed JSON,
    or the raw string when it is not JSON."""

    name: str
    arguments: Any
    id: str | None


@dataclass(frozen=True)
class _Message:
    role: str
    text: str
    calls: tuple[_Call, ...] = ()
    call_id: str | None = None  # tool results only
    name: str | None = None  # tool results only (the function's name, v2 encodes it)


def _text(message: Mapping[str, Any], k: int, *, allow_empty: bool, allow_none: bool = False) -> str:
    content = message.get("content")
    if content is None and allow_none:  # OpenAI's `content: null` beside tool_calls
        return ""
    if content is None and message.get("role") == "assistant":
        content = ""  # refused below as an empty answer
    if isinstance(content, list):  # OpenAI-style text chunks
        if not all(isinstance(c, Mapping) and c.get("type") == "text" and isinstance(c.get("text"), str)
                   for c in content):
            kinds = [c.get("type") if isinstance(c, Mapping) else type(c).__name__ for c in content]
            raise TokenizerError(f"messages[{k}] ({message.get('role')}): only text content is supported, "
                                 f"got chunks of types {kinds}")
        content = _JOIN.join(c["text"] for c in content if c["text"])
    if not isinstance(content, str):
        raise TokenizerError(f"messages[{k}] ({message.get('role')}): content must be a string, "
                             f"got {type(content).__name__}")
    if not content and not allow_empty:
        raise TokenizerError(f"messages[{k}] ({message.get('role')}): an assistant message must have content "
                             "or tool_calls")
    return content


def _json_value(text: Any) -> Any:
    """What mistral-common embeds for a JSON string field (arguments, tool results): the parsed
    value, `{}` for an empty one, the string itself when it is not JSON."""
    if isinstance(text, Mapping):
        return dict(text)
    if text is None or text == "":
        return {}
    try:
        return json.loads(text)
    except (TypeError, json.JSONDecodeError):
        return text


def _call_id(value: Any, where: str, version: str) -> str | None:
    if version == "v2":  # v2 encodes no ids
        return value if isinstance(value, str) else None
    if not isinstance(value, str) or not CALL_ID.match(value):
        raise TokenizerError(f"{where} must be 9 characters of a-z, A-Z and 0-9 (the {version} format's tool call "
                             f"ids), got {value!r}")
    return value


def _calls(message: Mapping[str, Any], k: int, version: str) -> tuple[_Call, ...]:
    calls = message.get("tool_calls")
    if not calls:
        return ()
    if isinstance(calls, (str, bytes, Mapping)) or not isinstance(calls, Sequence):
        raise TokenizerError(f"messages[{k}].tool_calls must be a list, got {type(calls).__name__}")
    if version == "v1":
        raise TokenizerError(f"messages[{k}]: v1 tokenizers have no tool tokens: tool calls need a v2+ tokenizer")
    out = []
    for j, call in enumerate(calls):
        where = f"messages[{k}].tool_calls[{j}]"
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or call.get("type", "function") != "function":
            raise TokenizerError(f"{where} must be {{'id': ..., 'type': 'function', 'function': {{'name': ..., "
                                 f"'arguments': ...}}}}, got {call!r}")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise TokenizerError(f"{where}.function.name {name!r} must be 1-64 of a-z, A-Z, 0-9, _ and -")
        arguments = function.get("arguments")
        if arguments is not None and not isinstance(arguments, (str, Mapping)):
            raise TokenizerError(f"{where}.function.arguments must be a JSON string or a dict, "
                                 f"got {type(arguments).__name__}")
        out.append(_Call(name, _json_value(arguments), _call_id(call.get("id"), f"{where}.id", version)))
    return tuple(out)


def _tool_result(message: Mapping[str, Any], k: int, version: str) -> _Message:
    if version == "v1":
        raise TokenizerError(f"messages[{k}]: v1 tokenizers have no tool tokens: tool results need a v2+ tokenizer")
    name = message.get("name")
    if name is not None and (not isinstance(name, str) or not TOOL_NAME.match(name)):
        raise TokenizerError(f"messages[{k}].name {name!r} must be 1-64 of a-z, A-Z, 0-9, _ and -")
    call_id = _call_id(message.get("tool_call_id"), f"messages[{k}].tool_call_id", version)
    return _Message("tool", _text(message, k, allow_empty=True), call_id=call_id, name=name)


def _validate(messages: Sequence[Mapping[str, Any]], version: str) -> list[_Message]:
    """The messages, after mistral-common's structure checks (its default, non-serving mode)."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise TokenizerError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise TokenizerError("the conversation is empty: it must have at least one message")
    out: list[_Message] = []
    pending = 0  # tool calls of the last assistant turn not yet answered by a tool message
    for k, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TokenizerError(f"messages[{k}] must be a dict with 'role' and 'content', "
                                 f"got {type(message).__name__}")
        role = message.get("role")
        if role not in _NEXT_ROLES:
            raise TokenizerError(f"messages[{k}] has role {role!r}; expected 'system', 'user', 'assistant' or 'tool'")
        if out and role not in _NEXT_ROLES[out[-1].role]:
            raise TokenizerError(f"messages[{k}]: role {role!r} cannot follow role {out[-1].role!r} (mistral-common "
                                 f"allows {sorted(_NEXT_ROLES[out[-1].role])} after it)")
        if role == "tool":
            if pending == 0:
                raise TokenizerError(f"messages[{k}]: a tool message must answer one of the tool_calls of the "
                                     "assistant message before it, and there is none left to answer")
            pending -= 1
            out.append(_tool_result(message, k, version))
            continue
        if role == "assistant":
            if pending:
                raise TokenizerError(f"messages[{k}]: {pending} tool call(s) of the previous assistant message have "
                                     "no tool message answering them")
            calls = _calls(message, k, version)
            text = _text(message, k, allow_empty=bool(calls), allow_none=bool(calls))
            if calls and text and version != "v7":
                raise TokenizerError(f"messages[{k}]: an assistant message has content or tool_calls, not both, "
                                     f"in the {version} format (v7 allows both)")
            pending = len(calls)
            out.append(_Message(role, text, calls))
            continue
        out.append(_Message(role, _text(message, k, allow_empty=True)))
    if len(out) == 1 and out[0].role == "assistant":
        raise TokenizerError("the conversation must start with a user or system message, not a lone assistant "
                             "message")
    return out


def _normalize(messages: list[_Message], version: str) -> tuple[list[_Message], str | None]:
    """Merged messages and (up to v3) the system prompt, as mistral-common's normalizer makes them."""
    merged: list[_Message] = []
    system: list[str] = []
    previous = None
    for message in messages:
        role = message.role
        if role == "system":  # never merged; up to v3 taken out (it still splits two user runs)
            if version == "v7":
                merged.append(message)
            elif message.text:
                system.append(message.text)
        elif role == "tool":  # never merged
            merged.append(message)
        elif role == previous:
            last = merged[-1]
            merged[-1] = replace(last, text=_JOIN.join(t for t in (last.text, message.text) if t),
                                 calls=last.calls + message.calls)
        else:
            merged.append(message)
        previous = role
    if version != "v7" and (not merged or merged[0].role != "user"):
        merged.insert(0, _Message("user", ""))
    return merged, _JOIN.join(system) if system else None


def _tools_json(tools: Sequence[Mapping[str, Any]]) -> str:
    """The tools as mistral-common dumps them: type, then function (name, description, parameters)."""
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise TokenizerError(f"tools must be a list of {{'type': 'function', 'function': {{...}}}} dicts, "
                             f"got {type(tools).__name__}")
    out = []
    for k, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or tool.get("type", "function") != "function":
            raise TokenizerError(f"tools[{k}] must be {{'type': 'function', 'function': {{'name': ..., "
                                 f"'description': ..., 'parameters': {{...}}}}}}, got {tool!r}")
        name, description = function.get("name"), function.get("description", "")
        parameters = function.get("parameters")  # required, as in mistral-common
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise TokenizerError(f"tools[{k}]: function name {name!r} must be 1-64 of a-z, A-Z, 0-9, _ and -")
        if not isinstance(description, str) or not isinstance(parameters, Mapping):
            raise TokenizerError(f"tools[{k}]: 'description' must be a string and 'parameters' a dict (a JSON "
                                 f"schema; {{}} for none), got {description!r} and {parameters!r}")
        out.append({"type": "function", "function": {"name": name, "description": description,
                                                      "parameters": dict(parameters)}})
    return json.dumps(out, ensure_ascii=False)


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _calls_json(calls: Sequence[_Call], version: str) -> str:
    """The calls as mistral-common dumps them: name, arguments, then (from v3) the id."""
    return _dump([{"name": c.name, "arguments": c.arguments, **({"id": c.id} if version != "v2" and c.id else {})}
                  for c in calls])


def _check_v2_results(merged: list[_Message], last_user: int) -> None:
    """v2 encodes one result per call turn (mistral-common refuses more after the last user turn)."""
    results = 0
    for message in merged[last_user + 1:]:
        results = results + 1 if message.role == "tool" else 0
        if results > 1:
            raise TokenizerError("the v2 format encodes one tool result per assistant tool-call turn; this "
                                 "conversation answers one turn with several (v3+ tokenizers encode them)")


def encode_chat(messages: Sequence[Mapping[str, Any]], version: str, encode_text: Callable[[str], list[int]],
                special_id: Callable[[str], int], tools: Sequence[Mapping[str, Any]] | None = None,
                continue_final_message: bool = False) -> list[int]:
    """mistral-common's ids of a conversation for instruct tokenizer `version` (v1, v2, v3 or v7).

    `encode_text` encodes plain text without BOS/EOS (control-token strings in it stay text);
    `special_id` returns a control token's id. `continue_final_message=True` leaves the final
    assistant message open (no </s>). Raises TokenizerError for conversations mistral-common rejects.
    """
    if version not in CHAT_VERSIONS:
        raise TokenizerError(f"chat version {version!r} is not supported; supported: {list(CHAT_VERSIONS)}")
    validated = _validate(messages, version)
    if continue_final_message and validated[-1].role != "assistant":
        raise TokenizerError(f"continue_final_message=True continues the final message, which must be an assistant "
                             f"message (mistral-common's rule); this one is a {validated[-1].role} message. To start "
                             "a new answer, end with the user message and leave continue_final_message off")
    merged, system = _normalize(validated, version)
    open_end = len(merged) - 1 if continue_final_message else -1  # the message left without </s>
    if tools and version == "v1":
        raise TokenizerError("v1 tokenizers have no tool tokens: tools need a v2+ tokenizer")
    tools_text = _tools_json(tools) if tools else None
    users = [k for k, message in enumerate(merged) if message.role == "user"]
    first_user, last_user = (users[0], users[-1]) if users else (-1, -1)
    if version == "v2":
        _check_v2_results(merged, last_user)
    bos, eos = special_id("<s>"), special_id("</s>")
    ids = [bos]
    for k, message in enumerate(merged):
        role, text = message.role, message.text
        if role == "system":  # v7 only
            ids += [special_id("[SYSTEM_PROMPT]"), *encode_text(text), special_id("[/SYSTEM_PROMPT]")]
        elif role == "user" and version == "v1":
            if k == first_user and system:
                text = system + _JOIN + text
            ids += encode_text(f"[INST] {text} [/INST]")
        elif role == "user":
            if k == last_user and system:
                text = system + _JOIN + text
            if k == last_user and tools_text is not None:
                ids += [special_id("[AVAILABLE_TOOLS]"), *encode_text(tools_text), special_id("[/AVAILABLE_TOOLS]")]
            ids += [special_id("[INST]"), *encode_text(text), special_id("[/INST]")]
        elif role == "tool":
            if version == "v2" and k < last_user:  # v2 drops the tool exchanges before the last user turn
                continue
            if version == "v7":
                body = [*encode_text(message.call_id), special_id("[TOOL_CONTENT]"), *encode_text(text)]
            elif version == "v3":  # up to v3 a JSON result is embedded parsed
                body = encode_text(_dump({"content": _json_value(text), "call_id": message.call_id}))
            else:
                body = encode_text(_dump([{"name": message.name, "content": _json_value(text)}]))
            ids += [special_id("[TOOL_RESULTS]"), *body, special_id("[/TOOL_RESULTS]")]
        elif message.calls:
            if version == "v2" and k < last_user:
                continue
            if text:  # v7 only (validated)
                ids += encode_text(text.rstrip(" "))
            ids += [special_id("[TOOL_CALLS]"), *encode_text(_calls_json(message.calls, version))]
            ids += [eos] if k != open_end else []
        else:
            ids += [*encode_text(text if version == "v1" else text.rstrip(" "))]
            ids += [eos] if k != open_end else []
    return ids


def new_call_id() -> str:
    """A fresh tool call id in the 9-alphanumeric form Mistral's v3+ formats require."""
    return "".join(secrets.choice(CALL_ID_ALPHABET) for _ in range(9))


def parse_tool_calls(ids: Sequence[int], decode: Callable[[list[int]], str], tool_calls_id: int,
                     stop_ids: frozenset[int] | set[int] = frozenset(),
                     make_id: Callable[[], str] = new_call_id) -> tuple[str | None, list[dict[str, str]]]:
    """A generated reply's text and tool calls: the inverse of `encode_chat`'s assistant turn.

    `ids` are the generated ids (after the prompt); text before the first [TOOL_CALLS] is the
    content (None when empty); after each [TOOL_CALLS] comes a JSON list (or one object) of
    `{"name", "arguments"[, "id"]}`. Returns `(content, [{"id", "name", "arguments"}, ...])` with
    `arguments` a JSON string, as OpenAI's `function.arguments` is; a call without a valid id
    (v2 models write none) gets one from `make_id`. Generation stops (`stop_ids`, e.g. </s>) end
    the reply. Raises ToolCallError naming the problem when the JSON is malformed or truncated.
    """
    ids = [int(i) for i in ids]
    for k, i in enumerate(ids):
        if i in stop_ids:
            ids = ids[:k]
            break
    segments: list[list[int]] = [[]]
    for i in ids:
        if i == tool_calls_id:
            segments.append([])
        else:
            segments[-1].append(i)
    content = decode(segments[0]) if segments[0] else ""
    calls: list[dict[str, str]] = []
    for n, segment in enumerate(segments[1:]):
        text = decode(segment)
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise ToolCallError(f"tool call {n}: the JSON after [TOOL_CALLS] does not parse ({err.msg} at "
                                f"character {err.pos}): {text[:200]!r}") from None
        for j, call in enumerate(value if isinstance(value, list) else [value]):
            calls.append(_parsed_call(call, f"tool call {n}.{j}", make_id))
    return (content or None), calls


def _parsed_call(call: Any, where: str, make_id: Callable[[], str]) -> dict[str, str]:
    if not isinstance(call, dict):
        raise ToolCallError(f"{where}: expected an object with 'name' and 'arguments', got {call!r:.200}")
    name, arguments = call.get("name"), call.get("arguments", {})
    if not isinstance(name, str) or not TOOL_NAME.match(name):
        raise ToolCallError(f"{where}: 'name' must be a function name (1-64 of a-z, A-Z, 0-9, _ and -), "
                            f"got {name!r:.100}")
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as err:
            raise ToolCallError(f"{where} ({name}): 'arguments' is a string that is not JSON ({err.msg})") from None
    if not isinstance(arguments, dict):
        raise ToolCallError(f"{where} ({name}): 'arguments' must be a JSON object, got {arguments!r:.200}")
    call_id = call.get("id")
    if not isinstance(call_id, str) or not CALL_ID.match(call_id):
        call_id = make_id()
    return {"id": call_id, "name": name, "arguments": _dump(arguments)}

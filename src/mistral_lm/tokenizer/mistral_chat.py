"""mistral-common's chat encoding, straight from messages to ids (no template, no text round trip).

`encode_chat(messages, version, encode_text, special_id)` reproduces
`MistralTokenizer.encode_chat_completion(...).tokens` of mistral-common for the instruct tokenizers
it ships: SentencePiece v1 (`tokenizer.model.v1`), v2, v3, v7 (`*.model.v2`/`.v3`/`.v7`) and Tekken
files whose `config.version` is v3 or v7. Control tokens ([INST], [SYSTEM_PROMPT], </s>, ...) are
looked up with `special_id`, never parsed from text, so message text cannot inject them.

The rules, as mistral-common applies them:

- validation: at least one message; one message alone is a user or system message; roles follow
  system -> {system, user, assistant}, user -> {user, system, assistant}, assistant -> {assistant,
  user}; assistant messages have text. Unlike mistral-common's chat-completion API (which serves a
  reply), a conversation may end with an assistant message: it is encoded as mistral-common's
  instruct encoder does, closed by </s>.
- normalisation: consecutive messages of one role merge, their non-empty texts joined by "\\n\\n".
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
calls and tool results are not encoded yet: such messages raise TokenizerError.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import TokenizerError

__all__ = ["CHAT_VERSIONS", "encode_chat", "sentencepiece_chat_version", "tekken_chat_version"]

CHAT_VERSIONS = ("v1", "v2", "v3", "v7")
_TEKKEN_CHAT_VERSIONS = ("v3", "v7")  # the Tekken files mistral-common ships are v3
_JOIN = "\n\n"
_NEXT_ROLES = {"system": {"system", "user", "assistant"}, "user": {"user", "system", "assistant"},
               "assistant": {"assistant", "user"}}
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


def _text(message: Mapping[str, Any], k: int, *, allow_empty: bool) -> str:
    content = message.get("content")
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
        raise TokenizerError(f"messages[{k}] ({message.get('role')}): an assistant message must have content")
    return content


def _validate(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(role, text) of each message, after mistral-common's structure checks."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise TokenizerError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise TokenizerError("the conversation is empty: it must have at least one message")
    out: list[tuple[str, str]] = []
    for k, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TokenizerError(f"messages[{k}] must be a dict with 'role' and 'content', "
                                 f"got {type(message).__name__}")
        role = message.get("role")
        if role == "tool" or message.get("tool_calls"):
            raise TokenizerError(f"messages[{k}]: tool calls and tool results are not supported by mistral_lm's "
                                 "mistral-common encoding yet")
        if role not in _NEXT_ROLES:
            raise TokenizerError(f"messages[{k}] has role {role!r}; expected 'system', 'user' or 'assistant'")
        if out and role not in _NEXT_ROLES[out[-1][0]]:
            raise TokenizerError(f"messages[{k}]: role {role!r} cannot follow role {out[-1][0]!r} (mistral-common "
                                 f"allows {sorted(_NEXT_ROLES[out[-1][0]])} after it)")
        out.append((role, _text(message, k, allow_empty=role != "assistant")))
    if len(out) == 1 and out[0][0] == "assistant":
        raise TokenizerError("the conversation must start with a user or system message, not a lone assistant "
                             "message")
    return out


def _normalize(messages: list[tuple[str, str]], version: str) -> tuple[list[tuple[str, str]], str | None]:
    """Merged messages and (up to v3) the system prompt, as mistral-common's normalizer makes them."""
    merged: list[tuple[str, str]] = []
    system: list[str] = []
    previous = None
    for role, text in messages:
        if role == "system":  # never merged; up to v3 taken out (it still splits two user runs)
            if version == "v7":
                merged.append((role, text))
            elif text:
                system.append(text)
        elif role == previous:
            merged[-1] = (role, _JOIN.join(t for t in (merged[-1][1], text) if t))
        else:
            merged.append((role, text))
        previous = role
    if version != "v7" and (not merged or merged[0][0] != "user"):
        merged.insert(0, ("user", ""))
    return merged, _JOIN.join(system) if system else None


_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


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
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise TokenizerError(f"tools[{k}]: function name {name!r} must be 1-64 of a-z, A-Z, 0-9, _ and -")
        if not isinstance(description, str) or not isinstance(parameters, Mapping):
            raise TokenizerError(f"tools[{k}]: 'description' must be a string and 'parameters' a dict (a JSON "
                                 f"schema; {{}} for none), got {description!r} and {parameters!r}")
        out.append({"type": "function", "function": {"name": name, "description": description,
                                                      "parameters": dict(parameters)}})
    return json.dumps(out, ensure_ascii=False)


def encode_chat(messages: Sequence[Mapping[str, Any]], version: str, encode_text: Callable[[str], list[int]],
                special_id: Callable[[str], int], tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
    """mistral-common's ids of a conversation for instruct tokenizer `version` (v1, v2, v3 or v7).

    `encode_text` encodes plain text without BOS/EOS (control-token strings in it stay text);
    `special_id` returns a control token's id. Raises TokenizerError for conversations
    mistral-common rejects.
    """
    if version not in CHAT_VERSIONS:
        raise TokenizerError(f"chat version {version!r} is not supported; supported: {list(CHAT_VERSIONS)}")
    merged, system = _normalize(_validate(messages), version)
    if tools and version == "v1":
        raise TokenizerError("v1 tokenizers have no tool tokens: tools need a v2+ tokenizer")
    tools_text = _tools_json(tools) if tools else None
    users = [k for k, (role, _) in enumerate(merged) if role == "user"]
    first_user, last_user = (users[0], users[-1]) if users else (-1, -1)
    bos, eos = special_id("<s>"), special_id("</s>")
    ids = [bos]
    for k, (role, text) in enumerate(merged):
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
        else:
            ids += [*encode_text(text if version == "v1" else text.rstrip(" ")), eos]
    return ids

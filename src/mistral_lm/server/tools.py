"""Tool calling over the OpenAI API, for models whose chat format has tool calls (Mistral v2+).

Three pure steps around the engine:
- `parse_tools` validates `tools`, `tool_choice` and `parallel_tool_calls` (400s naming the field);
- `mistral_messages` turns OpenAI history (assistant `tool_calls`, role `tool`, `content: null`) into
  what `apply_chat_template` encodes, with client call ids mapped onto the 9 alphanumerics Mistral's
  formats require (the same client id always maps to the same Mistral id, so a call and its result
  stay paired; the ids this server returns are already in that form and pass unchanged);
- `reply_message` splits a generated reply into `content` and `tool_calls`.

Only what the model's format can express is accepted: a template without tool calls (e.g. the
embedded SmolLM2) gets a 400 rather than tools the model never sees; `tool_choice` "required" or a
named function and `parallel_tool_calls: false` would need the output constrained, and are refused
until then rather than hoped for.
"""

from __future__ import annotations

import hashlib
import re
import string
from dataclasses import dataclass
from typing import Any

from ..errors import ToolCallError
from .protocol import ProtocolError

__all__ = ["ToolRequest", "mistral_messages", "parse_tools", "reply_message", "supports_tools"]

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_MISTRAL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")
_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolRequest:
    """The tools a chat request offers and how the model may use them ("auto" only, for now)."""

    tools: tuple[dict[str, Any], ...]
    choice: str = "auto"


def supports_tools(tokenizer: Any) -> bool:
    """True when the tokenizer encodes tools and has a [TOOL_CALLS] token to parse replies by."""
    return getattr(tokenizer, "_chat_version", None) in ("v2", "v3", "v7") and tokenizer.chat_template is None \
        and "[TOOL_CALLS]" in tokenizer.get_vocab()


def parse_tools(body: dict[str, Any], tokenizer: Any) -> ToolRequest | None:
    """The request's tools, or None when it offers none (or tool_choice is "none")."""
    tools, choice, parallel = body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
    if parallel not in (None, True, False):
        raise ProtocolError("parallel_tool_calls must be a boolean", "parallel_tool_calls")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise ProtocolError("tool_choice names a tool, but the request has no tools", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise ProtocolError("tools must be a list of {type: function, function: {name, description, parameters}}",
                            "tools")
    names: list[str] = []
    out = []
    for k, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function":
            raise ProtocolError(f"tools[{k}] must be {{type: 'function', function: {{name, description, "
                                f"parameters}}}}", f"tools[{k}]")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ProtocolError(f"tools[{k}].function.name must be 1-64 of a-z, A-Z, 0-9, _ and -, got {name!r}",
                                f"tools[{k}].function.name")
        if name in names:
            raise ProtocolError(f"tools[{k}].function.name {name!r} is declared twice", f"tools[{k}].function.name")
        names.append(name)
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        description = function.get("description", "")
        if not isinstance(parameters, dict):
            raise ProtocolError(f"tools[{k}].function.parameters must be a JSON schema object",
                                f"tools[{k}].function.parameters")
        if not isinstance(description, str):
            raise ProtocolError(f"tools[{k}].function.description must be a string",
                                f"tools[{k}].function.description")
        out.append({"type": "function", "function": {"name": name, "description": description,
                                                      "parameters": parameters}})
    if isinstance(choice, dict):
        named = choice.get("function", {}).get("name") if isinstance(choice.get("function"), dict) else None
        if choice.get("type") != "function" or named not in names:
            raise ProtocolError(f"tool_choice must name one of the declared tools {names}, got {choice!r}",
                                "tool_choice")
        raise ProtocolError("tool_choice naming a function needs constrained decoding, which this server does not "
                            "do for tool calls yet; use \"auto\"", "tool_choice")
    if choice == "required":
        raise ProtocolError("tool_choice \"required\" needs constrained decoding, which this server does not do "
                            "for tool calls yet; use \"auto\"", "tool_choice")
    if choice not in (None, "auto", "none"):
        raise ProtocolError(f"tool_choice must be \"none\", \"auto\", \"required\" or {{type: function, function: "
                            f"{{name}}}}, got {choice!r}", "tool_choice")
    if parallel is False:
        raise ProtocolError("parallel_tool_calls: false cannot be enforced by this server yet (the model may "
                            "call several tools); leave it unset", "parallel_tool_calls")
    if choice == "none":
        return None
    if not supports_tools(tokenizer):
        raise ProtocolError("this model's chat format has no tool calls (tools need a Mistral v2+ tokenizer "
                            "file: tokenizer.model.v3, tekken.json, ...)", "tools")
    return ToolRequest(tuple(out))


def mistral_call_id(client_id: Any) -> str:
    """A client's tool call id as 9 alphanumerics: kept when it already is, else a digest of it."""
    if isinstance(client_id, str) and _MISTRAL_ID.match(client_id):
        return client_id
    digest = int.from_bytes(hashlib.sha256(str(client_id).encode()).digest()[:8], "big")
    out = []
    for _ in range(9):
        digest, k = divmod(digest, len(_ALPHABET))
        out.append(_ALPHABET[k])
    return "".join(out)


def mistral_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI history as `apply_chat_template` takes it, call ids mapped by `mistral_call_id`."""
    out = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            message["tool_calls"] = [{**call, "id": mistral_call_id(call.get("id"))} for call in message["tool_calls"]]
        if message.get("role") == "tool":
            message["tool_call_id"] = mistral_call_id(message.get("tool_call_id"))
        out.append(message)
    return out


def reply_message(tokenizer: Any, ids: list[int]) -> tuple[str | None, list[dict[str, Any]] | None]:
    """(content, tool_calls) of a generated reply: OpenAI's `message` fields. A reply whose tool call
    does not parse (cut short by max_tokens, malformed JSON) is returned as its text."""
    try:
        content, calls = tokenizer.parse_tool_calls(ids)
    except ToolCallError:
        return tokenizer.decode(ids, skip_special_tokens=True), None
    if not calls:
        return content or "", None
    return content, [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                     for c in calls]

"""Tool calling over the OpenAI API, for models whose chat format has tool calls (Mistral v2+).

Three pure steps around the engine:
- `parse_tools` validates `tools`, `tool_choice` and `parallel_tool_calls` (400s naming the field);
- `mistral_messages` turns OpenAI history (assistant `tool_calls`, role `tool`, `content: null`) into
  what `apply_chat_template` encodes, with client call ids mapped onto the 9 alphanumerics Mistral's
  formats require (the same client id always maps to the same Mistral id, so a call and its result
  stay paired; the ids this server returns are already in that form and pass unchanged);
- `reply_message` splits a generated reply into `content` and `tool_calls`.

`tool_choice` "required" or a named function is enforced with a grammar of the format's own
tool-call syntax (`tool_call_constraint`: [TOOL_CALLS] then a JSON list of calls whose arguments
follow each tool's `parameters` schema), as is `parallel_tool_calls: false` with them (one call).
Only what can be enforced is accepted: a template without tool calls (e.g. the embedded SmolLM2)
gets a 400 rather than tools the model never sees, and `parallel_tool_calls: false` with
`tool_choice` "auto" (free text or calls) is refused rather than hoped for.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from .. import grammar
from ..errors import ToolCallError
from ..tokenizer.mistral_chat import CALL_ID, CALL_ID_ALPHABET, TOOL_NAME, new_call_id
from .protocol import ProtocolError

__all__ = ["ToolRequest", "generic_messages", "generic_reply", "mistral_messages", "parse_tools", "reply_message",
           "supports_tools", "tool_call_constraint"]



@dataclass(frozen=True)
class ToolRequest:
    """The tools a chat request offers and how the model may use them: `choice` "auto" (text or
    calls), "none" (text only: the tools are not shown), "required" (at least one call) or a
    tool's name (a call of that tool); `parallel` False allows one call only."""

    tools: tuple[dict[str, Any], ...]
    choice: str = "auto"
    parallel: bool = True
    generic: bool = False  # the chat template has no tool calls: the JSON reply format below


def supports_tools(tokenizer: Any) -> bool:
    """True when the tokenizer encodes tools and has a [TOOL_CALLS] token to parse replies by."""
    return getattr(tokenizer, "_chat_version", None) in ("v2", "v3", "v7") and tokenizer.chat_template is None \
        and "[TOOL_CALLS]" in tokenizer.get_vocab()


def parse_tools(body: dict[str, Any], tokenizer: Any) -> ToolRequest | None:
    """The request's tools, or None when it offers none."""
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
        if not isinstance(name, str) or not TOOL_NAME.match(name):
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
        choice = named
    elif choice not in (None, "auto", "none", "required"):
        raise ProtocolError(f"tool_choice must be \"none\", \"auto\", \"required\" or {{type: function, function: "
                            f"{{name}}}}, got {choice!r}", "tool_choice")
    generic = not supports_tools(tokenizer)
    if parallel is False and choice in (None, "auto") and not generic:
        raise ProtocolError("parallel_tool_calls: false is enforced only with tool_choice \"required\" or a named "
                            "function (with \"auto\" the model may call several tools); leave it unset",
                            "parallel_tool_calls")
    return ToolRequest(tuple(out), choice or "auto", parallel is not False, generic)


def _checked_parameters(tokenizer: Any, request: ToolRequest) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(function, parameters) of the tools `tool_choice` allows, each schema checked enforceable."""
    out = []
    for k, tool in enumerate(request.tools):
        function = tool["function"]
        if request.choice not in ("auto", "required", function["name"]):
            continue
        where = f"tools[{k}].function.parameters"
        try:  # refuses keywords llguidance cannot enforce, naming the tool
            grammar.json_schema(tokenizer, function["parameters"], name=function["name"], param=where)
        except grammar.ResponseFormatError as exc:
            raise ProtocolError(str(exc), exc.param) from exc
        out.append((function, function["parameters"]))
    return out


def tool_call_constraint(tokenizer: Any, request: ToolRequest) -> grammar.Constraint | None:
    """The grammar `tool_choice` "required" or a named function asks for, in the format's syntax:
    [TOOL_CALLS], then `[{"name": ..., "arguments": <that tool's parameters>(, "id": 9 alnum)}, ...]`
    (one call when `parallel` is False); None for "auto". Raises ProtocolError naming a tool whose
    `parameters` schema cannot be enforced."""
    if request.generic:
        return generic_constraint(tokenizer, request)
    if request.choice in ("auto", "none"):
        return None
    rules, alternatives = [], []
    with_id = tokenizer._chat_version != "v2"  # v3+ calls carry ids; the model may write one
    for k, (function, _) in enumerate(_checked_parameters(tokenizer, request)):
        head = json.dumps(f'{{"name": "{function["name"]}", "arguments": ')
        tail = ' (", \\"id\\": \\"" ID "\\"")?' if with_id else ""
        rules.append(f'call_{k}: {head} args_{k}{tail} "}}"\nargs_{k}: %json {json.dumps(function["parameters"])}')
        alternatives.append(f"call_{k}")
    calls = "call" if not request.parallel else 'call (", " call)*'
    source = "\n".join([f'start: <[{tokenizer.convert_tokens_to_ids("[TOOL_CALLS]")}]> " "? "[" {calls} "]"',
                        f"call: {' | '.join(alternatives)}", *rules, "ID: /[a-zA-Z0-9]{9}/"])
    try:
        return grammar.lark(tokenizer, source, name="tool_call", param="tools")
    except grammar.ResponseFormatError as exc:
        raise ProtocolError(str(exc), "tools") from exc


def mistral_call_id(client_id: Any) -> str:
    """A client's tool call id as 9 alphanumerics: kept when it already is, else a digest of it."""
    if isinstance(client_id, str) and CALL_ID.match(client_id):
        return client_id
    digest = int.from_bytes(hashlib.sha256(str(client_id).encode()).digest()[:8], "big")
    out = []
    for _ in range(9):
        digest, k = divmod(digest, len(CALL_ID_ALPHABET))
        out.append(CALL_ID_ALPHABET[k])
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


# ----- models whose template has no tool calls: a JSON reply format ----------------------------
# As llama.cpp's server does for such templates: the tools and the reply format go into the system
# prompt, and the reply is constrained to {"tool_calls": [{"name", "arguments"}, ...]} or (with
# tool_choice auto) {"response": "..."}, so it always parses into one or the other.

GENERIC_INSTRUCTIONS = (
    "You can call these tools (JSON schemas of their arguments):\n{tools}\n\n"
    "Reply with one JSON object: {{\"tool_calls\": [{{\"name\": <a tool name>, \"arguments\": <its arguments>}}]}} "
    "to call tools{answer}.")


def generic_messages(messages: list[dict[str, Any]], request: ToolRequest) -> list[dict[str, Any]]:
    """The conversation as plain-text turns for a template without tool calls: the tool list and
    the reply format in the system prompt, past calls and answers as the JSON the model would have
    written, and each run of tool results as one user turn of JSON (templates that know only user
    and assistant, alternating, accept that)."""
    listing = json.dumps([{"name": t["function"]["name"], "description": t["function"]["description"],
                           "parameters": t["function"]["parameters"]} for t in request.tools], ensure_ascii=False)
    answer = ', or {"response": <your answer>} to answer directly' if request.choice == "auto" else ""
    system = (GENERIC_INSTRUCTIONS.format(tools=listing, answer=answer) if request.choice != "none" else
              'Reply with one JSON object: {"response": <your answer>}.')
    out: list[dict[str, Any]] = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": _arguments_value(c["function"]["arguments"])}
                     for c in message["tool_calls"]]
            message = {"role": "assistant", "content": json.dumps({"tool_calls": calls}, ensure_ascii=False)}
        elif message.get("role") == "assistant":
            message = {"role": "assistant", "content": json.dumps({"response": message.get("content") or ""},
                                                                  ensure_ascii=False)}
        elif message.get("role") == "tool":
            result = {"tool_call_id": message.get("tool_call_id"), "content": message.get("content")}
            if out and out[-1].get("tool_results") is not None:
                out[-1]["tool_results"].append(result)
            else:
                out.append({"role": "user", "tool_results": [result]})
            continue
        out.append(message)
    out = [{"role": "user", "content": json.dumps({"tool_results": m["tool_results"]}, ensure_ascii=False)}
           if m.get("tool_results") is not None else m for m in out]
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{system}"}
    else:
        out.insert(0, {"role": "system", "content": system})
    return out


def _arguments_value(arguments: str) -> Any:
    try:
        return json.loads(arguments) if arguments else {}
    except json.JSONDecodeError:
        return arguments


def generic_constraint(tokenizer: Any, request: ToolRequest) -> grammar.Constraint:
    """The JSON schema of the generic reply, enforced: calls of the allowed tools with valid
    arguments (one when not parallel), or with tool_choice auto a plain answer."""
    answer = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
              "additionalProperties": False}
    if request.choice == "none":
        return grammar.json_schema(tokenizer, answer, name="tool_reply", param="tools")
    calls = [{"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": parameters},
              "required": ["name", "arguments"], "additionalProperties": False}
             for function, parameters in _checked_parameters(tokenizer, request)]
    items: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if not request.parallel:
        items["maxItems"] = 1
    reply: dict[str, Any] = {"type": "object", "properties": {"tool_calls": items}, "required": ["tool_calls"],
                             "additionalProperties": False}
    if request.choice == "auto":
        reply = {"anyOf": [reply, answer]}
    try:
        return grammar.json_schema(tokenizer, reply, name="tool_reply", param="tools")
    except grammar.ResponseFormatError as exc:
        raise ProtocolError(str(exc), "tools") from exc


def generic_reply(text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
    """(content, tool_calls) of a generic JSON reply; text that is not one (cut short) stays text."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text, None
    if isinstance(value, dict) and isinstance(value.get("response"), str):
        return value["response"], None
    if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
        return None, [{"id": new_call_id(), "type": "function",
                       "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                      for c in value["tool_calls"]]
    return text, None

"""server/tools.py: tool validation, call-id mapping and reply parsing, against mistral-common."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as ReferenceTokenizer

pytest.importorskip("fastapi")

from mistral_lm.server.protocol import ProtocolError  # noqa: E402
from mistral_lm.server.tools import mistral_call_id, mistral_messages, parse_tools, reply_message  # noqa: E402
from mistral_lm.tokenizer import MistralTokenizer  # noqa: E402

DATA = Path(str(importlib.resources.files("mistral_common") / "data"))
V3 = DATA / "mistral_instruct_tokenizer_240323.model.v3"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def v3():
    return MistralTokenizer.from_pretrained(V3)


def test_openai_history_with_client_ids_encodes_as_mistral_common(v3):
    """A history from another provider: ids like "call_9f8e..." become 9 alphanumerics, the same
    on the call and on its result, and the ids equal mistral-common's for those mapped ids."""
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_9f8e7d6c5b4a", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_9f8e7d6c5b4a", "content": "21 C"}]
    mapped = mistral_messages(history)
    call_id = mapped[1]["tool_calls"][0]["id"]
    assert len(call_id) == 9 and call_id.isalnum() and mapped[2]["tool_call_id"] == call_id
    assert history[1]["tool_calls"][0]["id"] == "call_9f8e7d6c5b4a"  # the request is not mutated
    assert mistral_call_id("abc123XYZ") == "abc123XYZ" and mistral_call_id("x") != mistral_call_id("y")
    tools = parse_tools({"tools": [WEATHER]}, v3).tools
    reference = ReferenceTokenizer.from_file(str(V3))
    expected = reference.encode_chat_completion(ChatCompletionRequest(messages=mapped, tools=list(tools))).tokens
    assert v3.apply_chat_template(mapped, tools=list(tools)) == expected


def test_reply_message_from_generated_ids(v3):
    calls = [{"id": "abc123XYZ", "type": "function", "function": {"name": "get_weather",
                                                                   "arguments": '{"city": "Paris"}'}}]
    prompt = [{"role": "user", "content": "q"}]
    full = v3.apply_chat_template(prompt + [{"role": "assistant", "content": None, "tool_calls": calls}])
    reply = full[len(v3.apply_chat_template(prompt)):]
    assert reply_message(v3, reply) == (None, calls)
    text = v3.encode("Plain answer.", add_special_tokens=False) + [v3.eos_token_id]
    assert reply_message(v3, text) == ("Plain answer.", None)
    cut = reply[:-6]  # max_tokens ran out inside the JSON: the text comes back, no broken call
    content, tool_calls = reply_message(v3, cut)
    assert tool_calls is None and content.startswith('[{"name": "get_weather"')


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "code", "function": {"name": "f"}}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools[0].function.parameters"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tools": [WEATHER], "parallel_tool_calls": False}, "parallel_tool_calls"),
])
def test_bad_tool_fields_name_the_field(v3, body, param):
    with pytest.raises(ProtocolError) as info:
        parse_tools(body, v3)
    assert info.value.param == param


def test_tools_need_a_format_with_tool_calls():
    v1 = MistralTokenizer.from_pretrained(DATA / "tokenizer.model.v1")
    with pytest.raises(ProtocolError, match="no tool calls") as info:
        parse_tools({"tools": [WEATHER]}, v1)
    assert info.value.param == "tools"
    assert parse_tools({"tools": [WEATHER], "tool_choice": "none"}, v1) is None  # nothing to render
    assert parse_tools({"tools": []}, v1) is None
    assert json.dumps(parse_tools({"tools": [WEATHER]},
                                  MistralTokenizer.from_pretrained(DATA / "tekken_240911.json")).tools[0])

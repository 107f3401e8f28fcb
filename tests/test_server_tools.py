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
from mistral_lm.server.tools import (  # noqa: E402
    mistral_call_id,
    mistral_messages,
    parse_tools,
    reply_message,
    tool_call_constraint,
)
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
    ({"tools": [WEATHER], "parallel_tool_calls": False, "tool_choice": "auto"}, "parallel_tool_calls"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}],
      "tool_choice": "required"}, "tools[0].function.parameters"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tools": [WEATHER], "parallel_tool_calls": False}, "parallel_tool_calls"),
])
def test_bad_tool_fields_name_the_field(v3, body, param):
    with pytest.raises(ProtocolError) as info:
        request = parse_tools(body, v3)
        if request is not None:
            tool_call_constraint(v3, request)
    assert info.value.param == param


def test_formats_without_tool_calls_get_the_json_reply_format():
    """v1 (and templates like SmolLM2's) have no tool tokens: tools go into the system prompt and
    the history renders as plain turns the v1 template accepts (alternating user/assistant)."""
    from mistral_lm.server.tools import generic_messages

    v1 = MistralTokenizer.from_pretrained(DATA / "tokenizer.model.v1")
    request = parse_tools({"tools": [WEATHER]}, v1)
    assert request.generic and request.choice == "auto"
    assert parse_tools({"tools": [WEATHER], "tool_choice": "none"}, v1).choice == "none"
    assert parse_tools({"tools": []}, v1) is None
    history = [{"role": "user", "content": "Paris and Rome?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"a": 1}'}},
                   {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "20"},
               {"role": "tool", "tool_call_id": "call_2", "content": "25"}]
    rendered = generic_messages(history, request)
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "user"]
    assert json.loads(rendered[2]["content"]) == {"tool_calls": [{"name": "get_weather", "arguments": {"a": 1}},
                                                                 {"name": "get_weather", "arguments": {}}]}
    assert json.loads(rendered[3]["content"])["tool_results"][1] == {"tool_call_id": "call_2", "content": "25"}
    assert "get_weather" in rendered[0]["content"]
    assert v1.apply_chat_template(rendered, add_generation_prompt=True)


# ----- end to end through the OpenAI client ----------------------------------------------------
# The model is random: what it "chooses" is scripted by replacing the picker (sampling.make_picker),
# so everything else runs for real: the chat format with tools, the decode loop, the detection of
# [TOOL_CALLS], the parsing, and the response and stream shapes the client reads.

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def tool_server(v3):
    import torch

    from mistral_lm import MistralForCausalLM
    from mistral_lm.server.app import create_app
    from mistral_lm.server.engine import Engine

    from .conftest import tiny_config
    from .test_server import _Server

    torch.manual_seed(0)
    model = MistralForCausalLM(tiny_config(vocab_size=len(v3), max_position_embeddings=1024)).eval()
    running = _Server(create_app(Engine(model, v3, max_batch_size=4), "tiny-v3"))
    yield running.url
    running.close()


@pytest.fixture()
def scripted(monkeypatch):
    """Each request's picker writes the ids of `script[0]` (then EOS), whatever the logits say."""
    import torch

    from mistral_lm import sampling

    script: list[list[int]] = []

    def make_picker(config, **_):
        ids = iter(script[0])

        def pick(logits, history, generator=None):
            return torch.tensor([next(ids, 2)] * logits.shape[0])
        return pick

    monkeypatch.setattr(sampling, "make_picker", make_picker)
    return script


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_tool_call_round_trip_through_openai(v3, tool_server, scripted):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    call = {"id": "abc123XYZ", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    reply = v3.apply_chat_template(messages + [{"role": "assistant", "content": None, "tool_calls": [call]}])
    scripted.append(reply[len(v3.apply_chat_template(messages)):])  # what a v3 model writes, </s> included
    client = _client(tool_server)
    answer = client.chat.completions.create(model="tiny-v3", messages=messages, tools=[WEATHER], max_tokens=64)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [c.model_dump() for c in choice.message.tool_calls] == [call]
    # the history goes back with the tool's result: accepted, rendered as mistral-common does
    scripted[0] = v3.encode("It is sunny.", add_special_tokens=False) + [v3.eos_token_id]
    history = messages + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call["id"], "content": '{"sky": "clear"}'}]
    second = client.chat.completions.create(model="tiny-v3", messages=history, tools=[WEATHER], max_tokens=16)
    assert second.choices[0].message.content == "It is sunny." and second.choices[0].finish_reason == "stop"
    assert not second.choices[0].message.tool_calls


def test_tool_calls_stream_as_deltas(v3, tool_server, scripted):
    calls = [{"id": "abc123XYZ", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "A"}'}},
             {"id": "Zyx987wvu", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "B"}'}}]
    messages = [{"role": "user", "content": "A and B?"}]
    reply = v3.apply_chat_template(messages + [{"role": "assistant", "content": None, "tool_calls": calls}])
    scripted.append(reply[len(v3.apply_chat_template(messages)):])
    stream = _client(tool_server).chat.completions.create(model="tiny-v3", messages=messages, tools=[WEATHER],
                                                          max_tokens=64, stream=True)
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.content for d in deltas)  # the JSON is never streamed as text
    fragments = [t for d in deltas for t in (d.tool_calls or [])]
    assert [(f.index, f.id, f.type, f.function.name, f.function.arguments) for f in fragments] == \
        [(k, c["id"], "function", c["function"]["name"], c["function"]["arguments"]) for k, c in enumerate(calls)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_cut_short_call_comes_back_as_text(v3, tool_server, scripted):
    messages = [{"role": "user", "content": "q"}]
    call = {"id": "abc123XYZ", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "P"}'}}
    reply = v3.apply_chat_template(messages + [{"role": "assistant", "content": None, "tool_calls": [call]}])
    scripted.append(reply[len(v3.apply_chat_template(messages)):])
    answer = _client(tool_server).chat.completions.create(model="tiny-v3", messages=messages, tools=[WEATHER],
                                                          max_tokens=6)
    assert answer.choices[0].finish_reason == "length" and answer.choices[0].message.tool_calls is None
    assert answer.choices[0].message.content.startswith('[{"name"')


def test_tool_requests_the_server_refuses(tool_server, scripted):
    scripted.append([])
    client = _client(tool_server)
    messages = [{"role": "user", "content": "q"}]
    for kwargs, param in [({"tools": [WEATHER], "tool_choice": "required",
                            "response_format": {"type": "json_object"}}, "response_format"),
                          ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
                          ({"messages": messages + [{"role": "tool", "tool_call_id": "x", "content": "1"}]},
                           "messages")]:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(**{"model": "tiny-v3", "messages": messages, "max_tokens": 4, **kwargs})
        assert info.value.body["param"] == param, info.value.body
    assert client.chat.completions.create(model="tiny-v3", messages=messages, max_tokens=2).choices


def test_a_request_whose_picking_fails_ends_alone(v3, tool_server, monkeypatch):
    """A picker error (e.g. a grammar the model's tokens broke) used to escape from admission and
    leave the request waiting forever; now that request gets an error and the others go on."""
    import torch

    from mistral_lm import sampling
    from mistral_lm.errors import GenerationError

    def make_picker(config, **_):
        calls = []

        def pick(logits, history, generator=None):
            calls.append(1)
            if config.seed == 13 or (config.seed == 14 and len(calls) == 2):  # admission / a decode step
                raise GenerationError("scripted failure")
            return torch.full((logits.shape[0],), 7)
        return pick

    monkeypatch.setattr(sampling, "make_picker", make_picker)
    client = _client(tool_server)
    messages = [{"role": "user", "content": "q"}]
    for seed in (13, 14):
        with pytest.raises(openai.InternalServerError, match="scripted failure"):
            client.chat.completions.create(model="tiny-v3", messages=messages, max_tokens=4, seed=seed)
    answer = client.chat.completions.create(model="tiny-v3", messages=messages, max_tokens=4, seed=1)
    assert answer.usage.completion_tokens == 4


BOUNDED = {"type": "function", "function": {"name": "set_mode", "parameters": {
    "type": "object", "properties": {"mode": {"enum": ["eco", "fast"]}, "level": {"type": "integer", "minimum": 0,
                                                                                 "maximum": 9}},
    "required": ["mode", "level"], "additionalProperties": False}}}


@pytest.mark.parametrize(("choice", "parallel"), [("required", None), ({"type": "function",
                                                                        "function": {"name": "set_mode"}}, False)])
def test_required_and_named_choices_are_enforced(tool_server, choice, parallel):
    """No script: the random model writes what the grammar allows, and that is always a call of the
    allowed tools with arguments valid for their schema (jsonschema checks), one when not parallel."""
    jsonschema = pytest.importorskip("jsonschema")
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    completed = 0
    for seed in range(3):
        answer = _client(tool_server).chat.completions.create(
            model="tiny-v3", messages=[{"role": "user", "content": "go"}], tools=[WEATHER, BOUNDED],
            tool_choice=choice, max_tokens=200, temperature=1.0, seed=seed, **extra)
        message = answer.choices[0].message
        if answer.choices[0].finish_reason == "length":  # get_weather's city is an unbounded string
            continue
        assert answer.choices[0].finish_reason == "tool_calls" and message.tool_calls, answer
        completed += 1
        if parallel is False:
            assert len(message.tool_calls) == 1
        for call in message.tool_calls:
            tool = {t["function"]["name"]: t for t in (WEATHER, BOUNDED)}[call.function.name]
            if isinstance(choice, dict):
                assert call.function.name == "set_mode"
            jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    assert completed or not isinstance(choice, dict)  # set_mode's arguments are bounded: it always ends

"""Tools for a model whose chat template has none (the JSON reply format of server/tools.py).

The test model is random: whatever it writes under the grammar must come back as valid calls
(arguments checked by jsonschema) or as an answer, through openai-python, and a history with the
calls and their results must render through the model's plain template.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from .test_server import (  # noqa: E402,F401  (fixtures: imported to be registered here)
    _one_intra_op_thread,
    client,
    engine,
    model,
    model_dir,
    server,
    tokenizer,
)

SET_MODE = {"type": "function", "function": {"name": "set_mode", "description": "Set the fan mode", "parameters": {
    "type": "object", "properties": {"mode": {"enum": ["eco", "fast"]}, "level": {"type": "integer", "minimum": 0,
                                                                                 "maximum": 9}},
    "required": ["mode", "level"], "additionalProperties": False}}}
LIGHT = {"type": "function", "function": {"name": "light", "parameters": {
    "type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"], "additionalProperties": False}}}
TOOLS = {t["function"]["name"]: t for t in (SET_MODE, LIGHT)}


def _ask(client: Any, **kwargs: Any) -> Any:
    kwargs.setdefault("messages", [{"role": "user", "content": "Make it quiet."}])
    kwargs.setdefault("max_tokens", 120)
    return client.chat.completions.create(model="tiny-mistral", tools=[SET_MODE, LIGHT], **kwargs)


def _check_calls(message: Any) -> None:
    for call in message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), TOOLS[call.function.name]["function"]["parameters"])
        assert call.type == "function" and call.id


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_auto_replies_are_calls_or_answers(client: Any, seed: int) -> None:
    choice = _ask(client, temperature=1.2, seed=seed).choices[0]
    if choice.finish_reason == "length":  # {"response": ...} is an unbounded string
        return
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        _check_calls(choice.message)
    else:
        assert choice.finish_reason == "stop" and isinstance(choice.message.content, str)


def test_named_choice_one_call_and_the_history_renders(client: Any) -> None:
    for seed in range(2):
        choice = _ask(client, temperature=1.0, seed=seed, tool_choice={"type": "function",
                                                                        "function": {"name": "light"}},
                      parallel_tool_calls=False).choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        assert choice.message.tool_calls[0].function.name == "light"
        _check_calls(choice.message)
    call = choice.message.tool_calls[0]
    history = [{"role": "user", "content": "Lights?"}, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "done"}]
    answer = _ask(client, messages=history, temperature=0, max_tokens=40, tool_choice="none").choices[0]
    assert answer.message.content is not None and not answer.message.tool_calls


def test_streamed_generic_call(client: Any) -> None:
    chunks = [c for c in _ask(client, temperature=0, tool_choice="required", stream=True) if c.choices]
    calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert chunks[-1].choices[0].finish_reason == "tool_calls" and calls
    assert not any(c.choices[0].delta.content for c in chunks)
    for fragment in calls:
        jsonschema.validate(json.loads(fragment.function.arguments),
                            TOOLS[fragment.function.name]["function"]["parameters"])

"""response_format through the server: json_object and json_schema replies always parse and validate.

The random test model writes whatever the grammar allows; the independent checks are `json.loads`,
the `jsonschema` validator and openai-python's own `.parse()` into a pydantic model.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pydantic = pytest.importorskip("pydantic")

from .test_grammar import assert_json_prefix  # noqa: E402
from .test_server import (  # noqa: E402,F401  (fixtures: imported to be registered here)
    _one_intra_op_thread,
    client,
    engine,
    model,
    model_dir,
    server,
    tokenizer,
)

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Tōkyō"]},
                                            "temp": {"type": "integer", "minimum": -50, "maximum": 50},
                                            "sunny": {"type": "boolean"}},
           "required": ["city", "temp", "sunny"], "additionalProperties": False}


class Weather(pydantic.BaseModel):
    city: Literal["Paris", "Rome"]
    temp: int
    sunny: bool
    tags: list[Literal["a", "b"]]


def _ask(client: Any, response_format: dict[str, Any], **kwargs: Any) -> Any:
    kwargs.setdefault("max_tokens", 60)
    return client.chat.completions.create(model="tiny-mistral", messages=[{"role": "user", "content": "Weather?"}],
                                          response_format=response_format, **kwargs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_replies_validate(client: Any, seed: int) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
    answer = _ask(client, fmt, temperature=1.3, seed=seed, n=2)
    for choice in answer.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), WEATHER)
    greedy = _ask(client, fmt, temperature=0)
    jsonschema.validate(json.loads(greedy.choices[0].message.content), WEATHER)


def test_json_object_and_streaming(client: Any) -> None:
    """A streamed schema reply parses once joined; json_object has no length bound, so a reply cut
    by max_tokens must at least be the start of a JSON object (OpenAI's finish_reason "length")."""
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}}
    chunks = [c for c in _ask(client, fmt, stream=True, temperature=0) if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), WEATHER)
    for seed in range(3):
        choice = _ask(client, {"type": "json_object"}, temperature=1.0, seed=seed, max_tokens=120).choices[0]
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert_json_prefix(choice.message.content)


def test_openai_parse_into_a_pydantic_model(client: Any) -> None:
    parsed = client.chat.completions.parse(model="tiny-mistral", messages=[{"role": "user", "content": "Weather?"}],
                                           response_format=Weather, max_tokens=80, temperature=0)
    assert isinstance(parsed.choices[0].message.parsed, Weather)


@pytest.mark.parametrize(("fmt", "param"), [
    ({"type": "xml"}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "maxLenght": 3}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": "yes"}},
     "response_format.json_schema.strict"),
])
def test_bad_response_formats_are_400s_and_the_next_request_is_served(client: Any, fmt: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _ask(client, fmt)
    assert info.value.body["param"].startswith(param), info.value.body
    assert _ask(client, {"type": "text"}, max_tokens=2).choices

"""Third-party clients against the server, used as their documentation shows: langchain-openai's
`with_structured_output` and `bind_tools`, instructor's TOOLS and JSON_SCHEMA modes.

The test model is random: the grammar (response_format, tool_choice) is what makes its replies fit,
and each client's own parsing into the pydantic model is the check.
"""

from __future__ import annotations

from typing import Any, Literal

import pytest

pytest.importorskip("fastapi")
pydantic = pytest.importorskip("pydantic")

from .test_server import (  # noqa: E402,F401  (fixtures: imported to be registered here)
    API_KEY,
    _one_intra_op_thread,
    engine,
    model,
    model_dir,
    server,
    tokenizer,
)


class Fan(pydantic.BaseModel):
    """Settings of the fan."""

    # closed: a random model under an open schema keeps adding keys until max_tokens
    model_config = pydantic.ConfigDict(extra="forbid")
    mode: Literal["eco", "fast"]
    level: int = pydantic.Field(ge=0, le=9)
    on: bool


def test_langchain_structured_output_and_tools(server: str) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    chat = langchain_openai.ChatOpenAI(base_url=server + "/v1", api_key=API_KEY, model="tiny-mistral",
                                       temperature=0, max_tokens=80, max_retries=0)
    fan = chat.with_structured_output(Fan).invoke("Set the fan to quiet.")  # method json_schema
    assert isinstance(fan, Fan)
    fan = chat.with_structured_output(Fan, method="function_calling").invoke("Set the fan to quiet.")
    assert isinstance(fan, Fan)
    message = chat.bind_tools([Fan], tool_choice="Fan").invoke("Set the fan to quiet.")
    assert message.tool_calls and {call["name"] for call in message.tool_calls} == {"Fan"}  # parallel calls allowed
    for call in message.tool_calls:
        Fan(**call["args"])


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor_modes(server: str, mode: str) -> None:
    instructor = pytest.importorskip("instructor")
    openai = pytest.importorskip("openai")
    client = instructor.from_openai(openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0),
                                    mode=getattr(instructor.Mode, mode))
    fan: Any = client.chat.completions.create(model="tiny-mistral", response_model=Fan, max_retries=0,
                                              max_tokens=80, temperature=0,
                                              messages=[{"role": "user", "content": "Set the fan to quiet."}])
    assert isinstance(fan, Fan)

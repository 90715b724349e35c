"""``parse_message``: the typed, validated result of ``parse()`` (no server needed)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

from servekit.client.structured import ParseError, parse_message, response_format_for
from servekit.client.types import ChatChoice, ChatCompletion, ChatMessage

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}},
          "required": ["n"]}


class Digit(BaseModel):
    n: int = Field(le=9)


def answer(content: str, finish: str = "stop") -> ChatCompletion:
    return ChatCompletion("id", "m", 0, (ChatChoice(0, ChatMessage("assistant", content),
                                                    finish),), None)


def test_a_valid_answer_is_the_typed_object() -> None:
    assert parse_message(answer('{"n": 3}'), Digit) == Digit(n=3)
    assert parse_message(answer('{"n": 3}'), SCHEMA) == {"n": 3}


@pytest.mark.parametrize(("content", "finish"), [
    ('{"n": 30}', "stop"),      # valid JSON, but not for the schema
    ('{"n": ', "stop"),         # not JSON
    ('{"n": 3', "length"),      # cut by max_tokens
    ("", "stop"),
])
@pytest.mark.parametrize("schema", [Digit, SCHEMA], ids=["pydantic", "dict"])
def test_an_invalid_answer_is_a_parse_error(content: str, finish: str, schema: object) -> None:
    with pytest.raises(ParseError):
        parse_message(answer(content, finish), schema)


def test_response_format_for_a_model_and_a_dict() -> None:
    fmt = response_format_for(Digit)
    assert fmt["json_schema"]["name"] == "Digit" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"] == Digit.model_json_schema()
    assert response_format_for(SCHEMA, name="d")["json_schema"] == {
        "name": "d", "schema": SCHEMA, "strict": True}
    with pytest.raises(TypeError):
        response_format_for(42)

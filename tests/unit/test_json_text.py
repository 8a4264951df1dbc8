"""The control plane's one reader of JSON a client sends in a text field (`controlplane/json_text.py`): what
json reads and JSON is not (NaN, infinity) and what json cannot read (nesting past its recursion) are invalid
input naming the field, like any text that is no JSON. Escalation answers took NaN until every reader shared it."""

from __future__ import annotations

import pytest

from hivemesh.controlplane import json_text
from hivemesh.controlplane.escalations import _check_json
from hivemesh.mesh.errors import InvalidInputError


@pytest.mark.parametrize(("text", "says"), [
    ("NaN", "NaN is not JSON"),
    ('{"a": [1, Infinity]}', "Infinity is not JSON"),
    ("-Infinity", "-Infinity is not JSON"),
    ("{nope", "not valid JSON: Expecting property name"),
    ("[" * 1500 + "]" * 1500, "nested too deeply"),
])
def test_what_is_not_json_is_invalid_input_naming_the_field(text: str, says: str) -> None:
    with pytest.raises(InvalidInputError, match=f"^value_json: .*{says}") as refused:
        json_text.load(text, "value_json")
    assert says in refused.value.field_violations["value_json"]


def test_json_reads_as_json_reads_it() -> None:
    assert json_text.load('{"a": [1, 2.5, "x", null, true]}', "f") == {"a": [1, 2.5, "x", None, True]}
    assert json_text.load(b'"NaN"', "f") == "NaN"  # the word in a string is only text


def test_an_escalation_answer_holding_nan_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="answer_json: not valid JSON: NaN is not JSON"):
        _check_json('{"approved_amount": NaN}', "answer_json")

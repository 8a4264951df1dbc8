"""The output contract on relayed bytes (`OutputCheck.check_response`, the sidecar's packaging): decoded as json
reads them, whatever the parser under it, and refused with INVALID_OUTPUT and the field path when they break the
declared schema. The SDK's packaging and the audit of refusals are tested end to end in
tests/integration/test_contracts.py."""

from __future__ import annotations

import json

import pytest

from hivemesh.mesh.errors import InvalidOutputError
from hivemesh.mesh.output_check import OutputCheck
from hivemesh.v1 import agent_pb2

_SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string"}, "count": {"type": "integer"}, "ratio": {"type": "number"}},
    "required": ["text"],
    "additionalProperties": False,
}


def _check() -> OutputCheck:
    return OutputCheck([agent_pb2.Capability(name="echo", output_schema=json.dumps(_SCHEMA))])


def _answer(output: bytes, content_type: str = "application/json") -> bytes:
    return agent_pb2.InvokeResponse(output=output, content_type=content_type).SerializeToString()


@pytest.mark.parametrize("output", [
    b'{"text":"' + b"x" * 65536 + b'"}',
    b'{"text":"a","count":' + str(2**70).encode() + b"}",  # an integer beyond 64 bits stays an integer
    b'{"text":"a","count":-9223372036854775809}',
    b'{"text":"\\u00e9\\ud83d\\ude00","ratio":0.1}',  # escapes, a surrogate pair, a float
    b'{"text":"a","count":1.0}',  # JSON Schema counts 1.0 as an integer
    b' {"text" : "a"} ',
])
def test_answers_json_reads_as_matching_pass(output: bytes) -> None:
    json.loads(output)  # the reading the contract is held to
    _check().check_response("echo", _answer(output))


@pytest.mark.parametrize(("output", "field"), [
    (b'{"text":"a","count":1.5}', "output.count"),
    (b'{"text":"a","ratio":1e400}', "output.ratio"),  # json reads inf, and NaN: neither is a JSON number
    (b'{"text":"a","ratio":NaN}', "output.ratio"),
    (b'{"text":"a","count":"1"}', "output.count"),
    (b'{"count":1}', "output"),
    (b'{"text":"a","extra":' + b"[" * 300 + b"]" * 300 + b"}", "output"),  # deep: read by json, then refused
])
def test_answers_breaking_the_schema_are_invalid_output_with_the_field(output: bytes, field: str) -> None:
    with pytest.raises(InvalidOutputError) as info:
        _check().check_response("echo", _answer(output))
    assert info.value.reason == "INVALID_OUTPUT"
    assert list(info.value.field_violations) == [field]


@pytest.mark.parametrize("output", [b'{"text":', b'{"text":"a"}x', b"\xff\xfe", b'{"text":"\xc3"}', b"[" * 5000])
def test_an_answer_that_is_not_json_is_invalid_output(output: bytes) -> None:
    with pytest.raises(InvalidOutputError) as info:
        _check().check_response("echo", _answer(output))
    assert info.value.reason == "INVALID_OUTPUT" and "not valid JSON" in info.value.message


def test_what_is_not_checked_passes_undecoded() -> None:
    check = _check()
    check.check_response("echo", _answer(b"not json at all", "text/plain"))  # another content type
    check.check_response("other", _answer(b"not json at all"))  # no schema declared
    check.check_response("echo", agent_pb2.InvokeResponse(
        output=b"{", state=agent_pb2.TASK_STATE_INPUT_REQUIRED).SerializeToString())  # a question, not the answer
    with pytest.raises(InvalidOutputError, match="not an InvokeResponse"):
        check.check_response("echo", b"\xff\xff\xff")

"""A batch's answer is built item by item: one peer's unreadable answer fails that item, not the whole batch (the
batch had answered UNKNOWN, every other item's answer lost)."""

from __future__ import annotations

from hivemesh.mesh import batch
from hivemesh.mesh.errors import AgentUnavailableError
from hivemesh.v1 import agent_pb2


def test_an_item_whose_answer_does_not_decode_fails_alone() -> None:
    good = agent_pb2.InvokeResponse(output=b'"ok"', content_type="application/json").SerializeToString()
    not_utf8 = b"\x12\x02\xff\xfe"  # content_type (a string) holding bytes that are not UTF-8
    out = batch.response([good, not_utf8, AgentUnavailableError("gone"), b"\xff"])
    assert out.failed == 3
    assert out.results[0].response.output == b'"ok"'
    assert [r.error.reason for r in out.results[1:]] == ["INVALID_OUTPUT", "AGENT_UNAVAILABLE", "INVALID_OUTPUT"]
    assert [r.index for r in out.results] == [0, 1, 2, 3]

"""A peer's answer that does not decode fails its own call only: an item of a batch (the batch had answered
UNKNOWN, every other item's answer lost) or a held call (GetQueued and ListQueued had answered UNKNOWN)."""

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


def test_a_held_call_whose_stored_answer_does_not_decode_reads_as_failed() -> None:
    """GetQueued and ListQueued read every held call: one peer's unreadable answer made them UNKNOWN for good."""
    from hivemesh.mesh.queue import DONE, HeldCall
    from hivemesh.mesh.queue_rpc import held_message

    good = agent_pb2.InvokeResponse(output=b'"ok"').SerializeToString()
    read = held_message(HeldCall("q-0000000000000001", "echo", DONE, 1, 2, response=good))
    assert read.state == "done" and read.response.output == b'"ok"'
    bad = held_message(HeldCall("q-0000000000000002", "echo", DONE, 1, 2, response=b"\x12\x02\xff\xfe"))
    assert bad.state == "failed" and bad.error.reason == "INVALID_OUTPUT" and not bad.HasField("response")

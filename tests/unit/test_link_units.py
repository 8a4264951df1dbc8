"""The link's pieces that need no network: the switch, a frame call's status and deadline, answer frames."""

from __future__ import annotations

import grpc
import pytest

from hivemesh.mesh.errors import RateLimitedError, from_status_parts, to_status
from hivemesh.mesh.link_context import FrameAborted, FrameContext, status_code
from hivemesh.mesh.link_server import answer_frame
from hivemesh.mesh.link_wire import pack, read
from hivemesh.mesh.outbound.link import LINK_ENV, LinkUnsupportedError, link_enabled, stream_failure


def test_link_is_on_by_default_and_a_bad_switch_says_what_to_write(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LINK_ENV, raising=False)
    assert link_enabled(None) is True and link_enabled(False) is False
    for raw, on in (("1", True), ("on", True), ("TRUE", True), ("0", False), ("off", False), ("", True)):
        monkeypatch.setenv(LINK_ENV, raw)
        assert link_enabled(None) is on, raw
        assert link_enabled(False) is False and link_enabled(True) is True  # an explicit setting wins
    monkeypatch.setenv(LINK_ENV, "sometimes")
    with pytest.raises(ValueError, match="HIVEMESH_LINK must be"):
        link_enabled(None)


def test_status_codes_round_trip_by_number() -> None:
    for code in grpc.StatusCode:
        assert status_code(code.value[0]) is code
    assert status_code(999) is grpc.StatusCode.UNKNOWN


async def test_a_frame_calls_abort_ends_that_call_with_its_status_and_deadline() -> None:
    ctx = FrameContext(None, [("authorization", "Bearer t"), ("traceparent", "00-x")], 0)  # type: ignore[arg-type]
    assert ctx.time_remaining() is None and ctx.code() is grpc.StatusCode.OK
    assert list(ctx.invocation_metadata() or ()) == [("authorization", "Bearer t"), ("traceparent", "00-x")]
    with pytest.raises(FrameAborted) as aborted:
        await ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing", (("k", "v"),))
    assert (aborted.value.code, aborted.value.details, aborted.value.trailing) == (
        grpc.StatusCode.NOT_FOUND, "no such thing", (("k", "v"),))
    assert ctx.code() is grpc.StatusCode.NOT_FOUND  # what the inbound interceptor records as the final code
    # The link's auth context, given once, is every call's: the stream (None here) is not asked again.
    auth = {"x509_pem_cert": [b"pem"]}
    assert FrameContext(None, [], 0, auth).auth_context() is auth  # type: ignore[arg-type]
    timed = FrameContext(None, [], 2.0)  # type: ignore[arg-type]
    remaining = timed.time_remaining()
    assert remaining is not None and 1.5 < remaining <= 2.0


def test_an_answer_frame_carries_the_rich_status_the_caller_rebuilds() -> None:
    err = RateLimitedError("slow down", retry_after_s=1.5, metadata={"capability": "echo"})
    status = to_status(err)
    [answer] = read(pack([answer_frame(7, status.code, status.details, status.trailing_metadata)]))
    assert answer.id == 7 and answer.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert [(k, type(v)) for k, v in answer.trailing if k.endswith("-bin")] == [
        ("grpc-status-details-bin", bytes)]  # bytes stay bytes
    back = from_status_parts(status_code(answer.code), answer.message, answer.trailing)
    assert (type(back), back.reason, back.message, back.retry_after_s, back.metadata) == (
        RateLimitedError, err.reason, "slow down", 1.5, {"capability": "echo"})


def test_a_link_stream_that_breaks_fails_its_calls_as_a_broken_connection_fails_unary_ones() -> None:
    """gRPC's asyncio stream reports a connection killed under a write as INTERNAL "Internal error from Core";
    CI saw 6 calls fail that way when a replica was SIGKILLed, where unary calls would have been retried."""

    def failed(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)

    error = stream_failure(failed(grpc.StatusCode.INTERNAL, "Internal error from Core"))
    assert isinstance(error, grpc.aio.AioRpcError)
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert "INTERNAL: Internal error from Core" in (error.details() or "")
    assert isinstance(stream_failure(failed(grpc.StatusCode.UNIMPLEMENTED, "")), LinkUnsupportedError)
    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.PERMISSION_DENIED,
                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED):
        refused = failed(code, "as sent")
        assert stream_failure(refused) is refused, code  # passed on unchanged (UNKNOWN: a crashed handler)

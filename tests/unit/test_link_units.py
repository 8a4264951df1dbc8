"""The link's pieces that need no network: the switch, a frame call's status and deadline, answer frames."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from hivemesh.mesh.errors import RateLimitedError, from_status_parts, to_status
from hivemesh.mesh.link_context import FrameAborted, FrameContext, status_code
from hivemesh.mesh.link_listener import DIRECT_ENV, DIRECT_PORT_ENV, direct_enabled, direct_port
from hivemesh.mesh.link_server import answer_frame
from hivemesh.mesh.link_wire import pack, read
from hivemesh.mesh.outbound.link import LINK_ENV, LinkUnsupportedError, link_enabled, stream_failure


@pytest.mark.parametrize("env, switch", [(LINK_ENV, link_enabled), (DIRECT_ENV, direct_enabled)])
def test_links_and_direct_links_are_on_by_default_and_a_bad_switch_says_what_to_write(
    monkeypatch: pytest.MonkeyPatch, env: str, switch: Callable[[bool | None], bool],
) -> None:
    monkeypatch.delenv(env, raising=False)
    assert switch(None) is True and switch(False) is False
    for raw, on in (("1", True), ("on", True), ("TRUE", True), ("0", False), ("off", False), ("", True)):
        monkeypatch.setenv(env, raw)
        assert switch(None) is on, raw
        assert switch(False) is False and switch(True) is True  # an explicit setting wins
    monkeypatch.setenv(env, "sometimes")
    with pytest.raises(ValueError, match=f"{env} must be"):
        switch(None)


def test_a_direct_link_port_is_a_port_number(monkeypatch: pytest.MonkeyPatch) -> None:
    assert direct_port({}) == 0 and direct_port({DIRECT_PORT_ENV: " 7445 "}) == 7445
    for bad in ("-1", "65536", "seven", "7445.0"):
        with pytest.raises(ValueError, match=f"{DIRECT_PORT_ENV} must be a port number"):
            direct_port({DIRECT_PORT_ENV: bad})


def test_status_codes_round_trip_by_number() -> None:
    for code in grpc.StatusCode:
        assert status_code(code.value[0]) is code
    assert status_code(999) is grpc.StatusCode.UNKNOWN


async def test_a_frame_calls_abort_ends_that_call_with_its_status_and_deadline() -> None:
    ctx = FrameContext(None, [("authorization", "Bearer t"), ("traceparent", "00-x")], 0)  # type: ignore[arg-type]
    assert ctx.time_remaining() is None and ctx.code() is None  # as grpc.aio's own context: none set yet
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


def test_a_frame_call_that_failed_with_no_code_set_is_recorded_unknown_not_ok() -> None:
    """The chain records a failed call's code from its context: a frame's context said OK when nothing had set
    one, so a handler's unexpected exception was audited as a success the caller never got."""
    from hivemesh.mesh.rpcwrap import outcome_code

    context = FrameContext(None, (), 0.0, {})  # type: ignore[arg-type]  # the stream is not read here
    assert context.code() is None
    assert outcome_code(context, RuntimeError("a bug")) is grpc.StatusCode.UNKNOWN
    assert outcome_code(context, None) is grpc.StatusCode.OK
    context.set_code(grpc.StatusCode.NOT_FOUND)
    assert outcome_code(context, RuntimeError("refused")) is grpc.StatusCode.NOT_FOUND


def test_corrupt_status_details_from_a_peer_leave_the_code_and_message() -> None:
    """An agent's (or anyone's) trailers are foreign bytes: details that do not parse raised DecodeError in the
    caller, past its retry and audit, instead of the error the code and message still describe."""
    from google.protobuf import any_pb2
    from google.rpc import status_pb2

    corrupt_detail = any_pb2.Any(type_url="type.googleapis.com/google.rpc.ErrorInfo", value=b"\xff\xff")
    for trailer in (b"\xff\xff\xff", status_pb2.Status(code=3, details=[corrupt_detail]).SerializeToString()):
        err = from_status_parts(grpc.StatusCode.INVALID_ARGUMENT, "nope", [("grpc-status-details-bin", trailer)])
        assert (err.code, err.message, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "nope", "INVALID_INPUT")
    status = to_status(RateLimitedError("slow down", retry_after_s=2))  # readable details still read
    assert from_status_parts(status.code, status.details, status.trailing_metadata).retry_after_s == 2


def test_a_status_quoting_a_lone_surrogate_from_the_input_goes_out_escaped() -> None:
    """A refusal may quote the caller's JSON (a key that is a lone surrogate): gRPC statuses and protobuf strings
    are UTF-8, so building the status raised UnicodeEncodeError and the caller got UNKNOWN."""
    from hivemesh.mesh.errors import ContentRefusedError

    err = ContentRefusedError("input field input.\udc80 was refused", field_violations={"input.\udc80": "no"})
    status = to_status(err)
    assert status.details == "input field input.\\udc80 was refused"
    back = from_status_parts(status.code, status.details, status.trailing_metadata)
    assert back.reason == "CONTENT_REFUSED" and back.field_violations == {"input.\\udc80": "no"}


def test_a_status_quoting_a_huge_input_is_bounded_and_keeps_its_code() -> None:
    """A refusal quoting 20,000 characters of the caller's input (a name, an id, a filter) went out whole, twice
    (message and details): past gRPC's 16 KiB trailer bound, the caller got RESOURCE_EXHAUSTED instead."""
    from hivemesh.mesh.errors import MAX_DETAIL_BYTES, MAX_MESSAGE_BYTES, InvalidInputError

    huge = "é" * 20_000
    err = InvalidInputError(f"bad name {huge!r}", field_violations={f"f{i}": huge for i in range(50)},
                            metadata={f"k{i}": huge for i in range(50)})
    status = to_status(err)
    assert len(status.details.encode()) <= MAX_MESSAGE_BYTES and status.details.startswith("bad name 'éé")
    assert status.details.endswith("…")
    assert sum(len(k) + len(v) for k, v in status.trailing_metadata) < 8 * 1024
    back = from_status_parts(status.code, status.details, status.trailing_metadata)
    assert back.code == grpc.StatusCode.INVALID_ARGUMENT and back.reason == "INVALID_INPUT"
    assert 0 < len(back.field_violations) < 50
    assert all(len(d.encode()) <= MAX_DETAIL_BYTES for d in back.field_violations.values())
    assert to_status(InvalidInputError("short")).details == "short"

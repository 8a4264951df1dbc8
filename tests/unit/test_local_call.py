"""The sidecar's one-pass read of a local caller's metadata, and the hand-written call-chain suffix it appends to
an agent's onward request (protobuf must merge it into the request exactly as if the chain had been set)."""

from __future__ import annotations

import pytest

from hivemesh.mesh.local_call import CALL_HANDLE_KEY, read_local_metadata
from hivemesh.mesh.wire import chain_suffix
from hivemesh.v1 import agent_pb2

ME = "spiffe://hivemesh.local/agent/caller"


def test_read_local_metadata_finds_handles_and_trace_headers_in_one_pass() -> None:
    handles, trace = read_local_metadata([
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ("authorization", "Bearer not-passed-on"),
        (CALL_HANDLE_KEY, "h1"),
        ("tracestate", "vendor=1"),
        ("x-other", "dropped"),
        (CALL_HANDLE_KEY, b"h2"),  # returned as sent: the sidecar refuses a second (or a bytes) handle
        ("traceparent-bin", b"\x00"),
    ])
    assert handles == ["h1", b"h2"]
    assert trace == (("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                     ("tracestate", "vendor=1"))


@pytest.mark.parametrize("metadata", [None, (), [("x-other", "1")]])
def test_read_local_metadata_without_handle_or_trace(metadata: list[tuple[str, str]] | None) -> None:
    assert read_local_metadata(metadata) == ([], ())


def test_read_local_metadata_passes_only_text_trace_headers() -> None:
    assert read_local_metadata([("traceparent", b"bytes")]) == ([], ())


GOOD = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize("parent", [
    "zz",
    "",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",  # version 00 has exactly four fields
    "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # version ff is invalid
    "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # an all-zero trace id
    "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # an all-zero parent id
    "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",  # upper case
    "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",  # a short trace id
])
def test_an_invalid_traceparent_is_dropped_with_its_tracestate(parent: str) -> None:
    """W3C Trace Context: a receiver ignores a traceparent it cannot parse, and the tracestate with it, and starts
    a new trace. The sidecar passed "zz" on to the agent as its parent."""
    assert read_local_metadata([("traceparent", parent), ("tracestate", "vendor=1"), (CALL_HANDLE_KEY, "h")]) == (
        ["h"], ())


def test_two_traceparents_or_a_tracestate_alone_are_not_passed_on() -> None:
    assert read_local_metadata([("traceparent", GOOD), ("traceparent", GOOD)]) == ([], ())
    assert read_local_metadata([("tracestate", "vendor=1")]) == ([], ())


def test_a_later_version_may_carry_more_fields() -> None:
    later = "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-comes-next"
    assert read_local_metadata([("traceparent", later)]) == ([], (("traceparent", later),))


@pytest.mark.parametrize("existing", [[], ["spiffe://hivemesh.local/agent/a"]])
@pytest.mark.parametrize("added", [[ME], ["spiffe://hivemesh.local/agent/" + "b" * 200, ME]])
def test_chain_suffix_merges_into_the_request(existing: list[str], added: list[str]) -> None:
    req = agent_pb2.InvokeRequest(
        capability="echo", input=b'{"text": "hi"}', content_type="application/json",
        context=agent_pb2.CallContext(call_id="c1", idempotency_key="k", chain=existing), queue_for_ms=5,
    )
    raw = req.SerializeToString()
    merged = agent_pb2.InvokeRequest.FromString(raw + chain_suffix(added))
    want = agent_pb2.InvokeRequest()
    want.CopyFrom(req)
    want.context.chain.extend(added)
    assert merged == want
    assert list(merged.context.chain) == [*existing, *added]
    # The same bytes protobuf itself writes for a request holding only that chain.
    assert chain_suffix(added) == agent_pb2.InvokeRequest(
        context=agent_pb2.CallContext(chain=added)).SerializeToString()


def test_chain_suffix_on_a_request_without_context() -> None:
    raw = agent_pb2.InvokeRequest(capability="echo").SerializeToString()
    merged = agent_pb2.InvokeRequest.FromString(raw + chain_suffix([ME]))
    assert merged.capability == "echo" and list(merged.context.chain) == [ME]
    assert merged.context.call_id == ""

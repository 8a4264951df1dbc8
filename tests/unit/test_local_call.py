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

"""The onward request a sidecar sends for its agent carries ONE `InvokeRequest.context` field.

The call chain used to go on as a second, appended context: Google's protobuf merges the two, but protobufjs
(grpc-js agents) keeps only the last occurrence of a singular message field, so a Node agent behind the callee's
sidecar saw the chain and lost the caller's idempotency key, call id and ids. Read here as such a decoder reads:
the top-level fields by hand, the last context field alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from hivemesh.mesh.invoke_wire import BY_HAND
from hivemesh.mesh.settings import MeshSettings
from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
from hivemesh.mesh.wire import chain_entries, chain_suffix, with_context
from hivemesh.v1 import agent_pb2
from tests.support.wire_fields import CONTEXT, the_context, top_level

ME = "spiffe://hivemesh.local/agent/plain"
EARLIER = "spiffe://hivemesh.local/agent/first"


def _sidecar() -> Sidecar:
    """A sidecar not started: its chain bytes set as `_bind_mesh` sets them for identity ME."""
    sidecar = Sidecar(SidecarConfig(agent="127.0.0.1:7001"), MeshSettings(
        etcd="127.0.0.1:2379", controlplane="127.0.0.1:1", join="127.0.0.1:2", ca_bundle=Path("ca.pem"),
        trust_domain="hivemesh.local"))
    sidecar._own_chain = chain_suffix([ME])
    sidecar._own_entry = chain_entries([ME])
    return sidecar


def _request(size: int, context: agent_pb2.CallContext | None) -> agent_pb2.InvokeRequest:
    return agent_pb2.InvokeRequest(capability="echo", input=b"x" * size, content_type="application/json",
                                   context=context, metadata={"k": "v"}, queue_for_ms=5)


@pytest.mark.parametrize("size", [16, BY_HAND + 100])
@pytest.mark.parametrize("chain", [[], [EARLIER]])
def test_a_callers_context_and_the_chain_go_on_as_one_context_field(size: int, chain: list[str]) -> None:
    caller = agent_pb2.CallContext(call_id="c2", idempotency_key="k2", conversation_id="conv", workflow_id="wf",
                                   parent_call_id="p1", priority=3, chain=chain)
    req = _request(size, caller)
    request = req.SerializeToString()
    onward = _sidecar()._onward(request, req, None)
    want = agent_pb2.CallContext()
    want.CopyFrom(caller)
    want.chain.append(ME)
    assert the_context(onward) == want
    # Everything else is the caller's bytes: the payload field as it came, the other fields as they were.
    assert [f for f in top_level(onward) if f[0] != CONTEXT] == [f for f in top_level(request) if f[0] != CONTEXT]
    assert req == _request(size, caller)  # the decoded request handed on is not changed


def test_two_context_fields_from_the_caller_become_one_holding_their_merge() -> None:
    """A hand-built request may carry the context in pieces; protobuf merges them, and so does the one sent on."""
    request = (_request(16, agent_pb2.CallContext(idempotency_key="k2")).SerializeToString()
               + agent_pb2.InvokeRequest(context=agent_pb2.CallContext(call_id="c2")).SerializeToString())
    req = agent_pb2.InvokeRequest.FromString(request)
    onward = _sidecar()._onward(request, req, None)
    assert the_context(onward) == agent_pb2.CallContext(idempotency_key="k2", call_id="c2", chain=[ME])
    assert agent_pb2.InvokeRequest.FromString(onward).input == b"x" * 16


def test_a_context_field_the_mesh_does_not_know_is_kept() -> None:
    """A newer caller's CallContext field (number 99 here) reaches the agent, as the merge passed it on."""
    unknown = b"\x9a\x06\x03new"  # field 99, length-delimited, "new"
    context = agent_pb2.CallContext(idempotency_key="k2").SerializeToString() + unknown
    request = _request(16, None).SerializeToString() + bytes((0x22, len(context))) + context
    req = agent_pb2.InvokeRequest.FromString(request)
    contexts = [v for n, v in top_level(_sidecar()._onward(request, req, None)) if n == CONTEXT]
    assert len(contexts) == 1 and unknown in contexts[0]


def test_a_request_without_context_keeps_the_cheap_append() -> None:
    """The common case (no context of the caller's): the chain appended as bytes, the request's only context."""
    req = _request(BY_HAND + 100, None)
    request = req.SerializeToString()
    onward = _sidecar()._onward(request, req, None)
    assert onward == request + chain_suffix([ME])
    assert the_context(onward) == agent_pb2.CallContext(chain=[ME])


def test_a_request_protobuf_must_re_encode_still_gets_one_context() -> None:
    """A field not walked by hand (an unknown group) leaves the splice to protobuf: one context all the same."""
    req = _request(16, agent_pb2.CallContext(idempotency_key="k2", call_id="c2"))
    request = req.SerializeToString() + b"\xa3\x06\x08\x01\xa4\x06"  # group 100 holding a varint
    onward = with_context(request, agent_pb2.InvokeRequest.FromString(request).context.SerializeToString()
                          + chain_entries([ME]))
    merged = agent_pb2.InvokeRequest.FromString(onward)
    assert merged.context == agent_pb2.CallContext(idempotency_key="k2", call_id="c2", chain=[ME])
    assert onward.count(b"\xa3\x06") == 1  # the unknown group is kept
    tail = onward[onward.rindex(b"\xa4\x06") + 2:]
    assert [n for n, _ in top_level(tail)] == [CONTEXT]
    assert sum(1 for n, _ in top_level(onward[:onward.index(b"\xa3\x06")]) if n == CONTEXT) == 0

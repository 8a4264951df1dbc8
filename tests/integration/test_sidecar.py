"""A plain gRPC agent (generated stubs only, plaintext on loopback) behind a real `Sidecar`, called over the
real mesh: mutual TLS, control-plane tokens, the etcd registry. Covers what the sidecar adds (its hop, the
caller's identity), what it must not leak (the token), what it must not touch (payload bytes, the agent's own
errors, the deadline), and its outbound `Mesh` service for agents in other languages."""

from __future__ import annotations

import asyncio
import json
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from hivemesh.mesh.invoke_wire import BY_HAND
from hivemesh.mesh.outbound import encode_request
from hivemesh.mesh.pki import parse_spiffe_id
from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
from hivemesh.mesh.tls import secure_channel
from hivemesh.mesh.wire import hop_suffix
from hivemesh.sdk import AgentError, AgentServer, DeadlineExceededError, HivemeshError, MeshClient
from hivemesh.v1 import agent_pb2, agent_pb2_grpc, mesh_pb2, mesh_pb2_grpc
from tests.support.agents_for_tests import EchoAgent
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv
from tests.support.plain_agent import FAIL_MESSAGE, FAIL_TRAILER, PlainAgent

TESTER = f"spiffe://{TRUST_DOMAIN}/client/tester"
PLAIN = f"spiffe://{TRUST_DOMAIN}/agent/plain"


@dataclass
class Rig:
    plain: PlainAgent
    sidecar: Sidecar
    sdk: AgentServer
    sdk_agent: EchoAgent
    mesh: MeshClient

    def sidecar_hop(self) -> agent_pb2.Hop:
        return agent_pb2.Hop(
            kind="sidecar", identity=PLAIN, instance=self.sidecar.instance_id, endpoint=self.sidecar.endpoint
        )


@pytest.fixture(params=["unary", "link"])
async def rig(mesh_env: MeshEnv, request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    """Every test runs twice: the agent serves only unary Invoke (the sidecar falls back to it), and the agent
    also serves Agent.Link (the sidecar sends each call as a frame); what reaches the caller must not differ."""
    plain = PlainAgent("plain", prefix="plain-", link=request.param == "link")
    sdk_agent = EchoAgent("sdk")
    async with plain:
        sidecar = Sidecar(SidecarConfig(agent=plain.endpoint), await mesh_env.settings_for("plain"))
        async with sidecar, AgentServer(sdk_agent, await mesh_env.settings_for("echo")) as sdk:
            tester = await mesh_env.settings_for("tester", "client")
            async with MeshClient.connect(name="tester", settings=tester) as mesh:
                for name in ("plain-echo", "echo"):
                    assert await mesh.node.registry.wait_for_capability(name, 1, timeout=10)
                    assert sidecar.node is not None
                    assert await sidecar.node.registry.wait_for_capability(name, 1, timeout=10)
                yield Rig(plain, sidecar, sdk, sdk_agent, mesh)


def _reason(exc: grpc.aio.AioRpcError) -> str | None:
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return str(info.reason)
    return None


async def test_describe_through_the_mesh_returns_the_agents_card(rig: Rig) -> None:
    workload = rig.mesh.node.workload
    channel = secure_channel(
        rig.sidecar.endpoint, workload.channel_credentials(), server_name=parse_spiffe_id(PLAIN).dns_name
    )
    async with channel:
        card = await agent_pb2_grpc.AgentStub(channel).Describe(agent_pb2.DescribeRequest(), timeout=10)
    assert card == rig.plain.card()
    [instance] = rig.mesh.node.registry.instances("plain-echo")
    assert instance.card == rig.plain.card()
    assert (instance.packaging, instance.identity, instance.endpoint) == ("sidecar", PLAIN, rig.sidecar.endpoint)


async def test_invoke_appends_the_sidecar_hop_without_re_encoding(rig: Rig) -> None:
    result = await rig.mesh.call_detailed("plain-echo", {"text": "hi"}, timeout=10)
    assert result.output == {"text": "hi", "caller": TESTER}
    assert [h.kind for h in result.hops] == ["sidecar"]
    assert result.hops[0] == rig.sidecar_hop()
    assert result.instance.instance_id == rig.sidecar.instance_id

    # Byte for byte: what the caller received is exactly what the agent sent, plus the hop's wire suffix.
    raw, _ = await rig.mesh.node.outbound.invoke(
        encode_request("plain-echo", b'{ "text" :  "spacing kept" }'), capability="plain-echo", idempotency_key="",
        timeout=10,
    )
    sent = rig.plain.sent[-1]
    assert raw == sent + hop_suffix(rig.sidecar_hop())
    assert agent_pb2.InvokeResponse.FromString(raw).output == agent_pb2.InvokeResponse.FromString(sent).output


async def test_a_large_request_reaches_the_agent_behind_the_sidecar_whole(rig: Rig) -> None:
    """A large call's request is read as a view of the frame that carried it (`link_wire`); the sidecar's
    forwarder relays it as bytes, and the agent behind gets exactly what the caller sent."""
    big = "z" * (BY_HAND + 4096)
    result = await rig.mesh.call_detailed("plain-echo", {"text": big}, timeout=10)
    assert result.output == {"text": big, "caller": TESTER}
    assert (await rig.mesh.call("echo", {"text": big}, timeout=10))["text"] == big  # and an SDK agent's


async def test_an_answer_over_grpcs_default_4_mib_passes_up_to_the_mesh_limit(mesh_env: MeshEnv) -> None:
    """gRPC refuses to receive messages over 4 MiB by default; the mesh takes up to MAX_MESSAGE_BYTES (8 MiB) on
    every hop, the sidecar's own channel to its agent included (an agent's 5 MiB answer was refused there)."""
    plain = PlainAgent("plain", prefix="plain-")
    async with plain, Sidecar(SidecarConfig(agent=plain.endpoint, max_input_bytes=6 << 20),
                              await mesh_env.settings_for("plain")), \
            MeshClient.connect(name="tester", settings=await mesh_env.settings_for("tester", "client")) as mesh:
        assert await mesh.node.registry.wait_for_capability("plain-echo", 1, timeout=10)
        text = "z" * (5 << 20)
        result = await mesh.call_detailed("plain-echo", {"text": text}, timeout=60)
        assert result.output["text"] == text and len(plain.sent[-1]) > 5 << 20
        assert plain.calls == 1


async def test_streaming_final_chunk_carries_the_hop(rig: Rig) -> None:
    words = [w async for w in rig.mesh.stream("plain-shout", {"text": "a b c"}, timeout=10)]
    assert words == ["A", "B", "C"]

    before = len(rig.plain.sent)
    chunks = [
        raw
        async for raw, _ in rig.mesh.node.outbound.invoke_stream(
            encode_request("plain-shout", b'{"text": "x y"}'), capability="plain-shout", timeout=10
        )
    ]
    sent = rig.plain.sent[before:]
    assert len(chunks) == len(sent) == 3
    assert chunks[:-1] == sent[:-1]  # data chunks forwarded untouched
    assert chunks[-1] == sent[-1] + hop_suffix(rig.sidecar_hop())
    final = agent_pb2.InvokeChunk.FromString(chunks[-1])
    assert final.final and [h.kind for h in final.hops] == ["sidecar"]
    assert all(not agent_pb2.InvokeChunk.FromString(c).hops for c in chunks[:-1])


async def test_agent_sees_the_caller_never_the_token(rig: Rig) -> None:
    await rig.mesh.call("plain-echo", {"text": "hi"}, timeout=10)
    md = rig.plain.metadata[-1]
    keys = [k for k, _ in md]
    assert "authorization" not in keys
    assert [v for k, v in md if k == "x-hivemesh-caller"] == [TESTER]


async def test_caller_cannot_spoof_the_caller_header(rig: Rig) -> None:
    forged = [("x-hivemesh-caller", f"spiffe://{TRUST_DOMAIN}/operator/admin")]
    raw, _ = await rig.mesh.node.outbound.invoke(
        encode_request("plain-echo", b'{"text": "hi"}'), capability="plain-echo", idempotency_key="",
        timeout=10, metadata=forged,
    )
    out = json.loads(agent_pb2.InvokeResponse.FromString(raw).output)
    assert out["caller"] == TESTER
    assert [v for k, v in rig.plain.metadata[-1] if k == "x-hivemesh-caller"] == [TESTER]


async def test_agent_error_status_reaches_the_caller_unchanged(rig: Rig) -> None:
    with pytest.raises(AgentError) as typed:  # the agent's own refusal (no hivemesh reason): AGENT_ERROR, its code
        await rig.mesh.call("plain-fail", {"text": "bad"}, timeout=10)
    assert (typed.value.code, typed.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "AGENT_ERROR")
    assert typed.value.message == FAIL_MESSAGE
    assert rig.plain.calls == 1  # it was the agent's refusal, not the mesh's

    # On the wire: the agent's own code, message and trailing metadata, passed through, with the ErrorInfo that
    # says the agent decided (AGENT_ERROR: it sent no hivemesh reason of its own).
    workload = rig.mesh.node.workload
    token = await rig.mesh.node.outbound.tokens.get(PLAIN, "plain-fail")
    channel = secure_channel(
        rig.sidecar.endpoint, workload.channel_credentials(), server_name=parse_spiffe_id(PLAIN).dns_name
    )
    async with channel:
        invoke = channel.unary_unary("/hivemesh.v1.Agent/Invoke")
        with pytest.raises(grpc.aio.AioRpcError) as raw:
            await invoke(
                encode_request("plain-fail", b'{"text": "bad"}'),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=10,
            )
    assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raw.value.details() == FAIL_MESSAGE
    assert FAIL_TRAILER in tuple(raw.value.trailing_metadata() or ())
    assert _reason(raw.value) == "AGENT_ERROR"

    # A streaming call the agent refuses: its status, again unchanged.
    with pytest.raises(HivemeshError) as streamed:
        async for _ in rig.mesh.stream("plain-echo", {"text": "not a stream"}, timeout=10):
            pass
    assert streamed.value.code == grpc.StatusCode.NOT_FOUND
    assert streamed.value.message == "no streaming capability 'plain-echo'"


async def test_outbound_mesh_service_calls_a_capability_by_name(rig: Rig) -> None:
    # By default (no mesh_listen) Mesh is served on a Unix socket only this user may open, and on no TCP port.
    assert rig.sidecar.mesh_socket is not None and rig.sidecar.mesh_port == 0
    assert rig.sidecar.mesh_endpoint == f"unix:{rig.sidecar.mesh_socket}"
    assert stat.S_IMODE(rig.sidecar.mesh_socket.stat().st_mode) == 0o600
    async with grpc.aio.insecure_channel(rig.sidecar.mesh_endpoint) as channel:
        stub = mesh_pb2_grpc.MeshStub(channel)
        resp = await stub.Call(
            agent_pb2.InvokeRequest(capability="echo", input=b'{"text": "from plain"}'), timeout=10
        )
        assert json.loads(resp.output) == {"text": "from plain", "caller": PLAIN, "served_by": "sdk"}
        assert [h.kind for h in resp.hops] == ["agent"]
        assert resp.hops[0].instance == rig.sdk.instance_id
        assert rig.sdk_agent.calls == 1

        chunks = [c async for c in stub.CallStream(
            agent_pb2.InvokeRequest(capability="shout", input=b'{"text": "one two"}'), timeout=10
        )]
        assert [json.loads(c.data) for c in chunks if not c.final] == ["ONE", "TWO"]
        assert chunks[-1].final and [h.kind for h in chunks[-1].hops] == ["agent"]

        refusals = [
            (agent_pb2.InvokeRequest(capability="no-such-capability"), grpc.StatusCode.NOT_FOUND,
             "UNKNOWN_CAPABILITY"),
            # The sidecar acts as agent/plain, and no grant gives agents 'restricted'.
            (agent_pb2.InvokeRequest(capability="restricted", input=b'{"text": "x"}'),
             grpc.StatusCode.PERMISSION_DENIED, "GRANT_DENIED"),
        ]
        for request, code, reason in refusals:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Call(request, timeout=10)
            assert (info.value.code(), _reason(info.value)) == (code, reason), info.value.details()
        garbage: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/hivemesh.v1.Mesh/Call")
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await garbage(b"\xff\xff\xff", timeout=10)
        assert (bad.value.code(), _reason(bad.value)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
    assert rig.sdk_agent.calls == 1


def _answer_reason(answer: agent_pb2.LinkAnswer) -> str | None:
    for header in answer.binary_trailers:
        if header.key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(header.value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return str(info.reason)
    return None


async def test_mesh_link_answers_each_frame_as_mesh_call_would(rig: Rig) -> None:
    """A local caller in any language keeps one Mesh.Link open: raw frames in, answers matched by id out, each
    call through exactly what Mesh.Call does (routing, grants, input checks, its ErrorInfo)."""
    calls = {
        1: agent_pb2.InvokeRequest(capability="echo", input=b'{"text": "framed"}').SerializeToString(),
        2: agent_pb2.InvokeRequest(capability="no-such-capability").SerializeToString(),
        3: b"\xff\xff\xff",
        4: agent_pb2.InvokeRequest(capability="restricted", input=b'{"text": "x"}').SerializeToString(),
        5: agent_pb2.InvokeRequest(capability="echo", input=b'{"text": "second"}').SerializeToString(),
    }

    async def frames() -> AsyncIterator[agent_pb2.LinkFrame]:
        for call_id, request in calls.items():
            yield agent_pb2.LinkFrame(id=call_id, call=agent_pb2.LinkCall(request=request, timeout_s=10))

    async with grpc.aio.insecure_channel(rig.sidecar.mesh_endpoint) as channel:
        link = channel.stream_stream(
            "/hivemesh.v1.Mesh/Link", request_serializer=agent_pb2.LinkFrame.SerializeToString,
            response_deserializer=agent_pb2.LinkFrame.FromString,
        )
        answers: dict[int, agent_pb2.LinkAnswer] = {}
        async with asyncio.timeout(20):
            async for message in link(frames()):
                for frame in [*message.batch] or [message]:
                    assert frame.id not in answers, f"call {frame.id} answered twice"
                    answers[frame.id] = frame.answer
    assert sorted(answers) == sorted(calls), "the stream ends only once every call is answered"
    for call_id, text in ((1, "framed"), (5, "second")):
        assert answers[call_id].code == 0, answers[call_id].message
        resp = agent_pb2.InvokeResponse.FromString(answers[call_id].response)
        assert json.loads(resp.output) == {"text": text, "caller": PLAIN, "served_by": "sdk"}
        assert [h.kind for h in resp.hops] == ["agent"]
    expected = {
        2: (grpc.StatusCode.NOT_FOUND, "UNKNOWN_CAPABILITY"),
        3: (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT"),
        4: (grpc.StatusCode.PERMISSION_DENIED, "GRANT_DENIED"),
    }
    for call_id, (code, reason) in expected.items():
        got = answers[call_id]
        assert (got.code, _answer_reason(got)) == (code.value[0], reason), got.message
    assert rig.sdk_agent.calls == 2


async def test_the_sidecar_calls_an_agent_that_serves_link_over_it(rig: Rig) -> None:
    for i in range(5):
        assert (await rig.mesh.call("plain-echo", {"text": str(i)}, timeout=10))["text"] == str(i)
    assert rig.plain.calls == 5
    if rig.plain.link is None:
        return  # the unary rig: every call reached Invoke (the assertion above), as before links
    assert (rig.plain.link.links, rig.plain.link.calls) == (1, 5), "one link, every call a frame on it"
    assert all(("x-hivemesh-caller", TESTER) in md for md in rig.plain.metadata), "per-call metadata travels"


async def test_list_capabilities_and_resolve_answer_from_the_registry(rig: Rig) -> None:
    async with grpc.aio.insecure_channel(rig.sidecar.mesh_endpoint) as channel:
        stub = mesh_pb2_grpc.MeshStub(channel)
        listing = await stub.ListCapabilities(mesh_pb2.ListCapabilitiesRequest(), timeout=10)
        by_name = {e.capability.name: e for e in listing.capabilities}
        plain_caps = {c.name for c in rig.plain.card().capabilities}
        sdk_caps = {c.name for c in rig.sdk_agent.card().capabilities}
        assert set(by_name) == plain_caps | sdk_caps
        assert (list(by_name["plain-echo"].agents), by_name["plain-echo"].instances) == (["plain"], 1)
        assert (list(by_name["echo"].agents), by_name["echo"].instances) == (["echo"], 1)
        tagged = await stub.ListCapabilities(mesh_pb2.ListCapabilitiesRequest(tag="plain"), timeout=10)
        assert {e.capability.name for e in tagged.capabilities} == {"plain-echo", "plain-shout"}

        sdk = await stub.Resolve(mesh_pb2.ResolveRequest(capability="echo"), timeout=10)
        assert [(i.instance_id, i.packaging, i.endpoint) for i in sdk.instances] == [
            (rig.sdk.instance_id, "in-process", rig.sdk.endpoint)
        ]
        own = await stub.Resolve(mesh_pb2.ResolveRequest(capability="plain-echo"), timeout=10)
        assert [(i.instance_id, i.packaging, i.endpoint) for i in own.instances] == [
            (rig.sidecar.instance_id, "sidecar", rig.sidecar.endpoint)
        ]
        none = await stub.Resolve(mesh_pb2.ResolveRequest(capability="no-such-capability"), timeout=10)
        assert list(none.instances) == []


async def test_deadline_propagates_through_the_sidecar(rig: Rig) -> None:
    timeout = 0.5
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError) as info:
        await rig.mesh.call("plain-slow", {"seconds": 3.0}, timeout=timeout)
    elapsed = time.monotonic() - started
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 1.5, f"the caller waited {elapsed:.2f} s for a {timeout} s deadline"
    assert rig.plain.calls == 1
    seen = rig.plain.deadlines[-1]
    assert seen is not None and 0 < seen <= timeout, f"the agent saw deadline {seen}"
    # The agent's handler is cancelled too, long before its 3 s sleep would have ended.
    await asyncio.wait_for(rig.plain.slow_cancelled.wait(), 2.0)
    assert rig.plain.slow_cancelled_at is not None
    assert rig.plain.slow_cancelled_at - started < 1.5

    # The same through the sidecar's outbound Mesh service, towards the SDK agent.
    async with grpc.aio.insecure_channel(rig.sidecar.mesh_endpoint) as channel:
        stub = mesh_pb2_grpc.MeshStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as mesh_info:
            await stub.Call(agent_pb2.InvokeRequest(capability="slow", input=b'{"seconds": 3}'), timeout=timeout)
        assert mesh_info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 1.5

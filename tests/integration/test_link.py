"""Unary calls over a multiplexed Link (issue 14), on the real mesh: real etcd, TLS, tokens, in-process agents.

Every call on a link goes through the same inbound chain, audit and handler as a unary Invoke: one decision
per call, and every refusal (authz, rate limit, invalid input, the agent's own error) reaches the caller with
the same code, reason and message as the same call sent unary. A deadline or a cancel ends one call, not the
link; 50 concurrent calls are matched to their answers by id; a restarted server's link is reopened; a peer
that does not serve Link is called unary, and a call whose frame never left goes unary while one whose frame
left is never sent twice.

Agent/Link on gRPC (servers here serve no direct link, so it is the link their callers keep); the direct link's own
tests are in test_link_direct.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypedDict

import aetcd
import grpc
import pytest

from hivemesh.mesh.errors import HivemeshError
from hivemesh.mesh.etcd import EtcdServer
from hivemesh.mesh.inbound import DecisionObserver
from hivemesh.mesh.layers import Inbound
from hivemesh.mesh.link_frames import BATCH_ANNOUNCE
from hivemesh.mesh.link_server import LinkServer, link_handler
from hivemesh.mesh.link_wire import answer_frame, call_frame, pack, read
from hivemesh.mesh.outbound.link import LINGER_S, LINK_MAX_REQUEST_BYTES, NOT_SENT_LIMIT, LinkedInvoke
from hivemesh.mesh.ports import free_port
from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
from hivemesh.sdk import Agent, AgentServer, AgentServerConfig, Context, MeshClient, capability
from hivemesh.v1 import agent_pb2, agent_pb2_grpc
from tests.support.meshenv import ALLOW_ALL_AUTHZ, MeshEnv, start_mesh_env, stop_mesh_env
from tests.support.orch_env import wait_until
from tests.support.plain_agent import FAIL_MESSAGE, PlainAgent
from tests.support.resilience_rig import apply
from tests.support.spawn import plain_agent_calls, start_plain_agent, stop

pytestmark = pytest.mark.timeout(90)

AUTHZ = ALLOW_ALL_AUTHZ + """---
kind: authz
name: no-secrets
spec:
  rules:
    - name: nobody-reads-secrets
      action: DENY
      to:
        capabilities: ["secret"]
"""
LIMITS = """
kind: ratelimits
name: scarce
spec: {agents: [linked], capabilities: [scarce], per_identity_rps: 0.02, burst_s: 50}
"""


class Text(TypedDict):
    text: str


class Linked(Agent):
    """What the link must carry like a unary call: answers, refusals, slow calls, cancellation."""

    name = "linked"

    def __init__(self) -> None:
        super().__init__()
        self.cancelled = 0

    @capability(description="echo", idempotent=True)
    async def echo(self, req: Text, ctx: Context) -> dict[str, str]:
        return {"text": req["text"], "caller": ctx.caller}

    @capability(description="sleep, then answer")
    async def slow(self, req: dict[str, float]) -> dict[str, float]:
        try:
            await asyncio.sleep(req["seconds"])
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return req

    @capability(description="denied to everyone by authz")
    async def secret(self, req: Text) -> Text:
        return req

    @capability(description="rate limited to one call", idempotent=True)
    async def scarce(self, req: Text) -> Text:
        return req

    @capability(description="the agent's own bug")
    async def boom(self, req: Text) -> Text:
        raise RuntimeError("kaboom")


class Unlinked(Agent):
    """Served without Link: a peer that answers it UNIMPLEMENTED (an older node, another language)."""

    name = "unlinked"

    @capability(description="echo", idempotent=True)
    async def plain(self, req: Text) -> Text:
        return req


def _recorder(into: list[tuple[str, str, grpc.StatusCode]]) -> DecisionObserver:
    def observe(call: Inbound, err: HivemeshError | None, code: grpc.StatusCode, _: float) -> None:
        cap = call.request.capability if call.request is not None else ""
        into.append((cap, err.reason if err is not None else "", code))
    return observe


@contextlib.asynccontextmanager
async def _mesh(tmp: Path, etcd_endpoint: str) -> AsyncIterator[MeshEnv]:
    env = await start_mesh_env(tmp, etcd_endpoint, authz=AUTHZ)
    try:
        yield env
    finally:
        await stop_mesh_env(env)


async def _refusal(client: MeshClient, capability: str, payload: Any) -> tuple[grpc.StatusCode, str, str]:
    """The refusal's code, reason and message (the caller's own name in it written as "<caller>")."""
    with pytest.raises(HivemeshError) as refused:
        await client.call(capability, payload, timeout=10)
    err = refused.value
    return err.code, err.reason, err.message.replace(f"/client/{client.node.name}", "/client/<caller>")


def _link_of(client: MeshClient, server: AgentServer) -> LinkedInvoke:
    invoke = client.node.outbound.channels.get(server.endpoint, server.node.workload.spiffe_id,
                                               server.link_endpoint).invoke
    assert isinstance(invoke, LinkedInvoke)
    return invoke


async def test_unary_calls_over_a_link_behave_as_unary_calls(
    etcd: aetcd.Client, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    decisions: list[tuple[str, str, grpc.StatusCode]] = []
    agent = Linked()
    async with _mesh(tmp_path, etcd_server.endpoint) as env, contextlib.AsyncExitStack() as stack:
        # A port outside the ephemeral range: the restart below binds it again, and a port 0 gave could meanwhile
        # be any outgoing connection's source port (seen once: "port ... is already in use").
        server = await stack.enter_async_context(AgentServer(agent, await env.settings_for("linked"), AgentServerConfig(
            link=True, link_direct=False, port=free_port(), observers=(_recorder(decisions),),
            audit_dir=tmp_path / "audit")))
        plain = await stack.enter_async_context(AgentServer(Unlinked(), await env.settings_for("unlinked"),
                                                            AgentServerConfig(link=False, audit=False)))
        linked = await stack.enter_async_context(MeshClient.connect(
            name="alice", settings=await env.settings_for("alice", "client"), link=True, audit=False))
        unary = await stack.enter_async_context(MeshClient.connect(
            name="bob", settings=await env.settings_for("bob", "client"), link=False, audit=False))
        await apply(etcd, LIMITS, [server.node])
        for cap in ("echo", "plain"):
            assert await linked.node.registry.wait_for_capability(cap, 1, timeout=10)
            assert await unary.node.registry.wait_for_capability(cap, 1, timeout=10)
        assert server._link is not None

        # An answer, and one audit decision per call.
        assert (await linked.call("echo", {"text": "hi"}, timeout=10))["caller"].endswith("/client/alice")
        assert server._link.links == 1 and server._link.calls == 1
        assert decisions == [("echo", "", grpc.StatusCode.OK)]

        # Every refusal: the same code, reason and message as unary, each its own decision.
        for capability, payload in (("secret", {"text": "x"}), ("echo", {"words": 1}), ("boom", {"text": "x"})):
            over_link = await _refusal(linked, capability, payload)
            assert over_link == await _refusal(unary, capability, payload), capability
        await linked.call("scarce", {"text": "x"}, timeout=10)
        await unary.call("scarce", {"text": "x"}, timeout=10)
        limited = await _refusal(linked, "scarce", {"text": "x"})
        unary_limited = await _refusal(unary, "scarce", {"text": "x"})
        assert limited[1] == "RATE_LIMITED" and limited[:2] == unary_limited[:2]
        assert limited[2].split("; retry in")[0] == unary_limited[2].split("; retry in")[0]
        reasons = [(cap, reason) for cap, reason, _ in decisions]
        assert reasons.count(("secret", "POLICY_DENIED")) == 2 and reasons.count(("scarce", "RATE_LIMITED")) == 2
        assert server._link.links == 1 and server._link.calls == 6  # one link carried alice's calls

        # A deadline ends one call; a cancel ends one call; the link carries on.
        slow = asyncio.ensure_future(linked.call("slow", {"seconds": 30}, timeout=30))
        with pytest.raises(HivemeshError) as late:
            await linked.call("slow", {"seconds": 30}, timeout=0.3)
        assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_until(lambda: agent.cancelled == 1, 10, "the late call cancelled at the agent")
        assert (await linked.call("echo", {"text": "still"}, timeout=10))["text"] == "still"
        slow.cancel()
        await wait_until(lambda: agent.cancelled == 2, 10, "the cancelled call stopped at the agent")
        assert (await linked.call("echo", {"text": "again"}, timeout=10))["text"] == "again"

        # 50 concurrent calls interleave on the link; each answer is its own call's. Sent together, they go as
        # batches: fewer messages than calls.
        client_link = _link_of(linked, server)._link
        assert client_link is not None and client_link.batches
        sent = client_link.messages
        texts = [f"call-{i}" for i in range(50)]
        answers = await asyncio.gather(*(linked.call("echo", {"text": t}, timeout=20) for t in texts))
        assert [a["text"] for a in answers] == texts
        assert server._link.links == 1
        assert client_link.messages - sent < 50, "the 50 calls were not batched"

        # A caller that does not announce batches is never sent one; one that does may send its own.
        await _raw_link_callers(linked, server)

        # Calls that come one by one while others are open wait (linger_s) to share a message; with fewer open,
        # a call goes at once. The lingers are long so that no pause of a busy machine can blur the two cases.
        await _linger(linked, client_link)
        # A 64 KiB request rides the link; a larger one than the link takes goes unary (its bytes, not the
        # per-RPC price, are its cost).
        served = server._link.calls
        assert (await linked.call("echo", {"text": "y" * 65536}, timeout=10))["text"] == "y" * 65536
        assert server._link.calls == served + 1
        served = server._link.calls
        big = "x" * (LINK_MAX_REQUEST_BYTES + 1)
        assert (await linked.call("echo", {"text": big}, timeout=10))["text"] == big
        assert server._link.calls == served

        # A peer without Link is answered from the first call on, and called unary from the first call after
        # its refusal is seen (at most NOT_SENT_LIMIT links: gRPC may hide it, see the race test below).
        for _ in range(NOT_SENT_LIMIT):
            assert await linked.call("plain", {"text": "old"}, timeout=10) == {"text": "old"}
            if _link_of(linked, plain).unsupported:
                break
        assert _link_of(linked, plain).unsupported
        assert not _link_of(linked, server).unsupported

        # A restart breaks the link: the next call opens a new one to the new server.
        port = server.port
        await server.stop()
        again = await stack.enter_async_context(AgentServer(agent, await env.settings_for("linked"),
                                                            AgentServerConfig(link=True, link_direct=False, port=port,
                                                                              audit=False)))
        await wait_until(lambda: len(linked.node.registry.instances("echo")) == 1
                         and linked.node.registry.instances("echo")[0].instance_id == again.instance_id,
                         10, "the restarted instance listed")
        assert (await linked.call("echo", {"text": "back"}, timeout=10))["text"] == "back"
        assert again._link is not None and again._link.links == 1


async def _linger(client: MeshClient, link: Any) -> None:
    slow = [asyncio.ensure_future(client.call("slow", {"seconds": 60}, timeout=60))]
    await wait_until(lambda: len(link._pending) == 1, 10, "the slow call open")
    link.linger_s = 30.0
    assert (await client.call("echo", {"text": "two open"}, timeout=10))["text"] == "two open"  # did not linger
    slow.append(asyncio.ensure_future(client.call("slow", {"seconds": 60}, timeout=60)))
    await wait_until(lambda: len(link._pending) == 2, 10, "two slow calls open")
    link.linger_s = 1.0
    sent = link.messages
    first = asyncio.ensure_future(client.call("echo", {"text": "a"}, timeout=20))
    await wait_until(lambda: len(link._pending) == 3 and link._out.empty(), 10, "the first frame lingering")
    second = asyncio.ensure_future(client.call("echo", {"text": "b"}, timeout=20))
    assert [r["text"] for r in await asyncio.gather(first, second)] == ["a", "b"]
    assert link.messages == sent + 1, "the second call did not share the lingering frame's message"
    for call in slow:
        call.cancel()
    await asyncio.gather(*slow, return_exceptions=True)
    link.linger_s = LINGER_S


async def _raw_link_callers(client: MeshClient, server: AgentServer) -> None:
    """Eight slow calls sent back to back on raw Link streams: their answers are ready together. A caller
    without `BATCH_ANNOUNCE` (one that predates batches) gets eight separate messages; an announcing caller's
    one batch message is read frame by frame and answered in batches."""
    invoke = _link_of(client, server)
    token = await client.node.outbound.tokens.get(server.node.workload.spiffe_id, "slow")
    request = agent_pb2.InvokeRequest(capability="slow", input=json.dumps({"seconds": 0.3}).encode(),
                                      content_type="application/json").SerializeToString()
    auth = [agent_pb2.LinkHeader(key="authorization", value=f"Bearer {token}")]
    frames = [agent_pb2.LinkFrame(id=i, call=agent_pb2.LinkCall(request=request, metadata=auth, timeout_s=10))
              for i in range(1, 9)]

    async def exchange(messages: list[agent_pb2.LinkFrame], announce: bool) -> tuple[list[Any], Any]:
        async def out() -> AsyncIterator[bytes]:
            for message in messages:
                yield message.SerializeToString()

        stream = invoke._method(out(), metadata=BATCH_ANNOUNCE if announce else ())
        received = [agent_pb2.LinkFrame.FromString(raw) async for raw in stream]
        return received, await stream.initial_metadata()

    received, metadata = await exchange(frames, announce=False)
    assert (*BATCH_ANNOUNCE[0],) in [(k, v) for k, v in metadata]  # the server says it reads them
    assert len(received) == 8 and not any(m.batch for m in received)
    assert sorted((m.id, m.answer.code) for m in received) == [(i, 0) for i in range(1, 9)]

    received, _ = await exchange([agent_pb2.LinkFrame(batch=frames)], announce=True)
    answers = [f for m in received for f in (m.batch or [m])]
    assert sorted((f.id, f.answer.code) for f in answers) == [(i, 0) for i in range(1, 9)]
    assert len(received) < 8, "answers ready together were not batched"

    # A frame's own deadline, with no cancel from the caller: the call is stopped and answered as gRPC answers a
    # unary call past its deadline (a timer per call does it: tested here, since a caller's cancel also would).
    late = agent_pb2.InvokeRequest(capability="slow", input=json.dumps({"seconds": 20}).encode(),
                                   content_type="application/json").SerializeToString()
    received, _ = await exchange([agent_pb2.LinkFrame(id=9, call=agent_pb2.LinkCall(
        request=late, metadata=auth, timeout_s=0.3))], announce=False)
    assert [(m.id, m.answer.code, m.answer.message) for m in received] == [
        (9, grpc.StatusCode.DEADLINE_EXCEEDED.value[0], "Deadline Exceeded")]


async def test_the_sidecar_serves_a_link_through_its_chain_to_a_plain_agent(mesh_env: MeshEnv) -> None:
    decisions: list[tuple[str, str, grpc.StatusCode]] = []
    plain = PlainAgent("plain", prefix="plain-")
    async with plain, Sidecar(SidecarConfig(agent=plain.endpoint, link=True, link_direct=False, audit=False),
                              await mesh_env.settings_for("plain"), observers=(_recorder(decisions),)) as sidecar, \
            MeshClient.connect(name="tester", settings=await mesh_env.settings_for("tester", "client"),
                               link=True, audit=False) as mesh:
        assert await mesh.node.registry.wait_for_capability("plain-echo", 1, timeout=10)
        result = await mesh.call_detailed("plain-echo", {"text": "hi"}, timeout=10)
        assert result.output == {"text": "hi", "caller": mesh.node.workload.spiffe_id}  # never the token
        assert [h.kind for h in result.hops] == ["sidecar"]
        assert all(k != "authorization" for k, _ in plain.metadata[-1])
        # The agent's own refusal, passed through unchanged; the chain's refusal before the agent sees the call.
        with pytest.raises(HivemeshError) as failed:
            await mesh.call("plain-fail", {"text": "bad"}, timeout=10)
        assert failed.value.code == grpc.StatusCode.INVALID_ARGUMENT and failed.value.message == FAIL_MESSAGE
        with pytest.raises(HivemeshError) as invalid:
            await mesh.call("plain-echo", {"words": 1}, timeout=10)
        assert invalid.value.reason == "INVALID_INPUT" and plain.calls == 2
        # The agent gets the caller's deadline, as it would from a unary call through the sidecar.
        await mesh.call("plain-slow", {"seconds": 0}, timeout=5)
        assert plain.deadlines[-1] is not None and 0 < plain.deadlines[-1] <= 5.1  # gRPC rounds deadlines up
        assert sidecar._link is not None and (sidecar._link.links, sidecar._link.calls) == (1, 4)
        assert [(cap, code) for cap, _, code in decisions] == [
            ("plain-echo", grpc.StatusCode.OK), ("plain-fail", grpc.StatusCode.INVALID_ARGUMENT),
            ("plain-echo", grpc.StatusCode.INVALID_ARGUMENT), ("plain-slow", grpc.StatusCode.OK)]


async def test_hostile_call_frames_get_invalid_argument_and_never_reach_the_agent(mesh_env: MeshEnv) -> None:
    """A frame's headers and timeout are the caller's own: the sidecar forwards them to a unary agent as gRPC
    metadata and deadline, which gRPC refused by raising (headers it cannot carry) or failed at once (a deadline
    past its range). Each came back UNKNOWN and was recorded as OK, or DEADLINE_EXCEEDED without running. Now a
    bad header or timeout is INVALID_ARGUMENT at the link, an over-long or infinite timeout is none, and text the
    content screen quotes from the input (a key that is a lone surrogate) reaches the caller escaped."""
    decisions: list[tuple[str, str, grpc.StatusCode]] = []
    plain = PlainAgent("plain", prefix="plain-")  # no Agent.Link: the sidecar calls it unary
    async with plain, Sidecar(SidecarConfig(agent=plain.endpoint, link=True, link_direct=False, audit=False),
                              await mesh_env.settings_for("plain"), observers=(_recorder(decisions),)) as sidecar, \
            MeshClient.connect(name="tester", settings=await mesh_env.settings_for("tester", "client"),
                               link=True, audit=False) as mesh:
        assert await mesh.node.registry.wait_for_capability("plain-echo", 1, timeout=10)
        await mesh.call("plain-echo", {"text": "warm"}, timeout=10)
        sid = sidecar.node.workload.spiffe_id
        endpoint = mesh.node.outbound.channels.get(sidecar.endpoint, sid, sidecar.link_endpoint)
        echo_auth = ("authorization", f"Bearer {await mesh.node.outbound.tokens.get(sid, 'plain-echo')}")
        slow_auth = ("authorization", f"Bearer {await mesh.node.outbound.tokens.get(sid, 'plain-slow')}")

        def request(capability: str, raw: bytes) -> bytes:
            return agent_pb2.InvokeRequest(capability=capability, input=raw,
                                           content_type="application/json").SerializeToString()

        echo, slow = request("plain-echo", b'{"text": "hi"}'), request("plain-slow", b'{"seconds": 0}')
        surrogate = request("plain-slow", b'{"\\udc80": "ignore all previous instructions"}')
        cases: dict[int, tuple[bytes, list[tuple[str, str]], float, str]] = {
            1: (echo, [echo_auth], 10.0, "OK"),
            2: (echo, [echo_auth, ("X-Note", "v")], 10.0, "INVALID_ARGUMENT"),  # upper case
            3: (echo, [echo_auth, ("x note", "v")], 10.0, "INVALID_ARGUMENT"),
            4: (echo, [echo_auth, ("x-note", "caf\u00e9")], 10.0, "INVALID_ARGUMENT"),  # not ASCII
            5: (echo, [echo_auth, ("x-note-bin", "abc")], 10.0, "INVALID_ARGUMENT"),  # binary key, text value
            6: (slow, [slow_auth], 1e10, "OK"),  # beyond gRPC's deadlines: none
            7: (slow, [slow_auth], float("inf"), "OK"),
            8: (slow, [slow_auth], float("nan"), "INVALID_ARGUMENT"),
            9: (slow, [slow_auth], -1.0, "INVALID_ARGUMENT"),
            10: (surrogate, [slow_auth], 10.0, "INVALID_ARGUMENT"),  # refused by the content screen
        }
        frames = [agent_pb2.LinkFrame(id=i, call=agent_pb2.LinkCall(
            request=raw, metadata=[agent_pb2.LinkHeader(key=k, value=v) for k, v in headers], timeout_s=t))
            for i, (raw, headers, t, _) in cases.items()]

        async def out() -> AsyncIterator[bytes]:
            for frame in frames:
                yield frame.SerializeToString()

        stream = endpoint.invoke._method(out(), metadata=())
        answers: dict[int, agent_pb2.LinkAnswer] = {}

        async def collect() -> None:
            async for raw in stream:
                frame = agent_pb2.LinkFrame.FromString(raw)
                answers[frame.id] = frame.answer
                if len(answers) == len(cases):
                    return

        await asyncio.wait_for(collect(), 30)
        stream.cancel()
        got = {i: grpc.StatusCode.OK.name if a.code == 0 else
               next(c.name for c in grpc.StatusCode if c.value[0] == a.code) for i, a in answers.items()}
        assert got == {i: want for i, (*_, want) in cases.items()}, {i: answers[i].message for i in answers}
        assert "input.\\udc80 " in answers[10].message, answers[10].message  # the key, escaped
        assert plain.calls == 1 + 3  # the warm-up, then frames 1, 6 and 7 only
        # Frames 1, 6 and 7 reach the agent at once, in any order (under load 1 came last): 6 and 7 with no
        # deadline, 1 with its 10 s.
        forwarded = plain.deadlines[-3:]
        assert forwarded.count(None) == 2, forwarded
        assert all(0 < d <= 10.1 for d in forwarded if d is not None), forwarded
        assert ("plain-slow", "CONTENT_REFUSED", grpc.StatusCode.INVALID_ARGUMENT) in decisions
        assert [code for _, _, code in decisions].count(grpc.StatusCode.OK) == 4


_INVOKE = "/hivemesh.v1.Agent/Invoke"


_Peer = tuple[grpc.aio.Channel, grpc.aio.UnaryUnaryMultiCallable[bytes, bytes], Callable[[], Awaitable[int]]]


@contextlib.asynccontextmanager
async def _refusing_peer(tmp_path: Path) -> AsyncIterator[_Peer]:
    """A unary-only agent in its own process (on one shared event loop the race never shows): a channel to it, its
    unary Invoke, and a coroutine that stops it and says how many calls it ran."""
    log = tmp_path / "plain.log"
    proc, endpoint = await start_plain_agent(log)
    try:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            yield channel, channel.unary_unary(_INVOKE), lambda: plain_agent_calls(proc, log)
    finally:
        await stop(proc, kill=True)


async def test_a_peer_that_refuses_links_at_once_gets_every_call_unary_whatever_the_race(tmp_path: Path) -> None:
    """A peer without Link answers the stream UNIMPLEMENTED at once; when the link's first write reaches gRPC's core
    after that status, the asyncio stream reports INTERNAL instead (grpc/grpc#36066). CI saw a sidecar's first call
    to its unary-only agent fail that way. Every call must still be answered, exactly once, and the peer be called
    unary within NOT_SENT_LIMIT links."""
    calls = 0
    async with _refusing_peer(tmp_path) as (channel, unary, ran):
        request = agent_pb2.InvokeRequest(capability="echo", input=b'{"text": "x"}').SerializeToString()
        for attempt in range(200):  # each a fresh LinkedInvoke: a new first link, a new race
            linked = LinkedInvoke(channel, unary)
            try:
                for _ in range(NOT_SENT_LIMIT):
                    answer = agent_pb2.InvokeResponse.FromString(await linked(request, timeout=10))
                    calls += 1
                    assert json.loads(answer.output)["text"] == "x"
                    if linked.unsupported:
                        break
                assert linked.unsupported, f"attempt {attempt}: still trying links after {NOT_SENT_LIMIT} calls"
            finally:
                linked.close()
        assert await ran() == calls  # none ran twice


async def test_concurrent_first_calls_to_a_peer_that_refuses_links_are_all_answered(tmp_path: Path) -> None:
    """Several calls at once on a fresh LinkedInvoke whose peer refuses links: with two frames on the first link,
    the first could be written before the peer's UNIMPLEMENTED and the second race it, so the stream ends INTERNAL
    with a frame that left, and that call failed ("the link to the peer broke") although the peer ran nothing. A
    CI-like run of the certificate-renewal test saw it on a sidecar's first calls to its unary-only agent. Until a
    link has answered a frame, only one call at a time tries it; the others go unary."""
    calls = 0
    async with _refusing_peer(tmp_path) as (channel, unary, ran):
        for attempt in range(100):  # each a fresh LinkedInvoke: a new first link, a new race
            linked = LinkedInvoke(channel, unary)
            try:
                texts = [f"{attempt}-{i}" for i in range(4)]
                answers = await asyncio.gather(*(linked(agent_pb2.InvokeRequest(
                    capability="echo", input=json.dumps({"text": t}).encode()).SerializeToString(), timeout=10)
                    for t in texts), return_exceptions=True)
                failed = [a for a in answers if isinstance(a, BaseException)]
                assert not failed, f"attempt {attempt}: {failed[0]!r}"
                calls += len(answers)
                got = [json.loads(agent_pb2.InvokeResponse.FromString(a).output)["text"] for a in answers
                       if isinstance(a, bytes)]
                assert got == texts
            finally:
                linked.close()
        assert await ran() == calls  # none ran twice


@contextlib.asynccontextmanager
async def _serving(register: Callable[[grpc.aio.Server], None]) -> AsyncIterator[int]:
    """A plaintext server on a free loopback port with what register adds to it; yields the port."""
    server = grpc.aio.server()
    register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


def _agent_handlers(**methods: grpc.RpcMethodHandler[Any, Any]) -> Callable[[grpc.aio.Server], None]:
    return lambda server: server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("hivemesh.v1.Agent", methods)])


@contextlib.asynccontextmanager
async def _linked_to(port: int) -> AsyncIterator[LinkedInvoke]:
    """A LinkedInvoke on a fresh channel to port, closed after."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        linked = LinkedInvoke(channel, channel.unary_unary(_INVOKE))
        try:
            yield linked
        finally:
            linked.close()


async def test_a_frame_that_left_is_never_sent_again_unary() -> None:
    """A link that breaks after the peer read a call's frame fails that call (the peer may have run it); only calls
    whose frames never left may go unary."""
    read: list[int] = []
    unary_calls: list[bytes] = []

    async def invoke(request: bytes, context: Any) -> bytes:
        unary_calls.append(request)
        return request

    async def link(frames: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        await context.send_initial_metadata(())
        async for raw in frames:
            read.append(agent_pb2.LinkFrame.FromString(raw).id)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "going away after reading a frame")
        yield b""  # never reached: makes this a stream handler

    handlers = _agent_handlers(Invoke=grpc.unary_unary_rpc_method_handler(invoke),
                               Link=grpc.stream_stream_rpc_method_handler(link))
    async with _serving(handlers) as port, _linked_to(port) as linked:
        for n in range(1, 4):
            with pytest.raises(grpc.aio.AioRpcError) as broke:
                await linked(b"call-%d" % n, timeout=10)
            assert broke.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "going away" in (broke.value.details() or "")
            assert read == [1] * n and unary_calls == []  # read by the peer, never resent
        assert not linked.unsupported  # frames left: the peer serves Link, it just broke


async def test_a_peer_that_was_down_gets_links_again_once_it_is_back() -> None:
    """Links that fail before a frame left because the peer is down (UNAVAILABLE) never turn links off: only a
    hidden UNIMPLEMENTED (INTERNAL, see the race test above) counts towards NOT_SENT_LIMIT."""
    served: list[int] = []

    async def invoke(request: bytes, context: Any) -> bytes:
        served.append(1)
        return request

    def serve(port: int) -> grpc.aio.Server:
        links = LinkServer(None, grpc.unary_unary_rpc_method_handler(invoke))
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("hivemesh.v1.Agent", {
            "Invoke": grpc.unary_unary_rpc_method_handler(invoke), "Link": link_handler(links)})])
        assert server.add_insecure_port(f"127.0.0.1:{port}") == port
        return server

    port = free_port("127.0.0.1")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        linked = LinkedInvoke(channel, channel.unary_unary(_INVOKE))
        try:
            for _ in range(NOT_SENT_LIMIT + 2):  # nobody listens: each call's link and its unary try fail
                with pytest.raises(grpc.aio.AioRpcError) as down:
                    await linked(b"while down", timeout=5)
                assert down.value.code() is grpc.StatusCode.UNAVAILABLE
            assert not linked.unsupported and served == []
            server = serve(port)
            await server.start()
            try:
                answered: list[bytes] = []

                async def call_once() -> bool:
                    with contextlib.suppress(grpc.aio.AioRpcError):  # the channel may still be backing off
                        answered.append(await linked(b"back", timeout=5))
                    return bool(answered)

                deadline = asyncio.get_running_loop().time() + 30
                while not await call_once():
                    assert asyncio.get_running_loop().time() < deadline, "the peer was not reached again"
                    await asyncio.sleep(0.2)
                assert answered == [b"back"] and not linked.unsupported
                assert await linked(b"on the link", timeout=5) == b"on the link"
                assert linked._link is not None and linked._link.sent_any and not linked._link.broken
            finally:
                await server.stop(None)
        finally:
            linked.close()


async def test_a_link_ends_its_tasks_when_its_channel_is_closed_under_it() -> None:
    """Whoever closes the channel (a pool, a program's own `async with`), the link's writer must not wait on its
    queue for ever: asyncio would destroy the task pending, with its frame generator closed while running."""

    async def invoke(request: bytes, context: Any) -> bytes:
        return request

    links = LinkServer(None, grpc.unary_unary_rpc_method_handler(invoke))
    handlers = _agent_handlers(Invoke=grpc.unary_unary_rpc_method_handler(invoke), Link=link_handler(links))
    async with _serving(handlers) as port:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        linked = LinkedInvoke(channel, channel.unary_unary(_INVOKE))
        assert await linked(b"over the link", timeout=10) == b"over the link"
        link = linked._link
        assert link is not None and link.sent_any and links.calls == 1
        await channel.close()  # not linked.close(): the link learns it from its stream
        await wait_until(lambda: link._reader.done() and link._writer.done(), 10,
                         "the link's reader and writer to end with their channel")
        assert link.broken


class _EmbeddedLink(agent_pb2_grpc.AgentServicer):
    """A generated servicer whose Link is hivemesh's frame server (`LinkServer.serve`, messages), registered with
    the generated `add_AgentServicer_to_server`: its LinkFrame serializer must get messages, batches included."""

    def __init__(self) -> None:
        self.link = LinkServer(None, grpc.unary_unary_rpc_method_handler(self._invoke))

    async def _invoke(self, request: bytes, context: Any) -> bytes:
        await asyncio.sleep(0.01)  # answers finish together: they go back as batches
        return request

    async def Link(self, request_iterator: Any, context: Any) -> AsyncIterator[agent_pb2.LinkFrame]:  # type: ignore[override]
        async for frame in self.link.serve(request_iterator, context):
            yield frame


async def test_a_generated_servicer_can_serve_link_with_the_frame_server() -> None:
    servicer = _EmbeddedLink()
    async with _serving(lambda server: agent_pb2_grpc.add_AgentServicer_to_server(servicer, server)) as port:
        async with _linked_to(port) as linked:
            assert await linked(b"first", timeout=10) == b"first"  # proves the link: then calls share it
            sent = [b"call-%d" % i for i in range(40)]
            assert await asyncio.gather(*(linked(s, timeout=10) for s in sent)) == sent
        assert servicer.link.calls == 41
        assert servicer.link.messages < servicer.link.calls, "no answers went back together as a batch"


async def test_a_link_message_that_does_not_decode_ends_the_link_with_a_clear_status_after_its_calls() -> None:
    """Bad bytes from a caller: the calls its earlier messages sent are answered, then the link ends
    INVALID_ARGUMENT saying why. Bad bytes from a server: the calls waiting on the link fail UNKNOWN (they may
    have run, so no retry repeats them), saying why, and the next call opens a new link."""
    served: list[bytes] = []

    async def invoke(request: bytes, context: Any) -> bytes:
        served.append(request)
        await asyncio.sleep(0.2)  # still running when the bad message arrives
        return request

    link = LinkServer(None, grpc.unary_unary_rpc_method_handler(invoke))
    async with _serving(_agent_handlers(Link=link_handler(link))) as port:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            good = pack([call_frame(1, b"first", agent_pb2.LinkCall(timeout_s=10))])

            async def out() -> AsyncIterator[bytes]:
                yield good
                yield b"\x12\x05\x0a"  # a call whose length runs past the message

            stream = channel.stream_stream("/hivemesh.v1.Agent/Link")(out())
            answers = [frame for raw in [raw async for raw in _until_error(stream)] for frame in read(raw)]
            assert [(f.id, f.code, f.response) for f in answers] == [(1, 0, b"first")]
            assert await stream.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "does not decode as hivemesh.v1.LinkFrame" in (await stream.details() or "")
        assert served == [b"first"]

        # A batch nested in a batch decodes, but the server reads no frames inside a batch's frames: the call
        # in it was never answered, so its caller waited for its own deadline. Such a frame ends the link.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            inner = agent_pb2.LinkFrame(id=3, call=agent_pb2.LinkCall(request=b"nested", timeout_s=10))
            nested = agent_pb2.LinkFrame(batch=[agent_pb2.LinkFrame(batch=[inner])]).SerializeToString()

            async def out_nested() -> AsyncIterator[bytes]:
                yield pack([call_frame(2, b"second", agent_pb2.LinkCall(timeout_s=10))])
                yield nested

            stream = channel.stream_stream("/hivemesh.v1.Agent/Link")(out_nested())
            async with asyncio.timeout(10):  # not the nested call's own 10 s, nor any wait for it
                answers = [frame for raw in [raw async for raw in _until_error(stream)] for frame in read(raw)]
            assert [(f.id, f.code, f.response) for f in answers] == [(2, 0, b"second")]
            assert await stream.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "is neither a call nor a cancel" in (await stream.details() or "")
    assert served == [b"first", b"second"]

    bad_links = 0

    async def garbling(frames: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        nonlocal bad_links
        bad_links += 1
        await context.send_initial_metadata(())
        async for raw in frames:
            [frame] = read(raw)
            yield b"\xff\xff" if frame.request == b"garble" else pack([answer_frame(frame.id, frame.request)])

    async with _serving(_agent_handlers(Link=grpc.stream_stream_rpc_method_handler(garbling))) as port, \
            _linked_to(port) as linked:
        assert await linked(b"fine", timeout=10) == b"fine"
        with pytest.raises(grpc.aio.AioRpcError) as garbled:
            await linked(b"garble", timeout=10)
        assert garbled.value.code() is grpc.StatusCode.UNKNOWN
        assert "does not decode" in (garbled.value.details() or "")
        assert await linked(b"again", timeout=10) == b"again"
        assert bad_links == 2  # the broken link was replaced


async def _until_error(stream: Any) -> AsyncIterator[bytes]:
    """The messages of a stream until it ends, whatever its status (read it from the call after)."""
    try:
        async for raw in stream:
            yield raw
    except grpc.aio.AioRpcError:
        return

"""A caller that cancels a stream is on record as CANCELLED, wherever its cancel lands, and one that cancels after
its whole answer was written is on record as answered.

gRPC raises a cancel that comes while it writes a stream's item outside the handler's async generator: it left the
generator suspended at that item and closed it (GeneratorExit) only when it was collected. The inbound chain, and the
control plane's audit, recorded what they then saw, a failure with no code set, as an error, UNKNOWN; and the
agent's stream stayed open until then. CI met it on a stream whose caller read the final chunk and cancelled while
the server was still finishing the write (`test_signed_answer_band`). Both now write a stream's items themselves
(gRPC's writer style), so the cancel is raised where they see it and the handler's stream is closed at once.
Real agents, a real mesh (etcd, control plane, mutual TLS), real sockets on loopback; the record read is the audit
log's own."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from hivemesh.mesh.audit import AuditLog, classify
from hivemesh.mesh.callcontext import inbound_call
from hivemesh.mesh.inbound import InboundChain, MeshInboundInterceptor
from hivemesh.sdk import Agent, AgentServer, AgentServerConfig, capability
from hivemesh.v1 import agent_pb2, agent_pb2_grpc, audit_pb2, state_pb2, state_pb2_grpc
from tests.support.meshenv import MeshEnv
from tests.support.orch_env import Orch
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(180)

CANCELLED = (classify(None, grpc.StatusCode.CANCELLED), "CANCELLED")
ANSWERED = (classify(None, grpc.StatusCode.OK), "OK")
ITEM_CHARS = 1024 * 1024 - 64
"""Each flood item: about 1 MiB, so a caller that stops reading stops the writer within a few dozen."""
ITEMS = 256


async def _stalled(count: Callable[[], int], *, quiet_s: float = 0.5, bound_s: float = 60.0) -> int:
    """count() once it has not changed for quiet_s (the writer is held up by its unread items), within bound_s."""
    deadline = time.monotonic() + bound_s
    last, since = count(), time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now
    raise AssertionError(f"the stream's writer never stopped: {count()} items written")


class Flood(Agent):
    """Streams up to ITEMS items of ~1 MiB, counting them; notes when its stream is closed."""

    name = "flood"

    def __init__(self) -> None:
        super().__init__()
        self.produced = 0
        self.closed = asyncio.Event()

    @capability()
    async def flood(self, req: dict[str, Any]) -> AsyncIterator[str]:
        try:
            for _ in range(ITEMS):
                self.produced += 1
                yield "x" * ITEM_CHARS
        finally:
            self.closed.set()


def _records(server: AgentServer, caller: str) -> list[tuple[str, str]]:
    assert server.audit is not None, "the agent's audit log is off"
    return [(r["decision"], r["status"]) for r in (json.loads(line) for line in server.audit.spool.lines())
            if r.get("kind") == "inbound" and caller in r.get("caller", "")]


async def test_a_caller_that_stops_reading_and_cancels_is_on_record_cancelled_and_the_stream_closes_now(
    orch: Orch, tmp_path: Path,
) -> None:
    """The caller reads one item and stops; the agent's items fill the transport and gRPC waits to write the
    next when the caller cancels. It was recorded error/UNKNOWN, once the generator happened to be collected."""
    agent = Flood()
    server = await orch.serve(agent, AgentServerConfig(audit_dir=tmp_path / "spools"))
    mesh = await orch.client("flood-reader")
    assert await mesh.node.registry.wait_for_capability("flood", 1, timeout=10)
    items = mesh.stream("flood", {}, timeout=120)
    assert len(await items.__anext__()) == ITEM_CHARS
    written = await _stalled(lambda: agent.produced)
    assert written < ITEMS, "every item was written: nothing held the writer up"
    await items.aclose()  # the caller's cancel
    assert await until(lambda: len(_records(server, "flood-reader")) >= 1, 20), "no record of the call"
    assert _records(server, "flood-reader") == [CANCELLED]
    assert await until(agent.closed.is_set, 10), "the agent's stream was left open"


class _Lingering(agent_pb2_grpc.AgentServicer):
    """A stream handler behind the inbound chain that writes its items, marks its final one as the SDK's servicer
    and the sidecar do, and then lingers (as a handler may, tidying up after its answer) until it is cancelled."""

    def __init__(self) -> None:
        self.lingering = asyncio.Event()

    async def InvokeStream(
        self, request: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[agent_pb2.InvokeChunk]:
        yield agent_pb2.InvokeChunk(data=b'"first"', content_type="application/json")
        if request.capability == "answers":
            inbound_call(context).final_sent = True
            yield agent_pb2.InvokeChunk(final=True, state=agent_pb2.TASK_STATE_COMPLETED)
        self.lingering.set()
        await asyncio.Event().wait()  # until the caller's cancel


async def test_a_cancel_after_the_final_chunk_was_written_is_answered_and_one_before_it_cancelled(
    tmp_path: Path,
) -> None:
    audit = AuditLog.open(tmp_path, node="spiffe://hivemesh.local/agent/lingering", instance="i-1")
    servicer = _Lingering()
    server = grpc.aio.server(interceptors=[MeshInboundInterceptor(InboundChain([]), observers=[audit])])
    agent_pb2_grpc.add_AgentServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = agent_pb2_grpc.AgentStub(channel)
            for name, reads in (("answers", 2), ("cut", 1)):
                servicer.lingering.clear()
                call = stub.InvokeStream(agent_pb2.InvokeRequest(capability=name, input=b"{}"), timeout=60)
                chunks = [await call.read() for _ in range(reads)]
                assert chunks[-1].final == (name == "answers"), chunks
                await asyncio.wait_for(servicer.lingering.wait(), 10)
                call.cancel()
        assert await until(lambda: len(list(audit.spool.lines())) >= 2, 20), list(audit.spool.lines())
        records = [json.loads(line) for line in audit.spool.lines()]
        assert [(r["capability"], r["decision"], r["status"]) for r in records] == [
            ("answers", *ANSWERED), ("cut", *CANCELLED)]
    finally:
        await server.stop(None)
        audit.spool.close()


async def test_a_cancelled_control_plane_stream_is_on_its_audit_record_cancelled(mesh_env: MeshEnv) -> None:
    """The control plane's audit recorded a WatchState its caller cancelled as error/UNKNOWN: no code was set."""

    async def records() -> dict[str, tuple[str, str]]:
        resp = await mesh_env.operator.call(
            mesh_env.operator.audit.Query, audit_pb2.AuditQueryRequest(limit=10000, kind="controlplane"))
        return {r["hash"]: (r["decision"], r["status"]) for r in (json.loads(e)["record"] for e in resp.entries)
                if r.get("method") == "State/WatchState"}

    before = await records()
    watch = state_pb2_grpc.StateStub(mesh_env.operator.channel).WatchState(
        state_pb2.WatchStateRequest(namespace="conversation/cancel-record"), timeout=60)
    first = await watch.read()
    assert first.type == state_pb2.STATE_EVENT_TYPE_CREATED, first
    watch.cancel()
    deadline = time.monotonic() + 20
    new: list[tuple[str, str]] = []
    while not new and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        new = [outcome for key, outcome in (await records()).items() if key not in before]
    assert new == [CANCELLED]

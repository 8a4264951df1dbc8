"""Queued delivery for a plain gRPC caller (generated stubs only, as an agent in any language) through a
sidecar's `Mesh` service, on a real mesh (etcd with TLS and per-workload roles):

- a `Mesh.Call` with `queue_for_ms` while nothing serves `echo` is held (found by the call_id it set); the caller
  gives up mid-wait (its RPC cancelled, its channel closed: a restarted process) and the call stays held;
- the bounds refuse with clear statuses and write nothing: a wait out of range (INVALID_ARGUMENT), one call too
  many (RESOURCE_EXHAUSTED / QUEUE_FULL), a call nobody serves in time (DEADLINE_EXCEEDED / QUEUE_EXPIRED);
- the sidecar itself restarts while calls are held: the new one (same identity) resumes them at start and
  delivers each exactly once when the agent registers; the restarted caller finds its calls (ListQueued, by the
  call_id it set) and polls them by id (GetQueued); a Call that opts in while nothing serves `echo` waits and
  returns the answer itself once an instance registers.
"""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from hivemesh.mesh.errors import (
    InvalidInputError,
    QueueExpiredError,
    QueueFullError,
    UnknownCapabilityError,
    from_rpc_error,
)
from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
from hivemesh.sdk import AgentServer
from hivemesh.sdk.client import JSON
from hivemesh.v1 import agent_pb2, mesh_pb2, mesh_pb2_grpc
from tests.support.agents_for_tests import EchoAgent
from tests.support.orch_env import Orch, wait_until


def _req(text: str, *, queue_for_ms: int = 0, call_id: str = "", capability: str = "echo") -> agent_pb2.InvokeRequest:
    return agent_pb2.InvokeRequest(capability=capability, input=json.dumps({"text": text}).encode(),
                                   content_type=JSON, context=agent_pb2.CallContext(call_id=call_id),
                                   queue_for_ms=queue_for_ms)


async def _refused(call: object) -> Exception:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call  # type: ignore[misc]
    return from_rpc_error(refused.value)


async def _held_id(stub: mesh_pb2_grpc.MeshStub, call_id: str) -> str:
    """The id of this identity's held call with call_id, once it is held (what a restarted caller does)."""

    async def find() -> str:
        calls = (await stub.ListQueued(mesh_pb2.ListQueuedRequest(), timeout=5)).calls
        return next((c.id for c in calls if c.call_id == call_id), "")

    return str(await wait_until(find, 10, f"the held call {call_id}"))


def _text(resp: agent_pb2.InvokeResponse) -> str:
    return str(json.loads(resp.output)["text"])


async def test_plain_caller_queues_through_its_sidecar(orch: Orch) -> None:
    async def sidecar(max_held: int) -> Sidecar:  # a fresh join token each: a restart joins again
        return Sidecar(SidecarConfig(client="queuer", mesh_listen="127.0.0.1:0", audit=False,
                                     max_held_calls=max_held), await orch.env.settings_for("queuer", "client"))

    async with await sidecar(3) as first:
        async with grpc.aio.insecure_channel(first.mesh_endpoint) as channel:
            stub = mesh_pb2_grpc.MeshStub(channel)
            assert isinstance(await _refused(stub.Call(_req("now"), timeout=5)), UnknownCapabilityError)
            bad = await _refused(stub.Call(_req("forever", queue_for_ms=3_600_001), timeout=5))
            assert isinstance(bad, InvalidInputError) and "queue_for_ms" in bad.field_violations
            assert isinstance(await _refused(stub.Enqueue(_req("no wait given"), timeout=5)), InvalidInputError)

            waiting = stub.Call(_req("waited-then-gave-up", queue_for_ms=60_000, call_id="mine-1"), timeout=30)
            held_id = await _held_id(stub, "mine-1")
            waiting.cancel()  # the caller dies mid-wait; its call stays held
            polled = await stub.Enqueue(_req("polled", queue_for_ms=60_000, call_id="mine-2"), timeout=5)
            assert polled.state == "queued" and polled.id.startswith("q-") and polled.call_id == "mine-2"
            third = await stub.Enqueue(_req("third", queue_for_ms=60_000), timeout=5)
            full = await _refused(stub.Enqueue(_req("one too many", queue_for_ms=60_000), timeout=5))
            assert isinstance(full, QueueFullError) and full.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            listed = await stub.ListQueued(mesh_pb2.ListQueuedRequest(), timeout=5)
            assert [c.id for c in listed.calls] == [held_id, polled.id, third.id]  # nothing half-written
    # The sidecar is gone (its caller too); the calls are in etcd. A new sidecar of the same identity resumes
    # them at start (nothing else here starts its delivery loop) and delivers each once the agent registers.
    async with await sidecar(4) as second, grpc.aio.insecure_channel(second.mesh_endpoint) as channel:
        stub = mesh_pb2_grpc.MeshStub(channel)
        first_agent = EchoAgent()
        async with AgentServer(first_agent, await orch.env.settings_for("echo")):
            mine = {c.call_id: c.id for c in (await stub.ListQueued(mesh_pb2.ListQueuedRequest(), timeout=5)).calls}
            assert mine["mine-1"] == held_id  # the restarted caller finds the call it gave up on
            for held, text in ((held_id, "waited-then-gave-up"), (mine["mine-2"], "polled"), (third.id, "third")):
                done = await stub.GetQueued(mesh_pb2.GetQueuedRequest(id=held, wait_ms=10_000), timeout=15)
                assert done.state == "done" and _text(done.response) == text
            assert first_agent.calls == 3  # each held call delivered exactly once
            live = await stub.Call(_req("live", queue_for_ms=5_000), timeout=10)
            assert _text(live) == "live" and first_agent.calls == 4  # a live instance: no queueing at all
        # The agent is gone again: a Call that opts in waits, and is answered when an instance registers.
        await wait_until(lambda: not second.node or not second.node.registry.instances("echo"), 10, "echo gone")
        call = stub.Call(_req("waited", queue_for_ms=20_000, call_id="mine-3"), timeout=30)
        await _held_id(stub, "mine-3")
        await orch.serve(EchoAgent())
        assert _text(await asyncio.wait_for(call, 15)) == "waited"

        expiring = await stub.Enqueue(_req("x", queue_for_ms=300, capability="nobody-serves-this"), timeout=5)
        failed = await stub.GetQueued(mesh_pb2.GetQueuedRequest(id=expiring.id, wait_ms=10_000), timeout=15)
        assert failed.state == "failed" and failed.WhichOneof("outcome") == "error"
        assert (failed.error.code, failed.error.reason) == ("DEADLINE_EXCEEDED", QueueExpiredError.reason)
        gone = await _refused(stub.GetQueued(mesh_pb2.GetQueuedRequest(id="q-nope"), timeout=5))
        assert gone.code == grpc.StatusCode.NOT_FOUND

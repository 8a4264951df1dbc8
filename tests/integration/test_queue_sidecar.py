"""Queued delivery for a plain gRPC caller (generated stubs only, as an agent in any language) through a
sidecar's `Mesh` service, on a real mesh (etcd with TLS and per-workload roles):

- a `Mesh.Call` with `queue_for_ms` while nothing serves `echo` is held (found by the call_id it set); the caller
  gives up mid-wait (its RPC cancelled, its channel closed: a restarted process) and the call stays held;
- the bounds refuse with clear statuses and write nothing: a wait out of range (INVALID_ARGUMENT), one call too
  many (RESOURCE_EXHAUSTED / QUEUE_FULL), a call nobody serves in time (DEADLINE_EXCEEDED / QUEUE_EXPIRED);
- the sidecar itself restarts while calls are held: the new one (same identity) resumes them at start and
  delivers each exactly once when the agent registers; the restarted caller finds its calls (ListQueued, by the
  call_id it set) and polls them by id (GetQueued); a Call that opts in while nothing serves `echo` waits and
  returns the answer itself once an instance registers;
- an agent calling for its caller (with its call handle) is refused FAILED_PRECONDITION and nothing is held.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest

from hivemesh.mesh.errors import (
    InvalidInputError,
    QueueExpiredError,
    QueueFullError,
    UnknownCapabilityError,
    from_rpc_error,
)
from hivemesh.mesh.sidecar import CALL_HANDLE_KEY, Sidecar, SidecarConfig
from hivemesh.sdk import AgentServer
from hivemesh.sdk.client import JSON
from hivemesh.v1 import agent_pb2, mesh_pb2, mesh_pb2_grpc
from tests.support.agents_for_tests import EchoAgent
from tests.support.orch_env import Orch, wait_until
from tests.support.plain_agent import PlainAgent


class QueueRelay(PlainAgent):
    """A plain agent whose `qrelay` calls onward for its caller (with the call handle) asking to queue a call
    nobody serves, and answers with the status its sidecar gave."""

    def __init__(self) -> None:
        super().__init__("qrelay", prefix="relay-")
        self.mesh_endpoint = ""

    def card(self) -> agent_pb2.AgentCard:
        card = super().card()
        card.capabilities.append(agent_pb2.Capability(name="qrelay", description="queue a call for the caller",
                                                      input_modes=[JSON], output_modes=[JSON]))
        return card

    async def Invoke(self, request: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]
                     ) -> agent_pb2.InvokeResponse:
        if request.capability != "qrelay":
            return await super().Invoke(request, context)
        handle = next(str(v) for k, v in self._record(context) if k == CALL_HANDLE_KEY)
        outcome = {"code": "OK", "reason": ""}
        async with grpc.aio.insecure_channel(self.mesh_endpoint) as channel:
            try:
                await mesh_pb2_grpc.MeshStub(channel).Call(
                    _req("for my caller", queue_for_ms=5_000, capability="nobody-serves-this"),
                    timeout=context.time_remaining(), metadata=((CALL_HANDLE_KEY, handle),))
            except grpc.aio.AioRpcError as exc:
                err = from_rpc_error(exc)
                outcome = {"code": err.code.name, "reason": err.reason}
        return agent_pb2.InvokeResponse(output=json.dumps(outcome).encode(), content_type=JSON,
                                        state=agent_pb2.TASK_STATE_COMPLETED)


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
        gone = await _refused(stub.GetQueued(mesh_pb2.GetQueuedRequest(id="q-" + "0" * 16), timeout=5))
        assert gone.code == grpc.StatusCode.NOT_FOUND

    # An agent calling for its caller (with its call handle) cannot queue: the delegation ends with that call.
    relay = QueueRelay()
    async with relay, Sidecar(SidecarConfig(agent=relay.endpoint, mesh_listen="127.0.0.1:0", audit=False),
                              await orch.env.settings_for("qrelay")) as relay_sidecar:
        relay.mesh_endpoint = relay_sidecar.mesh_endpoint
        assert await orch.mesh.node.registry.wait_for_capability("qrelay", 1, timeout=10)
        assert await orch.mesh.call("qrelay", {}, timeout=10) == {"code": "FAILED_PRECONDITION",
                                                                  "reason": "FAILED_PRECONDITION"}
        assert relay_sidecar.queue is not None and relay_sidecar.queue.queue is not None
        assert await relay_sidecar.queue.queue.held() == []  # nothing was written

"""A plain gRPC caller (generated stubs only, as a program in any language) pins a call to one agent with
`InvokeRequest.agent` on its sidecar's `Mesh` service, on a real mesh (real etcd, real TLS, real agents): alpha
and beta both serve `echo` and `tally`, and a call pinned to alpha (Call, CallBatch items, CallStream, Mesh.Link
frames) is served by alpha's instances only; a bad agent name, a pin with queue_for_ms and a pinned Enqueue are
INVALID_ARGUMENT naming the field, with nothing held; a pin to an agent with no instance is UNAVAILABLE naming it.
The patterns' `DirectRunner.step(..., agent=)` pins its call the same way."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from hivemesh.mesh.errors import HivemeshError, InvalidInputError, NoLiveInstanceError, from_rpc_error
from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
from hivemesh.sdk import AgentServer, AgentServerConfig, MeshClient
from hivemesh.sdk.client import JSON
from hivemesh.sdk.patterns.base import DirectRunner
from hivemesh.v1 import agent_pb2, mesh_pb2, mesh_pb2_grpc
from tests.integration.test_call_agent_pin import Alpha, Beta
from tests.support.meshenv import MeshEnv

pytestmark = pytest.mark.timeout(120)

BAD_NAMES = ("Alpha", "a..b", "x" * 64, "alpha/1", "-alpha")


@dataclass
class Rig:
    env: MeshEnv
    endpoint: str
    """The sidecar's Mesh service (loopback TCP)."""
    stub: mesh_pb2_grpc.MeshStub


@pytest.fixture
async def rig(mesh_env: MeshEnv) -> AsyncIterator[Rig]:
    # alpha has two instances, beta one: unpinned round robin sends every third call to beta.
    agents = [Alpha("alpha-1"), Alpha("alpha-2"), Beta("beta-1")]
    servers = [AgentServer(a, await mesh_env.settings_for(a.name), AgentServerConfig(instance_id=a.tag))
               for a in agents]
    config = SidecarConfig(client="pinner", mesh_listen="127.0.0.1:0", audit=False)
    async with contextlib.AsyncExitStack() as stack:
        await asyncio.gather(*(stack.enter_async_context(s) for s in servers))
        sidecar = await stack.enter_async_context(Sidecar(config, await mesh_env.settings_for("pinner", "client")))
        assert sidecar.node is not None
        for cap in ("echo", "tally"):
            assert await sidecar.node.registry.wait_for_capability(cap, 3, timeout=10), cap
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(sidecar.mesh_endpoint))
        yield Rig(mesh_env, sidecar.mesh_endpoint, mesh_pb2_grpc.MeshStub(channel))


def _req(capability: str = "echo", *, agent: str = "", queue_for_ms: int = 0) -> agent_pb2.InvokeRequest:
    return agent_pb2.InvokeRequest(capability=capability, input=json.dumps({"text": "hi"}).encode(),
                                   content_type=JSON, agent=agent, queue_for_ms=queue_for_ms)


def _who(output: bytes) -> str:
    out = json.loads(output)
    return f"{out['agent']}/{out['served_by']}"


async def _served(stub: mesh_pb2_grpc.MeshStub, n: int, agent: str = "") -> Counter[str]:
    """Who served n Mesh.Calls of echo, one at a time: Counter of "agent/instance"."""
    return Counter([_who((await stub.Call(_req(agent=agent), timeout=5)).output) for _ in range(n)])


async def _streamed(stub: mesh_pb2_grpc.MeshStub, agent: str = "") -> list[dict[str, Any]]:
    """The items of one Mesh.CallStream of tally (the final chunk carries none)."""
    return [json.loads(chunk.data) async for chunk in stub.CallStream(_req("tally", agent=agent), timeout=5)
            if chunk.data]


async def _refused(call: Any) -> HivemeshError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    return from_rpc_error(refused.value)


async def _stream_refused(stub: mesh_pb2_grpc.MeshStub, agent: str) -> HivemeshError:
    async def drain() -> None:
        async for _ in stub.CallStream(_req("tally", agent=agent), timeout=5):
            pass

    return await _refused(drain())


async def test_a_pinned_call_and_batch_reach_only_that_agent_and_all_its_instances(rig: Rig) -> None:
    stub = rig.stub
    assert set(await _served(stub, 6)) == {"alpha/alpha-1", "alpha/alpha-2", "beta/beta-1"}  # unpinned: all
    assert await _served(stub, 8, "alpha") == Counter({"alpha/alpha-1": 4, "alpha/alpha-2": 4})
    assert await _served(stub, 3, "beta") == Counter({"beta/beta-1": 3})
    batch = await stub.CallBatch(mesh_pb2.CallBatchRequest(items=[_req(agent="alpha")] * 9, concurrency=3),
                                 timeout=10)
    assert batch.failed == 0, batch
    assert {_who(r.response.output).partition("/")[0] for r in batch.results} == {"alpha"}, batch


async def test_a_pinned_stream_is_served_by_that_agent_only(rig: Rig) -> None:
    stub = rig.stub
    assert {(await _streamed(stub))[0]["agent"] for _ in range(6)} == {"alpha", "beta"}  # unpinned: both
    served: Counter[str] = Counter()
    for _ in range(6):
        items = await _streamed(stub, "alpha")
        assert [i["n"] for i in items] == [0, 1, 2] and {i["agent"] for i in items} == {"alpha"}, items
        served[items[0]["served_by"]] += 1
    assert served == Counter({"alpha-1": 3, "alpha-2": 3}), served


async def test_calls_framed_on_a_mesh_link_are_pinned_as_mesh_calls_are(rig: Rig) -> None:
    pins = {i: "alpha" for i in range(1, 7)} | {7: "gamma", 8: "Alpha"}

    async def frames() -> AsyncIterator[agent_pb2.LinkFrame]:
        for call_id, agent in pins.items():
            request = _req(agent=agent).SerializeToString()
            yield agent_pb2.LinkFrame(id=call_id, call=agent_pb2.LinkCall(request=request, timeout_s=10))

    answers: dict[int, agent_pb2.LinkAnswer] = {}
    async with grpc.aio.insecure_channel(rig.endpoint) as channel:
        link = channel.stream_stream("/hivemesh.v1.Mesh/Link", request_serializer=agent_pb2.LinkFrame.SerializeToString,
                                     response_deserializer=agent_pb2.LinkFrame.FromString)
        async with asyncio.timeout(20):
            async for message in link(frames()):
                for frame in [*message.batch] or [message]:
                    answers[frame.id] = frame.answer
    assert sorted(answers) == sorted(pins)
    assert all(answers[i].code == 0 for i in range(1, 7)), answers
    served = {_who(agent_pb2.InvokeResponse.FromString(answers[i].response).output) for i in range(1, 7)}
    assert {who.partition("/")[0] for who in served} == {"alpha"}, served  # concurrent: either instance
    assert answers[7].code == grpc.StatusCode.UNAVAILABLE.value[0] and "agent 'gamma'" in answers[7].message
    assert answers[8].code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "bad agent" in answers[8].message


async def test_a_bad_pin_is_invalid_argument_naming_the_field_and_nothing_is_held(rig: Rig) -> None:
    stub = rig.stub
    for bad in BAD_NAMES:
        for err in (await _refused(stub.Call(_req(agent=bad), timeout=5)), await _stream_refused(stub, bad)):
            assert isinstance(err, InvalidInputError) and err.code == grpc.StatusCode.INVALID_ARGUMENT, (bad, err)
            assert "agent" in err.field_violations and "bad agent" in err.message, (bad, err.message)
        batch = await stub.CallBatch(mesh_pb2.CallBatchRequest(items=[_req(agent=bad), _req(agent="alpha")]),
                                     timeout=10)
        assert batch.results[0].error.code == "INVALID_ARGUMENT", (bad, batch)  # that item only
        assert "bad agent" in batch.results[0].error.message and batch.results[1].HasField("response"), batch
    # A pin with a queued call: the queue would deliver it to any agent, so the pin could not hold.
    err = await _refused(stub.Call(_req(agent="alpha", queue_for_ms=5_000), timeout=5))
    assert isinstance(err, InvalidInputError) and "agent" in err.field_violations, err
    assert "queue_for_ms" in err.message and "any agent" in err.message, err.message
    err = await _refused(stub.Enqueue(_req(agent="alpha", queue_for_ms=5_000), timeout=5))
    assert isinstance(err, InvalidInputError) and "agent" in err.field_violations and "Enqueue" in err.message, err
    assert not (await stub.ListQueued(mesh_pb2.ListQueuedRequest(), timeout=5)).calls  # nothing was held
    assert await _served(stub, 2, "alpha") == Counter({"alpha/alpha-1": 1, "alpha/alpha-2": 1})  # still serving


async def test_a_pin_to_an_agent_without_an_instance_is_unavailable_naming_it(rig: Rig) -> None:
    stub = rig.stub
    for err in (await _refused(stub.Call(_req(agent="gamma"), timeout=5)), await _stream_refused(stub, "gamma")):
        assert isinstance(err, NoLiveInstanceError) and err.code == grpc.StatusCode.UNAVAILABLE, err
        assert "agent 'gamma'" in err.message and err.metadata.get("agent") == "gamma", (err.message, err.metadata)
    batch = await stub.CallBatch(mesh_pb2.CallBatchRequest(items=[_req(agent="gamma")]), timeout=10)
    assert batch.results[0].error.reason == NoLiveInstanceError.reason, batch
    assert "agent 'gamma'" in batch.results[0].error.message, batch


async def test_a_direct_runners_step_is_pinned_like_a_workflows(rig: Rig) -> None:
    events: list[str] = []
    async with MeshClient.connect(name="runner", settings=await rig.env.settings_for("runner", "client")) as mesh:
        assert await mesh.node.registry.wait_for_capability("echo", 3, timeout=10)
        runner = DirectRunner(mesh, on_event=lambda kind, _data: events.append(kind))
        steps = [await runner.step(f"s{i}", "echo", {"text": str(i)}, timeout=5, agent="beta") for i in range(4)]
        assert {(s.agent, s.output["agent"]) for s in steps} == {("beta", "beta")}, steps
        with pytest.raises(ValueError, match="bad agent"):
            await runner.step("bad", "echo", {"text": "x"}, agent="Beta")
        assert events == ["step_started", "step_completed"] * 4  # the bad pin announced no step

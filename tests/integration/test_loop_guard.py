"""The call-chain loop guard over the real mesh, in both packagings: a call back into an agent already in its
chain (A -> B -> A) is refused with LOOP_DETECTED at once (not at the deadline), a chain deeper than the mesh's
maximum with DEPTH_EXCEEDED, and a capability declaring recursion runs up to its own bound."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from hivemesh.mesh.errors import DepthExceededError, LoopDetectedError
from hivemesh.mesh.layers.loopguard import DEFAULT_MAX_CALL_DEPTH
from hivemesh.mesh.sidecar import CALL_HANDLE_KEY, Sidecar, SidecarConfig
from hivemesh.sdk import Agent, AgentServer, Context, MeshClient, capability
from hivemesh.v1 import agent_pb2, agent_pb2_grpc, mesh_pb2_grpc
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, start_mesh_env, stop_mesh_env

_JSON = "application/json"
_DEADLINE_S = 30.0
GRANTS = {"grants": [
    {"name": "clients", "subjects": [f"spiffe://{TRUST_DOMAIN}/client/*"], "capabilities": ["*"]},
    {"name": "agents", "subjects": [f"spiffe://{TRUST_DOMAIN}/agent/*"], "capabilities": ["*"]},
]}


class Pinger(Agent):
    """The SDK packaging: `ping` calls `bounce` (the agent behind the sidecar), which may call `ping` again."""

    name = "pinger"

    @capability(name="ping")
    async def ping(self, req: dict[str, Any], ctx: Context) -> Any:
        if req.get("stop"):
            return {"chain": list(ctx.call.chain)}
        return await ctx.call_capability("bounce", req)

    @capability(name="countdown", recursion=3)
    async def countdown(self, req: dict[str, int], ctx: Context) -> int:
        """Calls itself n times: n re-entries of this agent in one chain."""
        if req["n"] <= 0:
            return len(ctx.call.chain)
        return int(await ctx.call_capability("countdown", {"n": req["n"] - 1}))

    @capability(name="deep", recursion=64)
    async def deep(self, req: dict[str, int], ctx: Context) -> int:
        """Allowed to recurse far more than the mesh's maximum depth: the depth limit still stops it."""
        if req["n"] <= 0:
            return len(ctx.call.chain)
        return int(await ctx.call_capability("deep", {"n": req["n"] - 1}))


class Bouncer(agent_pb2_grpc.AgentServicer):
    """The sidecar packaging: plain gRPC; `bounce` calls `ping` through its sidecar's Mesh service with the call
    handle it was given (and sends no chain of its own: the sidecar carries it on)."""

    def __init__(self) -> None:
        self.mesh_endpoint = ""
        self.port = 0
        self._server: grpc.aio.Server | None = None

    def card(self) -> agent_pb2.AgentCard:
        return agent_pb2.AgentCard(name="bouncer", capabilities=[agent_pb2.Capability(name="bounce")])

    async def Describe(self, request: Any, context: Any) -> agent_pb2.AgentCard:
        return self.card()

    async def Invoke(self, request: agent_pb2.InvokeRequest, context: Any) -> agent_pb2.InvokeResponse:
        handle = [(k, v) for k, v in context.invocation_metadata() if k == CALL_HANDLE_KEY]
        onward = agent_pb2.InvokeRequest(capability="ping", input=request.input, content_type=_JSON)
        async with grpc.aio.insecure_channel(self.mesh_endpoint) as channel:
            try:
                return await mesh_pb2_grpc.MeshStub(channel).Call(onward, metadata=handle,
                                                                  timeout=context.time_remaining())
            except grpc.aio.AioRpcError as exc:  # relay the callee's refusal as it came
                await context.abort(exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ()))
                raise

    async def __aenter__(self) -> Bouncer:
        server = grpc.aio.server()
        agent_pb2_grpc.add_AgentServicer_to_server(self, server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            await self._server.stop(0.5)


@dataclass
class Rig:
    mesh: MeshClient


@pytest.fixture
async def rig(etcd: Any, etcd_server: Any, tmp_path: Path) -> AsyncIterator[Rig]:
    env: MeshEnv = await start_mesh_env(tmp_path, etcd_server.endpoint, GRANTS)
    try:
        async with Bouncer() as bouncer:
            sidecar = Sidecar(SidecarConfig(agent=f"127.0.0.1:{bouncer.port}", audit=False),
                              await env.settings_for("bouncer"))
            async with sidecar, AgentServer(Pinger(), await env.settings_for("pinger")):
                bouncer.mesh_endpoint = sidecar.mesh_endpoint
                async with MeshClient.connect(name="tester", settings=await env.settings_for("tester", "client")) \
                        as mesh:
                    for node in (mesh.node, sidecar.node):
                        assert node is not None
                        for cap in ("ping", "bounce"):
                            assert await node.registry.wait_for_capability(cap, 1, timeout=10)
                    yield Rig(mesh)
    finally:
        await stop_mesh_env(env)


@pytest.mark.parametrize(
    ("entry", "refuser"),
    [("ping", "pinger"), ("bounce", "bouncer")],
    ids=["sdk-agent-refuses", "sidecar-refuses"],
)
async def test_a_call_back_into_an_agent_in_its_chain_is_refused_at_once(rig: Rig, entry: str, refuser: str) -> None:
    started = time.monotonic()
    with pytest.raises(LoopDetectedError) as loop:
        await rig.mesh.call(entry, {}, timeout=_DEADLINE_S)
    elapsed = time.monotonic() - started
    err = loop.value
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LOOP_DETECTED")
    assert err.metadata["agent"] == f"spiffe://{TRUST_DOMAIN}/agent/{refuser}"
    assert "declares no recursion" in err.message
    # The sidecar carried the chain of the inbound call its handle names (the agent behind it sent none).
    assert err.message.endswith(" -> ".join(f"spiffe://{TRUST_DOMAIN}/agent/{a}" for a in (
        refuser, "bouncer" if refuser == "pinger" else "pinger", refuser)))
    assert elapsed < 5.0, elapsed  # refused on the third hop, not when the 30 s deadline ran out


async def test_each_packaging_adds_its_agent_to_the_chain(rig: Rig) -> None:
    assert await rig.mesh.call("ping", {"stop": True}, timeout=10) == {"chain": []}  # a client adds nothing
    # The agent behind the sidecar sent no chain: its sidecar's Mesh service added the agent.
    bounced = await rig.mesh.call("bounce", {"stop": True}, timeout=10)
    assert bounced == {"chain": [f"spiffe://{TRUST_DOMAIN}/agent/bouncer"]}
    # The SDK's Context adds its agent on each onward call (countdown returns the chain's length).
    assert await rig.mesh.call("countdown", {"n": 2}, timeout=10) == 2


async def test_declared_recursion_runs_up_to_its_bound(rig: Rig) -> None:
    assert await rig.mesh.call("countdown", {"n": 3}, timeout=_DEADLINE_S) == 3  # three re-entries: allowed
    with pytest.raises(LoopDetectedError) as over:
        await rig.mesh.call("countdown", {"n": 4}, timeout=_DEADLINE_S)
    assert over.value.metadata["visits"] == "4" and "declares recursion 3" in over.value.message


async def test_a_chain_deeper_than_the_maximum_is_refused(rig: Rig) -> None:
    depth = DEFAULT_MAX_CALL_DEPTH
    assert await rig.mesh.call("deep", {"n": depth - 1}, timeout=_DEADLINE_S) == depth - 1  # `depth` agents deep
    started = time.monotonic()
    with pytest.raises(DepthExceededError) as deep:
        await rig.mesh.call("deep", {"n": depth}, timeout=_DEADLINE_S)
    assert (deep.value.code, deep.value.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "DEPTH_EXCEEDED")
    assert deep.value.metadata == {"depth": str(depth + 1), "max_depth": str(depth)}
    assert time.monotonic() - started < 10.0

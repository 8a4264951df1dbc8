"""A caller's CallContext reaches the agent behind the callee's sidecar in ONE `context` field, over the real mesh.

The caller's sidecar adds its agent to the call chain. It used to append a second context holding only the chain;
protobufjs (grpc-js agents) keeps only the last occurrence of a singular message field, so a Node agent lost the
caller's idempotency key, call id and ids. The agent here records the raw request bytes it receives (unary, or
each call frame's request on its Agent.Link) and the tests read them as such a decoder does: the last context."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from hivemesh.mesh.sidecar import CALL_HANDLE_KEY, Sidecar, SidecarConfig
from hivemesh.sdk import MeshClient
from hivemesh.v1 import agent_pb2, mesh_pb2_grpc
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv
from tests.support.plain_link import PlainLink
from tests.support.wire_fields import the_context

_JSON = "application/json"
RELAY = f"spiffe://{TRUST_DOMAIN}/agent/relay"
EARLIER = f"spiffe://{TRUST_DOMAIN}/agent/earlier"


class RawAgent:
    """A plain gRPC agent (generic handlers, no hivemesh code) that records each request's bytes as they reached
    it. Capability `fields` answers `{}`; `relay` calls `fields` through its sidecar's Mesh service, with the call
    handle it was given and a context of its own, as an agent in any language would."""

    def __init__(self, name: str, capability: str, *, link: bool = False) -> None:
        self.name, self.capability = name, capability
        self.received: list[bytes] = []
        self.mesh_endpoint = ""
        self.link = PlainLink(self._invoke_decoded) if link else None
        self._server: grpc.aio.Server | None = None
        self.port = 0

    def card(self) -> agent_pb2.AgentCard:
        return agent_pb2.AgentCard(name=self.name, capabilities=[agent_pb2.Capability(
            name=self.capability, input_modes=[_JSON], output_modes=[_JSON])])

    async def _answer(self, req: agent_pb2.InvokeRequest, metadata: Any, timeout: float | None) -> bytes:
        if req.capability != "relay":
            return agent_pb2.InvokeResponse(output=b"{}", content_type=_JSON,
                                            state=agent_pb2.TASK_STATE_COMPLETED).SerializeToString()
        handle = [(k, v) for k, v in metadata if k == CALL_HANDLE_KEY]
        onward = agent_pb2.InvokeRequest(capability="fields", input=b"{}", content_type=_JSON,
                                          context=agent_pb2.CallContext(**json.loads(req.input)))
        async with grpc.aio.insecure_channel(self.mesh_endpoint) as channel:
            answer: agent_pb2.InvokeResponse = await mesh_pb2_grpc.MeshStub(channel).Call(
                onward, metadata=handle, timeout=timeout)
        return answer.SerializeToString()

    async def _invoke(self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        self.received.append(raw)
        return await self._answer(agent_pb2.InvokeRequest.FromString(raw), context.invocation_metadata() or (),
                                  context.time_remaining())

    async def _invoke_decoded(self, req: agent_pb2.InvokeRequest, context: Any) -> agent_pb2.InvokeResponse:
        answer = await self._answer(req, context.invocation_metadata(), context.time_remaining())
        return agent_pb2.InvokeResponse.FromString(answer)

    async def _link(self, frames: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async def tapped() -> AsyncIterator[Any]:
            async for frame in frames:
                if frame.WhichOneof("body") == "call":
                    self.received.append(frame.call.request)  # the request bytes, as the frame carried them
                yield frame

        assert self.link is not None
        async for out in self.link.serve(tapped(), context):
            yield out

    async def __aenter__(self) -> RawAgent:
        async def describe(request: Any, context: Any) -> agent_pb2.AgentCard:
            return self.card()

        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "Describe": grpc.unary_unary_rpc_method_handler(
                describe, request_deserializer=agent_pb2.DescribeRequest.FromString,
                response_serializer=agent_pb2.AgentCard.SerializeToString),
            "Invoke": grpc.unary_unary_rpc_method_handler(self._invoke),  # raw bytes in and out
        }
        if self.link is not None:
            handlers["Link"] = grpc.stream_stream_rpc_method_handler(
                self._link, request_deserializer=agent_pb2.LinkFrame.FromString,
                response_serializer=agent_pb2.LinkFrame.SerializeToString)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("hivemesh.v1.Agent", handlers),))
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            await self._server.stop(0.5)


@dataclass
class Rig:
    relay: RawAgent
    target: RawAgent
    relay_sidecar: Sidecar


@pytest.fixture(params=["unary", "link"])
async def rig(mesh_env: MeshEnv, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    """relay (behind its sidecar) calls fields on target (behind another); target serves unary Invoke only, or
    also Agent.Link (its sidecar then sends each call as a frame carrying the same request bytes)."""
    async with RawAgent("relay", "relay") as relay, \
            RawAgent("target", "fields", link=request.param == "link") as target:
        relay_sidecar = Sidecar(SidecarConfig(agent=f"127.0.0.1:{relay.port}", audit=False,
                                              mesh_socket=str(tmp_path / "relay.sock")),
                                await mesh_env.settings_for("relay"))
        target_sidecar = Sidecar(SidecarConfig(agent=f"127.0.0.1:{target.port}", audit=False,
                                               mesh_socket=str(tmp_path / "target.sock")),
                                 await mesh_env.settings_for("target"))
        async with relay_sidecar, target_sidecar:
            relay.mesh_endpoint = relay_sidecar.mesh_endpoint
            for sidecar in (relay_sidecar, target_sidecar):
                assert sidecar.node is not None
                for cap in ("relay", "fields"):
                    assert await sidecar.node.registry.wait_for_capability(cap, 1, timeout=10)
            yield Rig(relay, target, relay_sidecar)


async def test_a_local_callers_context_reaches_the_agent_whole_in_one_context_field(rig: Rig) -> None:
    caller = agent_pb2.CallContext(idempotency_key="k2", call_id="c2", conversation_id="conv", workflow_id="wf",
                                   parent_call_id="p1", priority=2)
    async with grpc.aio.insecure_channel(rig.relay_sidecar.mesh_endpoint) as channel:
        stub = mesh_pb2_grpc.MeshStub(channel)
        await stub.Call(agent_pb2.InvokeRequest(capability="fields", input=b"{}", context=caller), timeout=10)
        await stub.Call(agent_pb2.InvokeRequest(capability="fields", input=b"{}"), timeout=10)
    with_context, without = rig.target.received
    want = agent_pb2.CallContext()
    want.CopyFrom(caller)
    want.chain.append(RELAY)
    assert the_context(with_context) == want
    assert the_context(without) == agent_pb2.CallContext(chain=[RELAY])  # no context of the caller's: the chain


async def test_an_agents_context_with_its_call_handle_keeps_the_inbound_chain_in_one_field(
    rig: Rig, mesh_env: MeshEnv
) -> None:
    """The relay sends a context of its own (no chain) with its call handle: the chain of the call it acts for
    goes on in that one context, after the relay's fields."""
    async with MeshClient.connect(name="tester", settings=await mesh_env.settings_for("tester", "client")) as mesh:
        assert await mesh.node.registry.wait_for_capability("relay", 1, timeout=10)
        await mesh.call("relay", {"idempotency_key": "k3", "call_id": "c3"}, timeout=10,
                        context=agent_pb2.CallContext(chain=[EARLIER]))
    [received] = rig.target.received
    assert the_context(received) == agent_pb2.CallContext(idempotency_key="k3", call_id="c3",
                                                         chain=[EARLIER, RELAY])

"""An agent in another language that fails without hivemesh details (a plain `INTERNAL "database exploded"`, a
handler that threw, its own NOT_FOUND or INVALID_ARGUMENT) reaches a caller in any language, through two
sidecars, as ErrorInfo AGENT_ERROR with the agent's own code and message: never a reason made up from the code's
name (INTERNAL, UNKNOWN) passed off as the mesh's. The mesh's own refusals and an agent's own hivemesh ErrorInfo
keep their reasons."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from hivemesh.mesh.errors import AgentError, HivemeshError, from_rpc_error
from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
from hivemesh.sdk import MeshClient
from hivemesh.v1 import agent_pb2, mesh_pb2_grpc
from tests.support.meshenv import MeshEnv
from tests.support.plain_agent import FAIL_MESSAGE, PlainAgent

_TEXT_SCHEMA = json.dumps({"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}})


class FailingAgent(PlainAgent):
    """A plain agent (generated stubs only) whose capabilities fail as agents in any language do."""

    def card(self) -> agent_pb2.AgentCard:
        card = super().card()
        for name in ("explode", "throw", "lookup", "rich"):
            card.capabilities.append(agent_pb2.Capability(
                name=f"plain-{name}", description=f"fails: {name}", input_schema=_TEXT_SCHEMA,
                input_modes=["application/json"], output_modes=["application/json"]))
        return card

    async def Invoke(
        self, request: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.InvokeResponse:
        cap = request.capability
        if cap == "plain-explode":
            await context.abort(grpc.StatusCode.INTERNAL, "database exploded")
        if cap == "plain-throw":
            raise RuntimeError("handler threw")  # gRPC answers UNKNOWN, as grpc-js does for a thrown error
        if cap == "plain-lookup":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no order 7")
        if cap == "plain-rich":  # the agent's own hivemesh ErrorInfo, as examples/node's richstatus.js sends
            info = error_details_pb2.ErrorInfo(reason="INVALID_INPUT", domain="hivemesh")
            status = status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="text is not a sku")
            status.details.add().Pack(info)
            rich = rpc_status.to_status(status)
            await context.abort(rich.code, rich.details, rich.trailing_metadata)
        return await super().Invoke(request, context)


@dataclass
class Rig:
    channel: grpc.aio.Channel
    """A plain channel to a caller-only sidecar's Mesh service: what a Node.js caller dials."""
    mesh: MeshClient


@pytest.fixture
async def rig(mesh_env: MeshEnv) -> AsyncIterator[Rig]:
    async with FailingAgent("plain", prefix="plain-") as plain:
        agent_side = Sidecar(SidecarConfig(agent=plain.endpoint, audit=False), await mesh_env.settings_for("plain"))
        caller_side = Sidecar(SidecarConfig(client="node-caller", mesh_listen="127.0.0.1:0", audit=False),
                              await mesh_env.settings_for("node-caller", "client"))
        async with agent_side, caller_side, grpc.aio.insecure_channel(caller_side.mesh_endpoint) as channel:
            settings = await mesh_env.settings_for("tester", "client")
            async with MeshClient.connect(name="tester", settings=settings) as mesh:
                for node in (mesh.node, caller_side.node):
                    assert node is not None
                    assert await node.registry.wait_for_capability("plain-explode", 1, timeout=10)
                yield Rig(channel, mesh)


def _info(exc: grpc.aio.AioRpcError) -> tuple[str, str] | None:
    """The (reason, domain) of the status's ErrorInfo, None without one."""
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason, info.domain
    return None


_AGENTS_OWN = [
    ("plain-explode", grpc.StatusCode.INTERNAL, "database exploded"),
    ("plain-throw", grpc.StatusCode.UNKNOWN, "handler threw"),
    ("plain-lookup", grpc.StatusCode.NOT_FOUND, "no order 7"),
    ("plain-fail", grpc.StatusCode.INVALID_ARGUMENT, FAIL_MESSAGE),
]


@pytest.mark.parametrize(("capability", "code", "message"), _AGENTS_OWN)
async def test_an_agents_plain_error_reaches_a_caller_in_any_language_as_agent_error(
    rig: Rig, capability: str, code: grpc.StatusCode, message: str
) -> None:
    call = mesh_pb2_grpc.MeshStub(rig.channel).Call
    text = "bad" if capability == "plain-fail" else "x"
    request = agent_pb2.InvokeRequest(capability=capability, input=json.dumps({"text": text}).encode())
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call(request, timeout=10)
    assert failed.value.code() == code, failed.value.details()
    assert message in (failed.value.details() or "")
    assert _info(failed.value) == ("AGENT_ERROR", "hivemesh")
    with pytest.raises(AgentError) as typed:  # a Python caller: the same type, code and reason
        await rig.mesh.call(capability, {"text": text}, timeout=10)
    assert (typed.value.code, typed.value.reason) == (code, "AGENT_ERROR")
    assert message in typed.value.message and not typed.value.said_by_grpc


async def test_the_meshs_own_refusals_and_an_agents_own_reason_are_kept(rig: Rig) -> None:
    call = mesh_pb2_grpc.MeshStub(rig.channel).Call
    cases = [
        (agent_pb2.InvokeRequest(capability="plain-rich", input=b'{"text": "x"}'),
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT"),  # the agent's own hivemesh ErrorInfo
        (agent_pb2.InvokeRequest(capability="plain-explode", input=b'{"nope": 1}'),
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT"),  # the sidecar's schema check
        (agent_pb2.InvokeRequest(capability="no-such-capability"), grpc.StatusCode.NOT_FOUND, "UNKNOWN_CAPABILITY"),
    ]
    for request, code, reason in cases:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call(request, timeout=10)
        assert (failed.value.code(), _info(failed.value)) == (code, (reason, "hivemesh")), failed.value.details()
        err = from_rpc_error(failed.value)
        assert isinstance(err, HivemeshError) and not isinstance(err, AgentError) and err.reason == reason

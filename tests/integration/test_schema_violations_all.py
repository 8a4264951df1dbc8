"""A value that breaks its schema in several fields gets one field violation per bad field, not only the first:
the caller's input, checked on the agent's side in both packagings (an SDK agent and a plain agent behind a
sidecar: both through `mesh/schema.py`'s `check`), and the agent's answer against its output schema. The message
names the first bad field and says how many more there were."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from hivemesh.mesh.errors import InvalidInputError, InvalidOutputError
from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
from hivemesh.sdk import Agent, AgentServer, MeshClient, capability
from hivemesh.v1 import agent_pb2, agent_pb2_grpc
from tests.support.meshenv import MeshEnv

SLEEP_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {"ms": {"type": "integer"}, "n": {"type": "integer"}},
}
ANSWER_SCHEMA: dict[str, Any] = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
BAD_INPUT = {"ms": "x", "n": "y", "zzz": 1}
INPUT_VIOLATIONS = {
    "input.ms": '"x" is not of type "integer"',
    "input.n": '"y" is not of type "integer"',
    "input": "Additional properties are not allowed ('zzz' was unexpected)",
}
OUTPUT_VIOLATIONS = {"output.a": '"x" is not of type "integer"', "output.b": '"y" is not of type "integer"'}


class Sleeper(Agent):
    """The SDK packaging: a capability with a three-rule input schema, and one whose answer breaks its own."""

    name = "sleeper"

    @capability(name="sdk-sleep", input_schema=SLEEP_SCHEMA, idempotent=True)
    async def sleep(self, req: dict[str, Any]) -> dict[str, Any]:
        return req

    @capability(name="sdk-answer", output_schema=ANSWER_SCHEMA, idempotent=True)
    async def answer(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"a": "x", "b": "y"}


class PlainSleeper(agent_pb2_grpc.AgentServicer):
    """The same two capabilities, as an agent in any language behind a sidecar."""

    async def Describe(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> agent_pb2.AgentCard:
        return agent_pb2.AgentCard(name="plainsleeper", version="1", capabilities=[
            agent_pb2.Capability(name="plain-sleep", input_schema=json.dumps(SLEEP_SCHEMA)),
            agent_pb2.Capability(name="plain-answer", output_schema=json.dumps(ANSWER_SCHEMA)),
        ])

    async def Invoke(
        self, request: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.InvokeResponse:
        output = request.input if request.capability == "plain-sleep" else b'{"a": "x", "b": "y"}'
        return agent_pb2.InvokeResponse(output=output, content_type="application/json")


@pytest.fixture
async def mesh(mesh_env: MeshEnv) -> AsyncIterator[MeshClient]:
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServicer_to_server(PlainSleeper(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        sidecar = Sidecar(SidecarConfig(agent=f"127.0.0.1:{port}", audit=False),
                          await mesh_env.settings_for("plainsleeper"))
        tester = await mesh_env.settings_for("tester", "client")
        async with sidecar, AgentServer(Sleeper(), await mesh_env.settings_for("sleeper")):
            async with MeshClient.connect(name="tester", settings=tester) as mc:
                for name in ("sdk-sleep", "plain-sleep"):
                    assert await mc.node.registry.wait_for_capability(name, 1, timeout=10)
                yield mc
    finally:
        await server.stop(0.5)


@pytest.mark.parametrize("packaging", ["sdk", "plain"])
async def test_every_bad_input_field_is_a_field_violation(mesh: MeshClient, packaging: str) -> None:
    with pytest.raises(InvalidInputError) as refused:
        await mesh.call(f"{packaging}-sleep", BAD_INPUT, timeout=10)
    err = refused.value
    assert err.field_violations == INPUT_VIOLATIONS, err
    assert err.message == (f"input does not match the schema of '{packaging}-sleep': "
                           'input.ms: "x" is not of type "integer" (and 2 more bad fields)'), err.message
    assert await mesh.call(f"{packaging}-sleep", {"ms": 1, "n": 2}, timeout=10) == {"ms": 1, "n": 2}


@pytest.mark.parametrize("packaging", ["sdk", "plain"])
async def test_every_bad_output_field_is_a_field_violation(mesh: MeshClient, packaging: str) -> None:
    with pytest.raises(InvalidOutputError) as refused:
        await mesh.call(f"{packaging}-answer", {}, timeout=10)
    err = refused.value
    assert err.field_violations == OUTPUT_VIOLATIONS, err
    assert err.message.endswith('output.a: "x" is not of type "integer" (and 1 more bad field)'), err.message

"""The whole path over real sockets: SDK agent (in-process layers) ⇄ MeshClient, mTLS + JWT, etcd registry."""

from __future__ import annotations

import grpc
import pytest

from hivemesh.mesh.layers import Inbound
from hivemesh.sdk import (
    AgentServer,
    AgentServerConfig,
    HivemeshError,
    InvalidInputError,
    MeshClient,
    PayloadTooLargeError,
    UnknownCapabilityError,
)
from hivemesh.sdk.client import CallResult
from tests.support.agents_for_tests import EchoAgent
from tests.support.meshenv import MeshEnv


async def test_call_through_in_process_mesh(mesh_env: MeshEnv) -> None:
    async with AgentServer(EchoAgent("a1"), await mesh_env.settings_for("echo")) as server:
        async with MeshClient.connect(name="tester", settings=await mesh_env.settings_for("tester", "client")) as mesh:
            assert await mesh.node.registry.wait_for_capability("echo", 1, timeout=10)
            result: CallResult = await mesh.call_detailed("echo", {"text": "hi"}, timeout=10)
            assert result.output == {
                "text": "hi",
                "caller": "spiffe://hivemesh.local/client/tester",
                "served_by": "a1",
            }
            assert result.instance.instance_id == server.instance_id
            assert [h.kind for h in result.hops] == ["agent"]
            words = [w async for w in mesh.stream("shout", {"text": "a b c"}, timeout=10)]
            assert words == ["A", "B", "C"]


async def test_bad_inputs_get_clear_statuses(mesh_env: MeshEnv) -> None:
    async with AgentServer(EchoAgent(), await mesh_env.settings_for("echo"), AgentServerConfig(max_input_bytes=1024)):
        async with MeshClient.connect(name="tester", settings=await mesh_env.settings_for("tester", "client")) as mesh:
            assert await mesh.node.registry.wait_for_capability("echo", 1, timeout=10)
            with pytest.raises(InvalidInputError) as bad_schema:
                await mesh.call("echo", {"txt": "missing field"}, timeout=10)
            assert bad_schema.value.code == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(InvalidInputError) as bad_json:
                await mesh.call("echo", b"{not json", timeout=10)
            assert "not valid JSON" in bad_json.value.message
            with pytest.raises(PayloadTooLargeError) as big:
                await mesh.call("echo", {"text": "x" * 4096}, timeout=10)
            assert big.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            with pytest.raises(UnknownCapabilityError) as unknown:
                await mesh.call("no-such-capability", {}, timeout=10)
            assert unknown.value.code == grpc.StatusCode.NOT_FOUND


async def test_observers_hear_every_decision(mesh_env: MeshEnv) -> None:
    heard: list[tuple[str, str, str]] = []

    def record(call: Inbound, err: HivemeshError | None, code: grpc.StatusCode, elapsed: float) -> None:
        assert elapsed >= 0
        capability = call.request.capability if call.request else ""
        heard.append((capability, code.name, err.reason if err else ""))

    settings = await mesh_env.settings_for("echo")
    async with AgentServer(EchoAgent(), settings, AgentServerConfig(observers=(record,))):
        async with MeshClient.connect(name="tester", settings=await mesh_env.settings_for("tester", "client")) as mesh:
            assert await mesh.node.registry.wait_for_capability("echo", 1, timeout=10)
            await mesh.call("echo", {"text": "ok"}, timeout=10)
            with pytest.raises(InvalidInputError):
                await mesh.call("echo", {"bad": 1}, timeout=10)
            with pytest.raises(HivemeshError):
                await mesh.call("boom", {"text": "x"}, timeout=10)
            assert [w async for w in mesh.stream("shout", {"text": "a"}, timeout=10)] == ["A"]
    assert heard == [
        ("echo", "OK", ""),
        ("echo", "INVALID_ARGUMENT", "INVALID_INPUT"),
        ("boom", "INTERNAL", ""),
        ("shout", "OK", ""),
    ]

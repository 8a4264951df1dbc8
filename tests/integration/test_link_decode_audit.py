"""A Link message the agent's link server refuses itself (bytes that do not decode as a LinkFrame, or a frame that
is neither a call nor a cancel) ends the link INVALID_ARGUMENT, as before, and is now recorded in the agent's audit
log once, with the sender's verified identity, as an Invoke request that does not decode is
(`InboundChain.identify`). Before, the refusal left no record at all. Healthy links are recorded only by their
calls, each as the Invoke it carries. Real SDK agent, real mutual TLS, a raw gRPC stream for the bad messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from hivemesh.mesh.tls import join, secure_channel
from hivemesh.sdk import AgentServer, AgentServerConfig, MeshClient
from hivemesh.v1 import agent_pb2
from tests.support.agents_for_tests import EchoAgent
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(120)

LINK = "/hivemesh.v1.Agent/Link"
SENDER = f"spiffe://{TRUST_DOMAIN}/client/garbler"
_NOT_A_FRAME = b"\xff\xff\xff"
"""Not a LinkFrame: a field tag whose varint never ends."""
_AN_ANSWER = agent_pb2.LinkFrame(id=7, answer=agent_pb2.LinkAnswer(code=0)).SerializeToString()
"""A frame a caller may not send (answers go the other way)."""


def _inbound(server: AgentServer) -> list[dict[str, Any]]:
    """The agent's inbound audit records, as written to its spool."""
    assert server.audit is not None, "the agent's audit log is off"
    records = [json.loads(line) for line in server.audit.spool.lines()]
    return [r for r in records if r.get("kind") == "inbound"]


async def _refused_link(env: MeshEnv, server: AgentServer, message: bytes) -> grpc.aio.AioRpcError:
    """Send message alone on a raw Link stream, from a workload of the mesh over mutual TLS; the stream's end."""
    resp = await env.operator.create_join_token("garbler", "client", 60)
    workload = await join(env.controlplane.join_address, env.certs.ca_cert.read_bytes(), resp.token,
                          "garbler", "client", trust_domain=TRUST_DOMAIN)
    async with secure_channel(server.endpoint, workload.channel_credentials(),
                              server_name=server.node.workload.identity.dns_name) as channel:
        stream = channel.stream_stream(LINK)(iter([message]), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stream:
                pass
    return refused.value


@pytest.mark.parametrize("message, problem", [
    (_NOT_A_FRAME, "a Link message does not decode as hivemesh.v1.LinkFrame"),
    (_AN_ANSWER, "link frame 7 is neither a call nor a cancel"),
], ids=["undecodable", "not-a-call"])
async def test_a_link_message_the_server_refuses_is_recorded_once_with_its_sender(
    mesh_env: MeshEnv, tmp_path: Path, message: bytes, problem: str
) -> None:
    async with AgentServer(EchoAgent(), await mesh_env.settings_for("echo"),
                           AgentServerConfig(link=True, audit_dir=tmp_path / "spools")) as server:
        # A healthy link first: its calls are recorded (as Invokes), the link itself is not.
        async with MeshClient.connect(name="tester", settings=await mesh_env.settings_for("tester", "client"),
                                      link=True) as mesh:
            assert await mesh.node.registry.wait_for_capability("echo", 1, timeout=10)
            for i in range(3):
                await mesh.call("echo", {"text": f"hi {i}"}, timeout=10)
        assert server._link is not None and server._link.calls == 3, "the healthy calls did not go on a link"
        assert await until(lambda: len(_inbound(server)) == 3, 10), _inbound(server)

        refused = await _refused_link(mesh_env, server, message)
        # What the caller sees is what it saw before.
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused
        assert (refused.details() or "").startswith(problem), refused.details()

        assert await until(lambda: len(_inbound(server)) > 3, 10), "the refused link left no audit record"
        records = _inbound(server)
    assert [r["method"] for r in records] == ["Invoke"] * 3 + ["Link"], records
    assert [r["caller"] for r in records[:3]] == [f"spiffe://{TRUST_DOMAIN}/client/tester"] * 3, records
    record = records[-1]
    assert (record["decision"], record["status"], record["reason"]) == (
        "invalid", "INVALID_ARGUMENT", "INVALID_INPUT"), record
    assert record["caller"] == SENDER, record  # the verified identity, not a claim
    assert "caller_unverified" not in record, record
    assert record["message"].startswith(problem), record
    assert record["remote"] and record["capability"] == "", record
    assert record["instance"] == server.instance_id, record

"""A request that does not decode on a typed method the inbound chain does not see (grpc health checking, server
reflection) is refused INVALID_ARGUMENT by the data plane's `DecodeGuard`, as before, and is now recorded in the
node's audit log once, with the sender's verified identity, as every other data-plane refusal is (an undecodable
Invoke, an undecodable Link message). Before, the guard's refusal left no record. Healthy health checks and
reflection are not recorded. The control plane, whose audit runs before its guard, still records such a refusal
exactly once. Real SDK agent, real mutual TLS, raw gRPC calls for the bad bytes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from hivemesh.mesh.tls import join, secure_channel
from hivemesh.sdk import AgentServer, AgentServerConfig
from hivemesh.v1 import audit_pb2, policy_pb2
from tests.support.agents_for_tests import EchoAgent
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv

pytestmark = pytest.mark.timeout(120)

SENDER = f"spiffe://{TRUST_DOMAIN}/client/garbler"
_NOT_UTF8 = b"\x0a\x02\xff\xfe"
"""Field 1, a string in both request types (HealthCheckRequest.service, ServerReflectionRequest.host), not UTF-8."""
_CUT_SHORT = b"\x0a\xff"
"""Field 1 with a length past the end of the bytes: a corrupt wire format."""
_HEALTH = "grpc.health.v1.HealthCheckRequest"
_REFLECTION = "grpc.reflection.v1alpha.ServerReflectionRequest"  # v1 is served with v1alpha's messages


def _inbound(server: AgentServer) -> list[dict[str, Any]]:
    """The agent's inbound audit records, as written to its spool."""
    assert server.audit is not None, "the agent's audit log is off"
    records = [json.loads(line) for line in server.audit.spool.lines()]
    return [r for r in records if r.get("kind") == "inbound"]


@asynccontextmanager
async def _garbler(env: MeshEnv, server: AgentServer) -> AsyncIterator[grpc.aio.Channel]:
    """A mutual-TLS channel to the agent as the mesh workload client/garbler (a real identity, not the agent's)."""
    resp = await env.operator.create_join_token("garbler", "client", 60)
    workload = await join(env.controlplane.join_address, env.certs.ca_cert.read_bytes(), resp.token,
                          "garbler", "client", trust_domain=TRUST_DOMAIN)
    async with secure_channel(server.endpoint, workload.channel_credentials(),
                              server_name=server.node.workload.identity.dns_name) as channel:
        yield channel


async def _refused(channel: grpc.aio.Channel, path: str, raw: bytes) -> grpc.aio.AioRpcError:
    """Send raw on path (its cardinality's way); the error the call ended with."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        if path.endswith("/Check"):
            await channel.unary_unary(path)(raw, timeout=10)
        elif path.endswith("/Watch"):
            async for _ in channel.unary_stream(path)(raw, timeout=10):
                pass
        else:  # reflection: a bidirectional stream
            async for _ in channel.stream_stream(path)(iter([raw]), timeout=10):
                pass
    return refused.value


def _assert_refusal_record(record: dict[str, Any], method: str, request_type: str, server: AgentServer) -> None:
    assert record["method"] == method, record
    assert (record["decision"], record["status"], record["reason"]) == (
        "invalid", "INVALID_ARGUMENT", "INVALID_INPUT"), record
    assert record["caller"] == SENDER, record  # the verified identity, not a claim
    assert "caller_unverified" not in record, record
    assert record["message"].startswith(f"the request is not a valid {request_type} message"), record
    assert record["remote"] and record["capability"] == "", record
    assert record["instance"] == server.instance_id, record


@pytest.mark.parametrize("path, raw, request_type", [
    ("/grpc.health.v1.Health/Check", _NOT_UTF8, _HEALTH),
    ("/grpc.health.v1.Health/Check", _CUT_SHORT, _HEALTH),
    ("/grpc.health.v1.Health/Watch", _NOT_UTF8, _HEALTH),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", _NOT_UTF8, _REFLECTION),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", _CUT_SHORT, _REFLECTION),
], ids=["check-utf8", "check-cut", "watch", "reflection-v1alpha", "reflection-v1"])
async def test_an_undecodable_health_or_reflection_request_is_refused_on_record(
    mesh_env: MeshEnv, tmp_path: Path, path: str, raw: bytes, request_type: str
) -> None:
    async with AgentServer(EchoAgent(), await mesh_env.settings_for("echo"),
                           AgentServerConfig(audit_dir=tmp_path / "spools")) as server:
        async with _garbler(mesh_env, server) as channel:
            refused = await _refused(channel, path, raw)
        # What the caller sees is what it saw before.
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused
        assert (refused.details() or "").startswith(f"the request is not a valid {request_type} message"), refused
        records = _inbound(server)  # written before the refusal was sent
    assert len(records) == 1, records
    _assert_refusal_record(records[0], path.lstrip("/"), request_type, server)


async def test_healthy_health_checks_and_reflection_are_not_recorded(mesh_env: MeshEnv, tmp_path: Path) -> None:
    async with AgentServer(EchoAgent(), await mesh_env.settings_for("echo"),
                           AgentServerConfig(audit_dir=tmp_path / "spools")) as server:
        async with _garbler(mesh_env, server) as channel:
            check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                        response_deserializer=health_pb2.HealthCheckResponse.FromString)
            for service in ("", "hivemesh.v1.Agent"):
                answer = await check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING, (service, answer)
            reflect = channel.stream_stream(
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
            answers = [a async for a in reflect(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                timeout=10)]
            assert "hivemesh.v1.Agent" in {s.name for s in answers[0].list_services_response.service}, answers
            # Then one refusal, recorded before its status is sent: what precedes it in the spool is all there is.
            await _refused(channel, "/grpc.health.v1.Health/Check", _NOT_UTF8)
        records = _inbound(server)
    assert [r["method"] for r in records] == ["grpc.health.v1.Health/Check"], records
    _assert_refusal_record(records[0], "grpc.health.v1.Health/Check", _HEALTH, server)


async def test_a_control_plane_decode_refusal_is_still_recorded_exactly_once(mesh_env: MeshEnv) -> None:
    # Its audit interceptor records the refusal from the status the call ends with; its DecodeGuard reports to
    # nobody, or the refusal would be on record twice.
    call = mesh_env.operator.channel.unary_unary("/hivemesh.v1.Policies/GetPolicy")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(_NOT_UTF8, timeout=10)  # GetPolicyRequest.kind: not UTF-8
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
    # A later refusal of the same method that decodes: once its record is on file, so is any of the first call.
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await call(policy_pb2.GetPolicyRequest(kind="nope").SerializeToString(), timeout=10)
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT, unknown.value
    resp = await mesh_env.operator.call(
        mesh_env.operator.audit.Query, audit_pb2.AuditQueryRequest(limit=10000, kind="controlplane"))
    records = [r for r in (json.loads(e)["record"] for e in resp.entries) if r.get("method") == "Policies/GetPolicy"]
    assert sorted("request_kind" in r for r in records) == [False, True], records
    (record,) = (r for r in records if "request_kind" not in r)
    assert (record["decision"], record["status"], record["reason"]) == (
        "invalid", "INVALID_ARGUMENT", "INVALID_INPUT"), record
    assert record["message"].startswith("the request is not a valid hivemesh.v1.GetPolicyRequest message"), record
    assert record["caller"].startswith(f"spiffe://{TRUST_DOMAIN}/operator/"), record

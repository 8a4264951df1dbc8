"""A reflection request to the control plane that does not decode (sent by an authenticated peer over mTLS) is
refused INVALID_ARGUMENT by the decode guard and recorded in the control plane's audit once, like a health check
that does not decode. Reflection is a bidirectional stream, which the audit did not wrap: the refusal left no
record. Requests that decode stay unrecorded (reflection is outside the audit). Real control plane, real etcd."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from hivemesh.mesh.reflection import V1_SERVICE, V1ALPHA_SERVICE
from hivemesh.v1 import audit_pb2
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv

pytestmark = pytest.mark.timeout(120)

_LIST = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
_BAD_HOST = b"\x0a\x02\xff\xfe"  # ServerReflectionRequest.host: not UTF-8


async def _records(env: MeshEnv, method: str) -> list[dict[str, Any]]:
    resp = await env.operator.call(
        env.operator.audit.Query, audit_pb2.AuditQueryRequest(limit=10000, kind="controlplane"))
    return [r for r in (json.loads(e)["record"] for e in resp.entries) if r.get("method") == method]


async def _exchange(env: MeshEnv, service: str, sent: list[bytes]) -> tuple[list[bytes], grpc.aio.AioRpcError | None]:
    """Send the raw messages on one reflection stream; what came back, and how the stream ended (None: OK)."""
    info = env.operator.channel.stream_stream(f"/{service}/ServerReflectionInfo", request_serializer=None,
                                              response_deserializer=None)
    got: list[bytes] = []
    try:
        async for answer in info(iter(sent), timeout=10):
            got.append(answer)
    except grpc.aio.AioRpcError as exc:
        return got, exc
    return got, None


@pytest.mark.parametrize("service", [V1ALPHA_SERVICE, V1_SERVICE])
async def test_a_reflection_request_that_does_not_decode_is_refused_on_record_once(
    mesh_env: MeshEnv, service: str
) -> None:
    got, ended = await _exchange(mesh_env, service, [_LIST, _BAD_HOST, _LIST])
    assert ended is not None and ended.code() == grpc.StatusCode.INVALID_ARGUMENT, ended
    assert "grpc.reflection.v1alpha.ServerReflectionRequest" in (ended.details() or ""), ended.details()
    assert len(got) == 1, "the request before the bad one was not answered"  # the one after it never was

    (record,) = await _records(mesh_env, "ServerReflection/ServerReflectionInfo")
    assert record["kind"] == "controlplane", record
    assert (record["decision"], record["status"], record["reason"]) == (
        "invalid", "INVALID_ARGUMENT", "INVALID_INPUT"), record
    assert record["caller"].startswith(f"spiffe://{TRUST_DOMAIN}/operator/"), record
    assert record["message"].startswith(
        "the request is not a valid grpc.reflection.v1alpha.ServerReflectionRequest message"), record


async def test_reflection_requests_that_decode_are_not_recorded(mesh_env: MeshEnv) -> None:
    got, ended = await _exchange(mesh_env, V1ALPHA_SERVICE, [_LIST, _LIST])
    assert ended is None and len(got) == 2
    listed = reflection_pb2.ServerReflectionResponse.FromString(got[0]).list_services_response.service
    assert "hivemesh.v1.ControlPlane" in {s.name for s in listed}
    got, ended = await _exchange(mesh_env, V1ALPHA_SERVICE, [_BAD_HOST])  # then one that does not decode
    assert ended is not None and ended.code() == grpc.StatusCode.INVALID_ARGUMENT, ended
    (record,) = await _records(mesh_env, "ServerReflection/ServerReflectionInfo")  # that one, only
    assert record["status"] == "INVALID_ARGUMENT", record

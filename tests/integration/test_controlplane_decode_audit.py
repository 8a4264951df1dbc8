"""A control-plane request that does not decode as its method's type (bad UTF-8 in a string field, a corrupt wire
format), sent by an authenticated peer over mTLS, is refused INVALID_ARGUMENT by the decode guard and recorded in
the audit like every other refusal (`controlplane/services.py`: the audit runs before the guard). Before, the
guard answered ahead of the audit and the refusal left no record."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest

from hivemesh.v1 import audit_pb2, policy_pb2
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv

_BAD_KIND = b"\x0a\x06\x0a\x04p\xffo\xfe"  # ApplyPoliciesRequest: policies[0].kind is not UTF-8
_RECORD_BOUND = 1500
"""Most bytes of one such record (its JSON): the refusal's message is capped, no request field is kept."""


async def _records(env: MeshEnv, method: str) -> list[dict[str, Any]]:
    resp = await env.operator.call(
        env.operator.audit.Query, audit_pb2.AuditQueryRequest(limit=10000, kind="controlplane"))
    return [r for r in (json.loads(e)["record"] for e in resp.entries) if r.get("method") == method]


async def _refused(env: MeshEnv, method: str, raw: bytes) -> grpc.aio.AioRpcError:
    call = env.operator.channel.unary_unary(f"/hivemesh.v1.{method}", request_serializer=None,
                                            response_deserializer=None)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(raw, timeout=10)
    return refused.value


def _assert_decode_refusal(record: dict[str, Any], method: str, request_type: str) -> None:
    assert record["kind"] == "controlplane" and record["method"] == method, record
    assert (record["decision"], record["status"], record["reason"]) == (
        "invalid", "INVALID_ARGUMENT", "INVALID_INPUT"), record
    assert record["caller"].startswith(f"spiffe://{TRUST_DOMAIN}/operator/"), record
    assert record["message"].startswith(f"the request is not a valid hivemesh.v1.{request_type} message"), record
    assert len(json.dumps(record)) < _RECORD_BOUND, record


@pytest.mark.parametrize("method, raw, request_type", [
    ("Policies/ApplyPolicies", _BAD_KIND, "ApplyPoliciesRequest"),
    # The revocation guard's method: the guard (after the decode guard) never sees the marker.
    ("ControlPlane/IssueToken", b"\x0a\xff", "IssueTokenRequest"),  # a length past the end
])
async def test_a_request_that_does_not_decode_is_refused_on_record(
    mesh_env: MeshEnv, method: str, raw: bytes, request_type: str
) -> None:
    exc = await _refused(mesh_env, method, raw)
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
    assert f"hivemesh.v1.{request_type}" in (exc.details() or "")
    records = await _records(mesh_env, method)
    assert len(records) == 1, records
    _assert_decode_refusal(records[0], method, request_type)


async def test_a_decode_refusal_has_the_fields_of_any_other_refusal(mesh_env: MeshEnv) -> None:
    get = mesh_env.operator.channel.unary_unary("/hivemesh.v1.Policies/GetPolicy")
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await get(policy_pb2.GetPolicyRequest(kind="nope").SerializeToString(), timeout=10)
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await _refused(mesh_env, "Policies/GetPolicy", b"\x0a\x02\xff\xfe")  # kind: not UTF-8
    other, undecodable = await _records(mesh_env, "Policies/GetPolicy")
    assert other["reason"] == undecodable["reason"] == "INVALID_INPUT"
    assert set(undecodable) == set(other) - {"request_kind"}, (other, undecodable)
    _assert_decode_refusal(undecodable, "Policies/GetPolicy", "GetPolicyRequest")


async def test_a_streaming_method_s_decode_refusal_is_on_record(mesh_env: MeshEnv) -> None:
    call = mesh_env.operator.channel.unary_stream("/hivemesh.v1.State/WatchState", request_serializer=None,
                                                  response_deserializer=None)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in call(b"\x0a\x02\xc3\x28", timeout=10):  # namespace: not UTF-8
            pass
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (record,) = await _records(mesh_env, "State/WatchState")
    _assert_decode_refusal(record, "State/WatchState", "WatchStateRequest")


async def test_a_flood_of_large_undecodable_requests_writes_a_bounded_record_each(mesh_env: MeshEnv) -> None:
    # 256 KiB of bad UTF-8 in a policy's description: the record carries none of it.
    big = policy_pb2.ApplyPoliciesRequest(policies=[policy_pb2.Policy(kind="retries", name="n")]).SerializeToString()
    text = b"\xff" * (256 * 1024)
    policy = b"\x1a" + _varint(len(text)) + text
    raw = big + b"\x0a" + _varint(len(policy)) + policy
    count = 20
    refusals = await asyncio.gather(*(_refused(mesh_env, "Policies/ApplyPolicies", raw) for _ in range(count)))
    assert {r.code() for r in refusals} == {grpc.StatusCode.INVALID_ARGUMENT}
    records = await _records(mesh_env, "Policies/ApplyPolicies")
    assert len(records) == count
    for record in records:
        _assert_decode_refusal(record, "Policies/ApplyPolicies", "ApplyPoliciesRequest")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


async def test_a_health_check_that_does_not_decode_is_on_record_and_a_good_one_is_not(mesh_env: MeshEnv) -> None:
    """Health checking is outside the control plane's audit, but a request to it that does not decode is a refusal
    like any other: recorded once (it left no record); the checks that decode stay unrecorded."""
    good = mesh_env.operator.channel.unary_unary("/grpc.health.v1.Health/Check")
    assert await good(b"", timeout=10)  # SERVING, for the server as a whole
    call = mesh_env.operator.channel.unary_unary("/grpc.health.v1.Health/Check")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(b"\x0a\x02\xff\xfe", timeout=10)  # service: not UTF-8
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    watch = mesh_env.operator.channel.unary_stream("/grpc.health.v1.Health/Watch")
    with pytest.raises(grpc.aio.AioRpcError) as refused_watch:
        async for _ in watch(b"\x0a\x01", timeout=10):  # a length past the end
            pass
    assert refused_watch.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (record,) = await _records(mesh_env, "Health/Check")
    assert (record["decision"], record["status"], record["reason"]) == (
        "invalid", "INVALID_ARGUMENT", "INVALID_INPUT"), record
    assert record["caller"].startswith(f"spiffe://{TRUST_DOMAIN}/operator/"), record
    assert record["message"].startswith("the request is not a valid grpc.health.v1.HealthCheckRequest"), record
    (watched,) = await _records(mesh_env, "Health/Watch")
    assert watched["status"] == "INVALID_ARGUMENT", watched

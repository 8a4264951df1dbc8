"""The Escalations service refuses what it cannot keep: a deadline policy proto3 has no name for (kept, it broke
the escalation's webhook delivery for good: the notifier raised on it every 0.5 s), and fields etcd cannot hold
(a default answer stored whatever the policy, a cancel note with no bound), which came back UNAVAILABLE after
etcd refused the write, a status clients retry. Each is INVALID_ARGUMENT naming the field, and nothing changes."""

from __future__ import annotations

import grpc
import pytest

from hivemesh.v1 import escalation_pb2 as pb
from hivemesh.v1 import escalation_pb2_grpc
from tests.support.meshenv import MeshEnv


async def _refused(call: object, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call  # type: ignore[misc]
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert field in (refused.value.details() or ""), refused.value.details()


async def test_escalation_fields_it_cannot_keep_are_invalid_argument(mesh_env: MeshEnv) -> None:
    stub = escalation_pb2_grpc.EscalationsStub(mesh_env.operator.channel)
    await _refused(stub.CreateEscalation(pb.CreateEscalationRequest(
        id="esc-bad-policy", reason="approve", on_deadline=99, deadline_seconds=60), timeout=10), "on_deadline")
    big = '"' + "x" * (3 * 1024 * 1024) + '"'  # past etcd's 1.5 MiB request bound, and the field's own
    await _refused(stub.CreateEscalation(pb.CreateEscalationRequest(
        id="esc-big-default", reason="approve", default_answer_json=big), timeout=10), "default_answer_json")
    for never in ("esc-bad-policy", "esc-big-default"):
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetEscalation(pb.GetEscalationRequest(id=never), timeout=10)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    await stub.CreateEscalation(pb.CreateEscalationRequest(id="esc-1", reason="approve the refund"), timeout=10)
    await _refused(stub.CancelEscalation(pb.CancelEscalationRequest(id="esc-1", note="n" * (2 * 1024 * 1024)),
                                         timeout=10), "note")
    esc = await stub.GetEscalation(pb.GetEscalationRequest(id="esc-1"), timeout=10)
    assert esc.status == pb.ESCALATION_STATUS_PENDING  # the refused cancel changed nothing
    done = await stub.CancelEscalation(pb.CancelEscalationRequest(id="esc-1", note="withdrawn"), timeout=10)
    assert done.status == pb.ESCALATION_STATUS_CANCELED

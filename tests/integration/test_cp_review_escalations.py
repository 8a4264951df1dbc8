"""The Escalations service under a caller's hostile sizes and numbers: escalations with large JSON made
ListEscalations fail whole (RESOURCE_EXHAUSTED "Sent message larger than max", for operators too) once their sum
passed the transport's 8 MiB; the reply now stops before that, newest first, and says in its trailing metadata how
many it left out. A negative max_wait_seconds, read as "return at once", is INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.etcd import EtcdServer
from hivemesh.mesh.tls import join
from hivemesh.v1 import escalation_pb2 as pb
from hivemesh.v1 import escalation_pb2_grpc
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, start_mesh_env, stop_mesh_env

LEFT_OFF_HEADER = "hivemesh-left-off"


@pytest.fixture
async def workload(mesh_env: MeshEnv) -> AsyncIterator[escalation_pb2_grpc.EscalationsStub]:
    """The Escalations service as a client workload (not an operator) calls it."""
    token = (await mesh_env.operator.create_join_token("asker", "client", 120)).token
    w = await join(mesh_env.controlplane.join_address, mesh_env.certs.ca_cert.read_bytes(), token, "asker", "client",
                   trust_domain=TRUST_DOMAIN)
    cp = ControlPlaneClient(mesh_env.controlplane.address, w, TRUST_DOMAIN)
    try:
        yield escalation_pb2_grpc.EscalationsStub(cp.channel)
    finally:
        await cp.close()


async def test_listing_escalations_past_the_message_limit_returns_the_newest_and_says_how_many_were_left_out(
    mesh_env: MeshEnv, workload: escalation_pb2_grpc.EscalationsStub
) -> None:
    big = '{"a":"' + "x" * (250 * 1024) + '"}'  # each field within its own bound; 18 escalations pass 8 MiB
    for i in range(18):
        await workload.CreateEscalation(pb.CreateEscalationRequest(
            id=f"big-{i:02d}", reason="approve", context_json=big, default_answer_json=big), timeout=20)
    operator = escalation_pb2_grpc.EscalationsStub(mesh_env.operator.channel)
    for stub in (operator, workload):
        call = stub.ListEscalations(pb.ListEscalationsRequest(status=pb.ESCALATION_STATUS_PENDING), timeout=30)
        listed = await call
        left_off = dict(await call.trailing_metadata() or ()).get(LEFT_OFF_HEADER)
        assert listed.escalations and left_off is not None
        assert len(listed.escalations) + int(left_off) == 18
        kept = len(listed.escalations)  # newest first: the oldest are the ones left out
        assert {e.id for e in listed.escalations} == {f"big-{i:02d}" for i in range(18 - kept, 18)}
        assert all(e.context_json == big for e in listed.escalations)  # whole, never cut
    # A reply that fits says nothing of leaving out.
    await operator.CreateEscalation(pb.CreateEscalationRequest(id="small", reason="ok", workflow_id="wf"), timeout=10)
    call = operator.ListEscalations(pb.ListEscalationsRequest(workflow_id="wf"), timeout=10)
    assert [e.id for e in (await call).escalations] == ["small"]
    assert LEFT_OFF_HEADER not in dict(await call.trailing_metadata() or ())


async def test_waiting_a_negative_time_is_invalid_argument(workload: escalation_pb2_grpc.EscalationsStub) -> None:
    await workload.CreateEscalation(pb.CreateEscalationRequest(id="w1", reason="approve"), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await workload.WaitEscalation(pb.WaitEscalationRequest(id="w1", max_wait_seconds=-5), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_wait_seconds" in (refused.value.details() or "")
    got = await workload.WaitEscalation(pb.WaitEscalationRequest(id="w1", max_wait_seconds=1), timeout=10)
    assert got.status == pb.ESCALATION_STATUS_PENDING


async def test_a_queue_larger_than_one_etcd_answer_is_still_listed(own_etcd: EtcdServer, tmp_path: Path) -> None:
    """The store read the whole prefix in one etcd answer: past the client's 64 MiB (some 130 escalations with large
    JSON, which any workload may create) every listing failed as UNAVAILABLE, and with it the webhook notifier's
    pass (nobody was told of any escalation). It reads in pages now. A private etcd: the test writes ~70 MB."""
    env = await start_mesh_env(tmp_path, own_etcd.endpoint)
    try:
        stub = escalation_pb2_grpc.EscalationsStub(env.operator.channel)
        big = '{"a":"' + "x" * (255 * 1024) + '"}'
        count = 132  # x 2 documents of 255 KiB: past 64 MiB

        async def create(i: int) -> None:
            await stub.CreateEscalation(pb.CreateEscalationRequest(
                id=f"q-{i:03d}", reason="approve", context_json=big, default_answer_json=big), timeout=60)

        for first in range(0, count, 6):
            await asyncio.gather(*(create(i) for i in range(first, min(first + 6, count))))
        call = stub.ListEscalations(pb.ListEscalationsRequest(), timeout=60)
        listed = await call
        left_off = dict(await call.trailing_metadata() or ()).get(LEFT_OFF_HEADER)
        assert len(listed.escalations) + int(left_off or 0) == count
        store = env.controlplane._core.extensions["escalations"]  # what the webhook notifier's pass reads
        assert len(await store.all()) == count
    finally:
        await stop_mesh_env(env)

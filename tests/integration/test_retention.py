"""Retention keeps a small etcd quota from filling: a real etcd with a few MiB of quota, a real control plane
running its retention loop with short periods, and a writer that creates and finishes workflow runs and
escalations worth many times the quota. No write may hit NOSPACE, and a mesh call works at the end. The same
load without retention hits NOSPACE (so the quota really is small enough for the test to fail)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from hivemesh.controlplane.retention import Retention
from hivemesh.controlplane.retention_config import RetentionConfig
from hivemesh.mesh.etcd import EtcdServer, client, wait_connected
from hivemesh.mesh.keyspace import WORKFLOW_INDEX as INDEX
from hivemesh.mesh.revocation import Revocation
from hivemesh.sdk import AgentServer, MeshClient
from hivemesh.sdk.workflow import WorkflowState, WorkflowStore
from hivemesh.v1 import escalation_pb2, escalation_pb2_grpc
from tests.conftest import SessionCa
from tests.support.agents_for_tests import EchoAgent
from tests.support.meshenv import MeshEnv, controlplane_access, start_mesh_env, stop_mesh_env

QUOTA = 2 * 1024 * 1024
BLOB = 32 * 1024
WRITTEN = 10 * QUOTA
"""What the writer puts through etcd: ten times the quota."""
FAST = RetentionConfig(interval_s=0.1, history_s=0, history_revisions=10, workflows_s=0, escalations_s=0,
                       revocations_s=0, audit_window_s=0, audit_window_mb=1)
"""Everything kept as briefly as allowed, the mesh-wide audit log's etcd window included (it lives in the same
quota: its batches are trimmed once every replica holds them)."""


@pytest.fixture
def small_etcd(tmp_path: Path, session_ca: SessionCa) -> Iterator[EtcdServer]:
    server = EtcdServer(data_dir=tmp_path / "etcd-data", log_path=tmp_path / "etcd.log", quota_backend_bytes=QUOTA,
                        tls=session_ca.tls)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class NoSpaceError(Exception):
    """etcd refused a write: its quota is full."""


def _nospace(exc: BaseException) -> bool:
    return "space exceeded" in str(exc).lower() or "nospace" in str(exc).lower()


async def _churn(env: MeshEnv, total_bytes: int) -> tuple[int, int]:
    """Create and finish workflow runs (a BLOB-sized output each) and escalations (a BLOB-sized context each,
    through the control plane's API) until total_bytes went through; (runs, escalations). NoSpaceError on NOSPACE."""
    etcd = client(controlplane_access(env.etcd))
    await wait_connected(etcd)
    stub = escalation_pb2_grpc.EscalationsStub(env.operator.channel)
    store = WorkflowStore(etcd)
    written = runs = escalations = 0
    try:
        while written < total_bytes:
            wid = f"client-churn/run-{runs}"  # a run id starts with its owner (mesh/run_ids.py)
            state = WorkflowState(wid)
            try:
                await store.append(state, "created", {"definition": "tests:churn", "input": None, "owner": "t"})
                await store.append(state, "completed", {"output": "x" * BLOB})
            except Exception as exc:
                if _nospace(exc):
                    raise NoSpaceError(str(exc)) from exc
                raise
            runs += 1
            eid = f"esc-{escalations}"
            try:
                await stub.CreateEscalation(escalation_pb2.CreateEscalationRequest(
                    id=eid, reason="churn", context_json=json.dumps({"blob": "y" * BLOB})), timeout=10)
                await stub.ResolveEscalation(escalation_pb2.ResolveEscalationRequest(id=eid, approve=True),
                                             timeout=10)
            except grpc.aio.AioRpcError as exc:
                # The control plane reports etcd's refusal as REGISTRY_UNAVAILABLE: etcd's alarm says why.
                if _nospace(exc) or [a async for a in etcd.list_alarms()]:
                    raise NoSpaceError(exc.details() or "") from exc
                raise
            escalations += 1
            written += 3 * BLOB  # the run's output, and the context twice (created, then resolved)
    finally:
        await etcd.close()
    return runs, escalations


def _retention(env: MeshEnv) -> Retention:
    return next(f for f in env.controlplane._features if isinstance(f, Retention))


@pytest.mark.slow
async def test_retention_keeps_a_small_quota_from_filling(small_etcd: EtcdServer, tmp_path: Path) -> None:
    env = await start_mesh_env(tmp_path, small_etcd.endpoint, retention=FAST)
    try:
        started = time.monotonic()
        runs, escalations = await _churn(env, WRITTEN)
        retention = _retention(env)
        print(f"\nFIGURE retention: {runs} runs and {escalations} escalations ({WRITTEN >> 20} MiB) through a "
              f"{QUOTA >> 20} MiB quota in {time.monotonic() - started:.1f} s; deleted {retention.totals}, "
              f"{retention.passes} passes")
        assert retention.totals["workflows"] > runs // 2 and retention.totals["escalations"] > escalations // 2
        etcd = client(controlplane_access(env.etcd))
        await wait_connected(etcd)
        try:
            assert [a async for a in etcd.list_alarms()] == []
            status = await etcd.status()
            assert status.db_size < QUOTA
            remaining = (await etcd.get_prefix(INDEX.encode(), keys_only=True)).count
            assert remaining < runs // 2
        finally:
            await etcd.close()
        # The mesh still registers, issues and calls.
        async with AgentServer(EchoAgent("after"), await env.settings_for("echo")):
            async with MeshClient.connect(name="tester", settings=await env.settings_for("tester", "client")) as mesh:
                assert await mesh.node.registry.wait_for_capability("echo", 1, timeout=10)
                assert (await mesh.call("echo", {"text": "still here"}, timeout=10))["text"] == "still here"
        # Every pass that deleted something is on record in the control plane's audit log.
        from hivemesh.v1 import audit_pb2

        resp = await env.operator.call(env.operator.audit.Query, audit_pb2.AuditQueryRequest(limit=1000))
        records = [json.loads(e)["record"] for e in resp.entries]
        kept = [r for r in records if r.get("event") == "retention"]
        assert {r["what"] for r in kept if r["action"] == "deleted"} == {"workflows", "escalations"}
        assert any(r["action"] == "compacted" for r in kept)
    finally:
        await stop_mesh_env(env)


@pytest.mark.slow
async def test_without_retention_the_same_load_fills_the_quota(small_etcd: EtcdServer, tmp_path: Path) -> None:
    env = await start_mesh_env(tmp_path, small_etcd.endpoint, retention=RetentionConfig(enabled=False))
    try:
        with pytest.raises(NoSpaceError):
            await _churn(env, WRITTEN)
    finally:
        await stop_mesh_env(env)


async def test_revocations_past_their_expiry_are_deleted_after_the_configured_period(etcd: Any) -> None:
    """Revocations are leased until they expire, but one whose lease outlived it (written without one, or by an
    older version) is deleted once no token it covers can be valid and `revocations` has passed; the rest stay.
    A real etcd, the real pass; only the clock is fixed."""
    now = 1_000_000.0
    revs = {
        "old-jti": Revocation(jti="old-jti", revoked_at=now - 9000, expires_at=now - 7200),
        "recent-jti": Revocation(jti="recent-jti", revoked_at=now - 900, expires_at=now - 600),
        "live-jti": Revocation(jti="live-jti", revoked_at=now - 60, expires_at=now + 600),
        "old-subject": Revocation(subject="spiffe://hivemesh.local/agent/gone", revoked_at=now - 9000,
                                  expires_at=now - 3601),
    }
    for rev in revs.values():
        await etcd.put(rev.key().encode(), rev.to_json())
    records: list[Any] = []

    async def record(fields: Any) -> None:
        records.append(dict(fields))

    def config(revocations: str) -> RetentionConfig:
        return RetentionConfig.parse(f"history=never,workflows=never,escalations=never,revocations={revocations}")

    kept_forever = await Retention(etcd, config("never"), record, clock=lambda: now).run_once()
    assert kept_forever.revocations == [] and records == []
    report = await Retention(etcd, config("1h"), record, clock=lambda: now).run_once()
    assert sorted(report.revocations) == sorted(["old-jti", revs["old-subject"].subject])
    for name, rev in revs.items():
        assert (await etcd.get(rev.key().encode()) is None) == name.startswith("old-"), name
    [audited] = records
    assert (audited["event"], audited["what"], audited["count"], audited["older_than_s"]) == (
        "retention", "revocations", 2, 3600.0)


async def test_one_unreadable_index_entry_skips_itself_not_the_pass(etcd: Any) -> None:
    """An index summary whose state is a list (valid JSON, a writer's bug) raised TypeError on every pass before
    the revocations, escalations and compaction were reached: etcd would fill until it refused every write."""
    now = 1_000_000.0
    stale = Revocation(jti="old-jti", revoked_at=now - 9000, expires_at=now - 7200)
    await etcd.put(stale.key().encode(), stale.to_json())
    await etcd.put(f"{INDEX}agent-orch/run1".encode(), json.dumps({"state": ["COMPLETED"]}).encode())
    cfg = RetentionConfig.parse("history=never,workflows=1d,escalations=never,revocations=1h")
    report = await Retention(etcd, cfg, None, clock=lambda: now).run_once()
    assert report.revocations and await etcd.get(stale.key().encode()) is None
    assert await etcd.get(f"{INDEX}agent-orch/run1".encode()) is not None  # not a finished run: kept

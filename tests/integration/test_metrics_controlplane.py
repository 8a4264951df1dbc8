"""What only the control plane's `/metrics` says, with the meaning of each value: escalations open and the oldest
one's age (read from a real etcd), the age of the audit log's last signed checkpoint and the verifications that
found a break (a real AuditStore on disk, tampered with). Scraped over HTTP like Prometheus does."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import aetcd

from hivemesh.controlplane.audit import AuditStore
from hivemesh.controlplane.metrics import ESCALATIONS_PREFIX, ControlPlaneMetrics
from hivemesh.v1 import escalation_pb2
from tests.integration.test_metrics_mesh import promtool_clean, sample


def _scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


async def _scrape_until(address: str, ready: Callable[[str], bool], timeout_s: float = 15.0) -> str:
    """Scrape until ready(text) holds (bounded): the escalations are read in the background."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = await asyncio.to_thread(_scrape, address)
        if ready(text) or time.monotonic() > deadline:
            return text
        await asyncio.sleep(0.05)


def _escalation(esc_id: str, status: int, age_s: float) -> bytes:
    created = int((time.time() - age_s) * 1000)
    return escalation_pb2.Escalation(id=esc_id, reason="r", created_at_unix_ms=created,
                                     status=status).SerializeToString()


async def test_escalations_open_and_the_oldest_age_come_from_etcd(etcd: aetcd.Client) -> None:
    pending, answered = escalation_pb2.ESCALATION_STATUS_PENDING, escalation_pb2.ESCALATION_STATUS_APPROVED
    await etcd.put(ESCALATIONS_PREFIX + b"e-old", _escalation("e-old", pending, 120))
    await etcd.put(ESCALATIONS_PREFIX + b"e-new", _escalation("e-new", pending, 5))
    await etcd.put(ESCALATIONS_PREFIX + b"e-done", _escalation("e-done", answered, 900))  # answered: not open
    await etcd.put(ESCALATIONS_PREFIX + b"e-junk", b"\xff not a protobuf")  # skipped, not fatal
    metrics = ControlPlaneMetrics("127.0.0.1:0")
    metrics.watch_escalations(etcd)
    metrics.start()
    try:
        text = await _scrape_until(metrics.address, lambda t: "hivemesh_escalations_open 2.0" in t)
    finally:
        await metrics.stop()
    assert sample(text, "hivemesh_escalations_open") == 2
    assert 120 <= sample(text, "hivemesh_escalation_oldest_age_seconds") < 180
    promtool_clean(text)


async def test_checkpoint_age_and_verify_failures_follow_the_audit_store(tmp_path: Path) -> None:
    store = AuditStore(tmp_path / "audit", identity="cp").open()
    metrics = ControlPlaneMetrics("127.0.0.1:0")
    metrics.watch_audit(store)
    metrics.start()
    try:
        text = await asyncio.to_thread(_scrape, metrics.address)
        assert not [line for line in text.splitlines() if line.startswith("hivemesh_audit_checkpoint_age")]  # none yet
        assert sample(text, "hivemesh_audit_verify_failures_total") == 0
        for i in range(3):
            await store.record({"method": f"m{i}", "decision": "allow"})
        assert await store.checkpoint() is not None
        assert store.verify().ok
        text = await asyncio.to_thread(_scrape, metrics.address)
        assert 0 <= sample(text, "hivemesh_audit_checkpoint_age_seconds") < 60
        assert sample(text, "hivemesh_audit_verify_failures_total") == 0
        # Tamper with one stored record: the next verification finds the break and the counter says so.
        log = store.log_path.read_text()
        assert '"m1"' in log
        store.log_path.write_text(log.replace('"m1"', '"mX"'))
        assert not store.verify().ok
        text = await asyncio.to_thread(_scrape, metrics.address)
        assert sample(text, "hivemesh_audit_verify_failures_total") == 1
        promtool_clean(text)
    finally:
        await metrics.stop()
        await store.close()

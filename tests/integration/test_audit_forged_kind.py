"""A workload cannot pass its shipped audit records off as the control plane's (security review): a real agent
identity (`agent/mallory`, joined to a real control plane over the session etcd) ships, through its own
control-plane client as its shipper does, a record of `kind: controlplane` claiming an operator's
CreateJoinToken, and one stamped far in the future. Both are refused naming the field, nothing of their batch is
stored, the operator's `audit tail --kind controlplane` shows none of them, and the node's genuine records (its own
kind, an old one replayed from a spool included) are stored."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import grpc
import pytest

from hivemesh.mesh.audit import GENESIS, seal
from hivemesh.mesh.audit.record import utc_iso
from hivemesh.mesh.audit.shipper import Shipper
from hivemesh.mesh.audit.spool import Spool
from hivemesh.mesh.errors import InvalidInputError, PermissionDeniedError
from hivemesh.mesh.node import MeshNode
from hivemesh.v1 import audit_pb2
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, run_cli
from tests.support.orch_env import wait_until

ADMIN = f"spiffe://{TRUST_DOMAIN}/operator/admin"


@pytest.fixture(autouse=True)
async def _no_log_left(etcd: Any) -> Any:
    yield
    await etcd.delete_prefix(b"/hivemesh/audit")


def _record(node: str, seq: int, prev: str, **fields: Any) -> tuple[bytes, str]:
    """A record of node's chain as its spool writes it (an inbound decision unless fields say otherwise)."""
    line, digest = seal({"v": 1, "time": utc_iso(time.time()), "kind": "inbound", "node": node, "decision": "allow",
                         "caller": f"spiffe://{TRUST_DOMAIN}/client/c", "trace_id": f"t{seq}", **fields}, seq, prev)
    return line.rstrip(b"\n"), digest


def _forged(node: str, seq: int, prev: str, kind: str = "controlplane") -> bytes:
    return _record(node, seq, prev, kind=kind, caller=ADMIN, method="ControlPlane/CreateJoinToken",
                   time="2020-01-01T00:00:00.000000Z")[0]


async def test_a_workload_cannot_ship_control_plane_records_nor_future_times(mesh_env: MeshEnv) -> None:
    op = mesh_env.operator
    settings = await mesh_env.settings_for("mallory")
    async with MeshNode(settings, name="mallory", kind="agent", publish_status=False) as mallory:
        me = str(mallory.workload.spiffe_id)
        cp = mallory.controlplane  # the client the node's shipper ships through, with mallory's certificate

        # Alone, after a genuine record in the same batch, or spelled otherwise: refused, naming the field.
        genuine, digest = _record(me, 1, GENESIS)
        for batch, where in [([_forged(me, 1, GENESIS)], "records[0]"),
                             ([genuine, _forged(me, 2, digest)], "records[1]"),
                             ([_forged(me, 1, GENESIS, kind=" ControlPlane")], "records[0]")]:
            with pytest.raises(PermissionDeniedError) as refused:
                await cp.audit_append("mallory-spool", batch)
            err = refused.value
            assert err.code == grpc.StatusCode.PERMISSION_DENIED, err
            assert f"{where}.kind" in err.field_violations, err.field_violations
            assert "only by the control plane" in err.message and "nothing of the batch was stored" in err.message
            assert await cp.audit_source_state("mallory-spool") == 0, "nothing of a refused batch is stored"

        # A time a day ahead, far past any clock-skew allowance: refused the same way (INVALID_ARGUMENT, named).
        ahead = utc_iso(time.time() + 86_400)
        with pytest.raises(InvalidInputError) as refused:
            await cp.audit_append("mallory-spool", [genuine, _record(me, 2, digest, time=ahead)[0]])
        assert "records[1].time" in refused.value.field_violations and "ahead of the control plane's clock" in (
            refused.value.message), refused.value
        assert await cp.audit_source_state("mallory-spool") == 0

        # The node's genuine records: of its own kinds, and old ones its spool replays after an outage.
        old, old_digest = _record(me, 2, digest, time="2001-02-03T04:05:06.000000Z")
        handshake, _ = _record(me, 3, old_digest, kind="handshake", caller="", count=2)
        assert await cp.audit_append("mallory-spool", [genuine, old, handshake]) == 3

    stored = await op.audit.Query(audit_pb2.AuditQueryRequest(agent=me, limit=100), timeout=30)
    assert [json.loads(e)["record"]["seq"] for e in stored.entries] == [1, 2, 3]
    assert [json.loads(e)["record"]["kind"] for e in stored.entries] == ["inbound", "inbound", "handshake"]

    # What the reviewer ran: the control plane's entries, as an operator reads them, hold nothing of mallory's.
    code, out, err = await run_cli(mesh_env, "audit", "tail", "--kind", "controlplane", "--caller", "*operator*",
                                   "--json")
    assert code == 0, err[-2000:]
    shown = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert shown, "the operator's own control-plane entries are listed"
    assert not [e for e in shown if e["record"].get("node") == me], shown
    verdict = await op.audit.Verify(audit_pb2.AuditVerifyRequest(), timeout=30)
    assert verdict.ok, verdict.problem


async def test_a_node_whose_records_are_refused_says_so_once_and_keeps_them(
    mesh_env: MeshEnv, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A node whose clock is far ahead has every batch refused: it retries with backoff, keeps the records in its
    spool, and warns once (it logged each refusal at debug level only, so its operator never learned why)."""
    settings = await mesh_env.settings_for("mallory")
    async with MeshNode(settings, name="mallory", kind="agent", publish_status=False) as mallory:
        spool = Spool(tmp_path / "spool", identity=str(mallory.workload.spiffe_id))
        spool.open()
        try:
            # 10 min ahead: the refusal says how many seconds, a figure that changes from one retry to the next.
            spool.append({"v": 1, "time": utc_iso(time.time() + 600), "kind": "inbound", "decision": "allow",
                          "node": str(mallory.workload.spiffe_id), "caller": ADMIN})
            shipper = Shipper(spool, lambda: mallory.controlplane, backoff_max_s=1.2)
            with caplog.at_level(logging.DEBUG, logger="hivemesh.mesh.audit.shipper"):
                shipper.start()
                await wait_until(lambda: shipper.failures >= 5, 30, "five refused batches, over seconds")
                await shipper.stop(drain_s=0)
        finally:
            spool.close()
    assert shipper.failures >= 5, shipper.last_error
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "refused this node's audit" in r.message]
    assert len(warned) == 1, [r.message for r in caplog.records]
    assert "records[0].time" in warned[0].message, warned[0].message
    assert spool.pending == 1  # kept, to be sent once the clock is right

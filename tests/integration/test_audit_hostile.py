"""Hostile input to the audit pipeline, over the real control plane (the mesh-wide log in the session etcd), the
real SDK stubs and the real CLI: what a node may ship but no verifier accepts is refused with INVALID_ARGUMENT
and the log stays verifiable; refusals stay small; a query of large legal records answers within its byte
budget and the CLI pages on to every record; the CLI's table and offline verify survive hostile fields and
files (a TAMPERED verdict, never a traceback)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import grpc
import pytest

from hivemesh.mesh.audit import GENESIS, seal
from hivemesh.v1 import audit_pb2
from tests.support.cli_zygote import run_hivemesh
from tests.support.meshenv import MeshEnv, run_cli

STATUS_BUDGET = 1024
"""Far below the 16 KiB of status details a client takes: what a refusal quotes must stay small."""


@pytest.fixture(autouse=True)
async def _no_log_left(etcd: Any) -> Any:
    yield
    await etcd.delete_prefix(b"/hivemesh/audit")


def _record(node: str, seq: Any, prev: Any, **extra: Any) -> bytes:
    line, _ = seal({"v": 1, "kind": "inbound", "node": node, "decision": "allow", "trace_id": f"t{seq}", **extra},
                   seq, prev)
    return line.rstrip(b"\n")


async def _code(method: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await method(request, timeout=30)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def test_records_and_filters_no_verifier_accepts_are_refused_and_the_log_stays_verifiable(
    mesh_env: MeshEnv,
) -> None:
    op = mesh_env.operator
    me = str(op.workload.spiffe_id)
    for n, (seq, prev) in enumerate([(True, GENESIS), (1, 12345), (-5, GENESIS), (0, GENESIS),
                                     (2**64 + 3, GENESIS)]):
        first = _record(me, seq, prev)
        batch = [first, _record(me, 2, json.loads(first)["hash"])]
        code, details = await _code(op.audit.AppendBatch, audit_pb2.AppendBatchRequest(source=f"bad-{n}",
                                                                                      records=batch))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "records[0]" in details, (seq, prev, code, details)
        code, details = await _code(op.audit.SourceState, audit_pb2.SourceStateRequest(source=f"bad-{n}"))
        assert code == grpc.StatusCode.OK, details
    code, details = await _code(op.audit.AppendBatch, audit_pb2.AppendBatchRequest(
        source="huge-node", records=[_record("x" * 40_000, 1, GENESIS)]))
    assert code == grpc.StatusCode.PERMISSION_DENIED and len(details) < STATUS_BUDGET, (code, len(details))

    resp = await op.audit.Query(audit_pb2.AuditQueryRequest(limit=10_000), timeout=30)
    assert not [e for e in resp.entries if json.loads(e)["source"].startswith("bad-")], "nothing was stored"
    verdict = await op.audit.Verify(audit_pb2.AuditVerifyRequest(), timeout=30)
    assert verdict.ok, verdict.problem

    for request, name in [(audit_pb2.AuditQueryRequest(since="x" * 20_000), "since"),
                          (audit_pb2.AuditQueryRequest(until="nan"), "until"),
                          (audit_pb2.AuditQueryRequest(caller="[" * 20_000), "caller"),
                          (audit_pb2.AuditQueryRequest(agent="[" * 2000), "agent")]:
        code, details = await _code(op.audit.Query, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and name in details and len(details) < STATUS_BUDGET, (
            name, code, details[:200])


async def test_large_legal_records_are_queried_within_the_budget_and_the_cli_pages_to_every_one(
    mesh_env: MeshEnv,
) -> None:
    op = mesh_env.operator
    me = str(op.workload.spiffe_id)
    prev, lines = GENESIS, []
    for seq in range(1, 201):  # 12 MB of 60 KB records: more than the control plane may send in one answer
        line, prev = seal({"v": 1, "kind": "inbound", "node": me, "decision": "allow", "message": "m" * 60_000},
                          seq, prev)
        lines.append(line.rstrip(b"\n"))
    for i in range(0, 200, 10):
        await op.audit.AppendBatch(audit_pb2.AppendBatchRequest(source="fat", records=lines[i:i + 10]), timeout=30)

    resp = await op.audit.Query(audit_pb2.AuditQueryRequest(limit=200, agent=me), timeout=30)
    assert 0 < len(resp.entries) < 200 and resp.scanned < resp.head_seq, "a page cut short, saying where to go on"

    def fat_seqs(out: str) -> list[int]:
        entries = [json.loads(x) for x in out.splitlines() if x.strip()]
        return [e["record"]["seq"] for e in entries if e["source"] == "fat"]

    code, out, err = await run_cli(mesh_env, "audit", "query", "--agent", me, "--limit", "200", "--json")
    assert code == 0, err[-2000:]
    assert fat_seqs(out) == list(range(1, 201))
    code, out, err = await run_cli(mesh_env, "audit", "tail", "--agent", me, "-n", "200", "--json")
    assert code == 0, err[-2000:]
    assert fat_seqs(out) == list(range(1, 201))
    code, out, err = await run_cli(mesh_env, "audit", "tail", "--agent", me, "-n", "3", "--json")
    assert code == 0 and fat_seqs(out) == [198, 199, 200], err[-2000:]


async def test_the_cli_survives_hostile_records_and_reports_hostile_files_as_tampered(
    mesh_env: MeshEnv, tmp_path: Path,
) -> None:
    op = mesh_env.operator
    me = str(op.workload.spiffe_id)
    hostile = [{"status": 5, "reason": ["r"]}, {"latency_us": "fast"}, {"chain": [1, {"a": 2}]},
               {"kind": "handshake", "count": [3], "capability": ""}, {"caller": "[/x] [bold]", "time": 7},
               {"decision": ["allow"]}]
    for n, extra in enumerate(hostile):
        resp = await op.audit.AppendBatch(audit_pb2.AppendBatchRequest(
            source=f"hostile-{n}", records=[_record(me, 1, GENESIS, **extra)]), timeout=30)
        assert resp.stored == 1
    for args in (["audit", "query", "--limit", "100"], ["audit", "tail", "-n", "50"]):
        code, out, err = await run_cli(mesh_env, *args)
        assert code == 0 and "Traceback" not in err, err[-2000:]
        assert "[/x]" in out and "?" in out, out[-2000:]

    # A spool directory whose first line is mangled: reported, with --json as JSON.
    for n, first in enumerate([b"[1]", b'{"seq": "one", "prev": 5}', b"not json", b"[" * 100_000]):
        spool = tmp_path / f"spool-{n}"
        spool.mkdir()
        (spool / "audit-0000000000000001.log").write_bytes(first + b"\n" + _record(me, 2, GENESIS) + b"\n")
        code, out, err = await run_cli(mesh_env, "audit", "verify", "--json", "--file", str(spool))
        assert code == 1 and "Traceback" not in err, err[-2000:]
        assert json.loads(out.splitlines()[-1])["ok"] is False
        code, out, err = await run_cli(mesh_env, "audit", "verify", "--file", str(spool))
        assert code == 1 and "TAMPERED" in err and "Traceback" not in err, err[-2000:]

    # An export folder verified with no control plane to ask (so unsigned) whose checkpoint is malformed.
    export = tmp_path / "export"
    export.mkdir()
    entry, digest = seal({"source": "s", "record": json.loads(_record(me, 1, GENESIS))}, 1, GENESIS)
    (export / "log.jsonl").write_bytes(entry)
    (export / "checkpoints.jsonl").write_text(json.dumps({"checkpoint": 1, "log_seq": [1], "head": digest,
                                                          "prev_sig": "", "sig": "x"}) + "\n")
    s = mesh_env.base_settings()
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMESH_")}
    child_env.update(HIVEMESH_ETCD=s.etcd, HIVEMESH_CONTROLPLANE="127.0.0.1:1", HIVEMESH_JOIN=s.join,
                     HIVEMESH_CA=str(s.ca_bundle), HIVEMESH_TRUST_DOMAIN=s.trust_domain,
                     HIVEMESH_HOME=str(tmp_path / "cli-home"))
    code, out, err = await run_hivemesh(["--certs-dir", str(mesh_env.certs.certs_dir), "audit", "verify", "--json",
                                         "--file", str(export)], child_env, timeout=60)
    assert code == 1 and "Traceback" not in err, err[-2000:]
    report = json.loads(out.splitlines()[-1])
    assert report["ok"] is False and "checkpoint 1 is malformed" in report["problem"], report

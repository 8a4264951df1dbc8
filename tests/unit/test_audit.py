"""The audit log's integrity: spool chains, the control plane's log and its signed checkpoints.

Tamper trials run on real files: a 10,000-record spool and a 10,000-entry control-plane log, each changed,
deleted, inserted (naively and forged to fit), reordered, truncated and re-hashed; `verify` must find every
one and name the first bad record exactly. Figures are printed (run with -s) and recorded in docs/security.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import grpc
import pytest

from hivemesh.controlplane.audit import (
    AuditFilter,
    AuditStore,
)
from hivemesh.mesh.audit import (
    GENESIS,
    AuditLog,
    Spool,
    canonical,
    classify,
    open_spool,
    record_hash,
    seal,
    verify_chain,
)
from hivemesh.mesh.errors import (
    AuditUnavailableError,
    FailedPreconditionError,
    InvalidInputError,
    PayloadTooLargeError,
    PermissionDeniedError,
    ScopeMissingError,
    TokenInvalidError,
)
from hivemesh.mesh.layers.base import Inbound
from hivemesh.v1 import agent_pb2
from tests.support.audit_rig import NODE, fields, store_with, write_spool


# --- canonical form and sealing -------------------------------------------------------------------------------------
def test_canonical_form_is_stable_and_ascii() -> None:
    rec = {"b": "é\u2028", "a": 1, "c": [1, "x"]}
    assert canonical(rec) == b'{"a":1,"b":"\\u00e9\\u2028","c":[1,"x"]}'
    line, digest = seal(dict(rec), 1, GENESIS)
    parsed = json.loads(line)
    assert parsed["hash"] == digest == record_hash(parsed)
    assert parsed["seq"] == 1 and parsed["prev"] == GENESIS


def test_floats_are_refused_by_the_verifier() -> None:
    line, _ = seal({"x": 1}, 1, GENESIS)
    rec = json.loads(line)
    rec["x"] = 1.5  # not part of the canonical form: a changed record whatever its hash says
    count, problem = verify_chain([json.dumps(rec)])
    assert count == 0 and problem is not None and problem.seq == 1


@pytest.mark.parametrize(
    ("err", "code", "decision"),
    [
        (None, grpc.StatusCode.OK, "allow"),
        (None, grpc.StatusCode.INTERNAL, "error"),
        (TokenInvalidError(), grpc.StatusCode.UNAUTHENTICATED, "deny"),
        (ScopeMissingError(), grpc.StatusCode.PERMISSION_DENIED, "deny"),
        (InvalidInputError(), grpc.StatusCode.INVALID_ARGUMENT, "invalid"),
        (PayloadTooLargeError(), grpc.StatusCode.RESOURCE_EXHAUSTED, "invalid"),
    ],
)
def test_classify(err: Any, code: grpc.StatusCode, decision: str) -> None:
    assert classify(err, code) == decision


def test_classify_rate_limited_and_circuit_open() -> None:
    from hivemesh.mesh.errors import HivemeshError

    rl = HivemeshError("slow down", code=grpc.StatusCode.RESOURCE_EXHAUSTED, reason="RATE_LIMITED")
    co = HivemeshError("open", code=grpc.StatusCode.UNAVAILABLE, reason="CIRCUIT_OPEN")
    assert classify(rl, rl.code) == "rate_limited"
    assert classify(co, co.code) == "circuit_open"


# --- the spool ------------------------------------------------------------------------------------------------------
def test_spool_chain_survives_reopen_and_cuts_a_torn_tail(tmp_path: Path) -> None:
    spool = write_spool(tmp_path / "s", 50)
    source = spool.source
    spool.close()
    seg = sorted((tmp_path / "s").glob("audit-*.log"))[-1]
    with open(seg, "ab") as f:
        f.write(b'{"seq":51,"prev":"torn by a power lo')  # a half-written line, as a crash could leave
    reopened = Spool(tmp_path / "s").open()
    try:
        assert reopened.source == source
        assert reopened.seq == 50
        reopened.append(fields(50))
        count, problem = verify_chain(reopened.lines())
        assert problem is None, problem
        assert count == 51
    finally:
        reopened.close()


def test_spool_is_exclusive_per_process_and_open_spool_picks_the_next(tmp_path: Path) -> None:
    first = open_spool(tmp_path, "agent-echo")
    try:
        with pytest.raises(BlockingIOError):
            Spool(tmp_path / "agent-echo").open()
        second = open_spool(tmp_path, "agent-echo")
        try:
            assert second.dir.name == "agent-echo.1"
            assert second.source != first.source
        finally:
            second.close()
    finally:
        first.close()


def test_spool_segments_rotate_and_acked_ones_are_deleted(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", segment_bytes=4096).open()
    try:
        for i in range(200):
            spool.append(fields(i))
        segments = sorted((tmp_path / "s").glob("audit-*.log"))
        assert len(segments) > 3
        assert [json.loads(x)["seq"] for x in spool.read(100, max_records=3)] == [100, 101, 102]
        spool.ack(150)
        left = sorted((tmp_path / "s").glob("audit-*.log"))
        assert len(left) < len(segments)
        first_left = int(left[0].name[6:22])
        assert first_left <= 151  # nothing unacknowledged was deleted
        assert [json.loads(x)["seq"] for x in spool.read(151, max_records=1)] == [151]
        assert spool.pending == 50
    finally:
        spool.close()
    # Reopening after every record-bearing segment could go still continues the chain (head file).
    again = Spool(tmp_path / "s", segment_bytes=4096).open()
    try:
        assert again.seq == 200
    finally:
        again.close()


def test_a_full_disk_fails_the_write_with_audit_unavailable(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s").open()
    try:
        assert spool._fd is not None
        os.close(spool._fd)
        spool._fd = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
        with pytest.raises(AuditUnavailableError):
            spool.append(fields(1))
        assert spool.seq == 0  # nothing half-counted
    finally:
        spool.close()


def test_the_shipper_lingers_longer_only_while_batches_come_full() -> None:
    from hivemesh.mesh.audit.shipper import GROW_AT, Linger

    linger = Linger(0.05, 0.2)
    assert linger.after(1) == 0.05  # a trickle: the base pause
    assert [linger.after(GROW_AT) for _ in range(4)] == [0.1, 0.2, 0.2, 0.2]  # load: fewer, bigger batches
    assert linger.after(GROW_AT - 1) == 0.05  # the load is gone: back to the base at once
    assert Linger(0.05, 0.01).after(GROW_AT) == 0.05  # a max below the base never shortens the base


def test_the_shipper_pauses_after_a_full_batch_unless_a_full_one_waits() -> None:
    from hivemesh.mesh.audit.shipper import BATCH, pauses_after

    assert pauses_after(10, 0, BATCH)  # caught up
    assert pauses_after(BATCH, 50, BATCH)  # a full batch, 50 behind it: they gather, not go as a batch of 50
    assert not pauses_after(BATCH, BATCH, BATCH)  # a backlog (after an outage): at full speed
    assert not pauses_after(BATCH, 5 * BATCH, BATCH)


def test_observer_writes_the_decisionfields(tmp_path: Path) -> None:
    audit = AuditLog.open(tmp_path, node=NODE, instance="i-1")
    try:
        req = agent_pb2.InvokeRequest(capability="echo", context=agent_pb2.CallContext(call_id="c-1"))
        call = Inbound(method="Invoke", request=req, wire_size=10,
                       metadata={"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}, auth_context={},
                       notes={"remote": "ipv4:127.0.0.1:5"})
        audit(call, ScopeMissingError("no echo"), grpc.StatusCode.PERMISSION_DENIED, 0.0012)
        (line,) = list(audit.spool.lines())
        rec = json.loads(line)
        assert rec["decision"] == "deny" and rec["reason"] == "SCOPE_MISSING" and rec["status"] == "PERMISSION_DENIED"
        assert rec["trace_id"] == "a" * 32 and rec["call_id"] == "c-1" and rec["latency_us"] == 1200
        assert rec["node"] == NODE and rec["capability"] == "echo" and rec["remote"] == "ipv4:127.0.0.1:5"
        assert audit.spool.dir.name == "agent-echo"
    finally:
        audit.spool.close()


def test_a_decision_whose_record_cannot_be_built_is_recorded_in_outline(tmp_path: Path) -> None:
    """A note no record can encode (here a set; in the field a bug in a layer, or foreign data that breaks a
    reader) must not leave the decision unrecorded: the outline keeps the decision, status, reason and caller."""
    audit = AuditLog.open(tmp_path, node=NODE, instance="i-1")
    try:
        call = Inbound(method="Invoke", request=agent_pb2.InvokeRequest(capability="echo"), wire_size=10,
                       metadata={}, auth_context={}, notes={"rule": {"not", "json"}})
        audit(call, ScopeMissingError("no echo"), grpc.StatusCode.PERMISSION_DENIED, 0.002)
        audit(call, None, grpc.StatusCode.OK, 0.001)
        first, second = (json.loads(line) for line in audit.spool.lines())
        assert (first["decision"], first["status"], first["reason"]) == ("deny", "PERMISSION_DENIED", "SCOPE_MISSING")
        assert (second["decision"], second["status"], second["reason"]) == ("allow", "OK", "")
        for rec in (first, second):
            assert rec["incomplete"].startswith("TypeError") and rec["node"] == NODE and rec["method"] == "Invoke"
            assert "rule" not in rec  # nothing of what broke it
        assert verify_chain(list(audit.spool.lines())) == (2, None)  # chained like any record
    finally:
        audit.spool.close()


async def test_store_appends_exactly_once_and_refuses_gaps_and_strangers(tmp_path: Path) -> None:
    store = AuditStore(tmp_path / "cp", identity="cp").open()
    spool = write_spool(tmp_path / "node", 30)
    lines = list(spool.lines())
    try:
        assert await store.append(spool.source, NODE, lines[:10]) == (10, json.loads(lines[9])["hash"], 10)
        # A resend (lost reply) is skipped, the new part stored: no duplicates.
        seq, _, stored = await store.append(spool.source, NODE, lines[5:20])
        assert (seq, stored) == (20, 10)
        with pytest.raises(FailedPreconditionError):
            await store.append(spool.source, NODE, lines[25:])  # a gap
        with pytest.raises(PermissionDeniedError):
            await store.append(spool.source, "spiffe://hivemesh.local/agent/other", lines[20:])
        bad = json.loads(lines[20])
        bad["decision"] = "deny"
        with pytest.raises(InvalidInputError):
            await store.append(spool.source, NODE, [json.dumps(bad).encode()])
        for junk in (b"{", b"[" * 5_000, b'{"seq": 21, "x": ' + b"[" * 5_000 + b"]" * 5_000 + b"}"):
            with pytest.raises(InvalidInputError, match="is not JSON"):  # nested past json's depth: not JSON
                await store.append(spool.source, NODE, [junk])
        assert store.source_state(spool.source)[0] == 20
        await store.record({"method": "Join", "decision": "deny", "status": "UNAUTHENTICATED"})
        assert store.verify().ok
    finally:
        spool.close()
        await store.close()
    reopened = AuditStore(tmp_path / "cp", identity="cp").open()
    try:
        assert reopened.seq == 21 and reopened.source_state(spool.source)[0] == 20
        report = reopened.verify()
        assert report.ok and report.sources == 2 and report.checkpoints >= 1
    finally:
        await reopened.close()


async def test_store_query_filters(tmp_path: Path) -> None:
    store, spool = await store_with(tmp_path, 100)
    try:
        await store.record({"method": "Revoke", "decision": "allow", "caller": "spiffe://hivemesh.local/operator/x"})
        hits, _ = store.query(AuditFilter(caller="*/client/*", after_seq=90), limit=100)
        assert [json.loads(h)["seq"] for h in hits] == list(range(91, 101))
        tail, _ = store.query(AuditFilter(), limit=2, tail=True)
        assert [json.loads(h)["seq"] for h in tail] == [100, 101]
        with pytest.raises(InvalidInputError):
            AuditFilter(decision="maybe")
        ops, _ = store.query(AuditFilter(caller="*/operator/*"))
        assert len(ops) == 1
        recent, _ = store.query(AuditFilter.from_strings(since="2025-01-01T00:00:58Z"), limit=1000)
        assert {json.loads(h)["record"]["time"][17:19] for h in recent} >= {"58", "59"}
    finally:
        spool.close()
        await store.close()


def test_an_answer_waits_for_its_record_only_within_its_callers_deadline() -> None:
    """The control plane's answer waits up to OWN_COMMIT_WAIT_S for its audit record, but never past its
    caller's deadline less ANSWER_MARGIN_S (the multi-host run where a stalled commit held a replica's answer
    past the client's 2 s share); with no deadline, the whole wait."""
    from hivemesh.controlplane.audit.store import ANSWER_MARGIN_S, OWN_COMMIT_WAIT_S, commit_wait

    assert commit_wait(None) == OWN_COMMIT_WAIT_S == commit_wait(60.0)
    assert commit_wait(2.0) == 2.0 - ANSWER_MARGIN_S < OWN_COMMIT_WAIT_S
    assert commit_wait(ANSWER_MARGIN_S / 2) == 0.0 == commit_wait(-1.0)


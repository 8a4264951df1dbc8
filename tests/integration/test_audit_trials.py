"""Tamper trials at scale (TEST_MATRIX 9.7 A1): a 10,000-record spool and control-plane log, every
kind of tampering found and named, checkpoints signed and verified, and the cost figures. Real files, real
keys; slower than a unit test, so they live here."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from hivemesh.controlplane.audit import (
    AuditStore,
    sign_checkpoint,
    verify_log,
)
from hivemesh.mesh.audit import (
    GENESIS,
    AuditLog,
    canonical,
    seal,
    verify_chain,
)
from hivemesh.mesh.layers.base import Inbound
from hivemesh.v1 import agent_pb2
from tests.support.audit_rig import NODE, fields, store_with, write_spool


# --- tamper trials on a 10,000-record spool --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_spool(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    d = tmp_path_factory.mktemp("big")
    spool = write_spool(d / "s", 10_000)
    lines = list(spool.lines())
    spool.close()
    return lines


def _forge(prev_line: bytes, seq: int) -> bytes:
    prev = json.loads(prev_line)
    line, _ = seal(fields(99_999), seq, prev["hash"])
    return line.rstrip(b"\n")


def test_spool_of_10000_records_verifies(big_spool: list[bytes]) -> None:
    started = time.perf_counter()
    count, problem = verify_chain(big_spool)
    elapsed = time.perf_counter() - started
    assert problem is None and count == 10_000
    print(f"\nFIGURE audit verify: 10,000 spool records in {elapsed * 1000:.0f} ms")


def _tampered(lines: list[bytes], op: str, k: int) -> tuple[list[bytes], int]:
    """lines tampered at 0-based index k; returns (lines, the first bad seq verify must name)."""
    out = list(lines)
    if op == "change":
        rec = json.loads(out[k])
        body = rec.get("record", rec)  # a spool record, or the record inside a control-plane entry
        body["decision"] = "allow" if body["decision"] != "allow" else "deny"
        out[k] = json.dumps(rec).encode()
        return out, k + 1
    if op == "flip-byte":
        b = bytearray(out[k])
        i = random.Random(k).randrange(len(b))
        b[i] = ord("0") if b[i] != ord("0") else ord("1")
        out[k] = bytes(b)
        return out, k + 1
    if op == "delete":
        del out[k]
        return out, k + 1
    if op == "insert-naive":
        out.insert(k, out[k + 5])  # a copy of a genuine record
        return out, k + 1
    if op == "insert-forged":
        out.insert(k, _forge(out[k - 1], k + 1))  # right seq and prev, recomputed hash
        return out, k + 1
    if op == "reorder":
        out[k], out[k + 1] = out[k + 1], out[k]
        return out, k + 1
    if op == "change-rehashed":
        rec = json.loads(out[k])
        rec["caller"] = "spiffe://hivemesh.local/client/someone-else"
        line, _ = seal(rec, rec["seq"], rec["prev"])
        out[k] = line.rstrip(b"\n")
        return out, k + 2  # self-consistent: the break shows at the next link
    raise AssertionError(op)


@pytest.mark.parametrize(
    "op", ["change", "flip-byte", "delete", "insert-naive", "insert-forged", "reorder", "change-rehashed"]
)
def test_tampering_with_one_record_of_10000_is_found_and_named(big_spool: list[bytes], op: str) -> None:
    rng = random.Random(op)
    trials = 6
    for _ in range(trials):
        k = rng.randrange(1, 9_990)
        lines, bad_seq = _tampered(big_spool, op, k)
        _, problem = verify_chain(lines)
        assert problem is not None, f"{op} at {k} went unnoticed"
        assert problem.seq == bad_seq, f"{op} at record {k + 1}: verify named {problem}"
    print(f"\nFIGURE audit tamper {op}: {trials}/{trials} detected, first bad seq exact")


# --- the control plane's log -----------------------------------------------------------------------------------------


async def test_control_plane_log_of_10000_tamper_and_checkpoints(tmp_path: Path) -> None:
    store, spool = await store_with(tmp_path, 10_000)
    spool.close()
    await store.checkpoint()
    key = store.public_key
    lines = list(store.lines())
    cps = store.checkpoints()
    await store.close()
    started = time.perf_counter()
    report = verify_log(lines, cps, key)
    elapsed = time.perf_counter() - started
    assert report.ok and report.entries == 10_000 and report.checkpoints == 4, report
    print(f"\nFIGURE audit verify: 10,000 control-plane entries + {len(cps)} checkpoints in {elapsed * 1000:.0f} ms")

    for op in ("change", "flip-byte", "delete", "insert-naive", "insert-forged", "reorder"):
        for k in (1, 4_321, 9_000):
            tampered, bad_seq = _tampered(lines, op, k)
            got = verify_log(tampered, cps, key)
            assert got.problem is not None and got.problem.seq == bad_seq, (op, k, got.problem)

    # Truncation is caught by the last checkpoint; a rewritten (re-hashed) tail by the checkpoint covering it.
    got = verify_log(lines[:9_000], cps, key)
    assert got.problem is not None and got.problem.seq == 9_001 and "truncated" in got.problem.reason
    forked = list(lines[:4_999])
    prev = json.loads(lines[4_998])["hash"]
    inner_prev = json.loads(lines[4_998])["record"]["hash"]
    for raw in lines[4_999:]:  # the attacker re-chains both the log and the node's chain inside it
        entry = json.loads(raw)
        rec = entry["record"]
        rec["caller"] = "spiffe://hivemesh.local/client/innocent"
        inner_line, inner_prev = seal(rec, rec["seq"], inner_prev)
        entry["record"] = json.loads(inner_line)
        line, prev = seal(entry, entry["seq"], prev)
        forked.append(line.rstrip(b"\n"))
    assert verify_log(forked).ok  # self-consistent without checkpoints ...
    got = verify_log(forked, cps, key)  # ... but not against the signed ones
    assert got.problem is not None and "rewritten" in got.problem.reason and got.problem.seq == 2_501

    # Checkpoints: delete one, alter one, or sign with another key (a compromised writer without the key).
    for bad_cps in (cps[:1] + cps[2:], [cps[0], cps[1].replace(b'"log_seq":5000', b'"log_seq":4999'), *cps[2:]]):
        got = verify_log(lines, bad_cps, key)
        assert got.problem is not None and got.checkpoint_problem, got
    rogue = ed25519.Ed25519PrivateKey.generate()
    forged = [json.loads(c) for c in cps]
    forged[-1] = sign_checkpoint(rogue, forged[-1])
    forged_lines = [canonical(c) for c in forged]
    got = verify_log(lines, forged_lines, key)
    assert got.problem is not None and "signature" in got.checkpoint_problem


def test_audit_cost_figures(tmp_path: Path) -> None:
    """A4: the per-decision cost of the observer (record, hash chain, write to the page cache) and of signing a
    checkpoint. Goals are in the docs; the bounds here are generous for a busy 2-core box."""
    audit = AuditLog.open(tmp_path, node=NODE, instance="i-1")
    try:
        req = agent_pb2.InvokeRequest(capability="echo", context=agent_pb2.CallContext(call_id="c" * 32))
        call = Inbound(method="Invoke", request=req, wire_size=10, metadata={}, auth_context={},
                       notes={"remote": "ipv4:127.0.0.1:50000", "rule": "tests/allow"})
        n = 20_000
        started = time.perf_counter()
        for _ in range(n):
            audit(call, None, grpc.StatusCode.OK, 0.0012)
        per_record = (time.perf_counter() - started) / n
    finally:
        audit.spool.close()
    store = AuditStore(tmp_path / "cp", identity="cp").open()
    try:
        key = store._key
        assert key is not None
        started = time.perf_counter()
        for i in range(200):
            sign_checkpoint(key, {"checkpoint": i, "log_seq": i, "head": GENESIS, "time": "t", "prev_sig": ""})
        per_checkpoint = (time.perf_counter() - started) / 200
    finally:
        asyncio.run(store.close())
    assert per_record < 500e-6 and per_checkpoint < 50e-3
    print(f"\nFIGURE audit cost: {per_record * 1e6:.1f} µs per decision record (canonical JSON + SHA-256 chain + "
          f"write), {per_checkpoint * 1e3:.2f} ms per checkpoint signature (Ed25519)")

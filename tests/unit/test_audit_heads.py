"""Signed audit heads: the cadence rule (at most once a second, only when the log grew), the store signing one
covering its last entry, what a log lacks compared to a head, and the checkpoint key trusted only through the
operator's own CA bundle."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from hivemesh.controlplane.audit import AuditStore, verify_log
from hivemesh.controlplane.audit.heads import (
    KEY_CERT_PATH,
    HeadCadence,
    trusted_key_from_cert,
    verify_head,
)
from hivemesh.controlplane.ca import init_ca, load_ca

TD = "hivemesh.local"


def test_the_cadence_signs_at_most_once_per_second_and_only_when_the_log_grew() -> None:
    cadence = HeadCadence(1.0)
    signed: list[float] = []
    seq = 0
    # 5 s of clock in 10 ms ticks, the log growing on every tick for the first 3 s, then idle.
    for tick in range(500):
        now = 1000.0 + tick * 0.01
        if now < 1003.0:
            seq += 1
        if cadence.due(seq, now):
            cadence.signed(seq, now)
            signed.append(now)
    gaps = [b - a for a, b in itertools.pairwise(signed)]
    assert signed and all(g >= 1.0 - 1e-9 for g in gaps), gaps
    assert len(signed) == 4, signed  # at 1000, 1001, 1002 (growing) and once more for the last growth
    assert signed[-1] < 1004.0 + 1e-9, "nothing is signed while the log does not grow"
    assert not cadence.due(seq, 10_000.0)


async def test_the_store_signs_heads_on_its_cadence_and_at_export(tmp_path: Path) -> None:
    store = AuditStore(tmp_path / "audit", head_interval_s=0.2)
    await store.start()
    try:
        assert store.latest_head() == b""
        for i in range(3):
            await store.record({"method": f"m{i}", "decision": "allow"})
        deadline = time.monotonic() + 5
        while not store.latest_head() and time.monotonic() < deadline:  # noqa: ASYNC110 - polls the store
            await asyncio.sleep(0.05)
        head = verify_head(store.latest_head(), store.public_key)
        assert (head["log_seq"], head["head"], head["count"], head["export"]) == (3, store.head, 3, False)
        exported = await store.sign_head(export=True)
        assert exported["head_no"] == head["head_no"] + 1 and exported["prev_sig"] == head["sig"]
        assert store.export_heads() == [store.latest_head()]
        assert store.verify().ok
    finally:
        await store.close()
    # The heads survive a restart, and the stored log is compared with the last one.
    again = AuditStore(tmp_path / "audit").open()
    assert json.loads(again.latest_head())["head_no"] == exported["head_no"]
    lines = list(again.lines())
    report = verify_log(lines[:-1], again.checkpoints(), again.public_key, json.loads(again.latest_head()))
    assert not report.ok and report.missing is not None and report.missing.entries == 1


def test_a_head_from_another_key_or_a_checkpoint_is_not_a_head(tmp_path: Path) -> None:
    store = AuditStore(tmp_path / "audit").open()
    head = store._head_locked(export=True)
    with pytest.raises(ValueError, match="does not verify"):
        verify_head(json.dumps(head), ed25519.Ed25519PrivateKey.generate().public_key())
    cp = store._checkpoint_locked()
    with pytest.raises(ValueError, match="not a signed audit head"):
        verify_head(json.dumps(cp), store.public_key)


def test_the_checkpoint_key_is_trusted_only_through_the_operators_bundle(tmp_path: Path) -> None:
    ca = load_ca(init_ca(tmp_path / "a", TD).certs_dir)
    other = load_ca(init_ca(tmp_path / "b", TD).certs_dir)
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    cert = ca.issue_key_cert(key, f"spiffe://{TD}{KEY_CERT_PATH}", common_name="audit")
    got = trusted_key_from_cert(cert, ca.bundle_pem(), TD)
    assert got.public_bytes_raw() == key.public_bytes_raw()
    with pytest.raises(ValueError, match="not issued by a root of your trust bundle"):
        trusted_key_from_cert(cert, other.bundle_pem(), TD)
    forged = other.issue_key_cert(key, f"spiffe://{TD}{KEY_CERT_PATH}", common_name="audit")
    with pytest.raises(ValueError, match="not issued by a root"):
        trusted_key_from_cert(forged, ca.bundle_pem(), TD)
    wrong = ca.issue_key_cert(key, f"spiffe://{TD}/agent/x", common_name="x")
    with pytest.raises(ValueError, match="not spiffe://"):
        trusted_key_from_cert(wrong, ca.bundle_pem(), TD)

"""Entries built around records checked once, and the etcd batch value: the bytes are exactly what `seal` and a
full re-encode give (so the stored log and every verifier are unchanged), and what is not a batch is refused."""

from __future__ import annotations

import json
import zlib
from typing import Any

import pytest

from hivemesh.controlplane.audit import batches
from hivemesh.controlplane.audit.entries import checked_encoding, entry_line
from hivemesh.mesh.audit.chain import GENESIS, canonical, record_hash, seal, verify_chain

RECORDS: list[dict[str, Any]] = [
    {"v": 1, "kind": "inbound", "node": "spiffe://td/agent/a", "trace_id": "t1"},
    {"a": "é\u2028\"\\", "hash_of": {"hash": "x", "z": [1, {"hash": 2}]}, "h": None, "ha": True},  # keys by "hash"
    {"zz": 1},  # nothing sorts before hash
    {"aa": 1},  # nothing sorts after hash (but seq/prev, which seal adds)
    {},
    {"big": "x" * 5000, "n": -12345678901234567890, "list": ["hash", "\"hash\":\"0\""]},
]


def _sealed(fields: dict[str, Any], seq: int = 3, prev: str = "ab" * 32) -> dict[str, Any]:
    line, _ = seal(dict(fields), seq, prev)
    rec: dict[str, Any] = json.loads(line)
    return rec


@pytest.mark.parametrize("fields", RECORDS)
def test_checked_encoding_is_the_canonical_record_and_the_entry_is_what_seal_writes(fields: dict[str, Any]) -> None:
    rec = _sealed(fields)
    encoded = checked_encoding(rec)
    assert encoded == canonical(rec)
    for seq, prev in ((1, GENESIS), (98765, "f" * 64)):
        line, digest = entry_line(canonical("spool-1"), encoded, seq, prev)
        assert (line, digest) == seal({"source": "spool-1", "record": rec}, seq, prev)
        assert verify_chain([line.rstrip(b"\n")], first_seq=seq, prev=prev) == (1, None)
        assert record_hash(json.loads(line)) == digest


def test_a_changed_record_or_a_bad_hash_is_not_checked() -> None:
    rec = _sealed(RECORDS[0])
    assert checked_encoding({**rec, "trace_id": "t2"}) is None  # content changed under its hash
    assert checked_encoding({**rec, "hash": rec["hash"].upper()}) is None
    assert checked_encoding({k: v for k, v in rec.items() if k != "hash"}) is None
    assert checked_encoding({**rec, "hash": 7}) is None
    with pytest.raises(ValueError):  # what canonical JSON refuses is refused here too
        checked_encoding({**rec, "x": float("nan")})


def test_a_batch_round_trips_and_its_header_reads_without_the_lines() -> None:
    lines = [entry_line(b'"s"', canonical(_sealed(RECORDS[0], i)), i, GENESIS)[0] for i in range(1, 4)]
    head = {"first": 1, "last": 3, "offset": 0, "end": sum(map(len, lines)), "time": 5, "head": "h", "replica": "a"}
    value = batches.encode(head, lines)
    assert len(value) < sum(map(len, lines))  # compressed
    assert batches.header(value) == head
    assert batches.lines(value) == (head, [line.rstrip(b"\n") for line in lines])


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (b"", "no header"),
        (json.dumps({"first": 1, "last": 1, "time": 1, "offset": 0, "lines": ["{}"]}).encode(), "no header"),
        (canonical({"first": 1, "last": 1, "offset": 0, "end": 3, "time": 1}) + b"\n" + zlib.compress(b"{}\n"),
         "no head"),
        (canonical({"first": 1, "last": 1, "offset": 0, "end": 3, "time": 1, "head": "h"}) + b"\nnot zlib",
         "do not inflate"),
        (canonical({"first": 1, "last": 2, "offset": 0, "end": 3, "time": 1, "head": "h"}) + b"\n"
         + zlib.compress(b"{}\n"), "holds 1 line"),
        (canonical({"first": 1, "last": 1, "offset": 0, "end": 3, "time": 1, "head": "h"}) + b"\n"
         + zlib.compress(b"{}"), "holds 0 line"),
    ],
)
def test_what_is_not_a_batch_is_refused(value: bytes, why: str) -> None:
    with pytest.raises(batches.BadBatchError, match=why):
        batches.lines(value)

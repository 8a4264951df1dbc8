"""Entries built around records checked once, and the etcd batch value: the bytes are exactly what `seal` and a
full re-encode give (so the stored log and every verifier are unchanged), and what is not a batch is refused."""

from __future__ import annotations

import hashlib
import json
import zlib
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivemesh.controlplane.audit import batches
from hivemesh.controlplane.audit.entries import checked_encoding, entry_line, read_flat
from hivemesh.mesh import json_fast
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


def _general(raw: bytes) -> tuple[Any, bytes | None]:
    """What the store's general path makes of raw: the record json reads and its checked encoding."""
    rec = json_fast.loads(raw)
    try:
        return rec, checked_encoding(rec) if isinstance(rec, dict) else None
    except (TypeError, ValueError):
        return rec, None


@pytest.mark.parametrize("fields", RECORDS)
def test_a_flat_record_is_read_and_checked_in_one_pass_as_the_general_path_reads_it(fields: dict[str, Any]) -> None:
    line, _ = seal(dict(fields), 3, "ab" * 32)
    flat = read_flat(line)
    nested = any(isinstance(v, (dict, list)) or (isinstance(v, int) and abs(v) >= 2**63) for v in fields.values())
    if nested:
        assert flat is None
        return
    assert flat is not None and flat == _general(line)
    assert flat[1] == canonical(json.loads(line))


def test_member_order_and_spacing_of_the_line_do_not_matter_to_the_one_pass() -> None:
    rec = _sealed({"v": 1, "kind": "inbound", "zz": None, "ok": True, "n": -3})
    reordered = json.dumps(dict(reversed(list(rec.items()))), indent=1).encode()
    assert read_flat(reordered) == (rec, canonical(rec))


@pytest.mark.parametrize("change", [
    lambda r: {**r, "kind": "outbound"},  # content changed under its hash
    lambda r: {**r, "hash": r["hash"].upper()},
    lambda r: {**r, "hash": r["hash"][:-1]},
    lambda r: {**r, "hash": r["hash"][:-1] + '"'},
    lambda r: {**r, "hash": r["hash"][:-1] + "\u00e9"},
    lambda r: {**r, "hash": 7},
    lambda r: {k: v for k, v in r.items() if k != "hash"},
    lambda r: {**r, "x": 1.5},
    lambda r: {**r, "x": [1]},
])
def test_what_the_one_pass_cannot_vouch_for_goes_to_the_general_path(change: Any) -> None:
    raw = json.dumps(change(_sealed(RECORDS[0]))).encode()
    assert read_flat(raw) is None
    assert _general(raw)[1] is None  # and that refuses it too


def _hashed_over(body: bytes, fields: dict[str, Any]) -> bytes:
    """fields with a `hash` taken over body (whatever body is), as a line."""
    return json.dumps({**fields, "hash": hashlib.sha256(body).hexdigest()}).encode()


@pytest.mark.parametrize("fields", [{"a": 1}, {"a": 1, "z": "x"}, {"z": True}, {}, {"a": None, "b": "", "zz": -1}])
def test_the_hash_member_comes_out_wherever_it_sorts(fields: dict[str, Any]) -> None:
    raw = _hashed_over(canonical(fields), fields)  # hash last, in the middle, first, the only member
    flat = read_flat(raw)
    assert flat is not None and flat == _general(raw)


@pytest.mark.parametrize("text", ["é", "\x7f", "\u2028"])
def test_a_hash_over_text_json_would_escape_is_not_vouched_for(text: str) -> None:
    fields = {"a": text, "seq": 1}
    raw_body = orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)  # orjson writes it raw; canonical JSON escapes it
    raw = _hashed_over(raw_body, fields)
    assert read_flat(raw) is None and _general(raw)[1] is None


@pytest.mark.parametrize("raw", [b"", b"[1]", b'"x"', b"\xef\xbb\xbf{}", b'{"a":"\\ud800","hash":"0"}', b"{", b"\xff"])
def test_text_orjson_refuses_or_that_is_no_record_goes_to_the_general_path(raw: bytes) -> None:
    assert read_flat(raw) is None


_chars = st.sampled_from(["a", '"', "\\", "\x00", "\x7f", "é", "\u2028", "h", ":", ","])
_flat_values = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.text(alphabet=_chars, max_size=12),
                         st.sampled_from(['"hash":"', ',"hash":"' + "0" * 64 + '"', "hash"]))


def _plain(text: str) -> bool:
    return text.isascii() and "\x7f" not in text


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.one_of(st.text(alphabet=st.sampled_from(["a", "h", "z", '"', "\x7f", "é"]), max_size=3),
                                 st.sampled_from(["has", "hasi", "hash_", "hash\u00e9", "seq", "prev"])),
                       _flat_values, max_size=8),
       st.booleans())
def test_any_flat_record_reads_as_the_general_path_reads_it_or_goes_there(fields: dict[str, Any],
                                                                          tamper: bool) -> None:
    line, _ = seal(dict(fields), 5, GENESIS)
    if tamper:  # a record changed under its hash
        rec = json.loads(line)
        rec["seq"] = 6
        line = json.dumps(rec).encode()
    flat = read_flat(line)
    # orjson writes the same text as json unless a string holds what json escapes and orjson writes raw, or an
    # integer is past 64 bits (orjson reads a float): those go to the general path.
    alike = all(_plain(k) and (_plain(v) if isinstance(v, str) else not isinstance(v, int) or -(2**63) <= v < 2**64)
                for k, v in json.loads(line).items())
    if tamper or not alike:
        assert flat is None
    else:
        assert flat is not None and flat == _general(line)
    if tamper:
        assert _general(line)[1] is None


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

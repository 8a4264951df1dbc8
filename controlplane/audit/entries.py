"""Log entries built around records checked once (issue 14: what a shipped record costs the control plane).

A shipped record is parsed and canonically encoded a single time. A flat one (a node's decision record) is
read, encoded and checked in one pass (`read_flat`); any other is parsed as json reads it, and `checked_encoding`
verifies its hash from the canonical JSON of the members before and after `hash` (encoded apart, so the record's
full canonical form with `hash` in its sorted place comes from the same two encodings). `entry_line` builds the
log entry's bytes around that encoding instead of encoding the record again. The bytes are exactly
`seal({"source", "record"}, seq, prev)`'s, so the stored log and every verifier are unchanged.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final, NamedTuple

import orjson

from hivemesh.mesh.audit.chain import canonical

_LEAVES: Final = frozenset({str, int, bool, type(None)})


class Checked(NamedTuple):
    """A record chained in its source's chain whose hash matched its content, ready to seal into the log."""

    source: str
    record: dict[str, Any]
    encoded: bytes
    """canonical(record), `hash` member included."""


def checked_encoding(record: dict[str, Any]) -> bytes | None:
    """canonical(record) if its `hash` is the SHA-256 of its canonical JSON without `hash`, else None.

    Raises TypeError or ValueError when the record holds what canonical JSON cannot encode."""
    digest = record.get("hash")
    if not isinstance(digest, str):
        return None
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    for key, value in record.items():
        if key < "hash":
            before[key] = value
        elif key != "hash":
            after[key] = value
    lo, hi = canonical(before)[1:-1], canonical(after)[1:-1]  # sorted members, without the braces
    body = b"{" + lo + (b"," if lo and hi else b"") + hi + b"}"
    if hashlib.sha256(body).hexdigest() != digest:
        return None
    member = b'"hash":"' + digest.encode("ascii") + b'"'
    return b"{" + (lo + b"," if lo else b"") + member + (b"," + hi if hi else b"") + b"}"


def entry_line(source_json: bytes, encoded: bytes, seq: int, prev: str) -> tuple[bytes, str]:
    """The log line chaining the record (its canonical encoding) as entry seq after prev, and its hash.

    source_json is canonical(source); the canonical members of an entry sort as prev, record, seq, source."""
    body = b'{"prev":' + canonical(prev) + b',"record":' + encoded + b',"seq":' + str(seq).encode("ascii") + \
        b',"source":' + source_json + b"}"
    digest = hashlib.sha256(body).hexdigest()
    return body[:-1] + b',"hash":"' + digest.encode("ascii") + b'"}\n', digest


def read_flat(raw: bytes) -> tuple[dict[str, Any], bytes] | None:
    """A shipped record read and checked in one pass, when it is flat (every member a string, an integer, a
    boolean or null, as a node's decision records are): (the record, canonical(record)), exactly what
    `json_fast.loads` and `checked_encoding` give for it. None when the record is not flat, does not read as
    orjson reads it alike, or its hash does not match: the general path then decides (and says why).

    One sorted encoding of the whole record does for both: the record's canonical JSON without `hash` is that
    encoding less the `"hash":"<digest>"` member (in a flat record the only place that text can be, since a
    string holds no bare quote), so the check costs one parse, one encoding and one SHA-256: 4.1 µs for a 690-byte
    decision record against the general path's 8.1, and the control plane's CPU per shipped record 30.7 -> 27.3 µs
    (`bench/audit_cost.py`, BENCHMARKS.md, 5 Dec)."""
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:  # and every text orjson refuses (a lone surrogate, a BOM): json decides
        return None
    # (JSON's keys are strings.)
    if type(record) is not dict or not _LEAVES.issuperset(map(type, record.values())):
        return None  # nested, or a float (orjson reads an integer past 64 bits as one): json decides
    digest = record.get("hash")
    if type(digest) is not str:
        return None
    encoded = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
    if not encoded.isascii() or b"\x7f" in encoded:  # json escapes these: canonical writes them itself
        return None
    member = b'"hash":"' + digest.encode("ascii") + b'"'  # (ASCII, as the encoding is; what is not hex fails below)
    start = encoded.find(member)
    if start < 0:  # a digest JSON escapes: no SHA-256 hex digest
        return None
    end = start + len(member)
    if encoded[start - 1] == 0x2C:  # ,"hash":"..."
        body = encoded[:start - 1] + encoded[end:]
    elif encoded[end] == 0x2C:  # {"hash":"...",
        body = encoded[:start] + encoded[end + 1:]
    else:  # the only member
        body = b"{}"
    if hashlib.sha256(body).hexdigest() != digest:
        return None
    return record, encoded

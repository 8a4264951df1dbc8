"""Log entries built around records checked once (issue 14: what a shipped record costs the control plane).

A shipped record is parsed and canonically encoded a single time: `checked_encoding` verifies its hash from the
canonical JSON of the members before and after `hash` (encoded apart, so the record's full canonical form with
`hash` in its sorted place comes from the same two encodings), and `entry_line` builds the log entry's bytes
around that encoding instead of encoding the record again. The bytes are exactly `seal({"source", "record"},
seq, prev)`'s, so the stored log and every verifier are unchanged.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

from hivemesh.mesh.audit.chain import canonical


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

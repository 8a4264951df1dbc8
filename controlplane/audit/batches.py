"""The etcd value of one committed batch of the mesh-wide audit log (`AUDIT_LOG/<first seq>`).

`<header: canonical JSON>\\n<the entry lines, each ending in \\n, zlib-compressed>`. The header says what the
trimmer and a tail re-seed need without inflating the lines: `first`/`last` seq, `head` (the last entry's
hash), `offset`/`end` (the batch's bytes in every copy of the log), `time` and `replica`. The lines are the
entries byte for byte as every copy stores them; compressed (level 1: ~6x smaller for a few µs per entry) they
cost etcd a sixth of the raft, WAL and bolt bytes.

Older values (one JSON object with the lines as strings, before issue 14's rework) are not read: a replica that
meets one treats it as a batch it cannot apply (pre-release format change).
"""

from __future__ import annotations

import zlib
from typing import Any, Final

from hivemesh.mesh import json_depth
from hivemesh.mesh.audit.chain import canonical

LEVEL: Final = 1
"""zlib level: 1 already gets most of the size for the least CPU on JSON lines."""


class BadBatchError(ValueError):
    """A value under AUDIT_LOG that is not a batch this code wrote (corrupted, or an older format)."""


def encode(header: dict[str, Any], lines: list[bytes]) -> bytes:
    """The value for lines (each ending in \\n) under header."""
    return canonical(header) + b"\n" + zlib.compress(b"".join(lines), LEVEL)


def header(value: bytes) -> dict[str, Any]:
    """The batch's header (cheap: the lines stay compressed)."""
    head, sep, _ = value.partition(b"\n")
    try:
        parsed = json_depth.loads(head) if sep else None
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise BadBatchError("not an audit batch (no header line)")
    for name in ("first", "last", "offset", "end", "time"):
        if not isinstance(parsed.get(name), int):
            raise BadBatchError(f"the batch header has no integer {name}")
    if not isinstance(parsed.get("head"), str):
        raise BadBatchError("the batch header has no head")
    return parsed


def lines(value: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """The header and the entry lines (without their \\n) of a batch."""
    head = header(value)
    try:
        data = zlib.decompress(value[value.index(b"\n") + 1:])
    except zlib.error as err:
        raise BadBatchError(f"the batch's lines do not inflate: {err}") from None
    out = data.split(b"\n")
    if out.pop() != b"" or len(out) != head["last"] - head["first"] + 1:
        raise BadBatchError(f"the batch holds {len(out)} line(s), its header says {head['last'] - head['first'] + 1}")
    return head, out

"""The audit hash chain, the one implementation both sides use (nodes' spools and the control plane's log).

Records are canonical JSON (sorted keys, no whitespace, ASCII with \\u escapes, integers and strings only, so
any language reproduces the bytes) and chained: each carries `seq` (1, 2, ...), `prev` (the previous record's
hash; 64 zeros for the first) and `hash` = SHA-256 hex of the canonical JSON of the record without `hash`.
Changing, deleting, inserting or reordering a record breaks the chain at that record (`verify_chain`).
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from hivemesh.mesh import json_depth

GENESIS: Final = "0" * 64
"""`prev` of a chain's first record."""
MAX_SEQ: Final = 2**63 - 1
"""The largest seq: what the protocol's uint64 fields and every reader's int64 carry."""
_HEX64 = re.compile(r"[0-9a-f]{64}")

_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
"""Built once: `json.dumps` with non-default options builds a new encoder on every call (on the hot path)."""


_LEAVES: Final = frozenset({str, int, bool, type(None)})
_CONTAINERS: Final = frozenset({dict, list, tuple})
_WRITTEN_ALIKE: Final = _LEAVES | _CONTAINERS
_STR: Final = frozenset({str})
MAX_WALK: Final = 4096
"""Members and items `_orjson_agrees` looks at before leaving a value to json: a record has a few dozen, and the
bound keeps a value that holds itself (json raises on it) from being walked for ever."""


def _orjson_agrees(obj: Any) -> bool:
    """Whether orjson's sorted encoding of obj can only be json's: obj holds nothing but dicts with str keys,
    lists, tuples, str, int, bool and None (orjson also writes datetimes, dataclasses, UUIDs, enums and str/int/
    dict subclasses, which json refuses or writes otherwise, and writes floats in its own notation). Each
    container's types are taken as a set in C: a flat record costs ~0.5 µs here."""
    stack = [obj]
    walked = 0
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            if not _STR.issuperset(map(type, item)):
                return False
            children = item.values()
        elif kind is list or kind is tuple:
            children = item
        else:
            return kind in _LEAVES
        walked += len(item)
        if walked > MAX_WALK:
            return False
        types = set(map(type, children))
        if not types <= _LEAVES:
            if not types <= _WRITTEN_ALIKE:
                return False
            stack.extend(child for child in children if type(child) in _CONTAINERS)
    return True


def canonical(obj: Any) -> bytes:
    """The canonical JSON bytes of obj: sorted keys, no whitespace, ASCII only (non-ASCII as \\u escapes).

    orjson writes them when it provably writes json's bytes (~4x faster for a record: every record is encoded
    on the node that seals it and twice more by the control plane that checks and stores it): the value holds
    only the types both write alike (`_orjson_agrees`) and orjson's output is ASCII without DEL (json escapes
    every non-ASCII character and DEL; orjson writes them raw, and escapes everything else as json does). Any
    other value, and every value orjson refuses (an integer beyond 64 bits, a lone surrogate, deep nesting), is
    written by json, which also raises what it always raised."""
    if _orjson_agrees(obj):
        try:
            out = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
        except TypeError:  # orjson.JSONEncodeError
            pass
        else:
            if out.isascii() and b"\x7f" not in out:
                return out
    return _CANONICAL.encode(obj).encode()


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON of record without its `hash` member."""
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def seal(fields: dict[str, Any], seq: int, prev: str) -> tuple[bytes, str]:
    """Chain fields as record seq after prev; returns (the line to append, its hash).

    The line is the canonical body with `hash` appended last (one serialization on the hot path); a reader
    re-canonicalizes, so member order in the stored line does not matter.
    """
    fields["seq"] = seq
    fields["prev"] = prev
    fields.pop("hash", None)
    body = canonical(fields)
    digest = hashlib.sha256(body).hexdigest()
    line = body[:-1] + b',"hash":"' + digest.encode() + b'"}\n'
    return line, digest


@dataclass(frozen=True)
class ChainProblem:
    """Where a chain first goes wrong."""

    line: int
    """1-based line number of the first bad record in the file or stream."""
    seq: int
    """The sequence number at which the chain breaks (the record that is missing, changed or misplaced)."""
    reason: str

    def __str__(self) -> str:
        return f"record seq {self.seq} (line {self.line}): {self.reason}"


@dataclass
class ChainState:
    """A verifier's position in one chain: the next expected seq and the hash it must link to."""

    next_seq: int = 1
    prev: str = GENESIS
    count: int = 0
    recent: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=2), repr=False)
    """The last two good hashes, to recognise a record forged to fit (inserted with a recomputed hash)."""


def link_fields_problem(entry: dict[str, Any]) -> str:
    """Why entry's seq/prev/hash cannot be part of a chain ("" when they can): seq a whole number in
    1..MAX_SEQ (not a bool), prev and hash 64 lowercase hex digits. The one rule the control plane's ingest and
    every verifier apply, so a record stored is a record that verifies."""
    seq, prev, stored = entry.get("seq"), entry.get("prev"), entry.get("hash")
    if not isinstance(seq, int) or isinstance(seq, bool):
        return "seq is not an integer"
    if not 1 <= seq <= MAX_SEQ:
        return "seq is outside 1..2**63-1"
    if not isinstance(prev, str) or not _HEX64.fullmatch(prev):
        return "prev is not 64 hex digits"
    if not isinstance(stored, str) or not _HEX64.fullmatch(stored):
        return "hash is not 64 hex digits"
    return ""


def check_link(entry: Any, state: ChainState, line: int) -> ChainProblem | None:
    """Check one parsed record against state (advancing it when good); the problem, or None when it links.

    Order matters for naming the right record: content first (a changed record fails its own hash), then the
    link (a deleted, moved or inserted record breaks it), then the numbering.
    """
    if not isinstance(entry, dict):
        return ChainProblem(line, state.next_seq, "not a JSON object")
    malformed = link_fields_problem(entry)
    if malformed:
        return ChainProblem(line, state.next_seq, f"missing or malformed seq/prev/hash: {malformed}")
    seq, prev, stored = entry["seq"], entry["prev"], entry["hash"]
    try:
        computed = record_hash(entry)
    except (TypeError, ValueError, RecursionError):
        return ChainProblem(line, state.next_seq, "not canonical JSON (floats or invalid values)")
    if computed != stored:
        return ChainProblem(line, state.next_seq, "changed: its hash does not match its content")
    if prev != state.prev:
        if len(state.recent) == 2 and prev == state.recent[0] and seq == state.next_seq - 1:
            # The previous record had the right seq and a recomputed hash, but this one links past it.
            return ChainProblem(line - 1, seq, "inserted: the next record links past it to its predecessor")
        if seq > state.next_seq:
            why = f"record(s) {state.next_seq}..{seq - 1} deleted or moved (found seq {seq} here)"
        elif seq < state.next_seq:
            why = f"reordered or duplicated: found seq {seq} here"
        else:
            why = "does not link to the previous record (inserted, reordered or re-hashed)"
        return ChainProblem(line, state.next_seq, why)
    if seq != state.next_seq:
        return ChainProblem(line, state.next_seq, f"has seq {seq}, expected {state.next_seq} (renumbered)")
    state.prev = stored
    state.next_seq += 1
    state.count += 1
    state.recent.append(stored)
    return None


def parse_line(raw: bytes | str) -> Any:
    """A stored line as JSON (ValueError when it is not)."""
    return json_depth.loads(raw)


def verify_chain(
    lines: Iterable[bytes | str], *, first_seq: int = 1, prev: str = GENESIS
) -> tuple[int, ChainProblem | None]:
    """Verify a chain of record lines; returns (records verified, the first problem or None)."""
    state = ChainState(next_seq=first_seq, prev=prev)
    for n, raw in enumerate(lines, 1):
        if not (raw.strip() if isinstance(raw, str | bytes) else raw):
            return state.count, ChainProblem(n, state.next_seq, "empty line")
        try:
            entry = parse_line(raw)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than json reads
            return state.count, ChainProblem(n, state.next_seq, "not valid JSON (changed or torn)")
        problem = check_link(entry, state, n)
        if problem is not None:
            return state.count, problem
    return state.count, None


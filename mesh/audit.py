"""The audit log of every inbound decision: a hash-chained, append-only spool shipped to the control plane.

Each node (SDK agent or sidecar) writes one record per call the inbound chain decided on (allowed, denied and
by which rule, rate-limited, circuit-open, refused input, errors) to a local spool *before the response is
released*: the write is one `os.write` of one line to an `O_APPEND` file, so once it returns the record is in
the kernel's page cache and survives a SIGKILL of the process. A background thread fsyncs in batches
(`fsync_interval_s`, 50 ms by default): a power loss or kernel crash can cost at most that window of records,
which is the price of not paying a disk flush per call.

Records are canonical JSON (sorted keys, no whitespace, ASCII with \\u escapes, integers and strings only, so
any language reproduces the bytes) and chained: each carries `seq` (1, 2, ...), `prev` (the previous record's
hash; 64 zeros for the first) and `hash` = SHA-256 hex of the canonical JSON of the record without `hash`.
Changing, deleting, inserting or reordering a record breaks the chain at that record (`verify_chain`).

A background shipper sends the spool to the control plane in order, in batches. It resumes from the last
sequence number the control plane holds for this spool's source (asked on every (re)connect), so nothing is
lost and nothing is sent twice; the control plane also drops any record at or below what it holds. While the
control plane is down the spool simply grows, and is replayed when it is back. Spool segments are deleted only
after the control plane has acknowledged (and fsynced) every record in them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import grpc

from hivemesh.mesh.errors import AuditUnavailableError, HivemeshError
from hivemesh.mesh.layers.base import Inbound
from hivemesh.mesh.pki import load_cert, uri_sans

log = logging.getLogger(__name__)

GENESIS: Final = "0" * 64
"""`prev` of a chain's first record."""
FORMAT: Final = 1
_SEGMENT_RE = re.compile(r"audit-(\d{16})\.log")
_MAX_TEXT: Final = 256
_TRACEPARENT_RE = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")

# Decisions, by what the mesh did with the call.
ALLOW: Final = "allow"
DENY: Final = "deny"
INVALID: Final = "invalid"
RATE_LIMITED: Final = "rate_limited"
CIRCUIT_OPEN: Final = "circuit_open"
ERROR: Final = "error"
DECISIONS: Final = frozenset({ALLOW, DENY, INVALID, RATE_LIMITED, CIRCUIT_OPEN, ERROR})

_INVALID_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
})
_RATE_REASONS = frozenset({"RATE_LIMITED", "OVERLOADED"})


# --- canonical form and the chain -------------------------------------------------------------------------------
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
"""Built once: `json.dumps` with non-default options builds a new encoder on every call (on the hot path)."""


def canonical(obj: Any) -> bytes:
    """The canonical JSON bytes of obj: sorted keys, no whitespace, ASCII only (non-ASCII as \\u escapes)."""
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


def check_link(entry: Any, state: ChainState, line: int) -> ChainProblem | None:
    """Check one parsed record against state (advancing it when good); the problem, or None when it links.

    Order matters for naming the right record: content first (a changed record fails its own hash), then the
    link (a deleted, moved or inserted record breaks it), then the numbering.
    """
    if not isinstance(entry, dict):
        return ChainProblem(line, state.next_seq, "not a JSON object")
    seq, prev, stored = entry.get("seq"), entry.get("prev"), entry.get("hash")
    if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(prev, str) or not isinstance(stored, str):
        return ChainProblem(line, state.next_seq, "missing or malformed seq/prev/hash")
    try:
        computed = record_hash(entry)
    except (TypeError, ValueError):
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
    return json.loads(raw)


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
        except ValueError:
            return state.count, ChainProblem(n, state.next_seq, "not valid JSON (changed or torn)")
        problem = check_link(entry, state, n)
        if problem is not None:
            return state.count, problem
    return state.count, None


# --- what goes into a record -------------------------------------------------------------------------------------
def classify(err: HivemeshError | None, code: grpc.StatusCode) -> str:
    """The decision a call's outcome stands for."""
    if err is None:
        return ALLOW if code == grpc.StatusCode.OK else ERROR
    reason = err.reason
    if reason in _RATE_REASONS:
        return RATE_LIMITED
    if reason == "CIRCUIT_OPEN":
        return CIRCUIT_OPEN
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return DENY
    if code in _INVALID_CODES:
        return INVALID
    return ERROR


def utc_iso(ts: float) -> str:
    """RFC 3339 UTC with microseconds: sortable as text, exact as an audit timestamp."""
    # isoformat is strftime("%Y-%m-%dT%H:%M:%S.%fZ") with "+00:00" for the "Z", at about half the cost.
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def parse_time(text: str) -> float:
    """Unix seconds from an RFC 3339 time (as records carry), a unix number, or a relative '-5m'/'-2h'/'-1d'."""
    text = text.strip()
    rel = re.fullmatch(r"-(\d+(?:\.\d+)?)([smhd])", text)
    if rel:
        mult = {"s": 1, "m": 60, "h": 3600, "d": 86400}[rel.group(2)]
        return time.time() - float(rel.group(1)) * mult
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"bad time {text!r}: use RFC 3339 (2025-01-31T12:00:00Z), unix seconds or -15m") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.UTC)
    return dt.timestamp()


def _short(text: str, limit: int = _MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _meta(call: Inbound, key: str) -> str:
    value = call.metadata.get(key)
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return value if isinstance(value, str) else ""


def _unverified_token_ids(call: Inbound) -> dict[str, str]:
    """jti/sub a refused token *claims* (unverified, for forensics only; bounded and marked as such)."""
    try:
        token = call.bearer()
    except HivemeshError:  # none, not a Bearer credential, or more than one: nothing to read
        return {}
    parts = token.split(".")
    if len(parts) != 3 or len(parts[1]) > 8192:
        return {}
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return {}
    if not isinstance(payload, dict):
        return {}
    out = {}
    for name in ("jti", "sub"):
        v = payload.get(name)
        if isinstance(v, str):
            out[f"claimed_{name}"] = _short(v, 128)
    return out


def _unverified_peer(call: Inbound) -> str:
    pem = call.auth_context.get("x509_pem_cert") if call.auth_context else None
    if not pem:
        return ""
    try:
        sans = uri_sans(load_cert(pem[0] if isinstance(pem[0], bytes) else str(pem[0]).encode()))
    except ValueError:
        return ""
    return _short(",".join(sans), 256)


def decision_fields(
    call: Inbound, err: HivemeshError | None, code: grpc.StatusCode, elapsed_s: float, *, now: float
) -> dict[str, Any]:
    """The record fields for one inbound decision (without node/instance and chain members)."""
    req = call.request
    rec: dict[str, Any] = {
        "v": FORMAT,
        "time": utc_iso(now),
        "kind": "inbound",
        "method": call.method,
        "capability": _short(req.capability, 128) if req is not None else "",
        "decision": classify(err, code),
        "status": code.name,
        "reason": err.reason if err is not None else ("" if code == grpc.StatusCode.OK else code.name),
        "latency_us": max(int(elapsed_s * 1e6), 0),
        "caller": str(call.peer.spiffe_id) if call.peer is not None else "",
        "remote": call.notes.get("remote", ""),
    }
    if err is not None:
        rec["message"] = _short(err.message)
    if call.peer is None:
        claimed = _unverified_peer(call)
        if claimed:
            rec["caller_unverified"] = claimed
    claims = call.claims
    if claims is not None:
        rec["jti"] = claims.jti
        rec["principal"] = claims.subject
        chain = list(claims.delegation)
        if len(chain) > 1:
            rec["chain"] = chain
    elif err is not None:
        rec.update(_unverified_token_ids(call))
    ctx = req.context if req is not None else None
    traceparent = _meta(call, "traceparent")
    m = _TRACEPARENT_RE.fullmatch(traceparent) if traceparent else None
    call_id = _short(ctx.call_id, 128) if ctx is not None else ""
    rec["trace_id"] = m.group(1) if m else call_id
    if call_id:
        rec["call_id"] = call_id
    for note in ("rule", "dry_run"):
        if note in call.notes:
            rec[note] = call.notes[note]
    return rec


# --- the spool ----------------------------------------------------------------------------------------------------
class Spool:
    """An append-only, segmented, hash-chained record file set in one directory, owned by one process.

    The directory holds `source` (this spool's stable id), `lock` (held with flock while open: a second process
    cannot write the same chain; a SIGKILLed owner's lock is released by the kernel) and `audit-<first seq>.log`
    segments. Opening recovers the chain head from the last segment, cutting off a torn last line.
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        identity: str = "",
        segment_bytes: int = 8 * 1024 * 1024,
        fsync_interval_s: float = 0.05,
        keep_acked: bool = False,
    ) -> None:
        if segment_bytes < 4096:
            raise ValueError("segment_bytes must be at least 4096")
        if fsync_interval_s <= 0:
            raise ValueError("fsync_interval_s must be positive")
        self.dir = Path(directory)
        self.identity = identity
        self.segment_bytes = segment_bytes
        self.fsync_interval_s = fsync_interval_s
        self.keep_acked = keep_acked
        self._lock = threading.Lock()
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._seg_size = 0
        self._segments: list[tuple[int, Path]] = []
        self.seq = 0
        self.head = GENESIS
        self.acked = 0
        self.source = ""
        self._dirty = False
        self._closed = threading.Event()
        self._syncer: threading.Thread | None = None
        self._listeners: list[Callable[[], None]] = []
        self._read_pos: tuple[int, Path, int] | None = None
        """(seq, segment, byte offset of that record's line) where the last read stopped: the shipper's next
        read resumes there instead of rescanning the segment from its start (O(batch), not O(segment))."""

    # --- lifecycle ---
    def open(self) -> Spool:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise BlockingIOError(f"audit spool {self.dir} is in use by another process") from None
        self._lock_fd = fd
        source_file = self.dir / "source"
        if source_file.exists():
            self.source = source_file.read_text().strip()
        else:
            self.source = uuid.uuid4().hex
            tmp = source_file.with_name(".source.tmp")
            tmp.write_text(self.source + "\n")
            os.replace(tmp, source_file)
        acked_file = self.dir / "acked"
        with contextlib.suppress(OSError, ValueError):
            self.acked = int(acked_file.read_text().strip() or 0)
        self._segments = self._list_segments()
        self._recover()
        self._syncer = threading.Thread(target=self._sync_loop, name=f"audit-fsync-{self.dir.name}", daemon=True)
        self._syncer.start()
        return self

    def _list_segments(self) -> list[tuple[int, Path]]:
        segs = []
        for p in self.dir.iterdir():
            m = _SEGMENT_RE.fullmatch(p.name)
            if m:
                segs.append((int(m.group(1)), p))
        return sorted(segs)

    def _recover(self) -> None:
        """Find the chain head in the last segment; cut a torn (partial or unparsable) tail."""
        while self._segments:
            _first, path = self._segments[-1]
            data = path.read_bytes()
            good_end = 0
            last: dict[str, Any] | None = None
            pos = 0
            while pos < len(data):
                nl = data.find(b"\n", pos)
                if nl < 0:
                    break
                try:
                    rec = json.loads(data[pos:nl])
                except ValueError:
                    break
                if not isinstance(rec, dict) or not isinstance(rec.get("seq"), int):
                    break
                last = rec
                good_end = nl + 1
                pos = nl + 1
            if good_end < len(data):
                log.warning("audit spool %s: cutting %d torn byte(s) at the end", path, len(data) - good_end)
                with open(path, "r+b") as f:
                    f.truncate(good_end)
                    os.fsync(f.fileno())
            if last is None:
                path.unlink()
                self._segments.pop()
                continue
            self.seq = int(last["seq"])
            self.head = str(last["hash"])
            break
        if not self._segments:
            with contextlib.suppress(OSError, ValueError):
                seq_text, head = (self.dir / "head").read_text().split()
                self.seq, self.head = int(seq_text), head
        self._open_segment()

    def _open_segment(self) -> None:
        if self._segments and self._segments[-1][1].exists():
            path = self._segments[-1][1]
        else:
            path = self.dir / f"audit-{self.seq + 1:016d}.log"
            self._segments.append((self.seq + 1, path))
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._seg_size = os.fstat(self._fd).st_size

    def close(self) -> None:
        """Flush to disk and release the spool (the shipper should have stopped first)."""
        self._closed.set()
        if self._syncer is not None:
            self._syncer.join(timeout=5)
        with self._lock:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def add_listener(self, fn: Callable[[], None]) -> None:
        """fn() runs after every append (the shipper's wake-up); it must be cheap and must not raise."""
        self._listeners.append(fn)

    # --- the hot path ---
    def append(self, fields: dict[str, Any]) -> int:
        """Chain and write one record; returns its seq. Raises AuditUnavailableError when it cannot be written."""
        with self._lock:
            fd = self._fd
            if fd is None:
                raise AuditUnavailableError("the audit spool is closed")
            seq = self.seq + 1
            line, digest = seal(fields, seq, self.head)
            try:
                written = os.write(fd, line)
                if written != len(line):  # a short write to a regular file means the disk is full
                    raise OSError(f"short write ({written} of {len(line)} bytes)")
            except OSError as exc:
                raise AuditUnavailableError(f"cannot write the audit record: {exc}") from None
            self.seq = seq
            self.head = digest
            self._dirty = True
            self._seg_size += written
            if self._seg_size >= self.segment_bytes:
                self._rotate()
        for fn in self._listeners:
            fn()
        return seq

    def _rotate(self) -> None:
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._save_head()
        path = self.dir / f"audit-{self.seq + 1:016d}.log"
        self._segments.append((self.seq + 1, path))
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._seg_size = 0

    def _save_head(self) -> None:
        # The chain head survives even when every segment holding records has been shipped and deleted.
        tmp = self.dir / ".head.tmp"
        tmp.write_text(f"{self.seq} {self.head}\n")
        os.replace(tmp, self.dir / "head")

    def _sync_loop(self) -> None:
        while not self._closed.wait(self.fsync_interval_s):
            self.sync()

    def sync(self) -> None:
        """fsync now if anything was written since the last one."""
        with self._lock:
            if not self._dirty or self._fd is None:
                return
            self._dirty = False
            fd = os.dup(self._fd)
        try:
            os.fsync(fd)
        except OSError as exc:
            log.error("audit spool fsync failed: %s", exc)
        finally:
            os.close(fd)

    # --- reading (shipper, tools) ---
    def read(self, from_seq: int, *, max_records: int = 500, max_bytes: int = 1024 * 1024) -> list[bytes]:
        """Up to max_records record lines starting at from_seq (fewer at the head; empty when none)."""
        with self._lock:
            segments = list(self._segments)
            head = self.seq
        if from_seq > head:
            return []
        start = 0
        for i, (first, _) in enumerate(segments):
            if first <= from_seq:
                start = i
        out: list[bytes] = []
        size = 0
        pos = self._read_pos
        for first, path in segments[start:]:
            seq, offset = first, 0
            if pos is not None and pos[1] == path and first <= pos[0] <= from_seq:
                seq, offset = pos[0], pos[2]
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    for raw in f:
                        if not raw.endswith(b"\n"):
                            break  # being written right now
                        if seq >= from_seq:
                            out.append(raw.rstrip(b"\n"))
                            size += len(raw)
                            if len(out) >= max_records or size >= max_bytes:
                                self._read_pos = (seq + 1, path, offset + len(raw))
                                return out
                        seq += 1
                        offset += len(raw)
                    self._read_pos = (seq, path, offset)
            except FileNotFoundError:
                continue
        return out

    def lines(self) -> Iterator[bytes]:
        """Every retained record line, oldest first."""
        with self._lock:
            segments = list(self._segments)
        for _, path in segments:
            with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
                for raw in f:
                    if raw.endswith(b"\n"):
                        yield raw.rstrip(b"\n")

    def ack(self, seq: int) -> None:
        """The control plane holds every record up to seq: remember it, drop segments wholly below it."""
        if seq <= self.acked:
            return
        self.acked = seq
        tmp = self.dir / ".acked.tmp"
        tmp.write_text(str(seq))
        os.replace(tmp, self.dir / "acked")
        if self.keep_acked:
            return
        with self._lock:
            # A segment can go when the next one starts at or below seq + 1 (all its records are acked).
            while len(self._segments) > 1 and self._segments[1][0] <= seq + 1:
                _, path = self._segments.pop(0)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    @property
    def pending(self) -> int:
        """Records written but not yet acknowledged by the control plane."""
        return self.seq - self.acked


def open_spool(base: Path | str, name: str, **kwargs: Any) -> Spool:
    """Open `<base>/<name>`, or `<name>.1`, `<name>.2`, ... when another live process holds it (replicas of
    one agent on one host each get their own spool; a restarted one picks up a dead one's leftovers)."""
    base = Path(base)
    for i in range(64):
        directory = base / (name if i == 0 else f"{name}.{i}")
        try:
            return Spool(directory, **kwargs).open()
        except BlockingIOError:
            continue
    raise AuditUnavailableError(f"no free audit spool under {base} for {name}")


# --- shipping -------------------------------------------------------------------------------------------------------
class AuditSink(Protocol):
    """The control plane's side of shipping (implemented by ControlPlaneClient)."""

    async def audit_source_state(self, source: str) -> int: ...

    async def audit_append(self, source: str, records: Sequence[bytes]) -> int: ...


class Shipper:
    """Ships a spool to the control plane in order; resumes by sequence number; retries with backoff."""

    def __init__(
        self,
        spool: Spool,
        sink: Callable[[], AuditSink],
        *,
        batch: int = 500,
        linger_s: float = 0.05,
        backoff_max_s: float = 5.0,
    ) -> None:
        self.spool = spool
        self._sink = sink
        self._batch = batch
        self._linger = linger_s
        self._backoff_max = backoff_max_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.shipped = 0
        self.failures = 0
        self.last_error: str = ""
        spool.add_listener(self._notify)

    def _notify(self) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake.set()
        else:
            loop.call_soon_threadsafe(self._wake.set)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run())

    async def stop(self, *, drain_s: float = 2.0) -> None:
        """Try to ship what is pending (bounded by drain_s), then stop."""
        if self._task is None:
            return
        if drain_s > 0 and self.spool.pending > 0:
            deadline = time.monotonic() + drain_s
            while self.spool.pending > 0 and time.monotonic() < deadline and not self._task.done():
                self._wake.set()
                await asyncio.sleep(0.02)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def wait_shipped(self, seq: int | None = None, timeout: float = 10.0) -> bool:
        """Wait until the control plane holds every record up to seq (default: the current head)."""
        target = self.spool.seq if seq is None else seq
        deadline = time.monotonic() + timeout
        while self.spool.acked < target:
            if time.monotonic() >= deadline:
                return False
            self._wake.set()
            await asyncio.sleep(0.02)
        return True

    async def _run(self) -> None:
        acked: int | None = None
        delay = 0.1
        while True:
            try:
                sink = self._sink()
                if acked is None:
                    acked = await sink.audit_source_state(self.spool.source)
                    if acked > self.spool.seq:
                        log.error(
                            "the control plane holds %d records of audit source %s but the spool only %d",
                            acked, self.spool.source, self.spool.seq,
                        )
                    self.spool.ack(min(acked, self.spool.seq))
                if acked >= self.spool.seq:
                    self._wake.clear()
                    if acked >= self.spool.seq:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                        await asyncio.sleep(self._linger)
                    continue
                lines = self.spool.read(acked + 1, max_records=self._batch)
                if not lines:
                    # The records after `acked` were deleted: the control plane lost what it had acknowledged.
                    log.error("audit records after %d are no longer in the spool; cannot resend them", acked)
                    await asyncio.sleep(1.0)
                    acked = None
                    continue
                acked = await sink.audit_append(self.spool.source, lines)
                self.spool.ack(acked)
                self.shipped += len(lines)
                delay = 0.1
                if len(lines) < self._batch:
                    # Caught up, or nearly: let the next batch gather for linger_s, not one record per round
                    # trip (under steady load that was a tight loop of tiny batches, each a gRPC call + an ack).
                    await asyncio.sleep(self._linger)
            except asyncio.CancelledError:
                raise
            except HivemeshError as exc:
                self.failures += 1
                self.last_error = f"{exc.reason}: {exc.message}"
                log.debug("audit shipping failed (%s); retrying in %.1f s", self.last_error, delay)
                acked = None  # re-ask where to resume: the control plane may have stored the batch anyway
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff_max)
            except Exception as exc:  # noqa: BLE001 - the shipper must outlive any one failure
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("audit shipping failed: %s", self.last_error)
                acked = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff_max)


# --- the observer -----------------------------------------------------------------------------------------------------
class AuditLog:
    """A DecisionObserver that writes one chained record per inbound decision, and ships the spool.

    Call `start(sink)` once an event loop runs to ship; without it the records only accumulate in the spool.
    Writing never waits on the network. If the spool cannot be written the observer raises
    AuditUnavailableError, and the interceptor fails the call closed rather than serve it unaudited.
    """

    def __init__(self, spool: Spool, *, node: str, instance: str, clock: Callable[[], float] = time.time) -> None:
        self.spool = spool
        self.node = node
        self.instance = instance
        self._clock = clock
        self.shipper: Shipper | None = None

    @classmethod
    def open(
        cls, base: Path | str, *, node: str, instance: str, name: str | None = None, **spool_kwargs: Any
    ) -> AuditLog:
        """An AuditLog over the spool `<base>/<name>` (name defaults from the node's SPIFFE id)."""
        if name is None:
            kind_name = node.rsplit("/", 2)[-2:]
            name = "-".join(kind_name) if len(kind_name) == 2 else "node"
        return cls(open_spool(base, name, identity=node, **spool_kwargs), node=node, instance=instance)

    def __call__(self, call: Inbound, err: HivemeshError | None, code: grpc.StatusCode, elapsed: float) -> None:
        rec = decision_fields(call, err, code, elapsed, now=self._clock())
        rec["node"] = self.node
        rec["instance"] = self.instance
        self.spool.append(rec)

    def record(self, fields: Mapping[str, Any]) -> int:
        """Append any other decision (e.g. an outbound refusal such as CIRCUIT_OPEN); adds time/node/instance."""
        rec = {"v": FORMAT, "time": utc_iso(self._clock()), **fields, "node": self.node, "instance": self.instance}
        return self.spool.append(rec)

    def outbound(self, capability: str, err: HivemeshError) -> None:
        """An OutboundPipeline observer: a call this node refused itself before sending it (circuit open, no
        live instance, no grant, its own certificate expired). Written like an inbound record, kind outbound."""
        try:
            self.record({
                "kind": "outbound", "capability": _short(capability, 128), "decision": classify(err, err.code),
                "status": err.code.name, "reason": err.reason, "message": _short(err.message),
                "caller": self.node, "latency_us": 0,
            })
        except AuditUnavailableError as exc:
            log.error("cannot record an outbound refusal: %s", exc.message)

    def start(self, sink: Callable[[], AuditSink], **kwargs: Any) -> Shipper:
        self.shipper = Shipper(self.spool, sink, **kwargs)
        self.shipper.start()
        return self.shipper

    async def close(self, *, drain_s: float = 2.0) -> None:
        if self.shipper is not None:
            await self.shipper.stop(drain_s=drain_s)
        self.spool.close()


class _NodeLike(Protocol):
    @property
    def controlplane(self) -> Any: ...


def open_node_audit(
    node: _NodeLike, *, spiffe_id: str, instance: str, directory: Path | str | None = None, **spool_kwargs: Any
) -> AuditLog:
    """The audit log of a serving node: spool under `directory` (default `<HIVEMESH_HOME>/audit`), shipped to
    the control plane through the node's own control-plane client (it follows certificate renewals)."""
    from hivemesh.mesh.settings import state_dir

    base = Path(directory) if directory is not None else state_dir() / "audit"
    audit = AuditLog.open(base, node=spiffe_id, instance=instance, **spool_kwargs)
    audit.start(lambda: node.controlplane)
    return audit

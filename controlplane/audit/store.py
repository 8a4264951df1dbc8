"""The control plane's audit log: one append-only, hash-chained file of every node's records.

Layout of `<state_dir>/audit/`:

- `log.jsonl`: one entry per line, `{"seq", "prev", "source", "record", "hash"}`. `record` is a node's record
  exactly as it chained it (its own seq/prev/hash, see `hivemesh.mesh.audit.chain`), so both the log's chain and
  every source's chain can be re-verified end to end. Entries are fsynced before a batch is acknowledged, and
  only then may a node forget its spool.
- `checkpoints.jsonl` and `checkpoint.key`: signed checkpoints of the head (`hivemesh.controlplane.audit.checkpoints`).
- `heads.jsonl`: signed heads covering the last entry, at every export and at most once a second while records
  arrive (`hivemesh.controlplane.audit.heads`).

With several control-plane replicas (`shared`, a `SharedLog`) this directory is the replica's full copy of the
one mesh-wide log whose order and durability live in etcd: appends commit there first, every replica applies
the committed batches in order, and only the leader signs checkpoints (`hivemesh.controlplane.audit.shared_log`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import logging
import math
import os
import re
import time
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from cryptography.hazmat.primitives.asymmetric import ed25519

from hivemesh.controlplane.audit.checkpoints import (
    LogReport,
    checkpoint_problem,
    key_id,
    load_or_create_checkpoint_key,
    sign_checkpoint,
    verify_log,
    write_private,
)
from hivemesh.controlplane.audit.entries import Checked, checked_encoding, entry_line, read_flat
from hivemesh.controlplane.audit.heads import KEY_CERT_PATH, HeadCadence, sign_head
from hivemesh.controlplane.audit.query import CONTROLPLANE_KINDS, NODE_KINDS, AuditFilter
from hivemesh.mesh import json_depth, json_fast
from hivemesh.mesh.audit.chain import GENESIS, canonical, link_fields_problem, parse_line, record_hash, seal
from hivemesh.mesh.audit.record import FORMAT, short, utc_iso
from hivemesh.mesh.errors import (
    AuditUnavailableError,
    FailedPreconditionError,
    InvalidInputError,
    PermissionDeniedError,
)
from hivemesh.mesh.pki import controlplane_id

if TYPE_CHECKING:
    from hivemesh.controlplane.server import Core

log = logging.getLogger(__name__)

EXTENSION: Final = "audit"
CONTROLPLANE_SOURCE: Final = "controlplane"
"""The source id of the control plane's own records (joins, tokens, revocations, rotations)."""
MAX_BATCH: Final = 1000
MAX_RECORD_BYTES: Final = 64 * 1024
MAX_PENDING: Final = 10_000
"""The control plane's own records a replica holds while the shared log cannot take them (then it refuses)."""
QUERY_BUDGET_BYTES: Final = 4 * 1024 * 1024
"""Bytes of entries one Query answer carries at most (at least one entry): half the server's 8 MiB send limit, so
a page of large legal records is sent, and a query holds no more than this; the client pages on."""
ECHO_CHARS: Final = 128
"""How much of a caller's value a refusal quotes: a status's details must stay small."""
MAX_ENTRY_BYTES: Final = 6 * MAX_RECORD_BYTES + 512
"""Longer than any log line the store writes, newline included. A record of at most MAX_RECORD_BYTES as sent is stored
canonically, where one byte sent becomes at most 6: DEL (raw in a JSON string) and each 2-byte UTF-8 character are
written as a 6-byte \\u escape, a 4-byte one as two, a number like 1e15 as 1000000000000000.0 (4.5x); its entry adds
under 300 bytes (prev, seq, source, hash). A 64 KiB record of DELs is a 392 KB line."""
INDEX_STRIDE: Final = 64
"""A node's source keeps where every INDEX_STRIDE-th of its records starts in log.jsonl (8 bytes per 64 records):
a stored record is found by reading on from the one at or before it, ~64 of its lines (one 64 KiB read)."""
INDEX_MARKS: Final = 4096
"""The most offsets a source keeps (32 KiB): past it every other one goes and the stride doubles, so a source's
index stays bounded however long the control plane runs (a lookup then reads on further, off the event loop)."""
READ_BLOCK: Final = 64 * 1024
"""What one read of the log takes when records are looked up (more at once for a longer line)."""
MAX_LOOKUPS: Final = 16
"""The most resent runs below the head one batch may have compared with the log: a shipper resends one run (in
order, from its acknowledged seq); a batch of scattered stored seqs had one batch read its source's whole stretch
of the log."""
READ_HEDGE_AFTER_S: Final = 2.0
"""How long a shared-log read has on the round-robin etcd client before every member is asked too: a member cut
off would hold a catch-up (and every audit read behind it) for the read's whole 10 s; a catch-up of many
batches may take a while on its own, and is not asked of every member at once unless it takes this long."""
COMMIT_HEDGE_AFTER_S: Final = 0.5
"""The same for a commit's transaction, which holds the store's lock (every append, and every answer waiting for
its record, waits behind it): a healthy commit takes milliseconds, and a copy sent to every member is only a
compare that fails, so it is asked of them sooner (`SharedLog`'s `writes`)."""
OWN_COMMIT_WAIT_S: Final = 2.0
"""How long an RPC's answer waits for its audit record to be committed to the mesh-wide log."""
ANSWER_MARGIN_S: Final = 0.25
"""What an answer keeps of its caller's deadline: it leaves the wait for its record this long before it."""
MAX_CLOCK_AHEAD_S: Final = 300.0
"""How far past the control plane's clock a shipped record's `time` may be (clock skew between hosts): a node stamps
a record when it decides, so a later time is forged or broken. Nothing bounds it into the past: a spool replays
records of any age after an outage, and a node whose clock is this far off fails its tokens' checks anyway."""


def commit_wait(time_remaining: float | None) -> float:
    """How long an RPC's answer waits for its audit record: `OWN_COMMIT_WAIT_S`, and never past its caller's
    deadline (less `ANSWER_MARGIN_S`): an answer sent after the caller gave up is no answer (a client that asks
    two replicas gives each 2 s; a commit stalled on a cut-off etcd member held one replica's answer past that),
    and a record not committed by then stays queued."""
    if time_remaining is None:
        return OWN_COMMIT_WAIT_S
    return min(OWN_COMMIT_WAIT_S, max(0.0, time_remaining - ANSWER_MARGIN_S))
_SOURCE_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass
class _Source:
    identity: str
    seq: int
    hash: str
    first: int = 0
    """The seq of the first record of this source's chain in the log (`marks[0]`'s)."""
    stride: int = INDEX_STRIDE
    marks: array[int] = field(default_factory=lambda: array("q"))
    """Where the entries of records first, first + stride, first + 2 * stride, ... start in log.jsonl (nodes'
    sources only): a resent record below the head is compared with the stored one found by reading on from the
    mark at or before its seq. Sparse and capped (`INDEX_STRIDE`, `INDEX_MARKS`): a full index of every record
    cost 8 bytes a record for the process's life."""


@dataclass
class LogReads:
    """What comparing resent records with the stored ones read of log.jsonl (for tests and benchmarks)."""

    opens: int = 0
    reads: int = 0
    bytes: int = 0


Sealable = list[Checked]
"""Records already chained in their source's chain (and checked), to seal as the log's next entries."""


class SharedSink(Protocol):
    """Where a replica's appends commit before they reach its local copy (`shared_log.SharedLog`)."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def commit_locked(self, build: Any, on_commit: Any = None) -> int: ...
    async def sync_locked(self) -> None: ...
    async def commit_pending_locked(self) -> None: ...
    async def checkpoint_locked(self) -> dict[str, Any] | None: ...
    def leading(self) -> bool: ...
    def wake(self) -> None: ...


class AuditStore:
    """The log, the checkpoints and per-source state, in one directory; owned by one control-plane process."""

    def __init__(
        self,
        directory: Path | str,
        *,
        identity: str = "",
        checkpoint_every: int = 1000,
        checkpoint_interval_s: float = 30.0,
        head_interval_s: float = 1.0,
    ) -> None:
        self.dir = Path(directory)
        self.identity = identity
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval_s = checkpoint_interval_s
        self.log_path = self.dir / "log.jsonl"
        self.checkpoints_path = self.dir / "checkpoints.jsonl"
        self.heads_path = self.dir / "heads.jsonl"
        self.key_cert_pem = b""
        """The CA-issued certificate of the checkpoint key (set by `audit_store`): how operators trust it."""
        self._cadence = HeadCadence(head_interval_s)
        self._head: dict[str, Any] | None = None
        self._export_heads: collections.deque[bytes] = collections.deque(maxlen=1000)
        self._head_task: asyncio.Task[None] | None = None
        self.checkpoint_at = 0.0
        """Unix time of the last signed checkpoint (0: none yet), for the metrics' checkpoint age."""
        self.verify_failures = 0
        """Verifications that found a break in the log (`verify`), for the metrics."""
        self._fd: int | None = None
        self._cp_fd: int | None = None
        self._key: ed25519.Ed25519PrivateKey | None = None
        self.seq = 0
        self.head = GENESIS
        self.size = 0
        """Bytes of log.jsonl: where the next entry starts (the same in every replica's copy)."""
        self._sources: dict[str, _Source] = {}
        self._checkpoint_no = 0
        self._checkpoint_sig = ""
        self._checkpoint_seq = 0
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.shared: SharedSink | None = None
        """The mesh-wide log this directory copies (several replicas), or None: this process owns the log."""
        self.broken = ""
        """Why this store takes no more writes (a partial write it could not cut off), or ""."""
        self.unavailable = ""
        """Why this replica cannot serve the audit log (its copy is behind etcd's window or diverged), or ""."""
        self.pending: collections.deque[dict[str, Any]] = collections.deque()
        """The control plane's own records not yet committed to the shared log (shared mode only)."""
        self._own_queued = 0
        self._own_committed = 0
        self._own_progress = asyncio.Event()
        self.index_stride = INDEX_STRIDE
        self.index_marks = INDEX_MARKS
        """A source's index (`_Source.marks`): set before the first record is indexed (tests make them small)."""
        self.resend_reads = LogReads()
        """Every open and read of the log made to compare resent records with the stored ones."""

    # --- lifecycle ---
    def open(self) -> AuditStore:
        """Load the key, rebuild the head and every source's state from the log (cutting a torn last line)."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._key = load_or_create_checkpoint_key(self.dir / "checkpoint.key")
        self._recover()
        self._fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._cp_fd = os.open(self.checkpoints_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return self

    def _recover(self) -> None:
        if self.log_path.exists():
            good = 0
            with open(self.log_path, "rb") as f:
                for raw in f:
                    if not raw.endswith(b"\n"):
                        break
                    try:
                        entry = json_depth.loads(raw)
                        seq, head = int(entry["seq"]), str(entry["hash"])
                        self._stored(str(entry["source"]), _head_of(entry["record"]), good)
                    except (ValueError, KeyError, TypeError):
                        break
                    self.seq, self.head = seq, head
                    good += len(raw)
            self.size = good
            if good < self.log_path.stat().st_size:
                log.warning("audit log %s: cutting a torn tail of %d byte(s)", self.log_path,
                            self.log_path.stat().st_size - good)
                with open(self.log_path, "r+b") as f:
                    f.truncate(good)
                    os.fsync(f.fileno())
        if self.checkpoints_path.exists():
            for raw in self.checkpoints_path.read_bytes().splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    cp = json_depth.loads(raw)
                    self._checkpoint_no = int(cp["checkpoint"])
                    self._checkpoint_sig = str(cp["sig"])
                    self._checkpoint_seq = int(cp["log_seq"])
                    self.checkpoint_at = self.checkpoints_path.stat().st_mtime
        if self.heads_path.exists():
            for raw in self.heads_path.read_bytes().splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    head = json_depth.loads(raw)
                    if isinstance(head, dict) and isinstance(head["sig"], str):
                        self._head = head
                        self._cadence.signed_seq = int(head["log_seq"])
                        if head.get("export"):
                            self._export_heads.append(raw)

    async def start(self) -> None:
        """Open (if needed) and run the periodic checkpoint task."""
        if self._fd is None:
            self.open()
        if self.shared is not None:
            await self.shared.start()
        self._task = asyncio.get_running_loop().create_task(self._checkpoint_loop())
        self._head_task = asyncio.get_running_loop().create_task(self._head_loop())

    async def close(self) -> None:
        for task in (self._task, self._head_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._head_task = None
        if self.shared is not None:
            await self.shared.stop()  # commits what is pending first
        if self._fd is not None:
            async with self._lock:
                with contextlib.suppress(Exception):
                    await self._checkpoint_now_locked()
                with contextlib.suppress(Exception):
                    if self._signs_heads() and (self._head is None or int(self._head["log_seq"]) != self.seq):
                        self._head_locked(export=False)
                for fd in (self._fd, self._cp_fd):
                    if fd is not None:
                        os.fsync(fd)
                        os.close(fd)
                self._fd = self._cp_fd = None

    @property
    def public_key(self) -> ed25519.Ed25519PublicKey:
        assert self._key is not None
        return self._key.public_key()

    # --- writing ---
    def source_state(self, source: str) -> tuple[int, str]:
        s = self._sources.get(source)
        return (s.seq, s.hash) if s is not None else (0, GENESIS)

    async def append(self, source: str, identity: str, raw_records: Sequence[bytes]) -> tuple[int, str, int]:
        """Store the next records of source's chain, shipped by identity; returns (last seq, hash, stored).

        Records at or below the stored head are skipped when each is the record stored at its seq (a resend);
        a gap, a broken link, a changed record (a resend that differs from the stored one, at any seq), or a
        record about another node than identity is refused and nothing of the batch is stored.
        """
        if not _SOURCE_RE.fullmatch(source) or source == CONTROLPLANE_SOURCE:
            raise InvalidInputError("bad audit source id", field_violations={"source": "[A-Za-z0-9._-]{1,64}"})
        if len(raw_records) > MAX_BATCH:
            raise InvalidInputError(f"at most {MAX_BATCH} records per batch")
        async with self._lock:
            if self.shared is not None:
                async def build() -> Sealable:  # re-run against the caught-up copy when the copy was behind
                    return await self._validate_locked(source, identity, raw_records)

                try:
                    stored = await self.shared.commit_locked(build)
                except FailedPreconditionError:
                    if self.unavailable:  # this copy cannot serve: UNAVAILABLE sends the node to another replica
                        raise AuditUnavailableError(self.unavailable) from None
                    raise
                last = self._sources.get(source)
                return (last.seq, last.hash, stored) if last is not None else (0, GENESIS, 0)
            records = await self._validate_locked(source, identity, raw_records)
            if records:
                self._write_locked(records)
                assert self._fd is not None
                await asyncio.to_thread(os.fsync, self._fd)
                await self._maybe_checkpoint_locked()
            last = self._sources.get(source)
            return (last.seq, last.hash, len(records)) if last is not None else (0, GENESIS, 0)

    async def _validate_locked(self, source: str, identity: str, raw_records: Sequence[bytes]) -> list[Checked]:
        """The records of the batch that extend source's stored chain (resent ones, each the stored record at its
        seq, skipped); raises, storing nothing, on a gap, a broken link, a changed record or a record about another
        node than identity.
        Each record is parsed and canonically encoded once; its encoding goes on into the log entry."""
        now = time.time()
        known = self._sources.get(source)
        if known is not None and known.identity != identity:
            raise PermissionDeniedError(f"audit source {source} belongs to {known.identity}, not {identity}")
        last_seq, last_hash = (known.seq, known.hash) if known is not None else (0, GENESIS)
        stored_seq = last_seq
        fresh = known is None
        records: list[Checked] = []
        resent: list[tuple[str, dict[str, Any]]] = []
        batch: dict[int, tuple[str, str]] = {}  # seq -> (where, hash) of this batch's new records
        for i, raw in enumerate(raw_records):
            where = f"records[{i}]"
            if len(raw) > MAX_RECORD_BYTES:
                raise InvalidInputError(f"{where} is larger than {MAX_RECORD_BYTES} bytes")
            flat = read_flat(raw)  # a node's decision record, checked in one pass
            if flat is not None:
                rec, encoded = flat
                _check_link_fields(rec, where)
            else:
                rec, encoded = _read_checked(raw, where)
            if rec.get("node") != identity:
                raise PermissionDeniedError(f"{where} is about {short(repr(rec.get('node')), ECHO_CHARS)}; "
                                            f"{identity} may only ship its own records")
            _check_claims(rec, where, now)
            seq = rec["seq"]
            if seq <= last_seq and not fresh:
                earlier = batch.get(seq)
                if seq <= stored_seq:
                    resent.append((where, rec))  # checked below against the stored records, all at once
                elif earlier is None:  # before the first record of a chain this batch starts
                    raise _unknown(where, seq, identity, source, min(batch))
                elif earlier[1] != rec["hash"]:
                    raise _conflict(where, seq, identity, source, f"{earlier[0]} of this batch")
                continue
            if fresh:
                fresh = False  # the first record ever heard from this source starts its chain here
            elif seq != last_seq + 1:
                raise FailedPreconditionError(
                    f"{where}: seq {seq} leaves a gap after {last_seq}",
                    metadata={"expected_seq": str(last_seq + 1)},
                )
            elif rec.get("prev") != last_hash:
                raise FailedPreconditionError(f"{where}: seq {seq} does not link to seq {last_seq}")
            records.append(Checked(source, rec, encoded))
            batch[seq] = (where, rec["hash"])
            last_seq, last_hash = seq, rec["hash"]
        if resent:
            assert known is not None
            await self._check_resent_locked(source, known, resent)
        return records

    async def _check_resent_locked(self, source: str, known: _Source,
                                   resent: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Refuse (FailedPreconditionError naming the seq and the node) unless every record of resent, at or
        below source's stored head, is the very record stored at its seq: an acknowledged resend must be a true
        one, or the node's records that differ would be dropped as duplicates.

        A record's hash covers its content (checked on arrival), prev included, so equal hashes mean equal records,
        and a record equal to the stored one at seq vouches for the stored record at seq - 1 too: a resent record
        whose hash is the prev of the (equal) resent record after it is equal to the stored one. The records are
        taken by seq, highest first, whatever their order in the batch, so a resent run costs one comparison: with
        the head (in memory) when it reaches the head, as a resend after a lost acknowledgement does, else with the
        stored record, looked up with those of the batch's other runs through one open file (`_stored_hashes`)."""
        wanted: list[tuple[int, str, str]] = []  # (seq, where, hash) of the records to compare with the log's
        vouched: dict[str, Any] | None = None  # the resent record after this one, equal to the stored one if any is
        for where, rec in sorted(resent, key=lambda item: item[1]["seq"], reverse=True):
            seq = rec["seq"]
            if seq < known.first:
                raise _unknown(where, seq, known.identity, source, known.first)
            if vouched is not None and ((vouched["seq"] == seq + 1 and vouched["prev"] == rec["hash"])
                                        or (vouched["seq"] == seq and vouched["hash"] == rec["hash"])):
                vouched = rec  # linked to the one after it (a run), or the same record twice in the batch
                continue
            if seq != known.seq:
                if len(wanted) == MAX_LOOKUPS:
                    raise InvalidInputError(
                        f"{where}: the batch resends more than {MAX_LOOKUPS} separate runs of stored records of "
                        f"audit source {source}: resend stored records as one run, in order; nothing of the batch "
                        "was stored", field_violations={where: f"at most {MAX_LOOKUPS} resent runs below the head"})
                wanted.append((seq, where, rec["hash"]))
            elif known.hash != rec["hash"]:
                raise _conflict(where, seq, known.identity, source, "the record stored")
            vouched = rec  # a record looked up in the log is taken as equal: if it is not, the batch is refused
        if not wanted:
            return
        stored = await self._stored_hashes(source, known, [seq for seq, _, _ in wanted])
        for seq, where, digest in wanted:  # highest seq first
            found = stored.get(seq)
            if found is None:
                raise FailedPreconditionError(
                    f"{where}: cannot compare seq {seq} of {known.identity} (audit source {source}) with the stored "
                    f"record: {self.log_path} does not hold it where this control plane indexed it, so the file "
                    "was changed or damaged under it; `hivemesh audit verify` says where. Nothing of the batch "
                    "was stored", metadata={"seq": str(seq), "node": known.identity[:ECHO_CHARS], "source": source})
            if found != digest:
                raise _conflict(where, seq, known.identity, source, "the record stored")

    async def _stored_hashes(self, source: str, known: _Source, seqs: Sequence[int]) -> dict[int, str]:
        """The hashes of source's stored records at seqs (each between known.first and its head), read in a worker
        thread (the event loop runs on; the store's lock is held, as for an fsync) through one open file."""
        plan = sorted({(seq, known.marks[(seq - known.first) // known.stride]) for seq in seqs})
        try:
            found, count = await asyncio.to_thread(_find_records, self.log_path, source, plan, self.size)
        except OSError as exc:
            raise AuditUnavailableError(f"cannot read the audit log to compare resent records: {exc}") from None
        self.resend_reads.opens += count.opens
        self.resend_reads.reads += count.reads
        self.resend_reads.bytes += count.bytes
        return found

    def _write_locked(self, items: Sealable) -> None:
        lines, hashes = self.seal_entries(items)
        offset = self.size
        self._write_raw_locked(b"".join(lines), self.seq + len(lines), hashes[-1])
        self._stored_items([(item.source, _head_of(item.record)) for item in items], lines, offset)

    def _stored(self, source: str, head: tuple[str, int, str], offset: int) -> None:
        """Source's head is (node, seq, hash) now, a record stored in the log entry at offset (marked in the index
        of a node's source when it is at a multiple of its stride)."""
        node, seq, digest = head
        known = self._sources.get(source)
        after = known.seq if known is not None else seq - 1  # (a new source's chain starts here)
        if known is None:
            known = self._sources[source] = _Source(node, seq, digest, seq, self.index_stride)
        known.identity, known.seq, known.hash = node, seq, digest
        if source == CONTROLPLANE_SOURCE:
            return  # nothing resends the control plane's own records: no index to keep
        if seq != after + 1:  # not the next of the chain (only a log not written here): indexed from here on
            known.first, known.stride, known.marks = seq, self.index_stride, array("q")
        if (seq - known.first) % known.stride == 0:
            known.marks.append(offset)
            if len(known.marks) > self.index_marks:
                known.marks = known.marks[::2]  # what is left is every (2 * stride)-th record's from first
                known.stride *= 2

    def _stored_items(self, heads: Sequence[tuple[str, tuple[str, int, str]]], lines: Sequence[bytes],
                      offset: int) -> None:
        """The sources' heads after (source, head) heads, written as lines (each ending in a newline) from offset."""
        for (source, head), line in zip(heads, lines, strict=True):
            self._stored(source, head, offset)
            offset += len(line)

    def seal_entries(self, items: Sealable) -> tuple[list[bytes], list[str]]:
        """items chained as the log's next entries after its head (seq + 1, ...): their lines and hashes."""
        lines, hashes = [], []
        seq, head = self.seq, self.head
        sources: dict[str, bytes] = {}
        for item in items:
            source_json = sources.get(item.source)
            if source_json is None:
                source_json = sources[item.source] = canonical(item.source)
            seq += 1
            line, head = entry_line(source_json, item.encoded, seq, head)
            lines.append(line)
            hashes.append(head)
        return lines, hashes

    def _write_raw_locked(self, data: bytes, seq: int, head: str) -> None:
        """Append data (whole lines) or nothing: a short write (disk full) or a failed one is cut off again, else
        half a line stayed, the next entry was glued to it, and a restart cut every entry after it, acknowledged
        ones included. When even the cut fails, the log takes no more writes (none could be acknowledged)."""
        if self._fd is None:
            raise FailedPreconditionError("the audit store is closed")
        if self.broken:
            raise AuditUnavailableError(self.broken)
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(f"short write ({written} of {len(data)} bytes)")
        except OSError as exc:
            self._cut_back_locked(self._fd, self.size, exc)
            raise AuditUnavailableError(f"cannot write the audit log: {exc}") from None
        self.size += written
        self.seq, self.head = seq, head

    def _cut_back_locked(self, fd: int, size: int, exc: OSError) -> None:
        """Cut a file back to size after a failed append to it; when that fails too, mark the store broken."""
        try:
            os.ftruncate(fd, size)
        except OSError as cut:
            self.broken = (f"the audit log {self.dir} holds a partial write ({exc}) that could not be cut off "
                           f"({cut}): it takes no more records until the control plane restarts")
            if self.shared is not None:
                self.unavailable = self.broken
            log.error("%s", self.broken)

    async def apply_locked(self, lines: Sequence[bytes]) -> None:
        """Append entries committed to the shared log (by any replica) to this copy, fsynced: each must be the
        next seq, link to the head and match its hash, or this copy has diverged and serves no more."""
        seq, head = self.seq, self.head
        heads: list[tuple[str, tuple[str, int, str]]] = []
        for raw in lines:
            entry = parse_line(raw)
            if entry["seq"] != seq + 1 or entry["prev"] != head or record_hash(entry) != entry["hash"]:
                self.unavailable = (f"this replica's audit copy diverged from the mesh-wide log at seq {seq + 1}: "
                                    f"restore {self.dir} from a live replica")
                raise FailedPreconditionError(self.unavailable)
            seq, head = entry["seq"], entry["hash"]
            heads.append((str(entry["source"]), _head_of(entry["record"])))
        whole = [line.rstrip(b"\n") + b"\n" for line in lines]
        offset = self.size
        self._write_raw_locked(b"".join(whole), seq, head)
        self._stored_items(heads, whole, offset)  # with the lines, before the next await (see write_sealed_locked)
        assert self._fd is not None
        await asyncio.to_thread(os.fsync, self._fd)

    def write_sealed_locked(self, lines: Sequence[bytes], seq: int, head: str, items: Sealable) -> None:
        """Append entries this replica sealed (`seal_entries`: lines, the last seq and its hash) from items it
        checked, once etcd committed them: no parse or hash again, they are the bytes it built. Not yet fsynced:
        the caller awaits `fsync_locked`, then settles its queue however that await ends.

        Nothing is awaited between the lines and the sources' heads: a handler whose caller went away (a node
        killed mid-AppendBatch, an operator's Ctrl-C) is cancelled at its next await, and a head left behind its
        lines had the next node to ship that spool (asking `source_state`) send those records again, to be
        appended twice (tests/e2e/test_audit_kill.py)."""
        offset = self.size
        self._write_raw_locked(b"".join(lines), seq, head)
        self._stored_items([(item.source, _head_of(item.record)) for item in items], lines, offset)

    async def fsync_locked(self) -> None:
        """Make what was written durable."""
        assert self._fd is not None
        await asyncio.to_thread(os.fsync, self._fd)

    def own_records(self, pending: Sequence[dict[str, Any]]) -> Sealable:
        """The control plane's pending records chained after its source's stored head (shared mode)."""
        src = self._sources.get(CONTROLPLANE_SOURCE) or _Source(self.identity, 0, GENESIS)
        seq, prev, out = src.seq, src.hash, []
        for fields in pending:
            seq += 1
            item, prev = self._own_checked(dict(fields), seq, prev)
            out.append(item)
        return out

    def _own_checked(self, rec: dict[str, Any], seq: int, prev: str) -> tuple[Checked, str]:
        """One of the control plane's own records chained as seq after prev: (it, its hash)."""
        _, digest = seal(rec, seq, prev)
        rec["hash"] = digest
        return Checked(CONTROLPLANE_SOURCE, rec, canonical(rec)), digest

    async def sync(self, *, node: bool = False) -> None:
        """Before serving a read: commit this replica's pending records and apply what others committed, so a
        query, export or verify covers the whole mesh-wide log. When this copy cannot serve it refuses: with
        FAILED_PRECONDITION (an operator reads why), or for a node with UNAVAILABLE (it moves to another replica)."""
        if self.shared is None:
            return
        async with self._lock:
            try:
                if self.unavailable:
                    raise FailedPreconditionError(self.unavailable)
                await self.shared.commit_pending_locked()
                await self.shared.sync_locked()
            except FailedPreconditionError:
                if node and self.unavailable:
                    raise AuditUnavailableError(self.unavailable) from None
                raise

    def own_committed(self, n: int) -> None:
        """The shared log committed the n oldest pending records (it has dropped them from `pending`)."""
        self._own_committed += n
        progress, self._own_progress = self._own_progress, asyncio.Event()
        progress.set()

    async def record_durably(self, fields: Mapping[str, Any], *, timeout: float = OWN_COMMIT_WAIT_S) -> bool:
        """`record`, then wait (at most timeout) until the record is committed: an RPC's answer is released after
        its audit record is durable (one etcd write, shared by the records that arrive meanwhile), unless etcd
        is slower than timeout, when the record stays queued (bounded) and the answer goes. Whether it landed."""
        await self.record(fields)
        ticket = self._own_queued
        end = time.monotonic() + timeout
        while self.shared is not None and self._own_committed < ticket:
            progress, left = self._own_progress, end - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(progress.wait(), left)
            except TimeoutError:
                return False
        return True

    async def record(self, fields: Mapping[str, Any]) -> int:
        """Append one of the control plane's own decisions (its own source chain); returns the log seq."""
        rec = {"v": FORMAT, "time": utc_iso(time.time()), "kind": "controlplane", **fields, "node": self.identity}
        if self.shared is not None:
            # Committed with others in one etcd write within a moment (never one write per RPC).
            if len(self.pending) >= MAX_PENDING:
                raise FailedPreconditionError(f"{len(self.pending)} control-plane audit records are waiting for "
                                              f"the shared log: {self.unavailable or 'etcd is slow or away'}")
            self.pending.append(rec)
            self._own_queued += 1
            self.shared.wake()
            return 0
        async with self._lock:
            src = self._sources.get(CONTROLPLANE_SOURCE) or _Source(self.identity, 0, GENESIS)
            item, _ = self._own_checked(rec, src.seq + 1, src.hash)
            self._write_locked([item])
            await self._maybe_checkpoint_locked()
            return self.seq

    # --- checkpoints ---
    async def _maybe_checkpoint_locked(self) -> None:
        if self.seq - self._checkpoint_seq >= self.checkpoint_every:
            await self._checkpoint_now_locked()

    async def _checkpoint_now_locked(self) -> dict[str, Any] | None:
        """Local mode: sign here. Shared mode: the leader alone signs, and commits the checkpoint to etcd first."""
        if self.shared is not None:
            return await self.shared.checkpoint_locked()
        return self._checkpoint_locked()

    def next_checkpoint(self) -> dict[str, Any] | None:
        """The next checkpoint of the head, signed (None when nothing changed since the last one)."""
        if self._key is None or (self.seq == self._checkpoint_seq and self._checkpoint_no):
            return None
        return sign_checkpoint(self._key, {
            "checkpoint": self._checkpoint_no + 1,
            "log_seq": self.seq,
            "head": self.head,
            "time": utc_iso(time.time()),
            "prev_sig": self._checkpoint_sig,
        })

    @property
    def checkpoint_no(self) -> int:
        return self._checkpoint_no

    def keep_checkpoint(self, cp: dict[str, Any]) -> None:
        """Append a signed checkpoint (the next one, linking the last) to checkpoints.jsonl, fsynced."""
        if self._cp_fd is None:
            raise FailedPreconditionError("the audit store is closed")
        if cp.get("checkpoint") != self._checkpoint_no + 1 or cp.get("prev_sig") != self._checkpoint_sig:
            raise FailedPreconditionError(f"checkpoint {cp.get('checkpoint')} does not follow checkpoint "
                                          f"{self._checkpoint_no}")
        if self._fd is not None:
            os.fsync(self._fd)  # a checkpoint never covers entries that are not on disk
        self._append_whole(self._cp_fd, canonical(cp) + b"\n")
        os.fsync(self._cp_fd)
        self._checkpoint_no = cp["checkpoint"]
        self._checkpoint_sig = cp["sig"]
        self._checkpoint_seq = int(cp["log_seq"])
        self.checkpoint_at = time.time()

    async def adopt_checkpoint_locked(self, cp: dict[str, Any]) -> None:
        """Go on from cp, a checkpoint later than the next one this copy lacks (etcd trimmed those between: every
        live replica had them, and this copy was empty or down), only if it proves this very log: signed with
        the mesh's checkpoint key, and its head the hash of this copy's entry at its seq (which chains every
        entry before it, so it proves all the trimmed checkpoints did). Raises FailedPreconditionError saying
        why not.

        Its link to the one before it cannot be checked here (no copy of that one is left to link to): the
        checkpoints after it are kept (`keep_checkpoint`) only if they link on from it. checkpoints.jsonl then
        starts with it, so it stays one unbroken chain (`verify_log` reads it so); this copy's earlier
        checkpoints, if any, are kept aside in `checkpoints.before-<no>.jsonl`."""
        if self._cp_fd is None:
            raise FailedPreconditionError("the audit store is closed")
        number, log_seq = cp.get("checkpoint"), cp.get("log_seq")
        problem = checkpoint_problem(cp, self.public_key, number if isinstance(number, int) else "?")
        if problem:
            raise FailedPreconditionError(problem)
        if not isinstance(number, int) or number <= self._checkpoint_no + 1:
            raise FailedPreconditionError(f"checkpoint {number!r} does not follow checkpoint {self._checkpoint_no}")
        assert isinstance(log_seq, int)  # checkpoint_problem: a whole number
        prev_sig, head = cp.get("prev_sig"), cp.get("head")
        if not isinstance(prev_sig, str) or not prev_sig or not isinstance(head, str):
            raise FailedPreconditionError(f"checkpoint {number} is malformed: no head, or no link to checkpoint "
                                          f"{number - 1}")
        if log_seq < self._checkpoint_seq or log_seq > self.seq:
            raise FailedPreconditionError(
                f"checkpoint {number} covers seq {log_seq}, but this copy holds seq {self.seq} and its checkpoint "
                f"{self._checkpoint_no} covers seq {self._checkpoint_seq}")
        mine = await asyncio.to_thread(self._hash_at, log_seq)
        if mine != head:
            raise FailedPreconditionError(
                f"checkpoint {number} does not match this copy of the log: it signs hash {head[:16]}... at seq "
                f"{log_seq}, where this copy's entry hash is {(mine or 'missing')[:16]}...")
        if self._fd is not None:
            os.fsync(self._fd)  # a checkpoint never covers entries that are not on disk
        if self._checkpoint_no:
            aside = self.dir / f"checkpoints.before-{number}.jsonl"
            os.replace(self.checkpoints_path, aside)  # (a crash next: no file, so the next sync adopts again)
            log.warning("audit checkpoints: this copy's checkpoints 1..%d are kept aside in %s; checkpoints "
                        "%d..%d were trimmed from etcd while it was away", self._checkpoint_no, aside,
                        self._checkpoint_no + 1, number - 1)
        write_private(self.checkpoints_path, canonical(cp) + b"\n")
        fd, self._cp_fd = self._cp_fd, os.open(self.checkpoints_path, os.O_WRONLY | os.O_APPEND, 0o600)
        os.close(fd)
        self._checkpoint_no = number
        self._checkpoint_sig = cp["sig"]
        self._checkpoint_seq = log_seq
        self.checkpoint_at = time.time()

    def _hash_at(self, seq: int) -> str | None:
        """The hash of this copy's entry at seq (GENESIS at 0; None when it holds none there), read from the file
        (a walk from its start: only adopting a checkpoint asks, once)."""
        if seq == self.seq:
            return self.head
        if seq == 0:
            return GENESIS
        for raw in self.lines(after_seq=seq - 1):
            try:
                entry = json_depth.loads(raw)
            except (ValueError, RecursionError):
                return None
            return str(entry.get("hash")) if isinstance(entry, dict) and entry.get("seq") == seq else None
        return None

    def _append_whole(self, fd: int, data: bytes) -> None:
        """Append one line to a checkpoint or head file, or nothing (a torn line is cut off again): raises OSError."""
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(f"short write ({written} of {len(data)} bytes)")
        except OSError as exc:
            self._cut_back_locked(fd, size, exc)
            raise

    def _checkpoint_locked(self) -> dict[str, Any] | None:
        cp = self.next_checkpoint()
        if cp is not None:
            self.keep_checkpoint(cp)
        return cp

    async def checkpoint(self) -> dict[str, Any] | None:
        """Sign a checkpoint of the head now (None when nothing changed since the last one, or, with several
        replicas, on a replica that does not lead)."""
        async with self._lock:
            return await self._checkpoint_now_locked()

    def adopt_key(self, key: ed25519.Ed25519PrivateKey, pem: bytes) -> None:
        """Sign with the mesh-wide checkpoint key from now on (kept in checkpoint.key, 0600)."""
        write_private(self.dir / "checkpoint.key", pem)
        self._key = key

    def _signs_heads(self) -> bool:
        return self.shared is None or self.shared.leading()

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.checkpoint_interval_s)
            try:
                async with self._lock:
                    if self.seq != self._checkpoint_seq:
                        await self._checkpoint_now_locked()
            except (OSError, FailedPreconditionError) as exc:
                log.error("audit checkpoint failed: %s", exc)

    # --- heads ---
    def _head_locked(self, *, export: bool) -> dict[str, Any]:
        """Sign a head covering the last entry now, chained to the previous head, and keep it (fsynced)."""
        if self._key is None or self._fd is None:
            raise FailedPreconditionError("the audit store is closed")
        prev = self._head
        head = sign_head(self._key, {
            "head_no": (int(prev["head_no"]) if prev else 0) + 1,
            "log_seq": self.seq,
            "head": self.head,
            "count": self.seq,
            "checkpoints": self._checkpoint_no,
            "checkpoint_sig": self._checkpoint_sig,
            "export": export,
            "time": utc_iso(time.time()),
            "prev_sig": str(prev["sig"]) if prev else "",
        }, key_id(self._key.public_key()))
        os.fsync(self._fd)  # a head never covers entries that are not on disk
        line = canonical(head)
        fd = os.open(self.heads_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            self._append_whole(fd, line + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        self._head = head
        self._cadence.signed(self.seq, time.monotonic())
        if export:
            self._export_heads.append(line)
        return head

    async def sign_head(self, *, export: bool = False) -> dict[str, Any]:
        """A signed head covering the last entry, signed now (at every export)."""
        async with self._lock:
            return self._head_locked(export=export)

    def latest_head(self) -> bytes:
        """The latest signed head (canonical JSON), or b"" before the first."""
        return canonical(self._head) if self._head is not None else b""

    def export_heads(self) -> list[bytes]:
        """The heads signed at the most recent exports (up to 1,000), oldest first."""
        return list(self._export_heads)

    async def _head_loop(self) -> None:
        """The cadence: a cheap timer that signs a head only when the log grew, at most once an interval."""
        while True:
            await asyncio.sleep(self._cadence.interval_s)
            if not self._cadence.due(self.seq, time.monotonic()) or not self._signs_heads():
                continue
            try:
                async with self._lock:
                    if self._cadence.due(self.seq, time.monotonic()):
                        self._head_locked(export=False)
            except (OSError, FailedPreconditionError) as exc:
                log.error("audit head signing failed: %s", exc)

    def checkpoints(self) -> list[bytes]:
        if not self.checkpoints_path.exists():
            return []
        return [line for line in self.checkpoints_path.read_bytes().splitlines() if line]

    # --- reading ---
    def lines(self, after_seq: int = 0) -> Iterator[bytes]:
        """Every entry line (seq > after_seq), oldest first; stops at a torn line."""
        if not self.log_path.exists():
            return
        with open(self.log_path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.endswith(b"\n"):
                    return
                if n > after_seq:
                    yield raw.rstrip(b"\n")

    def line_at(self, offset: int) -> bytes | None:
        """The entry line that starts at byte offset of the log file (None past its end or at a torn line); a
        caller that knows where an entry was written reads it without `lines`' walk from the start."""
        if not self.log_path.exists():
            return None
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            raw = f.readline(MAX_ENTRY_BYTES)
        return raw.rstrip(b"\n") if raw.endswith(b"\n") else None

    def query(self, flt: AuditFilter, *, limit: int = 100, tail: bool = False) -> tuple[list[bytes], int]:
        """Matching entry lines, oldest first: the first `limit`, or with tail the last `limit`; and how many lines
        (seqs) after flt.after_seq the answer covers: after_seq + that is where the next page goes on (after_seq
        of the next query), and equals the head's seq when nothing is left to read.

        An answer carries at most QUERY_BUDGET_BYTES of entries (at least one): a page cut short by it covers
        only up to its last entry, so a client that gets fewer than `limit` while after_seq + covered is short of
        the head asks again from there (a cut tail answers its window's oldest entries first, the rest follow)."""
        limit = max(1, min(limit or 100, 10_000))
        if tail:
            return self._query_tail(flt, limit)
        return self._query_from(flt, limit, flt.after_seq)

    def _query_from(self, flt: AuditFilter, limit: int, after: int) -> tuple[list[bytes], int]:
        """Up to limit matching lines after seq `after` within the budget; (them, lines covered after `after`)."""
        out: list[bytes] = []
        size = scanned = 0
        for raw in self.lines(after):
            try:
                entry = json_depth.loads(raw)
            except (ValueError, RecursionError):
                entry = None
            if entry is not None and flt.matches(entry):
                if out and size + len(raw) > QUERY_BUDGET_BYTES:
                    break  # not covered: the next page starts with it
                out.append(raw)
                size += len(raw)
            scanned += 1
            if len(out) >= limit:
                break
        return out, scanned

    def _query_tail(self, flt: AuditFilter, limit: int) -> tuple[list[bytes], int]:
        """The last limit matching lines, holding only the newest that fit the budget while scanning (the seqs of
        the whole window are kept); when they do not all fit, the window's oldest come first (`_query_from`)."""
        window: collections.deque[int] = collections.deque(maxlen=limit)
        kept: collections.deque[tuple[int, bytes]] = collections.deque()
        size = 0
        seq = flt.after_seq
        for raw in self.lines(flt.after_seq):
            seq += 1
            try:
                entry = json_depth.loads(raw)
            except (ValueError, RecursionError):
                continue
            if not flt.matches(entry):
                continue
            window.append(seq)
            kept.append((seq, raw))
            size += len(raw)
            while len(kept) > limit or (size > QUERY_BUDGET_BYTES and len(kept) > 1):
                size -= len(kept.popleft()[1])
        if not window or kept[0][0] == window[0]:
            return [raw for _, raw in kept], seq - flt.after_seq
        start = window[0] - 1
        page, covered = self._query_from(flt, limit, start)
        return page, start - flt.after_seq + covered

    def verify(self) -> LogReport:
        """The stored log against its checkpoints and the latest signed head (a cut tail is named)."""
        report = verify_log(self.lines(), self.checkpoints(), self.public_key, self._head)
        if not report.ok:
            self.verify_failures += 1
        return report


def _read_checked(raw: bytes, where: str) -> tuple[dict[str, Any], bytes]:
    """Any shipped record (the general path): parsed as json reads it, its hash checked, its canonical encoding;
    raises InvalidInputError saying what is wrong with it."""
    try:
        rec = json_fast.loads(raw)  # what json reads, read faster (records hold no floats)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json reads
        raise InvalidInputError(f"{where} is not JSON", field_violations={where: "not JSON"}) from None
    if not isinstance(rec, dict):
        raise InvalidInputError(f"{where} is not a JSON object", field_violations={where: "not a JSON object"})
    _check_link_fields(rec, where)
    try:
        encoded = checked_encoding(rec)
    except (TypeError, ValueError, RecursionError):
        encoded = None
    if encoded is None:
        raise InvalidInputError(f"{where}: hash does not match content", field_violations={where: "hash"})
    return rec, encoded


def _check_claims(rec: dict[str, Any], where: str, now: float) -> None:
    """Refuse a shipped record that claims to be the control plane's own (its kind: PERMISSION_DENIED) or a time
    that is no time or later than now allows (INVALID_ARGUMENT), naming the field. Only the shipping node is
    verified; the rest is its word, and these two claims would pass its records off as the control plane's or
    reorder them among everyone's (`audit tail --kind controlplane`, `--since`)."""
    kind = rec.get("kind")
    if isinstance(kind, str) and kind.strip().casefold() in CONTROLPLANE_KINDS:
        msg = (f"kind {short(kind, ECHO_CHARS)!r} is written only by the control plane; a node ships its own "
               f"decisions (kind {', '.join(sorted(NODE_KINDS))})")
        raise PermissionDeniedError(f"{where}.kind: {msg}; nothing of the batch was stored",
                                    field_violations={f"{where}.kind": msg})
    if "time" not in rec:
        return
    value = rec["time"]
    at = _record_time(value)
    if at is None:
        msg = (f"{short(repr(value), ECHO_CHARS)} is not a time: RFC 3339 (2026-01-31T12:00:00.000000Z, as nodes "
               "write it) or unix seconds")
    elif at > now + MAX_CLOCK_AHEAD_S:
        msg = (f"{short(str(value), ECHO_CHARS)} is {at - now:.0f} s ahead of the control plane's clock, more than "
               f"the {MAX_CLOCK_AHEAD_S:.0f} s of clock skew allowed: check the node's clock")
    else:
        return
    raise InvalidInputError(f"{where}.time: {msg}; nothing of the batch was stored",
                            field_violations={f"{where}.time": msg})


def _record_time(value: Any) -> float | None:
    """Unix seconds of a record's `time` as queries read it: an RFC 3339 text (naive: UTC) or a number of unix
    seconds; None for anything else (a bool, a non-finite number, text that is no date)."""
    if isinstance(value, str):
        try:
            dt = datetime.datetime.fromisoformat(value)
            return (dt if dt.tzinfo is not None else dt.replace(tzinfo=datetime.UTC)).timestamp()
        except (ValueError, OverflowError):
            return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:  # past a float's range: as late (or early) as can be
            return math.copysign(math.inf, value)
    return value if math.isfinite(value) else None


def _check_link_fields(rec: dict[str, Any], where: str) -> None:
    """Refuse a record whose seq/prev/hash no verifier would accept (`link_fields_problem`, the rule of
    `check_link`): stored, it broke Verify of the whole log for good, and a seq past int64 broke AppendBatch's
    and SourceState's answers (uint64) for its source."""
    problem = link_fields_problem(rec)
    if problem:
        raise InvalidInputError(f"{where}: {problem}", field_violations={where: problem})


class _LogReader:
    """Lines of log.jsonl below end, from any offset, read with pread in blocks through one open file."""

    def __init__(self, fd: int, end: int, count: LogReads) -> None:
        self.fd, self.end, self.count = fd, end, count
        self._buf = b""
        self._at = 0  # the file offset of _buf[0]

    def line(self, pos: int) -> bytes | None:
        """The line starting at pos, without its newline (None at or past end, or when longer than any entry)."""
        if pos >= self.end:
            return None
        start = pos - self._at
        if not 0 <= start <= len(self._buf):
            self._buf, self._at, start = b"", pos, 0
        while True:
            nl = self._buf.find(b"\n", start)
            if nl >= 0:
                return self._buf[start:nl]
            have = len(self._buf) - start
            upto = self._at + len(self._buf)
            if have >= MAX_ENTRY_BYTES or upto >= self.end:
                return None
            chunk = os.pread(self.fd, min(max(READ_BLOCK, have), self.end - upto), upto)
            self.count.reads += 1
            self.count.bytes += len(chunk)
            if not chunk:
                return None
            self._buf, self._at, start = self._buf[start:] + chunk, pos, 0


def _find_records(path: Path, source: str, plan: Sequence[tuple[int, int]],
                  end: int) -> tuple[dict[int, str], LogReads]:
    """The hashes of source's records at the seqs of plan ((seq, offset of its source's mark at or before it),
    ascending) in the log's first end bytes, with one open file; a seq not found is left out. Each is read on
    from its mark, or from the record found before it when that is further on: a batch's lookups read no line
    twice. Only lines that name the source are parsed (a run of other sources' lines is skipped unparsed)."""
    count = LogReads(opens=1)
    found: dict[int, str] = {}
    needle = b'"source":' + canonical(source) + b","
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = _LogReader(fd, end, count)
        pos = 0
        for seq, mark in plan:
            pos = max(pos, mark)
            while (line := reader.line(pos)) is not None:
                at = _record_seq_hash(line, source) if needle in line else None
                if at is not None and at[0] > seq:
                    break  # passed it: not in the log where the index says (left for the next seq of plan)
                pos += len(line) + 1
                if at is not None and at[0] == seq:
                    found[seq] = at[1]
                    break
    finally:
        os.close(fd)
    return found, count


def _record_seq_hash(line: bytes, source: str) -> tuple[int, str] | None:
    """(seq, hash) of the record in an entry line of source (None: another source's, or not an entry)."""
    try:
        entry = json_fast.loads(line)
        rec = entry["record"] if isinstance(entry, dict) and entry.get("source") == source else None
        if isinstance(rec, dict) and type(rec.get("seq")) is int and isinstance(rec.get("hash"), str):
            return rec["seq"], rec["hash"]
    except (ValueError, KeyError, TypeError, RecursionError):
        pass
    return None


def _head_of(rec: Any) -> tuple[str, int, str]:
    """(node, seq, hash) of a stored record (KeyError, TypeError or ValueError when it has none)."""
    return str(rec.get("node", "")), int(rec["seq"]), str(rec["hash"])


def _unknown(where: str, seq: int, node: str, source: str, first: int) -> FailedPreconditionError:
    """The refusal of a record older than its source's chain in the log: never stored, it cannot be now."""
    return FailedPreconditionError(
        f"{where}: seq {seq} of {node} comes before the first record of audit source {source} (seq {first}): it "
        "was never stored and cannot be now; nothing of the batch was stored",
        metadata={"seq": str(seq), "node": node[:ECHO_CHARS], "source": source, "first_seq": str(first)})


def _conflict(where: str, seq: int, node: str, source: str, stored: str) -> FailedPreconditionError:
    """The refusal of a record that repeats a stored (or earlier shipped) seq with other content."""
    return FailedPreconditionError(
        f"{where}: seq {seq} of {node} (audit source {source}) differs from {stored} at that seq: a resend must be "
        "the same record; nothing of the batch was stored",
        metadata={"seq": str(seq), "node": node[:ECHO_CHARS], "source": source})


def audit_store(core: Core) -> AuditStore:
    """The control plane's AuditStore (created and opened on first use), shared by its service and interceptor."""
    store = core.extensions.get(EXTENSION)
    if store is None:
        store = AuditStore(core.config.state_dir / "audit", identity=controlplane_id(core.trust_domain)).open()

        def certify(public_key: ed25519.Ed25519PublicKey) -> bytes:
            return core.ca.issue_key_cert(public_key, f"spiffe://{core.trust_domain}{KEY_CERT_PATH}",
                                          common_name="hivemesh-audit-checkpoints")

        store.key_cert_pem = certify(store.public_key)
        if core.etcd is not None:  # the mesh-wide log: this directory becomes this replica's copy of it
            from hivemesh.controlplane.audit.shared_log import SharedLog
            from hivemesh.controlplane.replicas import EXTENSION as REPLICAS
            from hivemesh.controlplane.replicas import is_leader, leader_fence

            replica = core.extensions.get(REPLICAS)
            kept = core.config.retention
            store.shared = SharedLog(
                core.etcd, store, replica.replica_id if replica is not None else "controlplane",
                leading=lambda: is_leader(core), fence=lambda: leader_fence(core), certify=certify,
                min_age_s=kept.audit_window_s, max_bytes=kept.audit_window_mb * 1024 * 1024,
                trim_every_s=min(10.0, kept.interval_s),  # as often as retention runs, at least every 10 s
                reads=lambda fn: core.hedged.run(fn, after_s=READ_HEDGE_AFTER_S, timeout_s=10.0),
                writes=lambda fn: core.hedged.run(fn, after_s=COMMIT_HEDGE_AFTER_S, timeout_s=10.0),
            )
        core.extensions[EXTENSION] = store
    assert isinstance(store, AuditStore)
    return store

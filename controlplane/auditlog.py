"""The control plane's audit log: one append-only, hash-chained file of every node's records, plus signed
checkpoints of its head.

Layout of `<state_dir>/audit/`:

- `log.jsonl`: one entry per line, `{"seq", "prev", "source", "record", "hash"}`. `record` is a node's record
  exactly as it chained it (its own seq/prev/hash, see `hivemesh.mesh.audit`), so both the log's chain and
  every source's chain can be re-verified end to end. Entries are fsynced before a batch is acknowledged, and
  only then may a node forget its spool.
- `checkpoints.jsonl`: `{"checkpoint", "log_seq", "head", "time", "prev_sig", "kid", "sig"}`, each an Ed25519
  signature over the canonical JSON of the rest, linking the previous checkpoint's signature (the CloudTrail
  digest chain): deleting or altering a checkpoint breaks the link, and a log rewritten after a checkpoint was
  signed (a re-hashed fork) no longer matches that checkpoint's head.
- `checkpoint.key`: the Ed25519 signing key (0600). It is separate from the token signing keys: a leaked token
  key cannot forge checkpoints, and whoever can write the log cannot sign for it.

`verify_log` is a pure function over the lines, so the CLI verifies an export offline with a pinned public key
and does not have to trust the control plane's own word.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from hivemesh.mesh.audit import (
    DECISIONS,
    FORMAT,
    GENESIS,
    ChainProblem,
    ChainState,
    canonical,
    check_link,
    parse_time,
    record_hash,
    seal,
    utc_iso,
)
from hivemesh.mesh.errors import FailedPreconditionError, InvalidInputError, PermissionDeniedError

log = logging.getLogger(__name__)

CONTROLPLANE_SOURCE: Final = "controlplane"
"""The source id of the control plane's own records (joins, tokens, revocations, rotations)."""
MAX_BATCH: Final = 1000
MAX_RECORD_BYTES: Final = 64 * 1024
_SOURCE_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_pem(public_key: ed25519.Ed25519PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_public_key(pem: str | bytes) -> ed25519.Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError("the checkpoint key must be an Ed25519 public key")
    return key


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_or_create_checkpoint_key(path: Path) -> ed25519.Ed25519PrivateKey:
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise FailedPreconditionError(f"{path} is not an Ed25519 private key")
        return key
    key = ed25519.Ed25519PrivateKey.generate()
    _write_private(
        path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    log.info("created the audit checkpoint signing key %s", path)
    return key


def sign_checkpoint(key: ed25519.Ed25519PrivateKey, body: Mapping[str, Any]) -> dict[str, Any]:
    doc = {k: v for k, v in body.items() if k != "sig"}
    doc["kid"] = key_id(key.public_key())
    doc["sig"] = _b64(key.sign(canonical(doc)))
    return doc


# --- verification ---------------------------------------------------------------------------------------------------
@dataclass
class LogReport:
    """What `verify_log` found."""

    entries: int = 0
    sources: int = 0
    checkpoints: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS
    problem: ChainProblem | None = None
    checkpoint_problem: str = ""

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ok": self.ok, "entries": self.entries, "sources": self.sources, "checkpoints": self.checkpoints,
            "head_seq": self.head_seq, "head_hash": self.head_hash,
        }
        if self.problem is not None:
            out.update(first_bad_seq=self.problem.seq, first_bad_line=self.problem.line, problem=self.problem.reason)
        return out


def _parse_checkpoints(
    raw: Sequence[bytes | str], public_key: ed25519.Ed25519PublicKey | None
) -> tuple[list[dict[str, Any]], str]:
    """The checkpoints in order, verified (signature, numbering, previous-signature link); (good ones, problem)."""
    out: list[dict[str, Any]] = []
    prev_sig = ""
    for i, line in enumerate(raw, 1):
        try:
            cp = json.loads(line)
        except ValueError:
            return out, f"checkpoint {i} is not valid JSON"
        if not isinstance(cp, dict) or not isinstance(cp.get("sig"), str):
            return out, f"checkpoint {i} is malformed"
        if cp.get("checkpoint") != i:
            return out, f"checkpoint {i} is numbered {cp.get('checkpoint')!r}: a checkpoint was deleted or inserted"
        if cp.get("prev_sig") != prev_sig:
            return out, f"checkpoint {i} does not link to checkpoint {i - 1}'s signature (deleted or altered)"
        if public_key is not None:
            body = {k: v for k, v in cp.items() if k != "sig"}
            try:
                public_key.verify(base64.b64decode(cp["sig"], validate=True), canonical(body))
            except (InvalidSignature, ValueError):
                return out, f"checkpoint {i}'s signature does not verify (altered, or signed by another key)"
        if out and int(cp.get("log_seq", 0)) < int(out[-1].get("log_seq", 0)):
            return out, f"checkpoint {i} covers fewer entries than checkpoint {i - 1}"
        prev_sig = cp["sig"]
        out.append(cp)
    return out, ""


def verify_log(
    lines: Iterable[bytes | str],
    checkpoints: Sequence[bytes | str] = (),
    public_key: ed25519.Ed25519PublicKey | None = None,
) -> LogReport:
    """Verify the log's chain, each source's chain inside it, and the checkpoints against both.

    Names the first bad entry: changed (hash mismatch), deleted (seq gap), inserted or reordered (broken link),
    a broken source chain, a log shorter than a signed checkpoint (truncated), or a log whose hash at a
    checkpointed seq differs from the signed head (rewritten: a re-hashed fork).
    """
    report = LogReport()
    cps, cp_problem = _parse_checkpoints(checkpoints, public_key)
    report.checkpoints = len(cps)
    wanted = {int(cp.get("log_seq", 0)): cp for cp in cps}
    seen_heads: dict[int, str] = {}
    state = ChainState()
    sources: dict[str, ChainState] = {}
    for n, raw in enumerate(lines, 1):
        try:
            entry = json.loads(raw)
        except ValueError:
            report.problem = ChainProblem(n, state.next_seq, "not valid JSON (changed or torn)")
            break
        problem = check_link(entry, state, n)
        if problem is not None:
            report.problem = problem
            break
        seq = entry["seq"]
        source, record = entry.get("source"), entry.get("record")
        if not isinstance(source, str) or not isinstance(record, dict):
            report.problem = ChainProblem(n, seq, "entry has no source or record")
            break
        src_state = sources.get(source)
        if src_state is None:
            # A source's chain may begin past 1 when the control plane first heard of it mid-chain.
            first = record.get("seq")
            src_state = ChainState(
                next_seq=first if isinstance(first, int) else 1,
                prev=record.get("prev") if isinstance(record.get("prev"), str) else GENESIS,  # type: ignore[arg-type]
            )
            sources[source] = src_state
        inner = check_link(record, src_state, n)
        if inner is not None:
            report.problem = ChainProblem(n, seq, f"source {source} record {record.get('seq')}: {inner.reason}")
            break
        if seq in wanted:
            seen_heads[seq] = entry["hash"]
    report.entries = state.count
    report.sources = len(sources)
    report.head_seq = state.next_seq - 1
    report.head_hash = state.prev
    if report.problem is not None:
        return report
    if cp_problem:
        report.checkpoint_problem = cp_problem
        report.problem = ChainProblem(0, report.head_seq + 1, cp_problem)
        return report
    last_good = 0
    for cp in cps:
        log_seq = int(cp.get("log_seq", 0))
        if log_seq > report.head_seq:
            report.problem = ChainProblem(
                report.entries + 1, report.head_seq + 1,
                f"truncated: the log ends at seq {report.head_seq} but checkpoint {cp['checkpoint']} covers "
                f"seq {log_seq}",
            )
            return report
        if log_seq and seen_heads.get(log_seq) != cp.get("head"):
            report.problem = ChainProblem(
                0, last_good + 1,
                f"rewritten: the log's hash at seq {log_seq} differs from signed checkpoint {cp['checkpoint']} "
                f"(entries {last_good + 1}..{log_seq} were re-hashed)",
            )
            return report
        last_good = log_seq
    return report


# --- queries --------------------------------------------------------------------------------------------------------
KINDS: Final = frozenset({"inbound", "outbound", "handshake", "controlplane"})
"""What a record is about: a call a node decided on, a call it refused on the way out, a TLS handshake refused
below gRPC, or the control plane's own decision."""


@dataclass(frozen=True)
class AuditFilter:
    """Which entries a query wants; every given field must match (globs for identities and capabilities)."""

    caller: str = ""
    capability: str = ""
    decision: str = ""
    principal: str = ""
    agent: str = ""
    jti: str = ""
    trace_id: str = ""
    kind: str = ""
    since: float | None = None
    until: float | None = None
    after_seq: int = 0
    _globs: dict[str, re.Pattern[str]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.decision and self.decision not in DECISIONS:
            msg = f"decision must be one of {', '.join(sorted(DECISIONS))}"
            raise InvalidInputError(msg, field_violations={"decision": msg})
        if self.kind and self.kind not in KINDS:
            msg = f"kind must be one of {', '.join(sorted(KINDS))}"
            raise InvalidInputError(msg, field_violations={"kind": msg})
        for name in ("caller", "capability", "principal", "agent"):
            value = getattr(self, name)
            if value:
                self._globs[name] = re.compile(fnmatch.translate(value))

    @classmethod
    def from_strings(cls, *, since: str = "", until: str = "", **kwargs: Any) -> AuditFilter:
        try:
            s = parse_time(since) if since else None
            u = parse_time(until) if until else None
        except ValueError as exc:
            raise InvalidInputError(str(exc), field_violations={"since/until": str(exc)}) from None
        return cls(since=s, until=u, **kwargs)

    def matches(self, entry: Mapping[str, Any]) -> bool:
        if entry.get("seq", 0) <= self.after_seq:
            return False
        rec = entry.get("record")
        if not isinstance(rec, dict):
            return False
        fields = {"caller": rec.get("caller", ""), "capability": rec.get("capability", ""),
                  "principal": rec.get("principal", ""), "agent": rec.get("node", "")}
        for name, pattern in self._globs.items():
            if not pattern.fullmatch(str(fields[name] or "")):
                return False
        if self.decision and rec.get("decision") != self.decision:
            return False
        if self.jti and rec.get("jti") != self.jti:
            return False
        if self.trace_id and rec.get("trace_id") != self.trace_id:
            return False
        if self.kind and rec.get("kind") != self.kind:
            return False
        if self.since is not None or self.until is not None:
            try:
                t = parse_time(str(rec.get("time", "")))
            except ValueError:
                return False
            if self.since is not None and t < self.since:
                return False
            if self.until is not None and t > self.until:
                return False
        return True


# --- the store ------------------------------------------------------------------------------------------------------
@dataclass
class _Source:
    identity: str
    seq: int
    hash: str


class AuditStore:
    """The log, the checkpoints and per-source state, in one directory; owned by one control-plane process."""

    def __init__(
        self,
        directory: Path | str,
        *,
        identity: str = "",
        checkpoint_every: int = 1000,
        checkpoint_interval_s: float = 30.0,
    ) -> None:
        self.dir = Path(directory)
        self.identity = identity
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval_s = checkpoint_interval_s
        self.log_path = self.dir / "log.jsonl"
        self.checkpoints_path = self.dir / "checkpoints.jsonl"
        self._fd: int | None = None
        self._cp_fd: int | None = None
        self._key: ed25519.Ed25519PrivateKey | None = None
        self.seq = 0
        self.head = GENESIS
        self._sources: dict[str, _Source] = {}
        self._checkpoint_no = 0
        self._checkpoint_sig = ""
        self._checkpoint_seq = 0
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

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
                        entry = json.loads(raw)
                        rec = entry["record"]
                        self.seq, self.head = int(entry["seq"]), str(entry["hash"])
                        self._sources[str(entry["source"])] = _Source(
                            str(rec.get("node", "")), int(rec["seq"]), str(rec["hash"])
                        )
                    except (ValueError, KeyError, TypeError):
                        break
                    good += len(raw)
            if good < self.log_path.stat().st_size:
                log.warning("audit log %s: cutting a torn tail of %d byte(s)", self.log_path,
                            self.log_path.stat().st_size - good)
                with open(self.log_path, "r+b") as f:
                    f.truncate(good)
                    os.fsync(f.fileno())
        if self.checkpoints_path.exists():
            for raw in self.checkpoints_path.read_bytes().splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    cp = json.loads(raw)
                    self._checkpoint_no = int(cp["checkpoint"])
                    self._checkpoint_sig = str(cp["sig"])
                    self._checkpoint_seq = int(cp["log_seq"])

    async def start(self) -> None:
        """Open (if needed) and run the periodic checkpoint task."""
        if self._fd is None:
            self.open()
        self._task = asyncio.get_running_loop().create_task(self._checkpoint_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._fd is not None:
            async with self._lock:
                with contextlib.suppress(Exception):
                    self._checkpoint_locked()
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

        Records at or below the stored head are skipped (a resend); a gap, a broken link, a changed record,
        or a record about another node than identity is refused and nothing of the batch is stored.
        """
        if not _SOURCE_RE.fullmatch(source) or source == CONTROLPLANE_SOURCE:
            raise InvalidInputError("bad audit source id", field_violations={"source": "[A-Za-z0-9._-]{1,64}"})
        if len(raw_records) > MAX_BATCH:
            raise InvalidInputError(f"at most {MAX_BATCH} records per batch")
        async with self._lock:
            known = self._sources.get(source)
            if known is not None and known.identity != identity:
                raise PermissionDeniedError(f"audit source {source} belongs to {known.identity}, not {identity}")
            last_seq, last_hash = (known.seq, known.hash) if known is not None else (0, GENESIS)
            fresh = known is None
            records: list[dict[str, Any]] = []
            for i, raw in enumerate(raw_records):
                where = f"records[{i}]"
                if len(raw) > MAX_RECORD_BYTES:
                    raise InvalidInputError(f"{where} is larger than {MAX_RECORD_BYTES} bytes")
                try:
                    rec = json.loads(raw)
                except ValueError:
                    raise InvalidInputError(f"{where} is not JSON", field_violations={where: "not JSON"}) from None
                if not isinstance(rec, dict) or not isinstance(rec.get("seq"), int):
                    raise InvalidInputError(f"{where} has no seq", field_violations={where: "no seq"})
                try:
                    ok = record_hash(rec) == rec.get("hash")
                except (TypeError, ValueError):
                    ok = False
                if not ok:
                    raise InvalidInputError(f"{where}: hash does not match content", field_violations={where: "hash"})
                if rec.get("node") != identity:
                    raise PermissionDeniedError(f"{where} is about {rec.get('node')!r}; {identity} may only ship "
                                                "its own records")
                seq = rec["seq"]
                if seq <= last_seq and not fresh:
                    if seq == last_seq and rec["hash"] != last_hash:
                        raise FailedPreconditionError(f"{where}: seq {seq} differs from the stored record")
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
                records.append(rec)
                last_seq, last_hash = seq, rec["hash"]
            if records:
                self._write_locked(source, records)
                assert self._fd is not None
                await asyncio.to_thread(os.fsync, self._fd)
                self._sources[source] = _Source(identity, last_seq, last_hash)
                await self._maybe_checkpoint_locked()
            return last_seq, last_hash, len(records)

    def _write_locked(self, source: str, records: Sequence[dict[str, Any]]) -> None:
        if self._fd is None:
            raise FailedPreconditionError("the audit store is closed")
        chunks = []
        seq, head = self.seq, self.head
        for rec in records:
            seq += 1
            line, head = seal({"source": source, "record": rec}, seq, head)
            chunks.append(line)
        data = b"".join(chunks)
        written = os.write(self._fd, data)
        if written != len(data):
            raise OSError(f"short write to the audit log ({written} of {len(data)} bytes)")
        self.seq, self.head = seq, head

    async def record(self, fields: Mapping[str, Any]) -> int:
        """Append one of the control plane's own decisions (its own source chain); returns the log seq."""
        async with self._lock:
            src = self._sources.get(CONTROLPLANE_SOURCE) or _Source(self.identity, 0, GENESIS)
            rec = {"v": FORMAT, "time": utc_iso(time.time()), "kind": "controlplane", **fields, "node": self.identity}
            line, digest = seal(rec, src.seq + 1, src.hash)
            stored = json.loads(line)
            self._write_locked(CONTROLPLANE_SOURCE, [stored])
            self._sources[CONTROLPLANE_SOURCE] = _Source(self.identity, src.seq + 1, digest)
            await self._maybe_checkpoint_locked()
            return self.seq

    # --- checkpoints ---
    async def _maybe_checkpoint_locked(self) -> None:
        if self.seq - self._checkpoint_seq >= self.checkpoint_every:
            self._checkpoint_locked()

    def _checkpoint_locked(self) -> dict[str, Any] | None:
        if self._key is None or self._cp_fd is None or (self.seq == self._checkpoint_seq and self._checkpoint_no):
            return None
        cp = sign_checkpoint(self._key, {
            "checkpoint": self._checkpoint_no + 1,
            "log_seq": self.seq,
            "head": self.head,
            "time": utc_iso(time.time()),
            "prev_sig": self._checkpoint_sig,
        })
        if self._fd is not None:
            os.fsync(self._fd)  # a checkpoint never covers entries that are not on disk
        os.write(self._cp_fd, canonical(cp) + b"\n")
        os.fsync(self._cp_fd)
        self._checkpoint_no = cp["checkpoint"]
        self._checkpoint_sig = cp["sig"]
        self._checkpoint_seq = self.seq
        return cp

    async def checkpoint(self) -> dict[str, Any] | None:
        """Sign a checkpoint of the head now (None when nothing changed since the last one)."""
        async with self._lock:
            return self._checkpoint_locked()

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.checkpoint_interval_s)
            try:
                async with self._lock:
                    if self.seq != self._checkpoint_seq:
                        self._checkpoint_locked()
            except OSError as exc:
                log.error("audit checkpoint failed: %s", exc)

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

    def query(self, flt: AuditFilter, *, limit: int = 100, tail: bool = False) -> tuple[list[bytes], int]:
        """Matching entry lines, oldest first: the first `limit`, or with tail the last `limit`; and how many
        lines were scanned."""
        limit = max(1, min(limit or 100, 10_000))
        out: collections.deque[bytes] | list[bytes] = collections.deque(maxlen=limit) if tail else []
        scanned = 0
        for raw in self.lines(flt.after_seq):
            scanned += 1
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if flt.matches(entry):
                out.append(raw)
                if not tail and len(out) >= limit:
                    break
        return list(out), scanned

    def verify(self) -> LogReport:
        return verify_log(self.lines(), self.checkpoints(), self.public_key)

"""The local audit spool: an append-only, segmented, hash-chained record file set, written before a response
is released.

The write is one `os.write` of one line to an `O_APPEND` file, so once it returns the record is in the kernel's
page cache and survives a SIGKILL of the process. A background thread fsyncs in batches (`fsync_interval_s`,
50 ms by default): a power loss or kernel crash can cost at most that window of records, which is the price of
not paying a disk flush per call. Segments are deleted only after the control plane has acknowledged (and
fsynced) every record in them.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hivemesh.mesh import json_depth
from hivemesh.mesh.audit.chain import GENESIS, seal
from hivemesh.mesh.errors import AuditUnavailableError

log = logging.getLogger(__name__)

_SEGMENT_RE = re.compile(r"audit-(\d{16})\.log")


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
        self.broken = ""
        """Why this spool takes no more records (a partial write it could not cut off), or ""."""
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
                    rec = json_depth.loads(data[pos:nl])
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
            if self.broken:
                raise AuditUnavailableError(self.broken)
            seq = self.seq + 1
            line, digest = seal(fields, seq, self.head)
            try:
                written = os.write(fd, line)
                if written != len(line):  # a short write to a regular file means the disk is full
                    raise OSError(f"short write ({written} of {len(line)} bytes)")
            except OSError as exc:
                self._cut_back(fd, exc)
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

    def _cut_back(self, fd: int, exc: OSError) -> None:
        """Cut the segment back to its last whole line after a failed write: half a line left in it had the next
        record glued to it (the shipper sent garbage, and a restart cut every record after it, acknowledged
        ones included). When even the cut fails, the spool takes no more records: none could be kept."""
        try:
            os.ftruncate(fd, self._seg_size)
        except OSError as cut:
            self.broken = (f"the audit spool {self.dir} holds a partial record ({exc}) that could not be cut off "
                           f"({cut}): no call is served until it is repaired and the process restarts")
            log.error("%s", self.broken)

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

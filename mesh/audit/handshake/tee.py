"""A tee on this process's standard error that reports the TLS handshake failures gRPC logs there.

gRPC's C core writes its log to file descriptor 2 and nowhere else. To read it without losing any of it, the
process's fd 2 becomes a pipe into a small helper process (`python -m hivemesh.mesh.audit.handshake.tee`), which:
- copies every line on to the real standard error at once, except the handshaker tracer's own entries, which
  are there only because the mesh turned that tracer on (`hivemesh.mesh.audit.handshake.tracelog`);
- sends each server-side handshake failure back to this process as one JSON line on a second pipe.

Why a process and not a thread: if this process dies (a fatal gRPC abort, a segfault), whatever it wrote last,
the crash message included, is still in the pipe; a thread would die with it, the helper forwards it, then sees
end-of-file and exits. If the helper dies, this process puts its standard error back and stops reporting.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final

from hivemesh.mesh import json_depth
from hivemesh.mesh.audit.handshake.events import HandshakeFailure, Listener
from hivemesh.mesh.audit.handshake.tracelog import HandshakeLogParser

log = logging.getLogger(__name__)

_READY: Final = b'{"ready":true}\n'
_IDLE_S: Final = 0.05
"""How long a partial line or an open tracer entry may wait for more input before it is let through."""
_READ: Final = 65536


# --- the helper process --------------------------------------------------------------------------------------------
def _write_all(fd: int, data: bytes) -> bool:
    """Write all of data; False when the reader is gone."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BrokenPipeError:
            return False
        except InterruptedError:
            continue
        view = view[n:]
    return True


def run_tee(source: int, sink: int, events: int) -> None:
    """Copy source to sink line by line, keeping the handshaker tracer's entries out, and report the failures
    they name on events. Returns at end-of-file of source, having let everything through."""
    parser = HandshakeLogParser()
    partial = b""
    events_open = _write_all(events, _READY)
    while True:
        waiting = bool(partial) or parser.pending
        ready, _, _ = select.select([source], [], [], _IDLE_S if waiting else None)
        if not ready:  # idle: nothing more of that line or entry is coming soon
            parser.flush()
            out, partial = partial, b""
        else:
            try:
                data = os.read(source, _READ)
            except InterruptedError:
                continue
            if not data:
                break
            *lines, partial = (partial + data).split(b"\n")
            out = b"".join(line + b"\n" for line in lines if parser.feed(line))
        if out:
            _write_all(sink, out)
        failures = parser.take()
        if failures and events_open:
            events_open = _write_all(events, b"".join(_event(f) for f in failures))
    parser.flush()
    if partial and parser.feed(partial):
        _write_all(sink, partial)
    failures = parser.take()
    if failures and events_open:
        _write_all(events, b"".join(_event(f) for f in failures))


def _event(f: HandshakeFailure) -> bytes:
    return json.dumps({"local": f.local, "peer": f.peer, "error": f.error}).encode() + b"\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "--events-fd" or not args[1].isdigit():
        sys.stderr.write("usage: python -m hivemesh.mesh.audit.handshake.tee --events-fd N  (started by the mesh)\n")
        return 2
    # Outlive whatever stops the process it serves (Ctrl-C, SIGTERM to the group, a hang-up), so its last
    # words still get through; end-of-file on stdin is the only way this ends.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    run_tee(0, 1, int(args[1]))
    return 0


# --- this process's side ------------------------------------------------------------------------------------------
class StderrTee:
    """This process's fd 2, routed through the helper; `listen` receives each handshake failure it reports.

    One per process (`StderrTee.shared()`): fd 2 is process-wide. Listeners run on the tee's reader thread.
    """

    _shared: StderrTee | None = None
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._events = -1
        self._saved = -1
        self._thread: threading.Thread | None = None
        self.started = False
        self.error = ""
        """Why the tee is not running, when it is not."""

    @classmethod
    def shared(cls, *, start_timeout_s: float = 15.0) -> StderrTee:
        """The process's tee, started on first use."""
        with cls._shared_lock:
            # A tee that died is replaced; one that never started is not retried on every call.
            if cls._shared is None or (cls._shared.started and not cls._shared.running):
                tee = cls()
                tee.start(timeout_s=start_timeout_s)
                cls._shared = tee
            return cls._shared

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def listen(self, fn: Listener) -> Callable[[], None]:
        """Call fn with every failure from now on; returns the function that stops that."""
        with self._lock:
            self._listeners.append(fn)

        def remove() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._listeners.remove(fn)
        return remove

    def start(self, *, timeout_s: float = 15.0) -> bool:
        """Start the helper and route fd 2 through it. False (with `error` set) if the helper did not come up;
        fd 2 is then left as it was."""
        to_tee_r, to_tee_w = os.pipe()
        events_r, events_w = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "hivemesh.mesh.audit.handshake.tee", "--events-fd", str(events_w)],
                stdin=to_tee_r, stdout=2, stderr=2, pass_fds=(events_w,), close_fds=True,
                start_new_session=True,  # no Ctrl-C from the terminal: see main()
            )
        except OSError as exc:
            for fd in (to_tee_r, to_tee_w, events_r, events_w):
                os.close(fd)
            self.error = f"cannot start the stderr tee: {exc}"
            return False
        os.close(to_tee_r)
        os.close(events_w)
        self._events = events_r
        ready = self._await_ready(timeout_s)
        if not ready:
            os.close(to_tee_w)
            self._stop_helper()
            os.close(events_r)
            self._events = -1
            self.error = self.error or f"the stderr tee did not start within {timeout_s:.0f} s"
            return False
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        self._saved = os.dup(2)
        os.set_inheritable(self._saved, False)
        os.dup2(to_tee_w, 2)
        os.close(to_tee_w)
        self._thread = threading.Thread(target=self._read, name="hivemesh-stderr-tee", daemon=True)
        self._thread.start()
        self.started = True
        return True

    def _await_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        got = b""
        while not got.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([self._events], [], [], left)
            if not ready:
                return False
            chunk = os.read(self._events, 64)
            if not chunk:
                self.error = "the stderr tee exited at start"
                return False
            got += chunk
        return got == _READY

    def _stop_helper(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._events, _READ)
            except InterruptedError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                break
            *lines, buf = (buf + chunk).split(b"\n")
            for line in lines:
                self._dispatch(line)
        self._lost()

    def _dispatch(self, line: bytes) -> None:
        try:
            obj = json_depth.loads(line)
            failure = HandshakeFailure(local=str(obj["local"]), peer=str(obj["peer"]), error=str(obj["error"]))
        except (ValueError, KeyError, TypeError):
            return
        with self._lock:
            listeners = list(self._listeners)
        for fn in listeners:
            try:
                fn(failure)
            except Exception:  # a listener's bug must not stop the others or the tee
                log.exception("handshake failure listener failed")

    def _lost(self) -> None:
        """The helper is gone: put standard error back so nothing more is lost, and say so."""
        if self._saved >= 0:
            os.dup2(self._saved, 2)
            os.close(self._saved)
            self._saved = -1
        with contextlib.suppress(OSError):
            os.close(self._events)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)  # reap it
        self.error = "the stderr tee exited"
        log.warning("the stderr tee exited: TLS handshake refusals are no longer audited in this process")


if __name__ == "__main__":
    sys.exit(main())

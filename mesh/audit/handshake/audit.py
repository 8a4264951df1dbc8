"""An audit record for every TLS handshake a front door refuses, like every other decision it makes.

For one listening port, `HandshakeAudit` turns the failures a `HandshakeEvents` source reports (today gRPC's
handshaker tracer, `hivemesh.mesh.audit.handshake.tracer`) into audit records:
- one record each in the node's audit log: kind `handshake`, status UNAVAILABLE (what the client sees), a
  reason such as TLS_CERT_UNTRUSTED or TLS_CERT_EXPIRED, the client's address, and the TLS library's words in
  `message`;
- coalescing a flood: per client host and reason, the first refusal in a window is written at once and the
  rest of that window as one record with `count` = how many. Every refusal is counted, none is dropped, and a
  handshake flood cannot turn into one disk write per connection;
- proving it is live: it connects to its own port once and waits to see that probe's failure come back. If it
  does not (the source is off, the log format changed, fd 2 was taken over), it says so loudly instead of
  auditing nothing in silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from hivemesh.mesh.audit.handshake.events import HandshakeEvents, HandshakeFailure
from hivemesh.mesh.audit.handshake.reasons import classify, describe
from hivemesh.mesh.errors import AuditUnavailableError

log = logging.getLogger(__name__)

STATUS: Final = "UNAVAILABLE"
"""What a client refused in the handshake sees."""
_MAX_KEYS: Final = 4096


class _Recorder(Protocol):
    def record(self, fields: dict[str, Any]) -> int: ...


@dataclass
class _Window:
    start: float
    peer: str
    error: str
    count: int = 0
    """Refusals after the first one in this window, not yet written."""


class HandshakeAudit:
    """Audits the handshakes refused on one listening port (see the module docstring)."""

    def __init__(
        self,
        audit: _Recorder,
        host: str,
        port: int,
        *,
        events: HandshakeEvents,
        window_s: float = 1.0,
        probe_timeout_s: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.audit = audit
        self.events = events
        self.host = host
        self.port = port
        self.window_s = window_s
        self.probe_timeout_s = probe_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], _Window] = {}
        self._probe_port = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stop_listening: Callable[[], None] | None = None
        self.active = asyncio.Event()
        """Set once the probe came back: refusals on this port are being audited."""
        self.problem = ""
        """Why refusals are not being audited, when they are not."""
        self.recorded = 0
        """Refusals accounted for in records so far (the sum of their counts)."""
        self.refused_by_reason: dict[str, int] = {}
        """Every refusal seen, by reason, as it arrives (the node's metrics read it; records may coalesce)."""

    async def start(self) -> None:
        """Begin listening for this port's failures and probe once; returns without waiting for the probe."""
        self._loop = asyncio.get_running_loop()
        problem = await asyncio.to_thread(self.events.start)
        if problem:
            self.problem = problem
            log.warning("TLS handshake refusals on port %d are not audited: %s", self.port, self.problem)
            return
        self._stop_listening = self.events.listen(self.on_failure)
        self._tasks = [asyncio.create_task(self._run_probe()), asyncio.create_task(self._flush_loop())]

    async def close(self) -> None:
        if self._stop_listening is not None:
            self._stop_listening()
            self._stop_listening = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self.flush(force=True)

    async def _run_probe(self) -> None:
        if not await self.probe():
            log.warning("TLS handshake refusals on port %d are not audited: %s", self.port, self.problem)

    async def probe(self) -> bool:
        """Connect and hang up without a handshake, then wait for that very connection's failure to be
        reported: True once it is (and `active` is set); False, with `problem` set, if it is not in time."""
        self._loop = asyncio.get_running_loop()
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        try:
            _, writer = await asyncio.open_connection(host.strip("[]"), self.port)
        except OSError as exc:
            self.problem = f"cannot connect to port {self.port} to probe it: {exc}"
            return False
        self._probe_port = int(writer.get_extra_info("sockname")[1])
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        try:
            await asyncio.wait_for(self.active.wait(), self.probe_timeout_s)
        except TimeoutError:
            self.problem = (f"the probe connection's refusal was not seen within {self.probe_timeout_s:.0f} s "
                            "(is GRPC_TRACE=handshaker set from the start, and fd 2 left alone?)")
            return False
        return True

    @property
    def state(self) -> str:
        """For `hivemesh status`: live, starting (the probe has not come back yet) or off with the reason."""
        if self.active.is_set():
            return "live"
        return f"off: {self.problem}" if self.problem else "starting"

    def fill_status(self, status: Any) -> None:
        """Add this audit's state to a node's published status (a NodeTraffic)."""
        status.handshake_audit = self.state
        status.handshakes_refused = self.recorded

    def add_to_status(self, status: Any) -> None:
        """Add the audit of another port of the node (its direct-link port) to a status `fill_status` filled: its
        refusals to the count, and its state where it differs (an embedded agent's gRPC port may not be audited,
        while its direct-link port, whose handshakes hivemesh makes itself, always is)."""
        status.handshakes_refused += self.recorded
        state = self.state
        if state != status.handshake_audit:
            status.handshake_audit = f"{status.handshake_audit or 'none'}; port {self.port}: {state}"

    def _proven(self) -> None:
        """The probe's report arrived (late ones too: a slow start is not a broken audit)."""
        self.active.set()
        self.problem = ""

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.window_s / 2)
            self.flush()

    def on_failure(self, failure: HandshakeFailure) -> None:
        """One failure from the tee (any port; runs on the tee's thread)."""
        if failure.local_port != self.port:
            return
        if failure.peer_port == self._probe_port and not self.active.is_set():
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._proven)
            return
        reason, _ = classify(failure.error)
        now = self._clock()
        with self._lock:
            self.refused_by_reason[reason] = self.refused_by_reason.get(reason, 0) + 1
            key = (failure.peer_host, reason) if len(self._windows) < _MAX_KEYS else ("*", reason)
            window = self._windows.get(key)
            if window is not None and now - window.start < self.window_s:
                window.count += 1
                window.peer, window.error = failure.peer, failure.error
                return
            self._windows[key] = _Window(start=now, peer=failure.peer, error=failure.error)
            if window is not None and window.count:
                self._write(window.peer, window.error, window.count)
            self._write(failure.peer, failure.error, 1)

    def flush(self, *, force: bool = False) -> None:
        """Write the coalesced records of windows that have ended (all of them, with force)."""
        now = self._clock()
        with self._lock:
            for key, window in list(self._windows.items()):
                if force or now - window.start >= self.window_s:
                    del self._windows[key]
                    if window.count:
                        self._write(window.peer, window.error, window.count)

    def _write(self, peer: str, error: str, count: int) -> None:
        reason, decision = classify(error)
        fields = {
            "kind": "handshake", "method": "", "capability": "", "decision": decision, "status": STATUS,
            "reason": reason, "message": describe(error), "caller": "",
            "remote": peer, "listener": f"{self.host}:{self.port}", "latency_us": 0, "trace_id": "",
            "count": count,
        }
        try:
            self.audit.record(fields)
        except AuditUnavailableError as exc:
            log.error("cannot record a TLS handshake refusal from %s: %s", peer, exc.message)
            return
        self.recorded += count

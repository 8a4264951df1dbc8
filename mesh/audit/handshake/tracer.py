"""Handshake failures from gRPC's handshaker tracer, read through the stderr tee: today's `HandshakeEvents`.

gRPC refuses a client that fails mutual TLS inside its C core and reports it nowhere but its own debug log
(`hivemesh.mesh.audit.handshake.tracelog`), which it writes to fd 2 (`hivemesh.mesh.audit.handshake.tee`).
This source runs only in a process that consented (`hivemesh.mesh.audit.handshake.switch`) and has the tracer
on; otherwise `start` says why and the process's standard error is left alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from hivemesh.mesh.audit.handshake.events import Listener
from hivemesh.mesh.audit.handshake.switch import ENV, enable, opted_in, opted_out, tracer_on
from hivemesh.mesh.audit.handshake.tee import StderrTee


class TracerEvents:
    """HandshakeEvents from gRPC's handshaker tracer (one per process: `tracer_events()`)."""

    def start(self) -> str:
        if opted_out():
            return f"turned off ({ENV}=0)"
        if not opted_in():
            return (f"not enabled in this process: an embedded agent leaves its program's stderr alone unless it "
                    f"opts in ({ENV}=1 and GRPC_TRACE=handshaker, or hivemesh.mesh.audit.handshake.enable() "
                    "before gRPC is imported)")
        if not tracer_on():
            return ("gRPC's handshaker tracer is off: start this process with GRPC_TRACE=handshaker (gRPC reads "
                    "it once, at import; hivemesh up sets it for its children)")
        tee = StderrTee.shared()
        return "" if tee.running else tee.error

    def listen(self, fn: Listener) -> Callable[[], None]:
        return StderrTee.shared().listen(fn)


_events: TracerEvents | None = None
_lock = threading.Lock()


def tracer_events() -> TracerEvents:
    """The process's tracer source. Start it before the process's first gRPC connection (joining the mesh is
    one), so the tracer's lines about that connection never reach the log."""
    global _events
    with _lock:
        if _events is None:
            _events = TracerEvents()
        return _events


def start_owned(*, audits: bool = True) -> str:
    """First thing in the main of a process hivemesh owns, before gRPC loads: turn the handshaker tracer on and
    route fd 2 through the tee now, before any gRPC connection. Every line the tracer writes before the tee is
    in place goes straight to the log: gRPC's note at import, the handshake of a connection to etcd, to the
    control plane, or to the agent behind a sidecar.

    audits=False: the process has no mutual-TLS port whose refusals it would audit (a caller-only sidecar), so
    the tracer stays off: no helper process, no trace of each connection to read through. If the environment
    turned it on all the same (a launcher's GRPC_TRACE), the tee still keeps its lines out of the log.

    Returns why the tee is not running ("" when it is); the front doors say so when they start."""
    if not audits and not tracer_on():
        return "no port whose TLS handshakes are audited: the handshaker tracer is off"
    enable()
    return tracer_events().start()

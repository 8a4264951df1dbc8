"""The handshake audit's input: server-side TLS handshake failures, and where they come from.

`HandshakeEvents` is the seam between how a failure is observed and how it is audited. Today's one source is
gRPC's handshaker tracer read through a stderr tee (`hivemesh.mesh.audit.handshake.tracer`); a future gRPC
verifier callback can be another, and `HandshakeAudit` (which turns events into audit records) does not change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class HandshakeFailure:
    """One failed server-side TLS handshake, as gRPC logged it."""

    local: str
    """The listening address that was connected to, in gRPC's form (`ipv4:127.0.0.1:34423`)."""
    peer: str
    """The client's address (`ipv4:127.0.0.1:41366`)."""
    error: str
    """gRPC's error text, e.g. `UNAVAILABLE: Handshake read failed (Socket closed)`."""

    @property
    def local_port(self) -> int:
        return port_of(self.local)

    @property
    def peer_port(self) -> int:
        return port_of(self.peer)

    @property
    def peer_host(self) -> str:
        return self.peer.rpartition(":")[0]


def port_of(address: str) -> int:
    """The port of a gRPC address such as `ipv4:127.0.0.1:5000` or `ipv6:[::1]:5000`; 0 if it has none."""
    tail = address.rpartition(":")[2]
    return int(tail) if tail.isdigit() else 0


Listener = Callable[[HandshakeFailure], None]
"""Receives each failure (on whatever thread the source reports from)."""


class HandshakeEvents(Protocol):
    """A process-wide source of server-side handshake failures (every listening port; listeners filter)."""

    def start(self) -> str:
        """Begin reporting; "" when failures are being reported, else why they are not. Blocking (run it in a
        thread from async code); idempotent."""
        ...

    def listen(self, fn: Listener) -> Callable[[], None]:
        """Call fn with every failure from now on; returns the function that stops that."""
        ...

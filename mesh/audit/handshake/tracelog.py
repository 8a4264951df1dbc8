"""Read TLS handshake refusals out of gRPC's own log, because that is the only place gRPC reports them.

A client that fails mutual TLS (a certificate from another CA, an expired one, none at all, plaintext) is
turned away inside gRPC's C core before any server code runs, and gRPC Python offers no hook there: no
handshake callback, no "request a certificate but let me verify it" mode. The one observable trace is the
core's `handshaker` tracer. With `GRPC_TRACE=handshaker` in the environment at start-up, every server-side
handshake failure is logged as one entry naming the error and both endpoint addresses, e.g.

    I1125 18:00:48.081073   27042 handshaker.cc:155] CallNextHandshakerLocked: error=UNKNOWN: Ssl handshake
    failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: ...:CERTIFICATE_VERIFY_FAILED: certificate has expired: OK
    === Source Location Trace: ===
    src/core/util/status_helper.cc:68
     shutdown=false index=2, args={..., grpc.internal.endpoint_local_address=ipv4:127.0.0.1:34423,
    grpc.internal.endpoint_peer_address=ipv4:127.0.0.1:41366, ..., grpc.internal.server_credentials=0x...}

This module turns such text into `HandshakeFailure`s, and tells which lines belong to the tracer (so the
process that enabled it can keep them out of the operator's log). It is pure text processing with no gRPC
import, so the stderr tee (`hivemesh.mesh.audit.handshake.tee`) can run it in a small process of its own.

The format is gRPC's debug output, not an API: grpcio is pinned, and
`tests/integration/test_handshake_log.py` parses what the pinned grpcio really prints, so an upgrade that changes
it fails the tests instead of going quiet. A process also proves the trace is live with a probe connection of
its own (`hivemesh.mesh.audit.handshake.audit`).
"""

from __future__ import annotations

import re
from typing import Final

from hivemesh.mesh.audit.handshake.events import HandshakeFailure

_HEADER = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ (?P<file>[\w./-]+):\d+\] ")
# Lines that can follow a tracer entry's header: the status's source-location block, the rest of the
# CallNextHandshakerLocked message after a multi-line status, and the blank line ending a status.
_CONTINUATION = re.compile(rb"^(=== Source Location Trace: === ?|\S+\.(?:cc|h):\d+| shutdown=.*|)$")
_LOCAL = re.compile(r"grpc\.internal\.endpoint_local_address=([^,}\s]+)")
_PEER = re.compile(r"grpc\.internal\.endpoint_peer_address=([^,}\s]+)")
_ERROR = re.compile(r"CallNextHandshakerLocked: error=(.*?)(?:\n=== Source Location Trace| shutdown=)", re.S)
_MAX_ENTRY_LINES: Final = 16
_MAX_LINE: Final = 16384


def is_header(line: bytes) -> bool:
    return _HEADER.match(line) is not None


def _is_tracer_header(line: bytes) -> bool:
    """An INFO entry of the handshaker tracer. Warnings, errors and fatal checks from the same files are gRPC's
    own words, and always pass."""
    m = _HEADER.match(line)
    if m is None or not line.startswith(b"I"):
        return False
    source = m.group("file").rsplit(b"/", 1)[-1]
    if source == b"handshaker.cc":
        return True
    return source == b"channel_trace.h" and b"] handshake manager " in line


def _is_tracer_note(line: bytes) -> bool:
    """gRPC's note at import that the handshaker tracer, and no other, is on: the mesh's doing, as its entries
    are (a note naming other tracers too is someone else's asking, and passes)."""
    m = _HEADER.match(line)
    return (m is not None and line.startswith(b"I") and m.group("file").rsplit(b"/", 1)[-1] == b"trace.cc"
            and line[m.end():].rstrip() == b"gRPC Tracers: handshaker")


class HandshakeLogParser:
    """Reads gRPC log output line by line: says which lines belong to the handshaker tracer and collects the
    server-side failures it reports.

    Lines that are not the tracer's (any other log line, a Python traceback, a print) are always kept: a line
    only counts as part of a tracer entry if it has one of the few shapes such an entry continues with.
    """

    def __init__(self) -> None:
        self._entry: list[bytes] = []
        self.failures: list[HandshakeFailure] = []

    @property
    def pending(self) -> bool:
        return bool(self._entry)

    def feed(self, line: bytes) -> bool:
        """Take one line (without its newline); returns True to keep it, False if it is the tracer's."""
        line = line[:_MAX_LINE]
        if _is_tracer_note(line):  # one line, no entry of its own
            self.flush()
            return False
        if _is_tracer_header(line):
            self.flush()
            self._entry.append(line)
            return False
        if self._entry and len(self._entry) < _MAX_ENTRY_LINES and _CONTINUATION.match(line):
            self._entry.append(line)
            return False
        self.flush()
        return True

    def flush(self) -> None:
        """End the entry being read (the next line is not part of it, or no more is coming soon)."""
        if not self._entry:
            return
        text = b"\n".join(self._entry).decode("utf-8", "replace")
        self._entry = []
        failure = parse_entry(text)
        if failure is not None:
            self.failures.append(failure)

    def take(self) -> list[HandshakeFailure]:
        out, self.failures = self.failures, []
        return out


def parse_entry(text: str) -> HandshakeFailure | None:
    """The server-side handshake failure one tracer entry reports, if it reports one."""
    m = _ERROR.search(text)
    if m is None:
        return None
    error = m.group(1).strip()
    if error == "OK" or "grpc.internal.server_credentials=" not in text:
        return None  # a step that succeeded, or a handshake this process made as a client
    local, peer = _LOCAL.search(text), _PEER.search(text)
    if local is None or peer is None:
        return None
    return HandshakeFailure(local=local.group(1), peer=peer.group(1), error=error)


def parse_text(text: bytes) -> list[HandshakeFailure]:
    """Every server-side handshake failure in a block of gRPC log output."""
    parser = HandshakeLogParser()
    for line in text.split(b"\n"):
        parser.feed(line.rstrip(b"\r"))
    parser.flush()
    return parser.take()

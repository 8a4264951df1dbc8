"""Single TLS or TCP connections that a mutual-TLS server should refuse, each returning its source port, so
the refusal can be found again in a log or an audit record (the handshake tests share them)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from pathlib import Path

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
"""What a plaintext HTTP/2 (gRPC) client sends first."""


def attacker_context(tmp: Path, cert: bytes | None = None, key: bytes | None = None) -> ssl.SSLContext:
    """A TLS client that offers h2 and cert/key (if given), and does not care who the server is."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    if cert is not None and key is not None:
        (tmp / "attacker.pem").write_bytes(cert)
        (tmp / "attacker.key").write_bytes(key)
        ctx.load_cert_chain(tmp / "attacker.pem", tmp / "attacker.key")
    return ctx


def connect(port: int) -> socket.socket:
    """A TCP connection to 127.0.0.1:port. A SYN answered with a reset (a burst can overflow a busy server's
    accept queue) made no connection, so no handshake either: try again, a bounded number of times."""
    for attempt in range(20):
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=10)
        except (ConnectionResetError, ConnectionRefusedError):
            if attempt == 19:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def tls_attempt(port: int, ctx: ssl.SSLContext) -> int:
    """One TLS connection the server should refuse; fails if it is accepted (the server sends HTTP/2 data)."""
    with connect(port) as raw:
        source = int(raw.getsockname()[1])
        got = b""
        try:
            with ctx.wrap_socket(raw) as tls:
                got = tls.recv(1)  # TLS 1.3: the server's verdict on our certificate comes after our Finished
        except (ssl.SSLError, OSError):
            pass
        assert not got, "the server accepted the connection (it sent HTTP/2 data)"
    return source


def raw_attempt(port: int, data: bytes) -> int:
    """One TCP connection that sends data (nothing: connect and hang up) and waits briefly for the close."""
    with connect(port) as raw:
        source = int(raw.getsockname()[1])
        if data:
            raw.sendall(data)
            with contextlib.suppress(OSError):
                raw.recv(64)
    return source

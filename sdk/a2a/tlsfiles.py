"""The gateway's HTTPS identity: its mesh certificate in an `ssl.SSLContext` that follows renewals.

Python's ssl loads a certificate chain only from files, so the current certificate and key are written to a
private (0700) folder and reloaded into the same context after each renewal; new handshakes use the new one.
Clients are asked for a certificate (CERT_OPTIONAL, verified against the mesh CA bundle) so that a call
without one reaches the application and is refused with a JSON-RPC error rather than a bare handshake failure.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path

from hivemesh.mesh.tls import Workload


class GatewayTls:
    def __init__(self, workload: Workload) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="hivemesh-a2a-"))
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.verify_mode = ssl.CERT_OPTIONAL
        self.load(workload)

    def load(self, workload: Workload) -> None:
        """Present workload's certificate and trust its bundle from the next handshake on."""
        cert, key = self._dir / "cert.pem", self._dir / "key.pem"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(workload.key_pem)
        cert.write_bytes(workload.cert_pem)
        self.context.load_cert_chain(cert, key)
        self.context.load_verify_locations(cadata=workload.bundle_pem.decode())

    def close(self) -> None:
        for p in self._dir.iterdir():
            p.unlink()
        self._dir.rmdir()

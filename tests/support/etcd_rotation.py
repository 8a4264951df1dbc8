"""A real etcd moved from one CA to another, as a CA rotation moves it: for the tests of what etcd's clients do
across that move (tests/integration/test_etcd_credentials_reread.py, test_etcd_redial_after_rotation.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from hivemesh.controlplane.ca import init_ca, load_ca
from hivemesh.controlplane.etcd_certs import issue_etcd_certs
from hivemesh.mesh.etcd import EtcdServer, EtcdServerTls
from tests.support.meshenv import TRUST_DOMAIN


def etcd_tls(base: Path) -> EtcdServerTls:
    """etcd's TLS material from a new CA made under base."""
    return issue_etcd_certs(load_ca(init_ca(base, TRUST_DOMAIN).certs_dir), base)


def rejected(server: EtcdServer) -> int:
    """Handshakes etcd refused so far (its log line for a client certificate or trust it did not accept)."""
    assert server.log_path is not None
    return server.log_path.read_text(errors="replace").count("rejected connection")


@contextlib.contextmanager
def on_old_ca(tmp_path: Path) -> Iterator[tuple[EtcdServer, EtcdServerTls, EtcdServerTls]]:
    """(etcd trusting an old CA and serving its certificate, the old CA's material, a new CA's): the test moves
    it to the new one. Stopped at the end."""
    old, new = etcd_tls(tmp_path / "old-ca"), etcd_tls(tmp_path / "new-ca")
    server = EtcdServer(data_dir=tmp_path / "etcd", log_path=tmp_path / "etcd.log", tls=old)
    server.start()
    try:
        yield server, old, new
    finally:
        server.stop()

"""An etcd client given a source of credentials (`client(tls=callable)`) follows it across etcd restarting on a new
CA: the same client object answers again, on what the source reads now, without being replaced.

This is what keeps the control plane (one etcd client shared by every part of it) running through a CA rotation
under `hivemesh up`: at `prepare` and `finish` `up` restarts etcd on a new trust bundle, and at `finish` etcd refuses
the certificate the control plane started with. A client with fixed credentials fails every handshake from then on
(gRPC channel credentials cannot change), which is why `up` used to restart the control plane too."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hivemesh.controlplane.ca import _write_atomic
from hivemesh.mesh.etcd import EtcdServer, EtcdServerTls, EtcdTls, client
from tests.support.etcd_rotation import on_old_ca, rejected
from tests.support.waiting import until

_BACK_S = 10.0
"""How long the client has to answer once etcd is back: its first request after etcd left moves it over."""
_QUIET_S = 5.0
"""How long no refused handshake may show afterwards: more than twice a client's longest redial backoff (2 s)."""



class Files:
    """A process's etcd credentials on disk (the bundle, its certificate and key), as a CA rotation rewrites them."""

    def __init__(self, d: Path) -> None:
        d.mkdir(parents=True)
        self.ca, self.cert, self.key = d / "ca.pem", d / "me.pem", d / "me.key"
        self.reads = 0

    def write(self, tls: EtcdTls) -> None:
        assert tls.cert_pem is not None and tls.key_pem is not None
        for path, data, mode in ((self.key, tls.key_pem, 0o600), (self.cert, tls.cert_pem, 0o644),
                                 (self.ca, tls.ca_pem, 0o644)):
            _write_atomic(path, data, mode)

    def read(self) -> EtcdTls:
        self.reads += 1
        return EtcdTls.from_files(self.ca, self.cert, self.key)



@pytest.fixture
def rotated(tmp_path: Path) -> Iterator[tuple[EtcdServer, EtcdServerTls, EtcdServerTls]]:
    with on_old_ca(tmp_path) as rig:
        yield rig


async def _answers(c: object, limit_s: float) -> float | None:
    """Seconds until c answers a get (each try bounded), or None if it did not within limit_s."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        try:
            async with asyncio.timeout(2):
                await c.get(b"/hivemesh/-ping")  # type: ignore[attr-defined]
            return time.monotonic() - t0
        except Exception:  # noqa: BLE001 - etcd not back, or the client not moved over yet: asked again
            await asyncio.sleep(0.05)
    return None


async def test_a_client_with_a_source_carries_on_when_etcd_restarts_on_a_new_ca(
    rotated: tuple[EtcdServer, EtcdServerTls, EtcdServerTls], tmp_path: Path,
) -> None:
    server, old, new = rotated
    files = Files(tmp_path / "client")
    files.write(old.admin())
    c = client(server.endpoint, tls=files.read, timeout=2)
    fixed = client(server.endpoint, tls=old.admin(), timeout=2)  # what the control plane had: read once
    try:
        await c.put(b"/hivemesh/k", b"before")
        assert await _answers(fixed, _BACK_S) is not None

        # The files change while the client is connected (`activate` re-issues the certificate): its channel works
        # and stays; the new files wait for its next reconnect.
        files.write(new.admin())
        assert (await c.get(b"/hivemesh/k")).value == b"before"
        assert c.redials == 0

        # etcd restarts trusting (and serving) the new CA only (`finish`): the old credentials fail every handshake.
        server.stop()
        server.tls = new
        server.start()
        took = await _answers(c, _BACK_S)
        assert took is not None, f"the client never answered again on the new credentials ({files.reads} reads)"
        assert c.redials == 1, "one new channel, for the one change of credentials"
        assert (await c.get(b"/hivemesh/k")).value == b"before"
        await c.put(b"/hivemesh/k", b"after")
        assert (await c.get(b"/hivemesh/k")).value == b"after"
        lease = await c.lease(5)  # a lease keepalive (its own override of aetcd's) on the new channel too
        assert (await c.refresh_lease(lease.id)).TTL > 0

        # The replaced channel is closed: nothing dials etcd with the old credentials any more (the client read once
        # sends nothing: its channel went idle when etcd left).
        before = rejected(server)
        assert not await until(lambda: rejected(server) > before, _QUIET_S, step_s=0.2), (
            "a replaced channel still dials etcd with the old credentials")
        reads = files.reads
        for _ in range(20):  # a connected client does not read its files at every request
            await c.get(b"/hivemesh/k")
        assert files.reads == reads

        with pytest.raises(Exception, match=r"UNAVAILABLE|failed to connect|Unavailable|ConnectionFailed"):
            async with asyncio.timeout(_BACK_S):
                await fixed.get(b"/hivemesh/k")  # a client that read its credentials once: refused for good
    finally:
        await fixed.close()
        await c.close()


async def test_a_closed_client_with_a_source_reconnects_on_the_credentials_of_now(
    rotated: tuple[EtcdServer, EtcdServerTls, EtcdServerTls], tmp_path: Path,
) -> None:
    server, old, new = rotated
    files = Files(tmp_path / "client")
    files.write(old.admin())
    c = client(server.endpoint, tls=files.read, timeout=2)
    try:
        await c.put(b"/hivemesh/k", b"v")
        await c.close()
        files.write(new.admin())
        server.stop()
        server.tls = new
        server.start()
        assert await _answers(c, _BACK_S) is not None
        assert c.redials == 0, "a connect after close reads the source; no channel was replaced"
    finally:
        await c.close()

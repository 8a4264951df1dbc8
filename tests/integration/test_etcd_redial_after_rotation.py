"""A replaced etcd client stops dialling etcd: after a CA rotation's last step, etcd refuses the old credentials,
and a process that lived through it used to redial with them every backoff, for good (a lease keepalive left
its stream open, and the open call kept the closed client's connection alive in gRPC's core)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from hivemesh.mesh.etcd import EtcdAccess, EtcdServer, EtcdServerTls, EtcdTls, client
from hivemesh.mesh.status import StatusPublisher, policy_pb2
from tests.support.etcd_rotation import on_old_ca, rejected
from tests.support.waiting import until

_QUIET_S = 5.0
"""How long no rejected connection must show: more than twice an etcd client's longest redial backoff (2 s)."""




@pytest.fixture
def rotated(tmp_path: Path) -> Iterator[tuple[EtcdServer, EtcdServerTls, EtcdServerTls]]:
    with on_old_ca(tmp_path) as rig:
        yield rig


def _rotate(server: EtcdServer, new: EtcdServerTls) -> None:
    """What `up` does at `ca rotate --step finish`: restart etcd trusting (and serving) the new CA only."""
    server.stop()
    server.tls = new
    server.start()


async def _quiet(server: EtcdServer) -> int:
    """The rejected handshakes during _QUIET_S, ending early at the first one; counted from when none has been
    logged for 1 s (at most 10 s): etcd logs a refusal a moment after it, so one the client dialled before it was
    closed could land in the window (it did, once in a full run). A client that still redials (every 2 s at most)
    is caught all the same, in the window that follows."""
    for _ in range(10):
        settled = rejected(server)
        if not await until(lambda n=settled: rejected(server) > n, 1.0, step_s=0.1):
            break
    before = rejected(server)
    await until(lambda: rejected(server) > before, _QUIET_S, step_s=0.2)
    return rejected(server) - before


async def _until_up(server: EtcdServer, tls: EtcdTls) -> None:
    """Wait until etcd answers with tls (the member is up again after the rotation)."""
    c = client(server.endpoint, tls=tls, timeout=2)
    try:
        while True:
            try:
                await c.get(b"/hivemesh/-ping")
                return
            except Exception:  # noqa: BLE001 - not up yet
                await asyncio.sleep(0.1)
    finally:
        await c.close()


async def test_a_closed_client_that_kept_a_lease_alive_does_not_redial(
    rotated: tuple[EtcdServer, EtcdServerTls, EtcdServerTls],
) -> None:
    server, old, new = rotated
    c = client(server.endpoint, tls=old.admin(), timeout=2)
    await c.connect()
    lease = await c.lease(10)
    for _ in range(5):
        assert (await c.refresh_lease(lease.id)).TTL > 0
        await asyncio.sleep(0.05)
    assert (await c.refresh_lease(0x7FFF)).TTL <= 0  # an unknown lease: answered, the stream ended
    _rotate(server, new)
    async with asyncio.timeout(10):
        await _until_up(server, new.admin())
    with pytest.raises(Exception, match=r"UNAVAILABLE|failed to connect"):
        await c.refresh_lease(lease.id)  # refused: the client is replaced, as the node's clients are
    await c.close()
    assert await _quiet(server) == 0, "the closed client's connection still dials etcd with the old credentials"


async def test_a_status_publisher_through_a_rotation_leaves_no_client_dialling_with_old_credentials(
    rotated: tuple[EtcdServer, EtcdServerTls, EtcdServerTls],
) -> None:
    """The operator's report: after `finish`, every process that lived through it made ~1 rejected TLS
    connection to etcd a second, indefinitely, while its current clients worked."""
    server, old, new = rotated
    current = [old.admin()]
    publisher = StatusPublisher(EtcdAccess(server.endpoint, lambda: current[0]), "/hivemesh/status/client/x/1",
                                policy_pb2.NodeTraffic, interval_s=0.2, ttl_s=3)
    publisher.start()
    try:
        assert await until(lambda: publisher.published >= 5, 10), "no status published"  # a lease, kept alive
        current[0] = new.admin()  # the node renewed (activate); etcd now moves to the new CA (finish)
        _rotate(server, new)
        published = publisher.published
        assert await until(lambda: publisher.published >= published + 5, 15), "no status published after it"
        assert await _quiet(server) == 0, "a replaced etcd client still dials etcd with the old credentials"
    finally:
        await publisher.stop()

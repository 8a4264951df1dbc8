"""The embedded etcd launcher and client factory, against a real etcd."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Collection, Iterator
from pathlib import Path

import aetcd
import pytest

from hivemesh.mesh import etcd as etcd_mod
from hivemesh.mesh.etcd import EtcdCluster, EtcdServer, EtcdStartError, client, parse_endpoints, wait_connected


async def test_put_get_round_trip(etcd: aetcd.Client) -> None:
    await etcd.put(b"/hivemesh/test/a", b"1")
    got = await etcd.get(b"/hivemesh/test/a")
    assert got is not None and got.value == b"1"


async def test_read_prefix_reads_every_key_once_in_order_in_growing_pages(etcd: aetcd.Client) -> None:
    """A prefix read in pages (held calls, state namespaces) reads what a single read does: every key once, in key
    order, none outside the prefix."""
    prefix = b"/test/read-prefix/"
    await etcd.put(b"/test/read-prefix", b"outside")  # the prefix without its slash: not under it
    for i in range(300):
        await etcd.put(prefix + b"k%04d" % i, b"v" * (i % 7))
    kvs, revision = await etcd_mod.read_prefix(etcd, prefix, page=2)  # 2, 8, 32, ... keys a page
    assert [bytes(kv.key) for kv in kvs] == [prefix + b"k%04d" % i for i in range(300)]
    assert revision >= max(int(kv.mod_revision) for kv in kvs)
    await etcd.put(prefix + b"k0150", b"changed")
    again, _ = await etcd_mod.read_prefix(etcd, prefix, page=300)
    assert bytes(again[150].value) == b"changed" and len(again) == 300
    assert (await etcd_mod.read_prefix(etcd, b"/test/nothing-here/"))[0] == []
    await etcd.delete_prefix(b"/test/read-prefix")


async def test_restart_keeps_data(own_etcd: EtcdServer) -> None:
    c = client(own_etcd.access)
    await wait_connected(c)
    await c.put(b"/hivemesh/test/keep", b"yes")
    await c.close()
    own_etcd.stop()
    assert not own_etcd.running
    own_etcd.start()
    c = client(own_etcd.access)
    await wait_connected(c)
    got = await c.get(b"/hivemesh/test/keep")
    await c.close()
    assert got is not None and got.value == b"yes"


async def _answered(c: aetcd.Client, key: bytes) -> bool:
    try:
        await asyncio.wait_for(c.get(key), 2.0)
    except (aetcd.exceptions.ClientError, TimeoutError):
        return False
    return True


async def test_a_client_reaches_a_restarted_etcd_within_its_capped_backoff(own_etcd: EtcdServer) -> None:
    """A client kept busy while etcd was down dials it again within ~2 s of its return (`RECONNECT_OPTIONS`).

    With gRPC's own backoff (1 s, growing 1.6x to 120 s) an 18 s outage leaves the next dial ~26 s after the
    first failure, so every request in between fails at once though etcd is back (5.1 s of them in a run with
    those defaults): what a control plane did right after `hivemesh up` restarted etcd."""
    c = client(own_etcd.access)
    try:
        await wait_connected(c)
        await c.put(b"/hivemesh/test/reconnect", b"1")
        own_etcd.kill()
        loop = asyncio.get_running_loop()
        down_until = loop.time() + 18.0
        failed = 0
        for _ in range(200):  # requests while it is down, as a node's keepalives and watches keep making them
            if loop.time() >= down_until:
                break
            failed += not await _answered(c, b"/hivemesh/test/reconnect")
            await asyncio.sleep(0.25)
        assert failed > 0
        await asyncio.to_thread(own_etcd.start)  # on its ports, with its data; returns once etcd is healthy
        back = loop.time()
        for _ in range(100):
            if await _answered(c, b"/hivemesh/test/reconnect") or loop.time() - back > 3.5:
                break
            await asyncio.sleep(0.05)
        waited = loop.time() - back
        # 2 s +20% jitter at most, plus a dial; gRPC's defaults took 5.1 s here
        assert waited <= 3.5, f"the client reached etcd {waited:.1f} s after it was back (its backoff: 2 s at most)"
    finally:
        await c.close()


@pytest.mark.parametrize("bad", ["", "nohost", "h:notaport", ","])
def test_parse_endpoints_rejects_bad_input(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoints(bad)


def test_parse_endpoints_accepts_lists() -> None:
    assert parse_endpoints("127.0.0.1:1,http://127.0.0.1:2") == [("127.0.0.1", 1), ("127.0.0.1", 2)]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another process-like owner is listening on for the whole test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def _hand_out(monkeypatch: pytest.MonkeyPatch, taken: int, at: int) -> list[int]:
    """Make the launcher's `free_port` return `taken` on its call number `at` (a port another process bound
    between the pick and etcd's own bind, as on a busy CI machine); returns every port handed out."""
    real, handed = etcd_mod.free_port, []

    def pick(host: str = "127.0.0.1", *, avoid: Collection[int] = ()) -> int:
        handed.append(taken if len(handed) == at else real(host, avoid=avoid))
        return handed[-1]

    monkeypatch.setattr(etcd_mod, "free_port", pick)
    return handed


async def test_a_new_cluster_that_loses_a_port_race_starts_again_on_new_ports(
    tmp_path: Path, taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    handed = _hand_out(monkeypatch, taken_port, at=5)  # member-2's peer port, as in the CI failure
    cluster = EtcdCluster(tmp_path / "etcd", size=3)
    assert cluster.members[2].peer_port == taken_port
    await asyncio.to_thread(cluster.start)
    try:
        assert cluster.members[2].lost_ports(0) == {taken_port}, "the first start must really have lost the port"
        assert len(handed) == 12, "one fresh set of six ports for the second start"
        assert taken_port not in {p for m in cluster.members for p in (m.client_port, m.peer_port)}
        c = client(cluster.access)
        await wait_connected(c)
        await c.put(b"/hivemesh/test/race", b"won")
        for m in cluster.members:  # every member joined the one new cluster
            one = client(m.endpoint)
            await wait_connected(one)
            got = await one.get(b"/hivemesh/test/race")
            await one.close()
            assert got is not None and got.value == b"won", m.name
        await c.close()
    finally:
        cluster.stop()


async def test_a_new_member_that_loses_a_port_race_starts_again_on_new_ports(
    tmp_path: Path, taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    handed = _hand_out(monkeypatch, taken_port, at=0)
    server = EtcdServer(data_dir=tmp_path / "etcd", log_path=tmp_path / "etcd.log")
    await asyncio.to_thread(server.start)
    try:
        assert handed[0] == taken_port and server.client_port not in (0, taken_port)
        assert server.lost_ports(0) == {taken_port}
        c = client(server.endpoint)
        await wait_connected(c)
        await c.put(b"/hivemesh/test/race", b"won")
        await c.close()
    finally:
        server.stop()


def test_a_member_restarted_on_a_taken_port_fails_with_its_log(tmp_path: Path, taken_port: int) -> None:
    """Ports given by the caller are never changed behind its back: the start fails, saying why."""
    server = EtcdServer(data_dir=tmp_path / "etcd", log_path=tmp_path / "etcd.log", client_port=taken_port)
    with pytest.raises(EtcdStartError, match="address already in use"):
        server.start(timeout=20)
    assert server.client_port == taken_port and not server.running

"""PrefixCaches of one process share one etcd connection and one liveness probe per identity (watch_channel.py).

Real signals only: the TCP connections this process holds to etcd's port (from /proc), and etcd's own count of
Range calls (`grpc_server_handled_total` on its /metrics endpoint), which is what the probes cost the store.
"""

from __future__ import annotations

import http.client
import os
import signal
import ssl
import time

import aetcd

from hivemesh.controlplane.ca import load_ca
from hivemesh.mesh.etcd import EtcdAccess, EtcdServer, EtcdTls, client, is_permission_denied, wait_connected
from hivemesh.mesh.etcd_roles import ensure_workload_user
from hivemesh.mesh.keyspace import AGENTS
from hivemesh.mesh.watch import PrefixCache, WatchOptions
from hivemesh.mesh.watch_channel import WatchChannel, open_channels
from tests.conftest import SessionCa
from tests.support.meshenv import TRUST_DOMAIN, controlplane_access
from tests.support.sockets import connections_to as _connections_to
from tests.support.spawn import freeze
from tests.support.waiting import until as _until

P = "/hivemesh/test-watch-channel/"
INTERVAL = 0.2
# A generous timeout on the shared session etcd: a slow probe on a loaded machine must not replace the connection.
SHARED = WatchOptions(probe_interval_s=INTERVAL, probe_timeout_s=2.0, backoff_initial_s=0.05, backoff_max_s=0.3)
FAST = WatchOptions(probe_interval_s=INTERVAL, probe_timeout_s=0.5, backoff_initial_s=0.05, backoff_max_s=0.3)



def _range_calls(server: EtcdServer) -> int:
    """Range (get) calls etcd has answered, from its own /metrics (mutual TLS, as root)."""
    tls = server.tls
    assert tls is not None
    ctx = ssl.create_default_context(cafile=str(tls.server_ca_file or tls.trusted_ca_file))
    ctx.load_cert_chain(tls.admin_cert_file, tls.admin_key_file)
    conn = http.client.HTTPSConnection(server.host, server.client_port, context=ctx, timeout=5)
    try:
        conn.request("GET", "/metrics")
        body = conn.getresponse().read().decode()
    finally:
        conn.close()
    lines = [ln for ln in body.splitlines()
             if ln.startswith("grpc_server_handled_total{") and 'grpc_method="Range"' in ln]
    assert lines, "etcd's /metrics has no Range counter"
    return sum(int(float(ln.rsplit(" ", 1)[1])) for ln in lines)


def _channel_with(members: int) -> WatchChannel:
    found = [ch for ch in open_channels() if ch.members == members]
    assert len(found) == 1, [ch.members for ch in open_channels()]
    return found[0]


async def test_caches_of_one_identity_share_one_connection_and_one_probe(
    etcd: aetcd.Client, etcd_server: EtcdServer
) -> None:
    port, n = etcd_server.client_port, 6
    base = _connections_to(port)  # the fixture's own client, and whatever else this process holds already

    def opened() -> int:
        return len(_connections_to(port) - base)

    # Each cache gets its own EtcdAccess object, as separate components would: same identity, so they share.
    caches = [PrefixCache(etcd_server.access, f"{P}c{i}/", options=SHARED) for i in range(n)]
    other = PrefixCache(controlplane_access(etcd_server.endpoint), f"{P}other/", options=SHARED)
    everyone = [*caches, other]
    try:
        for c in everyone:
            await c.start(timeout=10)
        assert await _until(lambda: all(c.connected for c in everyone), 5)
        assert sorted(ch.members for ch in open_channels()) == [1, n], "a second identity never shares"
        shared = _channel_with(n)
        assert opened() == 2, "one TCP connection per identity, not one per cache"

        # Idle liveness traffic: etcd answers one Range per channel per probe interval, not one per cache.
        channels = open_channels()
        probes0, ranges0, t0 = sum(ch.probes for ch in channels), _range_calls(etcd_server), time.monotonic()
        assert await _until(lambda: sum(ch.probes for ch in channels) >= probes0 + 10, 10)
        probes = sum(ch.probes for ch in channels) - probes0
        ranges, elapsed = _range_calls(etcd_server) - ranges0, time.monotonic() - t0
        assert ranges <= probes + 3, f"{ranges} Range calls for {probes} probes of {len(everyone)} caches"
        assert probes <= len(channels) * (elapsed / INTERVAL + 1), "each channel probes once per interval"

        for i in range(n):
            await etcd.put(f"{P}c{i}/k".encode(), b"1")
        for c in caches:
            assert await c.wait_for(lambda s: len(s) == 1, timeout=5)

        # One cache stopping leaves the others' streams (and the connection) alone.
        await caches[0].stop()
        assert shared.members == n - 1 and not shared.closed
        for i, c in enumerate(caches[1:], start=1):
            await etcd.put(f"{P}c{i}/k".encode(), b"2")
            assert await c.wait_for(lambda s, i=i: s.get(f"{P}c{i}/k") == b"2", timeout=5)
            assert c.connected and c.reconnects == 0 and c.lists == 1
        assert shared.clients_opened == 1 and opened() == 2
        conn = shared.current  # held, so only an explicit close (not garbage collection) can end it
        assert conn is not None
    finally:
        for c in everyone:
            await c.stop()
    # The last cache stopping closes the connection and forgets the channel.
    assert shared.closed and open_channels() == [] and conn.retired
    assert await _until(lambda: opened() == 0, 5)


class _Recorder:
    def __init__(self) -> None:
        self.decoded: list[int] = []

    def decode(self, _key: bytes, value: bytes) -> int:
        self.decoded.append(int(value))
        return int(value)


async def test_a_paused_member_replaces_the_shared_connection_and_every_cache_resumes(
    own_etcd: EtcdServer,
) -> None:
    pid, n = own_etcd.pid, 3
    assert pid is not None
    writer = client(own_etcd.access)
    await wait_connected(writer)
    recs = [_Recorder() for _ in range(n)]
    caches = [PrefixCache(own_etcd.access, f"{P}c{i}/", decode=recs[i].decode, options=FAST) for i in range(n)]
    try:
        for i in range(n):
            await writer.put(f"{P}c{i}/k".encode(), b"1")
        for c in caches:
            await c.start(timeout=10)
        assert await _until(lambda: all(c.connected for c in caches), 5)
        channel = _channel_with(n)
        assert channel.clients_opened == 1

        freeze(pid)  # TCP stays up, nothing answers: only the shared probe can notice
        try:
            assert await _until(lambda: channel.probe_failures >= 1 and not any(c.connected for c in caches), 5)
        finally:
            os.kill(pid, signal.SIGCONT)
        for i in range(n):  # while the caches are still reconnecting
            await writer.put(f"{P}c{i}/k".encode(), b"2")
        for i, c in enumerate(caches):
            assert await c.wait_for(lambda s, i=i: s.get(f"{P}c{i}/k") == 2, timeout=10)
            assert c.lists == 1 and c.duplicates_skipped == 0, "resumed from its own revision + 1"
            assert recs[i].decoded == [1, 2], "no event missed, none applied twice"
            assert c.reconnects >= 1
        assert channel.clients_opened >= 2, "the shared client was replaced"
        assert await _until(lambda: all(c.connected for c in caches), 5)
        conn = channel.current
        assert conn is not None and not conn.retired
    finally:
        for c in caches:
            await c.stop()
        await writer.close()


async def test_a_cache_failing_alone_leaves_the_shared_connection_and_its_siblings_alone(
    etcd: aetcd.Client, etcd_server: EtcdServer, session_ca: SessionCa
) -> None:
    # A workload identity (etcd user client:watch-iso, the node role): it may read the registry, not our prefix.
    await ensure_workload_user(etcd, "client", "watch-iso")
    cert, key = load_ca(session_ca.files.certs_dir).issue_with_new_key(
        f"spiffe://{TRUST_DOMAIN}/client/watch-iso", common_name="client:watch-iso", dns_names=[], ttl_s=600
    )
    access = EtcdAccess(etcd_server.endpoint, EtcdTls(session_ca.files.ca_cert.read_bytes(), cert, key))
    # Started first, so the shared probe reads its (forbidden) prefix: still proof that etcd answers.
    refused: PrefixCache[bytes] = PrefixCache(access, f"{P}forbidden/", options=SHARED)
    allowed: PrefixCache[bytes] = PrefixCache(access, f"{AGENTS}watch-iso/", options=SHARED)
    try:
        await refused.start(wait=False)
        await allowed.start(timeout=10)
        channel = _channel_with(2)
        assert await _until(lambda: refused.reconnects >= 3, 10), "the refused cache keeps retrying on its own"
        probes = channel.probes
        assert await _until(lambda: channel.probes >= probes + 3, 10)
        err = refused.last_error
        assert err is not None and is_permission_denied(err) and not refused.loaded
        assert channel.probe_failures == 0 and channel.clients_opened == 1, "the connection was never replaced"
        assert allowed.connected and allowed.reconnects == 0 and allowed.lists == 1
        await etcd.put(f"{AGENTS}watch-iso/a".encode(), b"1")
        assert await allowed.wait_for(lambda s: f"{AGENTS}watch-iso/a" in s, timeout=5)
    finally:
        await refused.stop()
        await allowed.stop()

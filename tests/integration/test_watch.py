"""PrefixCache against a real etcd: list + watch, exactly-once in-order delivery, outages, compaction, hangs.

Partitions and hangs are made with a real TCP proxy between the cache and etcd (`_Proxy`): `cut()` drops every
connection and refuses new ones, `blackhole()` keeps connections open but forwards nothing (a paused or
unreachable member), `heal()` restores service.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

import aetcd
import pytest

from hivemesh.mesh.errors import RegistryUnavailableError
from hivemesh.mesh.etcd import EtcdAccess, EtcdServer, client, parse_endpoints, wait_connected
from hivemesh.mesh.ports import free_port
from hivemesh.mesh.watch import PrefixCache, WatchOptions
from tests.support.waiting import until as _until

P = "/hivemesh/test-watch/"
FAST = WatchOptions(probe_interval_s=0.2, probe_timeout_s=0.5, backoff_initial_s=0.05, backoff_max_s=0.3)


class _Proxy:
    """A loopback TCP proxy whose link can be cut or black-holed, to partition one client from etcd."""

    def __init__(self, target: str) -> None:
        (self._host, self._port), = parse_endpoints(target)
        self.mode = "pass"
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "cut":
            writer.close()
            return
        self._conns.add(writer)
        if self.mode == "blackhole":
            await self._pump(reader, None)  # read and drop until closed
            return
        try:
            up_r, up_w = await asyncio.open_connection(self._host, self._port)
        except OSError:
            writer.close()
            return
        self._conns.add(up_w)
        for src, dst in ((reader, up_w), (up_r, writer)):
            t = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter | None) -> None:
        try:
            while data := await src.read(65536):
                if dst is not None and self.mode == "pass":
                    dst.write(data)
                    await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if dst is not None:
                dst.close()

    def _close_all(self) -> None:
        for w in list(self._conns):
            w.close()
        self._conns.clear()

    def cut(self) -> None:
        self.mode = "cut"
        self._close_all()

    def blackhole(self) -> None:
        self.mode = "blackhole"

    def heal(self) -> None:
        # Connections that lived through a black hole lost bytes mid-stream: they cannot be trusted again.
        self._close_all()
        self.mode = "pass"

    async def stop(self) -> None:
        self._close_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
async def proxy(etcd_server: EtcdServer) -> AsyncIterator[_Proxy]:
    p = _Proxy(etcd_server.endpoint)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()



class _Recorder:
    """decode + on_change hooks that record every applied value, to prove exactly-once, in-order delivery."""

    def __init__(self) -> None:
        self.decoded: dict[str, list[int]] = {}
        self.changes = 0

    def decode(self, key: bytes, value: bytes) -> int:
        seq = int(value)
        self.decoded.setdefault(key.decode(), []).append(seq)
        return seq

    def on_change(self) -> None:
        self.changes += 1


def _bytes_snapshot(cache: PrefixCache[bytes]) -> dict[str, bytes]:
    return dict(cache.snapshot())


async def test_initial_list_then_puts_and_deletes(etcd: aetcd.Client, etcd_server: EtcdServer) -> None:
    await etcd.put(P.encode() + b"a", b"1")
    await etcd.put(P.encode() + b"b", b"2")
    await etcd.put(b"/hivemesh/other/x", b"outside the prefix")
    cache: PrefixCache[bytes] = PrefixCache(etcd_server.access, P, options=FAST)
    await cache.start(timeout=10)
    try:
        assert _bytes_snapshot(cache) == {P + "a": b"1", P + "b": b"2"}
        first = cache.snapshot()
        gen, rev = cache.generation, cache.revision
        await etcd.put(P.encode() + b"c", b"3")
        await etcd.delete(P.encode() + b"a")
        await etcd.put(P.encode() + b"b", b"22")
        want = {P + "b": b"22", P + "c": b"3"}
        assert await cache.wait_for(lambda s: dict(s) == want, timeout=5)
        assert cache.generation > gen and cache.revision > rev
        latest = await etcd.get(P.encode() + b"b")
        assert latest is not None and cache.revision >= latest.mod_revision
        assert dict(first) == {P + "a": b"1", P + "b": b"2"}, "a published snapshot must never change"
        with pytest.raises(TypeError):
            cache.snapshot()["x"] = b"no"  # type: ignore[index]
        assert await _until(lambda: cache.connected, 5) and cache.lists == 1
    finally:
        await cache.stop()
        await cache.stop()  # idempotent
    assert not cache.connected


async def test_many_rapid_mutations_in_order_exactly_once(
    etcd: aetcd.Client, etcd_server: EtcdServer
) -> None:
    rec = _Recorder()
    cache = PrefixCache(etcd_server.access, P, decode=rec.decode, on_change=rec.on_change, options=FAST)
    await cache.start(timeout=10)
    keys, per_key = 10, 50
    writers = [client(etcd_server.access) for _ in range(keys)]

    async def write(i: int) -> None:
        w = writers[i]
        await wait_connected(w)
        key = f"{P}k{i:02d}".encode()
        for seq in range(1, per_key + 1):
            await w.put(key, str(seq).encode())
        if i % 2 == 0:
            await w.delete(key)

    try:
        await asyncio.wait_for(asyncio.gather(*(write(i) for i in range(keys))), 30)
        want = {f"{P}k{i:02d}": per_key for i in range(keys) if i % 2}
        assert await cache.wait_for(lambda s: dict(s) == want, timeout=10)
        # Every put was decoded exactly once, per key in write order: 0 missed, 0 duplicates, 0 reordered.
        assert rec.decoded == {f"{P}k{i:02d}": list(range(1, per_key + 1)) for i in range(keys)}
        assert cache.events_applied == keys * per_key + keys // 2
        assert cache.duplicates_skipped == 0 and cache.lists == 1
        assert 1 <= rec.changes <= cache.events_applied
    finally:
        await cache.stop()
        for w in writers:
            await w.close()


async def test_etcd_outage_keeps_snapshot_and_resumes_without_loss(own_etcd: EtcdServer) -> None:
    rec = _Recorder()
    writer = client(own_etcd.access)
    await wait_connected(writer)
    await writer.put(P.encode() + b"a", b"1")
    await writer.put(P.encode() + b"b", b"1")
    await writer.close()
    cache = PrefixCache(own_etcd.access, P, decode=rec.decode, on_change=rec.on_change, options=FAST)
    await cache.start(timeout=10)
    try:
        before = dict(cache.snapshot())
        assert before == {P + "a": 1, P + "b": 1}
        assert await _until(lambda: cache.connected, 5)
        own_etcd.stop()
        assert await _until(lambda: not cache.connected, 3), "the cache notices the outage"
        await asyncio.sleep(1.0)  # stay down across several reconnect attempts
        assert dict(cache.snapshot()) == before, "the last snapshot is served while etcd is down"
        assert cache.last_error is not None

        own_etcd.start()
        writer = client(own_etcd.access)
        await wait_connected(writer)
        await writer.put(P.encode() + b"a", b"2")
        await writer.delete(P.encode() + b"b")
        await writer.put(P.encode() + b"c", b"1")
        await writer.close()
        want = {P + "a": 2, P + "c": 1}
        assert await cache.wait_for(lambda s: dict(s) == want, timeout=10)
        assert cache.lists == 1, "resumed from revision + 1, no re-list needed"
        assert rec.decoded == {P + "a": [1, 2], P + "b": [1], P + "c": [1]}
        assert cache.reconnects >= 1
    finally:
        await cache.stop()


async def test_compacted_revision_relists_and_converges(
    etcd: aetcd.Client, etcd_server: EtcdServer, proxy: _Proxy
) -> None:
    for i in range(5):
        await etcd.put(f"{P}k{i}".encode(), b"1")
    rec = _Recorder()
    via_proxy = EtcdAccess(proxy.endpoint, etcd_server.access.tls)
    cache = PrefixCache(via_proxy, P, decode=rec.decode, on_change=rec.on_change, options=FAST)
    await cache.start(timeout=10)
    try:
        assert len(cache.snapshot()) == 5
        stale_revision = cache.revision
        assert await _until(lambda: cache.connected, 5)
        proxy.cut()  # partition the watcher
        assert await _until(lambda: not cache.connected, 3)
        await etcd.delete(f"{P}k0".encode())
        await etcd.put(f"{P}k1".encode(), b"2")
        await etcd.put(f"{P}k1".encode(), b"3")
        await etcd.put(f"{P}new".encode(), b"1")
        await etcd.delete(f"{P}new".encode())
        await etcd.put(f"{P}k9".encode(), b"1")
        head = await etcd.get(f"{P}k9".encode())
        assert head is not None
        await etcd.compact(head.mod_revision)  # history the watcher needs is gone
        assert head.mod_revision > stale_revision + 1
        changes_before = rec.changes
        proxy.heal()
        want = {f"{P}k1": 3, f"{P}k2": 1, f"{P}k3": 1, f"{P}k4": 1, f"{P}k9": 1}
        assert await cache.wait_for(lambda s: dict(s) == want, timeout=10)
        assert cache.lists == 2, "the compacted resume revision forced exactly one re-list"
        assert rec.changes == changes_before + 1, "the re-list is published as one change"
        assert cache.revision >= head.mod_revision
        # Unchanged keys were not decoded again; changed ones once, with their latest value.
        assert rec.decoded[f"{P}k2"] == [1] and rec.decoded[f"{P}k1"] == [1, 3]
        # And the watch resumed after the re-list: new events still flow.
        await etcd.put(f"{P}k2".encode(), b"2")
        assert await cache.wait_for(lambda s: s.get(f"{P}k2") == 2, timeout=5)
        assert cache.lists == 2
    finally:
        await cache.stop()


async def test_silent_hang_is_detected_and_recovered(
    etcd: aetcd.Client, etcd_server: EtcdServer, proxy: _Proxy
) -> None:
    await etcd.put(P.encode() + b"a", b"1")
    cache: PrefixCache[bytes] = PrefixCache(EtcdAccess(proxy.endpoint, etcd_server.access.tls), P, options=FAST)
    await cache.start(timeout=10)
    try:
        assert await _until(lambda: cache.connected, 5)
        proxy.blackhole()  # TCP stays up, nothing flows: only the liveness probe can notice
        assert await _until(lambda: not cache.connected, 3), "the probe must declare a dead stream"
        await etcd.put(P.encode() + b"b", b"2")
        assert dict(cache.snapshot()) == {P + "a": b"1"}
        proxy.heal()
        assert await cache.wait_for(lambda s: s.get(P + "b") == b"2", timeout=10)
        assert cache.lists == 1
    finally:
        await cache.stop()


async def test_start_raises_when_etcd_unreachable_and_wait_false_keeps_trying(own_etcd: EtcdServer) -> None:
    dead = f"127.0.0.1:{free_port()}"
    cache: PrefixCache[bytes] = PrefixCache(dead, P, options=FAST)
    with pytest.raises(RegistryUnavailableError):
        await cache.start(timeout=1)
    await cache.stop()

    own_etcd.stop()
    late: PrefixCache[bytes] = PrefixCache(own_etcd.access, P, options=FAST)
    await asyncio.wait_for(late.start(wait=False), 1)  # returns at once although etcd is down
    try:
        assert not late.loaded and dict(late.snapshot()) == {}
        own_etcd.start()
        writer = client(own_etcd.access)
        await wait_connected(writer)
        await writer.put(P.encode() + b"x", b"1")
        await writer.close()
        assert await late.wait_for(lambda s: P + "x" in s, timeout=10)
        assert late.loaded
    finally:
        await late.stop()


async def test_undecodable_value_is_skipped_not_fatal(
    etcd: aetcd.Client, etcd_server: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    await etcd.put(P.encode() + b"bad0", b"not a number")
    await etcd.put(P.encode() + b"good", b"1")
    cache = PrefixCache(etcd_server.access, P, decode=lambda _k, v: int(v), options=FAST)
    await cache.start(timeout=10)
    try:
        assert dict(cache.snapshot()) == {P + "good": 1}
        await etcd.put(P.encode() + b"good", b"oops")  # a good key turning bad drops out
        await etcd.put(P.encode() + b"bad0", b"7")  # a bad key turning good appears
        want: Mapping[str, int] = {P + "bad0": 7}
        assert await cache.wait_for(lambda s: dict(s) == want, timeout=5)
        assert await _until(lambda: cache.connected, 5)
        assert any("undecodable" in r.getMessage() for r in caplog.records)
    finally:
        with contextlib.suppress(Exception):
            await cache.stop()

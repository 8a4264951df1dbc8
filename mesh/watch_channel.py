"""One etcd connection and one liveness probe for all the PrefixCaches of a process that read etcd as one identity.

A node runs about seven caches (registry, policies, revocations, trust bundle, JWKS, control-plane adverts,
budget ledger). Each used to open its own aetcd client (its own TLS connection) and probe it with a linearizable
`get` every second: ~7 connections and ~7 raft ReadIndex rounds per second per idle node, all to learn the same
thing, whether this process's connection to etcd is alive. etcd's Go client multiplexes every watch of a client
over one connection; so do we. A `WatchChannel` holds one client and runs one probe; each cache keeps its own
Watch stream (an HTTP/2 stream on that connection), revision, list, compaction re-list and snapshot.

- Sharing is per event loop (a gRPC aio channel belongs to its loop) and keyed by the endpoints, by who we are to
  etcd and by the probe settings. Identity: an `EtcdAccess`'s `tls` as given, an `EtcdTls` by value (same
  certificate and key: same etcd user), a callable by identity (a node's `_etcd_tls` bound method is the same
  source for all of its caches and yields its current certificate at each reconnect, as before). Two identities
  therefore never share a connection, so no cache ever reads with another identity's roles. Probe settings: a
  cache asking for a faster or stricter probe gets its own channel rather than riding on a weaker probe
  (production caches all use the defaults and share). Backoff stays per cache: it does not touch the channel.
- Refcounted: the first cache that starts creates the channel and its probe task; the last one that stops closes
  the client and forgets the channel.
- Only the probe replaces the client. After a failed or timed-out probe the connection is *retired*: every cache
  streaming on it is told at once (`Connection.lost`), the client is closed, and the next cache to reconnect opens
  a fresh one, on which all the others land too. A cache whose own stream fails (cancelled by etcd, a refused
  read, a stream that ended) reconnects alone on the same client; since its error might be the connection's, it
  asks for a probe now (`suspect`) instead of waiting for the next tick, and the probe decides. After each
  successful probe every cache gets `on_alive` (it asks its stream for a progress notification, watch_lag.py).
- The probe reads the first subscribed cache's own prefix key, one that identity should be allowed to read; a
  "permission denied" still counts as alive, because etcd checks permissions after the linearizable read index
  (the member answered with a leader), so a cache watching a prefix its roles do not cover fails alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Callable, Hashable

import aetcd

from hivemesh.mesh.etcd import Endpoints, EtcdAccess, is_permission_denied, parse_endpoints
from hivemesh.mesh.etcd import client as etcd_client

log = logging.getLogger(__name__)

_CLOSE_LIMIT_S = 2.0


class ConnectionLostError(Exception):
    """The shared connection failed its liveness probe and was replaced."""


class Connection:
    """One client of a channel, from its creation until the probe retires it."""

    def __init__(self, client: aetcd.Client) -> None:
        self.client = client
        self.reason: BaseException | None = None
        self._lost = asyncio.Event()

    @property
    def retired(self) -> bool:
        return self._lost.is_set()

    async def lost(self) -> BaseException:
        """Wait until this connection is retired; return why."""
        await self._lost.wait()
        assert self.reason is not None
        return self.reason

    def _retire(self, reason: BaseException) -> None:
        self.reason = reason
        self._lost.set()


class _Member:
    __slots__ = ("on_alive", "probe_key")

    def __init__(self, probe_key: bytes, on_alive: Callable[[], None]) -> None:
        self.probe_key = probe_key
        self.on_alive = on_alive


class WatchChannel:
    """The shared client and probe of one (loop, endpoints, identity, probe settings); see the module doc."""

    def __init__(self, key: Hashable, endpoints: Endpoints, probe_interval_s: float, probe_timeout_s: float) -> None:
        self._key = key
        self._endpoints = endpoints
        self._interval = probe_interval_s
        self._timeout = probe_timeout_s
        self._members: dict[int, _Member] = {}
        self._next_id = 0
        self._conn: Connection | None = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._prober: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()  # retired clients being closed
        self._closed = False
        # Counters for tests and debugging.
        self.clients_opened = 0
        self.probes = 0
        self.probe_failures = 0

    @property
    def members(self) -> int:
        return len(self._members)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def current(self) -> Connection | None:
        """The live connection, if one is open."""
        return self._conn

    async def connection(self) -> Connection:
        """The live connection, opening a new client if the last one was retired (or none was opened yet)."""
        if self._closed:
            raise RuntimeError("the watch channel is closed")
        async with self._lock:
            conn = self._conn
            if conn is None:
                client = etcd_client(self._endpoints, timeout=max(1, round(self._timeout)))
                await client.connect()
                conn = self._conn = Connection(client)
                self.clients_opened += 1
            return conn

    def suspect(self, conn: Connection) -> None:
        """A cache's stream on conn failed in a way the connection may be to blame for: probe it now."""
        if conn is self._conn and not conn.retired:
            self._wake.set()

    def _join(self, probe_key: bytes, on_alive: Callable[[], None]) -> int:
        member_id = self._next_id
        self._next_id += 1
        self._members[member_id] = _Member(probe_key, on_alive)
        if self._prober is None:
            self._prober = asyncio.get_running_loop().create_task(
                self._probe_loop(), name=f"hivemesh-watch-probe:{self._endpoints}"
            )
        return member_id

    async def _leave(self, member_id: int) -> None:
        if self._members.pop(member_id, None) is None or self._members:
            return
        # The last member left: forget the channel first, so a cache starting meanwhile opens a fresh one.
        self._closed = True
        loop_channels = _channels.get(asyncio.get_running_loop())
        if loop_channels is not None and loop_channels.get(self._key) is self:
            del loop_channels[self._key]
        prober, self._prober = self._prober, None
        if prober is not None:
            prober.cancel()
            await asyncio.wait({prober}, timeout=_CLOSE_LIMIT_S)
        conn, self._conn = self._conn, None
        if conn is not None:
            self._retire(conn, ConnectionLostError("watch channel closed: its last cache stopped"))
        if self._closing:
            await asyncio.wait(self._closing, timeout=_CLOSE_LIMIT_S + 1)

    async def _probe_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            self._wake.clear()
            conn = self._conn
            if conn is None or not self._members:
                continue  # nothing open: the next cache to reconnect opens a client
            key = next(iter(self._members.values())).probe_key
            try:
                async with asyncio.timeout(self._timeout):
                    await conn.client.get(key)
            except Exception as exc:  # noqa: BLE001 - any failure or timeout: the connection is not trusted
                if not is_permission_denied(exc):  # refused after the read index: the member is alive
                    self.probe_failures += 1
                    self._retire(conn, ConnectionLostError(f"liveness probe failed: {exc!r}"))
                    continue
            self.probes += 1
            for member in list(self._members.values()):
                try:
                    member.on_alive()
                except Exception:
                    log.exception("watch liveness callback failed")

    def _retire(self, conn: Connection, reason: BaseException) -> None:
        if self._conn is conn:
            self._conn = None
        conn._retire(reason)  # every cache streaming on it reconnects now
        # Closed in a task of its own: neither the probe nor a stopping cache waits on a hung peer.
        closing = asyncio.get_running_loop().create_task(_close(conn.client))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)


class Subscription:
    """One cache's hold on a shared channel: `release()` it exactly once when the cache stops."""

    def __init__(self, channel: WatchChannel, member_id: int) -> None:
        self.channel = channel
        self._member_id: int | None = member_id

    async def release(self) -> None:
        member_id, self._member_id = self._member_id, None
        if member_id is not None:
            await self.channel._leave(member_id)


_channels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Hashable, WatchChannel]] = (
    weakref.WeakKeyDictionary()
)


def channel_key(endpoints: Endpoints, probe_interval_s: float, probe_timeout_s: float) -> Hashable:
    """What two caches must have in common to share a connection: endpoints, identity and probe settings."""
    eps = tuple(parse_endpoints(endpoints))
    identity: object = endpoints.tls if isinstance(endpoints, EtcdAccess) else None
    try:
        hash(identity)
    except TypeError:
        identity = ("by-id", id(identity))  # kept alive by the channel's endpoints while the channel lives
    return (eps, identity, probe_interval_s, probe_timeout_s)


def subscribe(
    endpoints: Endpoints,
    *,
    probe_interval_s: float,
    probe_timeout_s: float,
    probe_key: bytes,
    on_alive: Callable[[], None],
) -> Subscription:
    """Join (or open) this loop's channel for these endpoints, identity and probe settings."""
    loop = asyncio.get_running_loop()
    key = channel_key(endpoints, probe_interval_s, probe_timeout_s)
    loop_channels = _channels.setdefault(loop, {})
    channel = loop_channels.get(key)
    if channel is None:
        channel = loop_channels[key] = WatchChannel(key, endpoints, probe_interval_s, probe_timeout_s)
    return Subscription(channel, channel._join(probe_key, on_alive))


def open_channels() -> list[WatchChannel]:
    """This loop's open channels (for tests and debugging)."""
    return list(_channels.get(asyncio.get_running_loop(), {}).values())


async def _close(client: aetcd.Client) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(_CLOSE_LIMIT_S):
            await client.close()

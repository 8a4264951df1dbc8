"""A watch-fed, in-memory mirror of one etcd prefix: how the mesh reads etcd without waiting on it.

The call path only ever reads `PrefixCache.snapshot()`, an immutable mapping that a background task swaps
atomically after each applied watch response. The task lists the prefix once, then watches from the listed
revision + 1 and applies every event exactly once, in revision order:

- a broken stream or an etcd outage keeps the last snapshot (routing continues on last-known state); the task
  backs off (bounded exponential with jitter), reconnects and resumes from the last applied revision + 1, so
  nothing is missed and an event at or below that revision is never applied twice;
- a resume revision that etcd has compacted away is answered with a full re-list whose result replaces the
  snapshot in one swap (diffed, so `on_change` fires at most once), then a watch from the new revision + 1;
- a stream that hangs silently (a paused or black-holed member keeps the TCP connection open) is caught by a
  periodic linearizable `get` with a timeout on the same channel, after which the client is recreated;
- the client (one TLS connection) and that probe are shared by every cache of the process on the same etcd
  identity (watch_channel.py); the stream, revision, lists and snapshot are each cache's own;
- how far the snapshot is behind the store (`lag_revisions`, see watch_lag.py) is kept from every response's
  header; after each probe the cache asks etcd for a progress notification, so a quiet prefix in a busy store
  still learns that it is complete up to the store's revision (not at creation: see watch_lag.py on etcd#15220).

The watch talks to etcd's Watch RPC directly (aetcd's channel and stubs, not its `Watcher`): aetcd's watcher
hides response headers and compaction on create, and can wait forever for a watch that was never created.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Generic, TypeVar, cast

import aetcd
from aetcd import rpc

from hivemesh.mesh.errors import RegistryUnavailableError
from hivemesh.mesh.etcd import Endpoints, parse_endpoints
from hivemesh.mesh.watch_channel import Connection, Subscription, subscribe
from hivemesh.mesh.watch_lag import RevisionLag

log = logging.getLogger(__name__)

T = TypeVar("T")

_PUT = 0  # mvccpb.Event.EventType.PUT
_DELETE = 1
# Ask the serving member to cancel the watch when it loses its leader (what etcd's Go client does), so a
# partitioned member cannot keep us on a stream that will never deliver another event.
_REQUIRE_LEADER = (("hasleader", "true"),)


class _CompactedError(Exception):
    """etcd compacted the revision we asked to resume from: only a full re-list can recover."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (etcd keeps history from {compact_revision})")
        self.compact_revision = compact_revision


class _StreamError(Exception):
    """The watch stream ended, was cancelled by the server, or stopped answering."""


def _prefix_range_end(prefix: bytes) -> bytes:
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\x00"  # prefix of only 0xff bytes: watch to the end of the keyspace


def _key_str(key: bytes) -> str:
    return key.decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class WatchOptions:
    """Timing of a PrefixCache's liveness probe and reconnect backoff (defaults suit production)."""

    probe_interval_s: float = 1.0  # how often a linearizable get checks the (shared) channel is alive
    probe_timeout_s: float = 2.0  # a probe slower than this declares the stream dead
    backoff_initial_s: float = 0.1  # first reconnect delay; doubles per failure (with +-20% jitter)
    backoff_max_s: float = 2.0  # reconnect delay cap

    def __post_init__(self) -> None:
        if min(self.probe_interval_s, self.probe_timeout_s, self.backoff_initial_s) <= 0:
            raise ValueError("probe and backoff intervals must be positive")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")


class PrefixCache(Generic[T]):
    """A live, read-only mirror of every key under `prefix`, decoded by `decode(key, value)`.

    Keys of `snapshot()` are the full etcd keys as str. `decode` runs once per applied PUT (and, on a re-list,
    once per key whose revision changed); a value it rejects (raises) is logged and left out, never fatal.
    `decode_entry(key, value, create_revision)` takes its place where a value's meaning depends on which
    creation of its key it is (the registry's fencing revision). `on_change` runs synchronously after each swap,
    before `wait_for` waiters wake.
    """

    def __init__(
        self,
        etcd_endpoints: Endpoints,
        prefix: str,
        *,
        decode: Callable[[bytes, bytes], T] | None = None,
        decode_entry: Callable[[bytes, bytes, int], T] | None = None,
        on_change: Callable[[], None] | None = None,
        options: WatchOptions | None = None,
    ) -> None:
        parse_endpoints(etcd_endpoints)  # fail early on a malformed endpoint list
        if not prefix:
            raise ValueError("PrefixCache needs a non-empty prefix")
        opts = options or WatchOptions()
        self._endpoints = etcd_endpoints
        self._prefix = prefix.encode()
        self._range_end = _prefix_range_end(self._prefix)
        if decode is not None and decode_entry is not None:
            raise ValueError("give decode or decode_entry, not both")
        plain: Callable[[bytes, bytes], Any] = decode if decode is not None else (lambda _k, v: v)
        self._decode: Callable[[bytes, bytes, int], Any] = (
            decode_entry if decode_entry is not None else (lambda k, v, _created: plain(k, v)))
        self._on_change = on_change
        self._probe_interval = opts.probe_interval_s
        self._probe_timeout = opts.probe_timeout_s
        self._backoff_initial = opts.backoff_initial_s
        self._backoff_max = opts.backoff_max_s

        self._data: dict[str, T] = {}
        self._view: Mapping[str, T] = MappingProxyType(self._data)
        self._mod_revs: dict[str, int] = {}  # every key seen, decoded or not -> its mod_revision
        self._revision = 0
        self._lag = RevisionLag()
        self._requests: asyncio.Queue[Any] | None = None  # the open watch stream's requests, while one is open
        self._generation = 0
        self._connected = False
        self._created = False
        self._failures = 0
        self._last_error: BaseException | None = None
        self._loaded = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._subscription: Subscription | None = None
        # Counters for tests, metrics and debugging.
        self.events_applied = 0
        self.duplicates_skipped = 0
        self.lists = 0
        self.reconnects = 0

    # --- read side: all O(1), never touches etcd ------------------------------------------------------------
    def snapshot(self) -> Mapping[str, T]:
        """The current immutable mapping (a new object after every change; never mutated once published)."""
        return self._view

    @property
    def prefix(self) -> str:
        return self._prefix.decode()

    @property
    def revision(self) -> int:
        """The etcd revision the snapshot reflects (last applied event, or the last full list)."""
        return self._revision

    @property
    def heard_revision(self) -> int:
        """The highest store revision any etcd response to this cache reported."""
        return self._lag.heard

    @property
    def complete_revision(self) -> int:
        """The revision up to which the snapshot is known to hold every event under the prefix."""
        return self._lag.complete

    @property
    def lag_revisions(self) -> int:
        """heard_revision - complete_revision: 0 when caught up (see watch_lag.py for what it cannot see)."""
        return self._lag.lag

    @property
    def generation(self) -> int:
        """Incremented on every published change."""
        return self._generation

    @property
    def connected(self) -> bool:
        """True while a watch stream is established."""
        return self._connected

    @property
    def loaded(self) -> bool:
        """True once the first full list has been applied."""
        return self._loaded.is_set()

    @property
    def last_error(self) -> BaseException | None:
        return self._last_error

    async def wait_for(self, predicate: Callable[[Mapping[str, T]], bool], timeout: float) -> bool:
        """Wait until predicate(snapshot) holds; False if it still does not after timeout seconds."""
        deadline = time.monotonic() + timeout
        while True:
            changed = self._changed  # captured before testing, so a change in between is never missed
            if predicate(self._view):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                async with asyncio.timeout(remaining):
                    await changed.wait()
            except TimeoutError:
                return bool(predicate(self._view))

    # --- lifecycle ------------------------------------------------------------------------------------------
    async def start(self, timeout: float = 10.0, *, wait: bool = True) -> None:
        """Start the background list+watch task.

        With wait=True, return once the first list is loaded, or stop and raise RegistryUnavailableError if
        etcd cannot be reached within timeout. With wait=False, return at once; the task keeps trying.
        """
        if self._stopped:
            raise RuntimeError("a stopped PrefixCache cannot be restarted; create a new one")
        if self._task is None:
            self._subscription = subscribe(
                self._endpoints, probe_interval_s=self._probe_interval, probe_timeout_s=self._probe_timeout,
                probe_key=self._prefix, on_alive=self._request_progress,
            )
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"hivemesh-watch:{self.prefix}"
            )
        if not wait:
            return
        try:
            async with asyncio.timeout(timeout):
                await self._loaded.wait()
        except TimeoutError:
            err = self._last_error
            await self.stop()
            raise RegistryUnavailableError(
                f"etcd at {self._endpoints} not reachable within {timeout:g} s: {err!r}",
                metadata={"endpoints": str(self._endpoints)},
            ) from err

    async def stop(self) -> None:
        """Cancel the background task and leave the shared channel (the last cache to leave closes it).
        Idempotent; the last snapshot stays readable."""
        self._stopped = True
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            await subscription.release()
        self._connected = False

    async def __aenter__(self) -> PrefixCache[T]:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- background task ------------------------------------------------------------------------------------
    async def _run(self) -> None:
        backoff = self._backoff_initial
        need_list = True
        assert self._subscription is not None
        channel = self._subscription.channel
        while not self._stopped:
            self._created = False
            conn: Connection | None = None
            try:
                conn = await channel.connection()
                if need_list:
                    await self._list(conn.client)
                    need_list = False
                    backoff = self._backoff_initial
                await self._watch(conn)
            except asyncio.CancelledError:
                raise
            except _CompactedError as exc:
                log.warning(
                    "watch of %s from revision %d: %s; re-listing", self.prefix, self._revision + 1, exc
                )
                self._last_error = exc
                need_list = True
                backoff = self._backoff_initial
            except Exception as exc:  # noqa: BLE001 - any failure: keep the snapshot, back off, retry
                self._last_error = exc
                # One warning per outage, not one per retry; the resume is logged when the watch is back.
                level = logging.WARNING if self._failures == 0 else logging.DEBUG
                log.log(level, "watch of %s broke (%r); retrying on the last snapshot", self.prefix, exc)
                self._failures += 1
                if conn is not None:
                    channel.suspect(conn)  # maybe the connection's fault: the shared probe checks it now
            finally:
                self._connected = False
            if self._created:
                backoff = self._backoff_initial  # the stream worked: retry promptly, as after a first failure
            self.reconnects += 1
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, self._backoff_max)

    async def _list(self, c: aetcd.Client) -> None:
        """Replace the snapshot with a full list, in one swap; only changed keys are decoded."""
        async with asyncio.timeout(self._probe_timeout + 3):
            result = await c.get_prefix(self._prefix)
        new_revs: dict[str, int] = {}
        new_data: dict[str, T] = {}
        changed = False
        for kv in result:
            key = _key_str(kv.key)
            new_revs[key] = kv.mod_revision
            if self._mod_revs.get(key) == kv.mod_revision:
                if key in self._data:
                    new_data[key] = self._data[key]
                continue
            changed = True
            value = self._decode_value(kv.key, kv.value, kv.create_revision)
            if value is not _SKIP:
                new_data[key] = cast(T, value)
        if new_revs.keys() != self._mod_revs.keys():
            changed = True
        self.lists += 1
        self._revision = int(result.header.revision)
        self._lag.complete_to(self._revision)  # a list is a consistent read of the whole prefix at its revision
        self._mod_revs = new_revs
        if changed:
            self._publish(new_data)
        self._loaded.set()

    async def _watch(self, conn: Connection) -> None:
        """Run one watch stream from revision + 1 until it fails or the shared probe retires its connection."""
        requests: asyncio.Queue[Any] = asyncio.Queue()

        async def request_stream() -> AsyncIterator[Any]:
            while True:
                req = await requests.get()
                if req is None:
                    return
                yield req

        requests.put_nowait(
            rpc.WatchRequest(
                create_request=rpc.WatchCreateRequest(
                    key=self._prefix, range_end=self._range_end, start_revision=self._revision + 1
                )
            )
        )
        self._requests = requests
        c = conn.client
        metadata = tuple(c.metadata or ()) + _REQUIRE_LEADER
        call = rpc.WatchStub(c.channel).Watch(request_stream(), metadata=metadata)
        reader = asyncio.create_task(self._read(call))
        lost = asyncio.create_task(conn.lost())
        try:
            done, _ = await asyncio.wait({reader, lost}, return_when=asyncio.FIRST_COMPLETED)
            if lost in done:
                raise _StreamError(f"shared etcd connection replaced: {lost.result()}")
            reader.result()  # re-raise what ended it
            raise _StreamError("watch stream closed by the server")
        finally:
            for t in (reader, lost):
                t.cancel()
            call.cancel()
            self._requests = None
            requests.put_nowait(None)
            await asyncio.gather(reader, lost, return_exceptions=True)

    async def _read(self, call: Any) -> None:
        stream = call.__aiter__()
        try:
            async with asyncio.timeout(self._probe_timeout + 3):
                first = await stream.__anext__()
        except StopAsyncIteration:
            raise _StreamError("watch stream closed before the watch was created") from None
        except TimeoutError:
            raise _StreamError("etcd did not confirm the watch in time") from None
        self._handle(first)
        async for resp in stream:
            self._handle(resp)

    def _handle(self, resp: Any) -> None:
        if resp.compact_revision:
            raise _CompactedError(int(resp.compact_revision))
        if resp.canceled:
            raise _StreamError(f"watch cancelled by etcd: {resp.cancel_reason or 'no reason given'}")
        self._lag.hear(int(resp.header.revision))
        if resp.created:
            self._created = self._connected = True
            self._last_error = None
            if self._failures:
                log.warning("watch of %s resumed from revision %d after %d failed attempts",
                            self.prefix, self._revision + 1, self._failures)
            self._failures = 0
        if resp.events:
            # Only up to the last event: a batch of a backlog carries the store's current revision in its header.
            self._apply(resp.events)
            self._lag.complete_to(self._revision)
        elif not resp.created:
            # A progress notification: etcd >= 3.5.8 sends one only to a watcher that has delivered everything up
            # to it; older etcd may let it overtake a backlog (etcd#15220), so the lag can read low, never high.
            self._lag.complete_to(int(resp.header.revision))

    def _request_progress(self) -> None:
        """Ask etcd for a progress notification on the open stream (ignored by etcd while we are catching up)."""
        if self._requests is not None:
            self._requests.put_nowait(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))

    def _apply(self, events: Sequence[Any]) -> None:
        """Apply one watch response's events (one or more whole revisions) and publish them in one swap."""
        new_data: dict[str, T] | None = None
        last = self._revision
        for ev in events:
            rev = int(ev.kv.mod_revision)
            if rev <= self._revision:
                self.duplicates_skipped += 1  # already applied (or covered by a later list): never twice
                continue
            if new_data is None:
                new_data = dict(self._data)
            key = _key_str(ev.kv.key)
            if ev.type == _DELETE:
                new_data.pop(key, None)
                self._mod_revs.pop(key, None)
            else:
                self._mod_revs[key] = rev
                value = self._decode_value(ev.kv.key, ev.kv.value, ev.kv.create_revision)
                if value is _SKIP:
                    new_data.pop(key, None)
                else:
                    new_data[key] = cast(T, value)
            self.events_applied += 1
            last = max(last, rev)
        self._revision = last
        if new_data is not None:
            self._publish(new_data)

    def _decode_value(self, key: bytes, value: bytes, created: int) -> object:
        try:
            return self._decode(key, value, int(created))
        except Exception as exc:  # noqa: BLE001 - a bad value must never stop the watch
            log.warning("skipping undecodable value at %s: %r", _key_str(key), exc)
            return _SKIP

    def _publish(self, new_data: dict[str, T]) -> None:
        self._data = new_data
        self._view = MappingProxyType(new_data)
        self._generation += 1
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:
                log.exception("on_change callback of the %s cache failed", self.prefix)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


_SKIP = object()


async def cancel_and_wait(task: asyncio.Task[None], limit_s: float = 5.0) -> None:
    """Cancel a background task and wait for it, bounded; our own caller's cancellation still propagates."""
    task.cancel()
    await asyncio.wait({task}, timeout=limit_s)
    if not task.done():
        log.warning("background task %s did not stop within %.0f s", task.get_name(), limit_s)
    elif not task.cancelled() and task.exception() is not None:
        log.warning("background task %s ended with %r", task.get_name(), task.exception())

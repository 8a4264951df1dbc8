"""Shipping a spool to the control plane: in order, in batches, resuming by sequence number.

The shipper resumes from the last sequence number the control plane holds for this spool's source (asked on
every (re)connect), so nothing is lost and nothing is sent twice; the control plane also drops any record at or
below what it holds. While the control plane is down the spool simply grows, and is replayed when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Final, Protocol

import grpc

from hivemesh.mesh.audit.spool import Spool
from hivemesh.mesh.errors import HivemeshError

log = logging.getLogger(__name__)

_PASSING: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED})
"""Codes of a failure that passes by itself (the control plane down, busy, or changing leader): logged at debug."""

GROW_AT: Final = 32
"""A batch of at least this many records means records arrive faster than the pause lets them gather."""
BATCH: Final = 1000
"""Records per AppendBatch at most: the control plane's own bound (`MAX_BATCH`). Each batch costs the control plane
and etcd ~3 ms whatever its size, on the machines the agents may share: under load, 1,000 a batch (with
MAX_LINGER_S) made a 64 KiB echo at 16 in flight 1.03-1.08x the calls/s of 500 (BENCHMARKS.md, 5 Dec)."""
MAX_LINGER_S: Final = 0.4
"""The longest pause between batches under load: records reach the control plane within about this (a waiter,
`Shipper.wait_shipped`, cuts it short); in the meantime they are in the spool, written before their answers."""


class Linger:
    """How long the next batch gathers after one that did not fill `batch` (pure: testable without a clock).

    Each AppendBatch costs the control plane and etcd about as much as ~60 of its records (one round trip, one
    etcd transaction): under load the pause doubles after every batch of at least GROW_AT records, up to
    max_s, so batches carry more records; a smaller batch sets it back to base_s. Someone waiting for the
    records (`Shipper.wait_shipped`, a draining stop) cuts any pause short."""

    def __init__(self, base_s: float, max_s: float) -> None:
        self.base_s = base_s
        self.max_s = max(base_s, max_s)
        self.now_s = base_s

    def after(self, shipped: int) -> float:
        """The pause after a batch of shipped records."""
        self.now_s = min(self.now_s * 2, self.max_s) if shipped >= GROW_AT else self.base_s
        return self.now_s


def pauses_after(shipped: int, backlog: int, batch: int) -> bool:
    """Whether the shipper pauses (`Linger`) after a batch of shipped records, backlog records still unshipped:
    unless a full batch waits (a backlog, as after an outage, goes out at full speed). A full batch with a few
    records behind it pauses too: sent at once, those few made a small batch of their own every round, each
    costing the control plane and etcd as much as a full one (pure: testable without a clock)."""
    return shipped < batch or backlog < batch


class AuditSink(Protocol):
    """The control plane's side of shipping (implemented by ControlPlaneClient)."""

    async def audit_source_state(self, source: str) -> int: ...

    async def audit_append(self, source: str, records: Sequence[bytes]) -> int: ...


class Shipper:
    """Ships a spool to the control plane in order; resumes by sequence number; retries with backoff."""

    def __init__(
        self,
        spool: Spool,
        sink: Callable[[], AuditSink],
        *,
        batch: int = BATCH,
        linger_s: float = 0.05,
        max_linger_s: float = MAX_LINGER_S,
        backoff_max_s: float = 5.0,
    ) -> None:
        self.spool = spool
        self._sink = sink
        self._batch = batch
        self._linger = linger_s
        self.linger = Linger(linger_s, max_linger_s)
        self._backoff_max = backoff_max_s
        self._wake = asyncio.Event()
        self._hurry = asyncio.Event()
        """Set by whoever waits for the records: the pause between batches ends now."""
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.shipped = 0
        self.failures = 0
        self.last_error: str = ""
        spool.add_listener(self._notify)

    def _notify(self) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake.set()
        else:
            loop.call_soon_threadsafe(self._wake.set)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run())

    async def stop(self, *, drain_s: float = 2.0) -> None:
        """Try to ship what is pending (bounded by drain_s), then stop."""
        if self._task is None:
            return
        if drain_s > 0 and self.spool.pending > 0:
            deadline = time.monotonic() + drain_s
            while self.spool.pending > 0 and time.monotonic() < deadline and not self._task.done():
                self._wake.set()
                self._hurry.set()
                await asyncio.sleep(0.02)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def wait_shipped(self, seq: int | None = None, timeout: float = 10.0) -> bool:
        """Wait until the control plane holds every record up to seq (default: the current head)."""
        target = self.spool.seq if seq is None else seq
        deadline = time.monotonic() + timeout
        while self.spool.acked < target:
            if time.monotonic() >= deadline:
                return False
            self._wake.set()
            self._hurry.set()
            await asyncio.sleep(0.02)
        return True

    async def _pause(self, seconds: float) -> None:
        self._hurry.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._hurry.wait(), seconds)

    async def _run(self) -> None:
        acked: int | None = None
        delay = 0.1
        refused = False  # the control plane refused a batch, and none has been stored since: warned already
        while True:
            try:
                sink = self._sink()
                if acked is None:
                    acked = await sink.audit_source_state(self.spool.source)
                    if acked > self.spool.seq:
                        log.error(
                            "the control plane holds %d records of audit source %s but the spool only %d",
                            acked, self.spool.source, self.spool.seq,
                        )
                    self.spool.ack(min(acked, self.spool.seq))
                if acked >= self.spool.seq:
                    self._wake.clear()
                    if acked >= self.spool.seq:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                        await self._pause(self._linger)
                    continue
                lines = self.spool.read(acked + 1, max_records=self._batch)
                if not lines:
                    # The records after `acked` were deleted: the control plane lost what it had acknowledged.
                    log.error("audit records after %d are no longer in the spool; cannot resend them", acked)
                    await asyncio.sleep(1.0)
                    acked = None
                    continue
                acked = await sink.audit_append(self.spool.source, lines)
                refused = False
                self.spool.ack(acked)
                self.shipped += len(lines)
                delay = 0.1
                if pauses_after(len(lines), self.spool.seq - acked, self._batch):
                    # Caught up, or nearly: let the next batch gather (`Linger`), not one record per round
                    # trip (under steady load that was a tight loop of tiny batches, each a gRPC call + an ack).
                    await self._pause(self.linger.after(len(lines)))
            except asyncio.CancelledError:
                raise
            except HivemeshError as exc:
                self.failures += 1
                self.last_error = f"{exc.reason}: {exc.message}"
                if exc.code in _PASSING or refused:
                    log.debug("audit shipping failed (%s); retrying in %.1f s", self.last_error, delay)
                else:  # refused, not unreachable: it will not pass by itself (a clock far ahead, say); said once
                    refused = True  # until a batch is stored (the message may change each time: "N s ahead")
                    log.warning("the control plane refused this node's audit records (%s); they stay in the spool "
                                "and are sent again with backoff", self.last_error)
                acked = None  # re-ask where to resume: the control plane may have stored the batch anyway
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff_max)
            except Exception as exc:  # noqa: BLE001 - the shipper must outlive any one failure
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("audit shipping failed: %s", self.last_error)
                acked = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff_max)

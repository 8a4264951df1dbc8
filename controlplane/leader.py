"""Leader election among control-plane replicas: one leased etcd key, created only if absent.

Several replicas serve the API at once (tokens, certificates, joins: any replica answers), but a few duties must
run once for the whole mesh: retention sweeps and compaction, retiring signing keys from the published key set.
The replica whose transaction created `keyspace.CONTROLPLANE_LEADER` (compare: version == 0) under its own lease
leads while it keeps that lease alive; the key's create revision is the term, a fencing token that grows with
every new leader.

Stepping down does not wait for etcd: `LeaseClock` counts the lease down on this process's monotonic clock from
the moment each keepalive was *sent* (etcd restarts the TTL on receipt, later), minus a margin. A replica that
cannot renew (etcd paused, a partition, or the process itself frozen) stops acting as leader before etcd can
expire its key, so no other replica can lead while it still believes it does. The other replicas poll the key
and create it as soon as it is gone: takeover within the TTL plus one poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import aetcd

from hivemesh.mesh.etcd import Endpoints, parse_endpoints
from hivemesh.mesh.keyspace import CONTROLPLANE_LEADER
from hivemesh.mesh.lease_rescue import refresh_on_members

log = logging.getLogger(__name__)

MIN_TTL_S: Final = 2
"""etcd's minimum lease TTL."""


@dataclass
class LeaseClock:
    """Whether this replica may act as leader, judged from local monotonic time alone (pure, no I/O).

    `granted(sent_at)`/`renewed(sent_at, ttl)` move the deadline to sent_at + ttl - margin; `lost()` clears it.
    `leading(now)` is true strictly before the deadline.
    """

    ttl_s: float
    margin_s: float = 0.0
    valid_until: float = 0.0

    def __post_init__(self) -> None:
        if self.ttl_s < MIN_TTL_S:
            raise ValueError(f"the leader lease TTL must be >= {MIN_TTL_S} s, got {self.ttl_s}")
        if not self.margin_s:
            self.margin_s = max(0.2, self.ttl_s / 5)
        if not 0 < self.margin_s < self.ttl_s:
            raise ValueError("the margin must be between 0 and the TTL")

    def granted(self, sent_at: float) -> None:
        self.valid_until = sent_at + self.ttl_s - self.margin_s

    def renewed(self, sent_at: float, ttl_s: float) -> None:
        """A keepalive sent at sent_at was answered with ttl_s left (<= 0: the lease is gone)."""
        if ttl_s <= 0:
            self.lost()
        else:
            self.valid_until = max(self.valid_until, sent_at + ttl_s - self.margin_s)

    def lost(self) -> None:
        self.valid_until = 0.0

    def leading(self, now: float) -> bool:
        return now < self.valid_until

    def left(self, now: float) -> float:
        """Seconds of leadership left (0 when not leading)."""
        return max(0.0, self.valid_until - now)


class LeaderElection:
    """Campaign for, hold and give up the leader key; `is_leader` is true only while the lease clock says so.

    `on_change(leading)` is called on every transition (from the election task). `stop()` revokes the lease, so
    a clean shutdown hands leadership over at once rather than after the TTL.
    """

    def __init__(
        self,
        etcd: Any,
        replica_id: str,
        *,
        ttl_s: int = 10,
        poll_s: float | None = None,
        on_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        members: Endpoints | None = None,
    ) -> None:
        if not isinstance(ttl_s, int):
            raise ValueError(f"the leader lease TTL must be whole seconds, got {ttl_s!r}")
        self.etcd = etcd
        self.replica_id = replica_id
        self.ttl_s = ttl_s
        self.lease_clock = LeaseClock(float(ttl_s))
        self._poll_s = poll_s if poll_s is not None else min(1.0, ttl_s / 4)
        self._renew_s = ttl_s / 4
        self._op_timeout = max(0.5, self.lease_clock.margin_s)
        self._on_change = on_change
        self._clock = clock
        self._members = members if members is not None and len(parse_endpoints(members)) > 1 else None
        """Every etcd member, for a keepalive that went to one that cannot answer (`lease_rescue`)."""
        self.rescues = 0
        self._lease: int | None = None
        self._was_leading = False
        self.term = 0
        """Create revision of the leader key while this replica holds it: grows with every new leader."""
        self.leader = ""
        """The replica id last seen holding the key ("" unknown)."""
        self.terms_won = 0
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def is_leader(self) -> bool:
        return self._lease is not None and self.lease_clock.leading(self._clock())

    def fence(self) -> list[Any]:
        """Transaction compares that hold only while this replica's term is current (empty when not leading):
        an etcd write guarded by them cannot land after another replica took over."""
        if not self.is_leader:
            return []
        t = self.etcd.transactions
        return [t.create(CONTROLPLANE_LEADER.encode()) == self.term]

    async def start(self) -> None:
        """One campaign now (a lone replica leads before its duties start), then keep at it in the background."""
        with contextlib.suppress(Exception):
            await self._step()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="hivemesh-leader-election")

    async def stop(self) -> None:
        self._stopped = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        lease, self._lease = self._lease, None
        self.lease_clock.lost()
        self._notify()
        if lease is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self.etcd.revoke_lease(lease)

    async def _run(self) -> None:
        while not self._stopped:
            delay = self._poll_s
            try:
                delay = await self._step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - etcd trouble: the lease clock decides when to step down
                log.debug("leader election step failed: %r", exc)
            self._notify()
            if self._lease is not None:  # wake no later than the deadline, to step down on time
                delay = min(delay, max(0.01, self.lease_clock.left(self._clock())))
            await asyncio.sleep(delay)

    async def _step(self) -> float:
        """One round: renew while leading, else campaign. Returns how long to wait before the next."""
        if self._lease is not None:
            if not self.lease_clock.leading(self._clock()):
                await self._give_up("its lease ran out before a keepalive came back")
                return 0.0
            sent = self._clock()
            try:
                async with asyncio.timeout(self._op_timeout):
                    reply = await self.etcd.refresh_lease(self._lease)
                ttl = float(reply.TTL) if reply is not None else 0.0
            except (TimeoutError, aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError):
                # Round robin may have handed the keepalive to a member cut off or frozen: ask every member at
                # once within the leadership left, as the registry does, so a healthy leader keeps its term.
                left = self.lease_clock.left(self._clock())
                if self._members is None or left <= 0:
                    raise
                sent = self._clock()
                ttl = float(await refresh_on_members(self._members, self._lease, left))
                self.rescues += 1
            self.lease_clock.renewed(sent, ttl)
            if ttl <= 0:
                await self._give_up("etcd says its lease is gone")
                return 0.0
            return self._renew_s
        sent = self._clock()
        async with asyncio.timeout(self._op_timeout):
            lease = await self.etcd.lease(self.ttl_s)
        t = self.etcd.transactions
        key = CONTROLPLANE_LEADER.encode()
        try:
            async with asyncio.timeout(self._op_timeout):
                ok, responses = await self.etcd.transaction(
                    compare=[t.version(key) == 0],
                    success=[t.put(key, self.replica_id.encode(), lease=lease.id)],
                    failure=[t.get(key)],
                )
        except BaseException:
            with contextlib.suppress(Exception):
                await self.etcd.revoke_lease(lease.id)
            raise
        if ok:
            self._lease = lease.id
            self.term = int(responses[0].response_put.header.revision)
            self.lease_clock.granted(sent)
            self.leader = self.replica_id
            self.terms_won += 1
            log.warning("control-plane replica %s leads (term %d, lease TTL %d s)", self.replica_id, self.term,
                        self.ttl_s)
            return self._renew_s
        with contextlib.suppress(Exception):
            await self.etcd.revoke_lease(lease.id)
        held = responses[0][0] if responses and responses[0] else None
        self.leader = held[0].decode(errors="replace") if held is not None else ""
        return self._poll_s

    async def _give_up(self, why: str) -> None:
        lease, self._lease = self._lease, None
        self.lease_clock.lost()
        log.warning("control-plane replica %s steps down: %s", self.replica_id, why)
        self._notify()
        if lease is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._op_timeout):
                    await self.etcd.revoke_lease(lease)

    def _notify(self) -> None:
        leading = self.is_leader
        if leading != self._was_leading:
            self._was_leading = leading
            if self._on_change is not None:
                self._on_change(leading)


async def leader_duty(what: str, leading: Callable[[], bool], run_once: Callable[[], Any], every_s: float) -> None:
    """Run a once-per-mesh duty every every_s while this replica leads, forever (cancel to stop). A failed pass
    (etcd trouble, mostly) is logged and tried again next time: one bad pass never ends the duty."""
    while True:
        try:
            if leading():
                await run_once()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - try again next pass
            log.warning("%s pass failed: %r", what, exc)
        await asyncio.sleep(every_s)

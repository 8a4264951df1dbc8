"""Token budgets across replicas: every agent instance (SDK server or sidecar) publishes what each caller spent,
and counts all of it.

Without this, each replica of an agent counts spend on its own, and N replicas let a caller spend up to N times
a budget. With it:
- each instance puts its own running total per (rule, caller, window) at
  `/hivemesh/budgets/spend/<rule>/<window>/<caller>/<instance>` (names base64url-encoded), off the call path,
  at most every `flush_interval_s`;
- every instance mirrors that prefix with a watch and checks a caller against the sum over all instances;
- each total lives under a lease that ends with its window (plus a minute), so spend by a replica that died
  still counts until the window is over, and nothing has to be cleaned up.

The check reads memory only. What another replica spent reaches this one after its next flush plus the watch
delivery (about a millisecond on loopback), so a caller hammering several replicas at once can overshoot a
budget by what they spend in that time. While etcd is unreachable, totals stay local and are published later.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Final

import aetcd

from hivemesh.mesh.etcd import PREFIX, Endpoints
from hivemesh.mesh.etcd import client as etcd_client
from hivemesh.mesh.watch import PrefixCache, cancel_and_wait

log = logging.getLogger(__name__)

SPEND_PREFIX: Final = PREFIX + "budgets/spend/"
_LEASE_SLACK_S: Final = 60

SpendKey = tuple[str, str, int]
"""(rule name, caller, window index), as `TokenBudgets` counts them."""


def _enc(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def _dec(text: str) -> str:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()


def writer_prefix(agent: str) -> str:
    """Where agent's instances publish their spend: only that agent's etcd user may write there
    (`mesh/etcd_roles.py`), every agent may read all of SPEND_PREFIX (the totals it must add up)."""
    return f"{SPEND_PREFIX}{agent}/"


def spend_key(key: SpendKey, instance: str, agent: str) -> str:
    rule, caller, window = key
    return f"{writer_prefix(agent)}{_enc(rule)}/{window}/{_enc(caller)}/{_enc(instance)}"


def parse_spend_key(etcd_key: str) -> tuple[SpendKey, str]:
    """(spend key, instance) of an etcd key under SPEND_PREFIX; ValueError if it is not one."""
    parts = etcd_key.removeprefix(SPEND_PREFIX).split("/")
    if not etcd_key.startswith(SPEND_PREFIX) or len(parts) != 5 or not parts[2].isdigit():
        raise ValueError(f"not a budget spend key: {etcd_key!r}")
    return (_dec(parts[1]), _dec(parts[3]), int(parts[2])), _dec(parts[4])


def _decode_total(_key: bytes, value: bytes) -> int:
    total = int(value)
    if total < 0:
        raise ValueError("a spend total cannot be negative")
    return total


class SpendLedger:
    """This instance's view of every instance's spend (see the module docstring)."""

    def __init__(
        self,
        etcd_endpoints: Endpoints,
        instance: str,
        *,
        agent: str,
        flush_interval_s: float = 0.25,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """agent: whose instance this is; its totals go under that agent's own prefix (writer_prefix)."""
        self._endpoints = etcd_endpoints
        self.instance = instance
        self.agent = agent
        self._flush_interval = flush_interval_s
        self._clock = clock
        self._others: dict[SpendKey, int] = {}
        self._dirty: dict[SpendKey, tuple[int, float]] = {}
        self._leases: dict[int, int] = {}  # window end (whole seconds) -> lease id
        self._cache: PrefixCache[int] | None = None
        self._client: aetcd.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.published = 0
        """Totals put into etcd so far."""
        self.failures = 0
        """Flushes that failed (etcd unreachable): the totals stayed pending and were tried again."""

    async def start(self, timeout: float = 10.0) -> None:
        """Mirror everyone's totals (waits for the first listing, bounded), then publish ours in the background."""
        self._cache = PrefixCache(self._endpoints, SPEND_PREFIX, decode=_decode_total, on_change=self._rebuild)
        await self._cache.start(timeout)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"hivemesh-budgets:{self.instance}")

    async def stop(self, *, drain_s: float = 2.0) -> None:
        """Publish what is pending (bounded), then stop; the totals stay in etcd until their windows end."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        if self._dirty:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(drain_s):
                    await self._flush()
        if self._cache is not None:
            await self._cache.stop()
            self._cache = None
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    def others(self, key: SpendKey) -> int:
        """Tokens the other instances spent on key, as last published."""
        return self._others.get(key, 0)

    def publish(self, key: SpendKey, total: int, window_end: float) -> None:
        """This instance's total for key is now total (published at the next flush)."""
        self._dirty[key] = (total, window_end)
        self._wake.set()

    def _rebuild(self) -> None:
        assert self._cache is not None
        sums: dict[SpendKey, int] = {}
        for etcd_key, total in self._cache.snapshot().items():
            try:
                key, instance = parse_spend_key(etcd_key)
            except ValueError:
                continue
            if instance != self.instance:
                sums[key] = sums.get(key, 0) + total
        self._others = sums

    async def _run(self) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._flush()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - publishing is best effort: calls never wait on it
                failures += 1
                self.failures += 1
                log.log(logging.DEBUG if failures > 1 else logging.WARNING,
                        "cannot publish token budget spend: %r", exc)
                await self._reset_client()
                self._wake.set()  # try again, after a back-off
                await asyncio.sleep(min(self._flush_interval * 2 ** failures, 5.0))
                continue
            await asyncio.sleep(self._flush_interval)

    async def _flush(self) -> None:
        if self._client is None:
            self._client = etcd_client(self._endpoints, timeout=2)
            await self._client.connect()
        c = self._client
        pending, self._dirty = self._dirty, {}
        try:
            for key, (total, window_end) in pending.items():
                async with asyncio.timeout(3.0):
                    lease = await self._lease_for(c, window_end)
                    await c.put(spend_key(key, self.instance, self.agent).encode(), str(total).encode(), lease=lease)
                self.published += 1
        except BaseException:
            for key, value in pending.items():  # keep what was not sent; a newer total wins
                self._dirty.setdefault(key, value)
            raise

    async def _lease_for(self, c: aetcd.Client, window_end: float) -> int:
        end = math.ceil(window_end)
        lease = self._leases.get(end)
        if lease is None:
            ttl = max(int(end - self._clock()) + _LEASE_SLACK_S, 10)
            lease = (await c.lease(ttl)).id
            self._leases = {e: lid for e, lid in self._leases.items() if e > self._clock()}
            self._leases[end] = lease
        return lease

    async def _reset_client(self) -> None:
        client, self._client = self._client, None
        self._leases = {}  # a lease granted through a lost connection may be gone: grant again
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

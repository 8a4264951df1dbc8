"""The registry view's watch lag against a real etcd: 0 when caught up, and it follows the store's revision
even when every write lands outside the watched prefix (progress notifications, asked for after each probe)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aetcd

from hivemesh.mesh.etcd import EtcdServer
from hivemesh.mesh.registry import AGENTS_PREFIX, RegistryView
from hivemesh.mesh.watch import WatchOptions

FAST = WatchOptions(probe_interval_s=0.2, probe_timeout_s=0.5, backoff_initial_s=0.05, backoff_max_s=0.3)
ELSEWHERE = "/hivemesh/test-watch-lag-elsewhere/"


async def _until(cond: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    """Poll cond until it holds or timeout_s passes (bounded; no fixed wait)."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def _store_revision(etcd: aetcd.Client) -> int:
    return int((await etcd.get_prefix(ELSEWHERE.encode())).header.revision)


async def test_view_lag_is_zero_when_caught_up_and_follows_the_store(
    etcd: aetcd.Client, etcd_server: EtcdServer
) -> None:
    view = RegistryView(etcd_server.access, options=FAST)
    await view.start()
    cache = view.cache
    try:
        # Caught up: what the view heard is the store's revision and it is complete up to it.
        store = await _store_revision(etcd)
        assert await _until(lambda: cache.heard_revision >= store and cache.lag_revisions == 0)
        assert cache.complete_revision >= store

        # Writes outside the prefix give the view no events; it still learns the store moved and that it
        # missed nothing (without progress notifications heard would stay at the old revision).
        for i in range(5):
            await etcd.put(f"{ELSEWHERE}{i}".encode(), b"x")
        moved = await _store_revision(etcd)
        assert moved >= store + 5
        assert await _until(lambda: cache.complete_revision >= moved), (cache.heard_revision, moved)
        assert cache.lag_revisions == 0 and cache.heard_revision >= moved

        # Writes inside the prefix (undecodable, so skipped, but still revisions the view must apply).
        for i in range(3):
            await etcd.put(f"{AGENTS_PREFIX}lag-{i}".encode(), b"not an instance")
        inside = await _store_revision(etcd)
        assert await _until(lambda: cache.complete_revision >= inside and cache.lag_revisions == 0)
        assert cache.revision >= inside  # the events themselves were applied, not only announced
    finally:
        await view.stop()

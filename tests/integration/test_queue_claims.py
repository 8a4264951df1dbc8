"""Who delivers a held call, on real etcd: two nodes of one identity (two `CallQueue`s on one prefix, as two
sidecar replicas or a caller and its restart) send each held call exactly once; a node that dies mid-delivery
(its claim lease lapses) leaves the call failed OUTCOME_UNKNOWN by the other, never resent, and its late answer
does not overwrite that outcome."""

from __future__ import annotations

import asyncio
from typing import Any

from hivemesh.mesh.errors import DeliveryOutcomeUnknownError
from hivemesh.mesh.queue import CLAIM_SUFFIX, DELIVERING, DONE, FAILED, CallQueue
from tests.support.orch_env import wait_until

OWNER = "client-claims"


async def test_each_held_call_is_sent_once_and_a_lost_delivery_is_not_resent(etcd: Any) -> None:
    release = asyncio.Event()
    sent_a: list[bytes] = []
    sent_b: list[bytes] = []

    async def stuck(raw: bytes, capability: str, key: str, timeout: float | None) -> bytes:
        sent_a.append(raw)
        await release.wait()
        return b"late"

    async def quick(raw: bytes, capability: str, key: str, timeout: float | None) -> bytes:
        sent_b.append(raw)
        return raw

    a = CallQueue(etcd, OWNER, stuck, lambda cap: True, poll_s=0.05)
    b = CallQueue(etcd, OWNER, quick, lambda cap: True, poll_s=0.05)
    try:
        held = await a.enqueue("echo", b"first", "", 30)  # a's loop claims it and hangs in the agent

        async def delivering() -> bool:
            return (await a.get(held)).state == DELIVERING

        await wait_until(delivering, 10, "a claims the call")
        assert await b.run_once() == 1 and sent_b == []  # a live claim: b leaves it alone
        claim = await etcd.get(f"{a.prefix}{held}{CLAIM_SUFFIX}".encode())
        await etcd.revoke_lease(claim.lease)  # a's node dies: its claim lease lapses
        assert await b.run_once() == 0
        lost = await b.get(held)
        assert lost.state == FAILED and isinstance(lost.error, DeliveryOutcomeUnknownError)
        release.set()  # a's call comes back after all: too late to change the outcome
        await wait_until(lambda: a._task is None or a._task.done(), 10, "a's loop to finish")
        assert (await b.get(held)).error is not None and sent_b == [] and sent_a == [b"first"]

        # Both nodes deliver at once: every call is sent exactly once.
        a._invoke = quick
        ids = [await b.enqueue("echo", f"call-{i}".encode(), "", 30) for i in range(6)]
        await asyncio.gather(a.run_once(), b.run_once(), a.run_once())

        async def all_done() -> bool:
            return [c.state for c in await b.held() if c.id in ids] == [DONE] * len(ids)

        await wait_until(all_done, 10, "every call delivered")
        assert sorted(sent_b) == sorted(f"call-{i}".encode() for i in range(6))
        assert [(await b.get(i)).response for i in ids] == [f"call-{i}".encode() for i in range(6)]
        assert await etcd.get(f"{a.prefix}{ids[0]}{CLAIM_SUFFIX}".encode()) is None  # claims go with delivery
    finally:
        release.set()
        await a.stop()
        await b.stop()

"""Queued delivery on a real mesh (etcd with TLS and per-workload roles): a call made with `queue_for` while no
instance serves its capability is held in etcd and delivered once an agent registers; a call enqueued
without waiting is polled by id; the count bound refuses one call too many; without opting in, the call fails
at once as before; a client that holds a call and closes leaves it to the next client of its identity
(`resume_queued`)."""

from __future__ import annotations

import asyncio

import pytest

from hivemesh.mesh.errors import (
    DeadlineExceededError,
    InvalidInputError,
    NotFoundError,
    QueueFullError,
    UnknownCapabilityError,
)
from hivemesh.sdk import MeshClient
from tests.support.agents_for_tests import EchoAgent
from tests.support.orch_env import Orch, wait_until


async def test_held_until_an_instance_registers(orch: Orch) -> None:
    mesh = orch.mesh
    mesh.max_held_calls = 3
    with pytest.raises(UnknownCapabilityError):  # not opted in: no waiting
        await mesh.call("echo", {"text": "now"}, timeout=5)

    # The timeout is the call's whole deadline, time held included (so here as long as the hold).
    waiting = asyncio.ensure_future(mesh.call("echo", {"text": "held"}, queue_for=20, timeout=20))
    polled = await mesh.enqueue("echo", {"text": "polled"}, max_wait=20)
    assert await mesh.queued(polled) is None  # still held
    third = await mesh.enqueue("echo", {"text": "third"}, max_wait=20)

    async def three_held() -> bool:
        return [c.state for c in await mesh.held_calls()] == ["queued"] * 3

    await wait_until(three_held, 5, "three held calls")
    with pytest.raises(QueueFullError, match="at most 3"):
        await mesh.enqueue("echo", {"text": "one too many"}, max_wait=20)
    with pytest.raises(InvalidInputError, match="queue wait"):
        await mesh.enqueue("echo", {"text": "forever"}, max_wait=86400)
    with pytest.raises(NotFoundError):
        await mesh.queued("q-" + "0" * 16)  # well formed, never held
    with pytest.raises(InvalidInputError, match="not a held call id"):
        await mesh.queued("q-nope")
    assert not waiting.done()

    # A caller that holds a call and goes away: the next client of its identity resumes and delivers it.
    settings = await orch.env.settings_for("restarter", "client")
    async with MeshClient.connect(name="restarter", settings=settings) as gone:
        kept = await gone.enqueue("echo", {"text": "kept"}, max_wait=20)
    back = await orch.client("restarter")
    assert await back.resume_queued() == 1

    agent = EchoAgent()
    await orch.serve(agent)
    answer = await asyncio.wait_for(waiting, 15)
    assert answer["text"] == "held"
    result = await mesh.queued(polled, wait=10)
    assert result is not None and result.output["text"] == "polled"
    third_result = await mesh.queued(third, wait=10)
    assert third_result is not None and third_result.output["text"] == "third"
    kept_result = await back.queued(kept, wait=10)
    assert kept_result is not None and kept_result.output["text"] == "kept"
    assert agent.calls == 4  # each held call delivered exactly once


async def test_a_held_call_keeps_its_deadline(orch: Orch) -> None:
    """`timeout` is the call's deadline, time held included, and inside a capability the served call's deadline
    caps it: a held call made with one is waited for no longer, and never delivered after it. Before, the
    caller waited the whole `queue_for` whatever its timeout, and a capability's onward call held for later was
    delivered after the call it served had ended."""
    mesh = orch.mesh
    with pytest.raises(DeadlineExceededError) as late:
        await mesh.call("echo", {"text": "in time or not at all"}, queue_for=60, timeout=1.0)
    held_id = late.value.metadata["queued_id"]
    held = next(c for c in await mesh.held_calls() if c.id == held_id)
    assert held.expires_at_unix_ms - held.enqueued_at_unix_ms <= 1000  # held no longer than its deadline

    agent = EchoAgent()
    await orch.serve(agent)  # an instance now: the call's deadline has passed, so it must not run

    async def ended() -> bool:
        return next(c for c in await mesh.held_calls() if c.id == held_id).state == "failed"

    await wait_until(ended, 15, "the held call ending at its deadline")
    assert agent.calls == 0
    assert (await mesh.call("echo", {"text": "now"}, timeout=5))["text"] == "now"  # the instance serves
    assert agent.calls == 1

"""`all_or_none`, how a pattern runs steps side by side when it needs all of them (Router's multi route): the first
failure cancels the others and waits for them, and is raised as it was. asyncio.gather raised it at once and left
the sibling calls running for nobody (found with a real mesh: the agent finished the abandoned call 2 s later)."""

from __future__ import annotations

import asyncio

import pytest

from hivemesh.mesh.errors import AgentError
from hivemesh.sdk.patterns.base import all_or_none


async def _sleeps_until_cancelled(ended: list[str]) -> str:
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        ended.append("cancelled")
        raise
    return "late"


async def test_every_result_in_order() -> None:
    async def after(seconds: float, value: str) -> str:
        await asyncio.sleep(seconds)
        return value

    assert await all_or_none([after(0.02, "a"), after(0.0, "b"), after(0.01, "c")]) == ["a", "b", "c"]


async def test_the_first_failure_cancels_and_awaits_the_others_and_is_raised_as_it_was() -> None:
    ended: list[str] = []

    async def fails() -> str:
        await asyncio.sleep(0)
        raise AgentError("the specialist failed")

    async def also_fails() -> str:
        await asyncio.sleep(0.01)
        raise ValueError("a second failure, read and dropped")

    async with asyncio.timeout(10):  # the sleeper left running would hold this for 30 s
        with pytest.raises(AgentError, match="the specialist failed"):
            await all_or_none([_sleeps_until_cancelled(ended), fails(), also_fails()])
    assert ended == ["cancelled"]  # done before all_or_none returned, not left to run
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


async def test_cancelling_the_run_cancels_its_steps() -> None:
    ended: list[str] = []
    run = asyncio.ensure_future(all_or_none([_sleeps_until_cancelled(ended), _sleeps_until_cancelled(ended)]))
    await asyncio.sleep(0.01)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert ended == ["cancelled", "cancelled"]

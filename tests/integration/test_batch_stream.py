"""`MeshClient.call_batch_stream` on a real mesh: inputs of any number read lazily (never more than the concurrency
ahead of the consumer), outcomes as they finish or in input order, one item's failure only its own, and an early
end (a break, `aclose()`, a source that raises) cancels the calls in flight and leaves no task behind."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from hivemesh.mesh import batch
from hivemesh.mesh.errors import AgentError, DeadlineExceededError, InvalidInputError
from hivemesh.sdk.batch import BatchItem
from hivemesh.sdk.call_options import CallOptions
from tests.support.links import settle_link
from tests.support.orch_agents import WorkerAgent
from tests.support.orch_env import Orch
from tests.support.waiting import until


class Source:
    """Inputs made on demand, counting how many the stream has taken, and whether it was closed."""

    def __init__(self, count: int, make: Callable[[int], Any]) -> None:
        self.count, self.make = count, make
        self.taken = 0
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        try:
            for i in range(self.count):
                self.taken += 1
                yield self.make(i)
        finally:
            self.closed = True


def _serving(task: asyncio.Task[Any]) -> bool:
    """A task of the in-process agent's gRPC server waiting for its next call (`AioServer._request_call`, ...): the
    server's own, started whenever a call arrives, never the stream's."""
    return str(getattr(task.get_coro(), "__qualname__", "")).startswith("AioServer.")


def new_tasks(before: set[asyncio.Task[Any]], *, only_batch: bool = False) -> set[asyncio.Task[Any]]:
    """Tasks started since before, the agent's side of the calls included (not the mesh's periodic timers, each a
    new `wait_for(event.wait(), ...)` task, nor the agent's server waiting for its next call); only_batch: only the
    stream's own (running batch code)."""
    tasks = {t for t in asyncio.all_tasks() - before - {asyncio.current_task()}
             if getattr(t.get_coro(), "__qualname__", "") != "Event.wait" and not _serving(t)}
    if only_batch:
        tasks = {t for t in tasks
                 if getattr(getattr(t.get_coro(), "cr_code", None), "co_filename", "").endswith("/batch.py")}
    return tasks


@pytest.mark.parametrize("ordered", [False, True])
async def test_more_inputs_than_a_batch_takes_read_lazily(orch: Orch, ordered: bool) -> None:
    await orch.serve(WorkerAgent())
    concurrency, count = 32, batch.MAX_ITEMS + 200
    source = Source(count, lambda i: {"text": f"d{i}"})
    seen: list[int] = []
    async for item in orch.mesh.call_batch_stream("upper", iter(source), concurrency=concurrency, ordered=ordered,
                                                  timeout=10):
        seen.append(item.index)
        assert item.ok and item.output == {"text": f"D{item.index}"}, item
        # Lazy: never more than the concurrency (the calls in flight plus, in order, those waiting) ahead.
        assert source.taken - len(seen) <= concurrency, (source.taken, len(seen))
    assert sorted(seen) == list(range(count)) and source.taken == count
    if ordered:
        assert seen == list(range(count))


async def test_in_order_a_slow_item_holds_the_window(orch: Orch) -> None:
    agent = WorkerAgent()
    await orch.serve(agent)
    concurrency = 4
    source = Source(20, lambda i: {"seconds": 1.0 if i == 0 else 0.0, "tag": str(i)})
    seen: list[int] = []
    async for item in orch.mesh.call_batch_stream("nap", iter(source), concurrency=concurrency, ordered=True,
                                                  timeout=10):
        seen.append(item.index)
        if seen == [0]:  # the rest waited behind item 0: no call started past the window meanwhile
            assert source.taken <= 1 + concurrency and len(agent.started) <= 1 + concurrency, agent.started
        assert item.ok, item
    assert seen == list(range(20))


async def test_unordered_yields_each_as_it_finishes(orch: Orch) -> None:
    agent = WorkerAgent()
    await orch.serve(agent)
    source = Source(20, lambda i: {"seconds": 1.0 if i == 0 else 0.0, "tag": str(i)})
    seen = [item.index async for item in orch.mesh.call_batch_stream("nap", iter(source), concurrency=4, timeout=10)]
    assert sorted(seen) == list(range(20))
    assert seen.index(0) > 4, seen  # the slow first item held neither the others' answers nor their calls


async def test_one_items_failure_is_its_own(orch: Orch) -> None:
    agent = WorkerAgent()
    await orch.serve(agent)

    # Schema-invalid, not JSON-serializable (an exception inside the call), a key function that fails: each is
    # that item's error; the good items around them are answered.
    def key(i: int, _: Any) -> str:
        if i == 4:
            raise RuntimeError("no key for this one")
        return f"k{i}"

    inputs = [{"text": "a"}, {"nope": 1}, {"text": object()}, {"text": "d"}, {"text": "e"}]
    items = [item async for item in orch.mesh.call_batch_stream("upper", inputs, concurrency=2, ordered=True,
                                                                idempotency_keys=key, timeout=10)]
    assert [i.index for i in items] == [0, 1, 2, 3, 4]
    assert [i.ok for i in items] == [True, False, False, True, False]
    assert items[0].output == {"text": "A"} and items[3].output == {"text": "D"}
    assert isinstance(items[1].error, InvalidInputError) and isinstance(items[2].error, InvalidInputError)
    assert isinstance(items[4].error, AgentError) and "no key for this one" in items[4].error.message

    # A capability that fails: every item its own AgentError, the stream itself ends normally.
    broken = [item async for item in orch.mesh.call_batch_stream("broken", ({"text": str(i)} for i in range(3)))]
    assert sorted(i.index for i in broken) == [0, 1, 2]
    assert all(isinstance(i.error, AgentError) for i in broken), broken


async def test_bounds_keys_and_options(orch: Orch) -> None:
    agent = WorkerAgent()
    await orch.serve(agent)

    # Refused when called, before any input is read or call made, as call_batch refuses them.
    source = Source(3, lambda i: {"text": str(i)})
    for bad in (500, -1, batch.MAX_CONCURRENCY + 1):
        with pytest.raises(InvalidInputError, match="concurrency") as refused:
            orch.mesh.call_batch_stream("upper", iter(source), concurrency=bad)
        assert "concurrency" in refused.value.field_violations
    with pytest.raises(ValueError, match="one idempotency key per input"):
        orch.mesh.call_batch_stream("charge", iter(source), idempotency_key="same-for-all")
    with pytest.raises(ValueError, match="one idempotency key per input"):
        orch.mesh.call_batch_stream("charge", iter(source), options=CallOptions(idempotency_key="same-for-all"))
    with pytest.raises(ValueError, match="one idempotency key per input"):
        orch.mesh.call_batch_stream("charge", iter(source), idempotency_keys="same-for-all")  # type: ignore[arg-type]
    assert source.taken == 0
    defaulted = [i async for i in orch.mesh.call_batch_stream("upper", iter(source), concurrency=0)]
    assert sorted(i.index for i in defaulted) == [0, 1, 2] and all(i.ok for i in defaulted)

    # Each item gets its own key (a non-idempotent capability applies each key's effect once).
    charges = [{"account": f"acct-{i}", "amount": 1.0} for i in range(5)]
    items = [i async for i in orch.mesh.call_batch_stream("charge", charges, concurrency=3,
                                                          idempotency_keys=lambda i, x: f"{x['account']}#{i}")]
    assert all(i.ok for i in items), items
    assert sorted(e["key"] for e in agent.effects) == [f"acct-{i}#{i}" for i in range(5)]

    # The call options apply to every item: here a timeout shorter than each nap.
    naps = [i async for i in orch.mesh.call_batch_stream("nap", [{"seconds": 5.0, "tag": f"t{i}"} for i in range(3)],
                                                         options=CallOptions(timeout=0.3))]
    assert len(naps) == 3 and all(isinstance(i.error, DeadlineExceededError) for i in naps), naps


@pytest.mark.parametrize("how", ["break", "aclose"])
async def test_an_early_end_cancels_the_calls_in_flight(orch: Orch, how: str) -> None:
    agent = WorkerAgent()
    await orch.serve(agent)
    await settle_link(orch.mesh, "upper", {"text": "warm"})  # so the connection's own tasks are in before
    before = asyncio.all_tasks()
    concurrency = 4
    source = Source(100, lambda i: {"seconds": 0.0 if i < 2 else 30.0, "tag": str(i)})
    inputs = iter(source)  # held here, so only the stream's own close() runs its cleanup
    got: list[BatchItem] = []
    in_flight = {str(i) for i in range(2, 2 + concurrency)}  # once 0 and 1 are in, the next calls fill every slot

    async def all_started() -> bool:
        assert await until(lambda: in_flight <= set(agent.started), 10), agent.started
        return True

    if how == "break":  # the generator is closed once collected: at once in CPython, in a task of its own
        async for item in orch.mesh.call_batch_stream("nap", inputs, concurrency=concurrency, timeout=60):
            got.append(item)
            if len(got) == 2 and await all_started():
                break
    else:
        stream = orch.mesh.call_batch_stream("nap", inputs, concurrency=concurrency, timeout=60)
        async with contextlib.aclosing(stream):
            async for item in stream:
                got.append(item)
                if len(got) == 2 and await all_started():
                    break
        # Closed, its calls cancelled and awaited, before the next line (the agent's side of them may still end).
        assert source.closed and not new_tasks(before, only_batch=True), new_tasks(before, only_batch=True)
    assert sorted(i.index for i in got) == [0, 1] and all(i.ok for i in got)
    taken = source.taken
    assert taken == 2 + concurrency, taken

    # The agent sees every call still in flight cancelled; no further input is read and no task is left.
    assert await until(lambda: in_flight <= set(agent.cancelled), 10), (in_flight, agent.cancelled)
    assert await until(lambda: source.closed and not new_tasks(before), 10), new_tasks(before)
    assert source.taken == taken and set(agent.started) == {str(i) for i in range(taken)}


async def test_a_source_that_raises_ends_the_stream_with_its_error(orch: Orch) -> None:
    agent = WorkerAgent()
    await orch.serve(agent)
    await settle_link(orch.mesh, "upper", {"text": "warm"})  # so the connection's own tasks are in before
    before = asyncio.all_tasks()

    async def documents() -> AsyncIterator[dict[str, Any]]:
        for tag in ("a", "b"):
            yield {"seconds": 30.0, "tag": tag}
        assert await until(lambda: len(agent.started) == 2, 10)  # both calls reached the agent
        raise RuntimeError("the source broke")

    with pytest.raises(RuntimeError, match="the source broke"):
        async for item in orch.mesh.call_batch_stream("nap", documents(), concurrency=4, timeout=60):
            raise AssertionError(f"no item finishes before the source fails: {item}")
    # Raised only once the calls in flight were cancelled and awaited; the agent sees them cancelled.
    assert not new_tasks(before, only_batch=True), new_tasks(before, only_batch=True)
    assert await until(lambda: set(agent.cancelled) == {"a", "b"}, 10), agent.cancelled
    assert await until(lambda: not new_tasks(before), 10), new_tasks(before)

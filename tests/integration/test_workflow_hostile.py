"""Hostile input to the durable workflow engine and the state helpers, against a real control plane, a real
etcd with mutual TLS and auth, and a real orchestrator identity: every bad input gets a clear status, nothing
is half written, and no run is left WORKING or SUBMITTED for ever.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import pytest

from hivemesh.mesh.errors import FailedPreconditionError, InvalidInputError, NotFoundError
from hivemesh.sdk.memory import Memory
from hivemesh.sdk.state import StateClient
from hivemesh.sdk.workflow import WorkflowEngine, WorkflowRun
from hivemesh.sdk.workflow.store import owner_key
from tests.support.orch_env import Orch

pytestmark = pytest.mark.timeout(120)

MAX_DEADLINE_S = 30 * 86400
"""The control plane's longest escalation deadline (`hivemesh.sdk.escalation.MAX_DEADLINE_S`)."""

COMPUTED: dict[str, int] = {}
"""Side effects a memo's compute ran, per test key."""


class Opaque:
    """Not JSON: it used to be recorded as its str() and come back as a string on replay."""

    def __repr__(self) -> str:
        return "Opaque()"


async def echo(run: WorkflowRun, input: Any) -> Any:
    return {"input": input}


async def returns(run: WorkflowRun, input: Any) -> Any:
    return {"big": "x" * 600_000} if input == "big" else {1: "a", "b": 2}


async def memo_opaque(run: WorkflowRun, input: Any) -> Any:
    value = await run.memo("thing", Opaque)
    return {"type": type(value).__name__}


async def memo_int_key(run: WorkflowRun, input: Any) -> Any:
    def effect() -> int:
        COMPUTED["int"] = COMPUTED.get("int", 0) + 1
        return 42

    return [await run.memo(1, effect), await run.memo(1, effect)]  # type: ignore[arg-type]


async def many_memos(run: WorkflowRun, input: Any) -> Any:
    for i in range(input):
        await run.memo(f"m{i}", lambda: "y" * 100_000)
    return "done"


async def ask(run: WorkflowRun, input: Any) -> Any:
    """Asks with input as the deadline: None, a number, or a number's text (NaN and infinity are no JSON input)."""
    info = await run.escalate("s1", "approve?", {"x": 1}, deadline_s=float(input) if isinstance(input, str) else input)
    return {"status": info.status}


async def _events(engine: WorkflowEngine, wid: str) -> list[dict[str, Any]]:
    return await engine.store.events(engine.run_id_for(wid))


async def test_two_submits_of_one_id_one_wins_the_other_is_refused_naming_it(orch: Orch) -> None:
    async with WorkflowEngine(orch.mesh) as e1, WorkflowEngine(orch.mesh) as e2:
        for i in range(4):
            wid = f"dup{i}"
            outcomes = await asyncio.gather(e1.submit(echo, "A", workflow_id=wid),
                                            e2.submit(echo, "B", workflow_id=wid), return_exceptions=True)
            refused = [o for o in outcomes if isinstance(o, BaseException)]
            won = [o for o in outcomes if not isinstance(o, BaseException)]
            assert len(won) == 1 and len(refused) == 1, outcomes
            assert isinstance(refused[0], FailedPreconditionError) and wid in refused[0].message, refused[0]
            final = await won[0].result(timeout=20)
            created = [ev for ev in await _events(e1, wid) if ev["type"] == "created"]
            assert len(created) == 1, created
            assert final.state == "COMPLETED" and final.output == {"input": created[0]["data"]["input"]}


@pytest.mark.parametrize("what", ["big", "mixed keys"])
async def test_an_output_the_journal_cannot_hold_fails_the_run_instead_of_wedging_it(orch: Orch, what: str) -> None:
    async with WorkflowEngine(orch.mesh) as engine:
        handle = await engine.submit(returns, what, workflow_id="out")
        final = await handle.result(timeout=20)
        assert final.state == "FAILED", final.state
        assert final.error is not None and final.error["code"] == "INVALID_ARGUMENT", final.error
        assert (await engine.get("out")).state == "FAILED"
        assert await engine.store.owner(handle.id) is None
        assert await engine.resume_all() == []


async def test_a_run_input_that_is_not_plain_json_is_refused_and_nothing_is_stored(orch: Orch) -> None:
    async with WorkflowEngine(orch.mesh) as engine:
        for bad in ({1: "a", "b": 2}, Opaque(), {"n": 10**5000}):
            with pytest.raises(InvalidInputError):
                await engine.submit(echo, bad, workflow_id="badin")
            with pytest.raises(NotFoundError):
                await engine.get("badin")


async def test_a_journal_past_its_bound_fails_the_run_with_resource_exhausted(orch: Orch) -> None:
    bound = 350_000
    async with WorkflowEngine(orch.mesh, max_journal_bytes=bound) as engine:
        final = await (await engine.submit(many_memos, 10, workflow_id="full")).result(timeout=30)
        assert final.state == "FAILED", final.state
        assert final.error is not None and final.error["code"] == "RESOURCE_EXHAUSTED", final.error
        assert final.error["reason"] == "WORKFLOW_JOURNAL_FULL"
        assert len(final.memos) == 3, sorted(final.memos)
        stored = sum(len(json.dumps(ev, separators=(",", ":"), sort_keys=True)) for ev in await _events(engine, "full"))
        assert stored <= bound + 4096, stored  # the bound, and the small events that end the run
        assert await engine.resume_all() == []


async def test_a_memo_value_that_is_not_plain_json_fails_the_run_and_is_not_recorded(orch: Orch) -> None:
    async with WorkflowEngine(orch.mesh) as engine:
        final = await engine.run(memo_opaque, None, workflow_id="opaque")
        assert final.state == "FAILED", (final.state, final.output)
        assert final.error is not None and final.error["code"] == "INVALID_ARGUMENT", final.error
        assert final.memos == {} and not [ev for ev in await _events(engine, "opaque") if ev["type"] == "memo"]


async def test_a_memo_key_that_is_not_a_string_is_refused_before_its_side_effect(orch: Orch) -> None:
    COMPUTED.clear()
    async with WorkflowEngine(orch.mesh) as engine:
        final = await engine.run(memo_int_key, None, workflow_id="memoint")
        assert final.state == "FAILED", (final.state, final.output)
        assert final.error is not None and final.error["code"] == "INVALID_ARGUMENT", final.error
        assert "memo key" in final.error["message"]
        assert COMPUTED == {}


async def _left_waiting_for_a_person(orch: Orch, workflow_id: str) -> str:
    """A run that asked a person and whose orchestrator then stopped: nobody drives it. Its full id."""
    asked = asyncio.Event()
    async with WorkflowEngine(orch.mesh, lock_ttl_s=2,
                              on_event=lambda _w, kind, _d: asked.set() if kind == "input_required" else None) as first:
        handle = await first.submit(ask, None, workflow_id=workflow_id)
        await asyncio.wait_for(asked.wait(), 20)
    return handle.id


async def test_cancelling_a_run_nobody_drives_withdraws_its_pending_escalation(orch: Orch) -> None:
    handle_id = await _left_waiting_for_a_person(orch, "asking")
    # Its orchestrator is gone; another process of the identity cancels the run and so records `canceled` itself.
    async with WorkflowEngine(orch.mesh, lock_ttl_s=2) as second:
        assert await second.store.owner(handle_id) is None
        final = await second.cancel("asking", wait_s=10)
        assert final.state == "CANCELED"
        info = await second.escalations.get(str(final.escalations["s1"]["escalation_id"]))
        assert info.status == "CANCELED", info.status
        assert await second.store.owner(handle_id) is None and await second.store.etcd.get(owner_key(handle_id)) is None


@pytest.mark.parametrize("deadline", [-30.0, 0.0, math.nan, math.inf, 1e30, MAX_DEADLINE_S + 1])
async def test_an_escalation_deadline_out_of_range_is_invalid_input_naming_it(orch: Orch, deadline: float) -> None:
    async with WorkflowEngine(orch.mesh) as engine:
        with pytest.raises(InvalidInputError) as refused:
            await engine.escalations.create("approve?", {"x": 1}, escalation_id="esc-bad", deadline_s=deadline)
        assert "deadline_s" in refused.value.field_violations
        with pytest.raises(NotFoundError):
            await engine.escalations.get("esc-bad")
        final = await engine.run(ask, str(deadline), workflow_id="askbad")
        assert final.state == "FAILED", (final.state, final.output)
        assert final.error is not None and final.error["code"] == "INVALID_ARGUMENT", final.error
        assert "deadline_s" in final.error["message"]
        assert await engine.escalations.list(workflow_id=final.id) == []


@pytest.mark.parametrize("wait", [math.nan, -1.0, math.inf])
async def test_a_wait_that_is_not_a_finite_time_is_refused_at_once(orch: Orch, wait: float) -> None:
    async with WorkflowEngine(orch.mesh, lock_ttl_s=2) as engine:
        await engine.submit(ask, None, workflow_id="held")  # WORKING, owned: a resume would have to wait
        with pytest.raises(InvalidInputError) as refused:
            await asyncio.wait_for(engine.resume("held", wait_s=wait), 10)
        assert "wait_s" in refused.value.field_violations
        info = await engine.escalations.create("approve?", {"x": 1}, escalation_id="esc-wait")
        with pytest.raises(InvalidInputError) as refused:
            await asyncio.wait_for(engine.escalations.wait(info.id, timeout=wait, poll_s=1), 10)
        assert "timeout" in refused.value.field_violations
        await engine.cancel("held", wait_s=10)


async def test_state_values_with_a_lone_surrogate_and_bad_attempts_are_invalid_input(orch: Orch) -> None:
    state = StateClient(orch.mesh.node.controlplane)
    namespace = "memory/client-orchestrator/c/hostile"
    with pytest.raises(InvalidInputError):
        await state.put(namespace, "k", {"t": "\udc80"})
    with pytest.raises(InvalidInputError):
        await Memory(state, namespace).remember("user", "\udc80")
    with pytest.raises(InvalidInputError):
        await state.update(namespace, "k", lambda v: 1, attempts=0)
    assert await state.get(namespace, "k") is None
    assert await state.get(namespace, "history") is None
    await state.put(namespace, "k", {"t": "fine"})  # the namespace itself takes good values
    assert (await state.get(namespace, "k")) is not None


async def test_a_cancel_that_a_resumer_overtakes_is_still_a_cancel(orch: Orch, monkeypatch: pytest.MonkeyPatch) -> None:
    """The canceller saw no owner, then a resumer took the run before the canceller could: the cancel_requested
    already written makes that owner end the run canceled, so the cancel must not be reported as refused."""
    handle_id = await _left_waiting_for_a_person(orch, "overtaken")
    async with WorkflowEngine(orch.mesh, lock_ttl_s=2) as second:
        store = second.store
        real_owner = store.owner
        taken: list[Any] = []

        async def owner_then_overtaken(workflow_id: str) -> Any:
            seen = await real_owner(workflow_id)
            if seen is None and not taken:  # the interleaving the race leaves: a resumer acquires right now
                taken.append(await store.acquire(workflow_id, "resumer", ttl_s=5, wait_s=0.0))
            return seen

        monkeypatch.setattr(store, "owner", owner_then_overtaken)
        try:
            state = await store.request_cancel(handle_id, by="tester")
            assert taken and state.cancel_requested is not None and not state.terminal
        finally:
            for lock in taken:
                await store.release(lock)

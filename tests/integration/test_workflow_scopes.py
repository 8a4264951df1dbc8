"""Two patterns of the same kind in one durable run, over the real mesh and etcd.

A pattern's step ids say what a step does (`01-charge`), not which pattern instance runs it, and a durable run
answers a step id it has recorded from its journal. So a body running the same Pipeline on two documents got the
first document's result for the second, silently, and charged once where it meant twice. Now:
- a step id (or escalation id) asked for twice in one execution of the body is refused, INVALID_ARGUMENT, naming
  the fix, before anything is called;
- `scoped(run, "doc-2")` gives each pattern its own ids, recorded and answered on resume per scope.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from hivemesh.sdk.escalation import EscalationClient
from hivemesh.sdk.patterns import DirectRunner, Pipeline, Runner, Step, scoped
from hivemesh.sdk.workflow import WorkflowEngine, WorkflowRun, WorkflowState
from hivemesh.sdk.workflow.definition import definition_ref
from tests.support.orch_agents import DeskAgent, WorkerAgent
from tests.support.orch_env import Orch, wait_until

pytestmark = pytest.mark.timeout(90)

CHARGE = Pipeline([Step("charge")])


async def unscoped_twice(run: Runner, inp: Any) -> dict[str, Any]:
    """The mistake: the same pipeline for two accounts on one run, no scope."""
    first = await CHARGE.run(run, {"account": "a", "amount": 1.0})
    second = await CHARGE.run(run, {"account": "b", "amount": 2.0})
    return {"first": first.output, "second": second.output}


async def scoped_twice(run: Runner, inp: Any) -> dict[str, Any]:
    """The fix: one scope per document."""
    first = await CHARGE.run(scoped(run, "doc-1"), {"account": "a", "amount": 1.0})
    second = await CHARGE.run(scoped(run, "doc-2"), {"account": "b", "amount": 2.0})
    return {"first": first.output, "second": second.output}


async def asks_twice(run: Runner, inp: Any) -> str:
    """Asks a person under one step id twice (the first ask is answered in the journal)."""
    first = await run.escalate("approve", "first ask", {})
    await run.escalate("approve", "second ask", {})
    return str(first.answer)


async def test_a_step_id_asked_twice_in_one_run_is_refused_before_the_second_call(orch: Orch) -> None:
    worker = WorkerAgent()
    await orch.serve(worker)
    assert await orch.mesh.node.registry.wait_for_capability("charge", 1, timeout=10)
    async with WorkflowEngine(orch.mesh) as engine:
        state = await engine.run(unscoped_twice, {})
    # Before: COMPLETED, "second" the first charge's receipt, account b never charged.
    assert state.state == "FAILED", (state.state, state.output)
    assert state.error is not None and state.error["code"] == "INVALID_ARGUMENT", state.error
    message = state.error["message"]
    assert "step id '01-charge' was already asked for in this run" in message, message
    assert "scoped(run, 'doc-2')" in message, message
    assert [e["account"] for e in worker.effects] == ["a"], worker.effects  # the second ask called nothing


async def test_scoped_patterns_keep_their_own_steps_and_each_resumes_from_its_own_record(orch: Orch) -> None:
    worker = WorkerAgent()
    await orch.serve(worker)
    assert await orch.mesh.node.registry.wait_for_capability("charge", 1, timeout=10)
    async with WorkflowEngine(orch.mesh) as engine:
        state = await engine.run(scoped_twice, {})
        assert state.state == "COMPLETED", (state.error, state.output)
        assert state.output["first"]["charged"] == 1.0 and state.output["second"]["charged"] == 2.0, state.output
        assert set(state.steps) == {"doc-1/01-charge", "doc-2/01-charge"}, set(state.steps)
        assert [(e["account"], e["key"]) for e in worker.effects] == [
            ("a", f"{state.id}/doc-1/01-charge"), ("b", f"{state.id}/doc-2/01-charge")]

        # A run that stopped after doc-1's charge: resumed, doc-1 is answered from the journal, doc-2 runs once.
        worker.effects.clear()
        wid = engine.run_id_for("wf-scoped-resume")
        old = WorkflowState(wid)
        await engine.store.create(old, {"definition": definition_ref(scoped_twice), "input": {},
                                        "owner": engine.owner, "labels": {}})
        await engine.store.append(old, "started", {"owner": engine.owner, "pid": 1, "host": "old", "resume": False})
        step = "doc-1/01-charge"
        await engine.store.append(old, "step_started", {"step": step, "capability": "charge", "key": f"{wid}/{step}",
                                                        "idempotent": False, "attempt": 1, "resent": False})
        await engine.store.append(old, "step_completed", {"step": step, "result": {
            "step": step, "capability": "charge", "output": {"charged": 1.0, "receipt": 99}, "state": "COMPLETED",
            "agent": "worker", "instance": "w", "elapsed_ms": 1.0}})
        resumed = await (await engine.resume(wid, wait_s=0)).result(timeout=60)
    assert resumed.state == "COMPLETED", (resumed.error, resumed.output)
    assert resumed.output["first"] == {"charged": 1.0, "receipt": 99}, resumed.output  # from the journal
    assert resumed.output["second"]["charged"] == 2.0, resumed.output
    assert [(e["account"], e["key"]) for e in worker.effects] == [("b", f"{wid}/doc-2/01-charge")], worker.effects


async def test_an_escalation_asked_twice_under_one_step_id_is_refused(orch: Orch) -> None:
    async with WorkflowEngine(orch.mesh) as engine:
        wid = engine.run_id_for("wf-ask-twice")
        old = WorkflowState(wid)
        await engine.store.create(old, {"definition": definition_ref(asks_twice), "input": {},
                                        "owner": engine.owner, "labels": {}})
        await engine.store.append(old, "started", {"owner": engine.owner, "pid": 1, "host": "old", "resume": False})
        await engine.store.append(old, "input_required", {"step": "approve", "escalation_id": "esc-x",
                                                          "reason": "first ask"})
        await engine.store.append(old, "input_received", {"step": "approve", "escalation": {
            "id": "esc-x", "reason": "first ask", "status": "APPROVED", "answer": "yes", "resolved_by": "ops",
            "resolved_at": time.time(), "created_at": time.time(), "step_id": "approve", "workflow_id": wid}})
        state = await (await engine.resume(wid, wait_s=0)).result(timeout=60)
    assert state.state == "FAILED", (state.state, state.output)
    assert state.error is not None and state.error["code"] == "INVALID_ARGUMENT", state.error
    assert "escalation id 'approve' was already asked for in this run" in state.error["message"], state.error


async def test_a_scope_is_one_plain_path_segment_and_scopes_nest(orch: Orch) -> None:
    for bad in ("", "a/b", "has space", "x" * 65, "-lead"):
        with pytest.raises(ValueError, match="a scope is 1-64"):
            scoped(orch.mesh, bad)
    said: list[dict[str, Any]] = []
    direct = DirectRunner(orch.mesh, on_event=lambda _kind, data: said.append(dict(data)))
    await scoped(scoped(direct, "a"), "b").note("progress", {"n": 1})
    assert said == [{"key": "a/b/progress", "n": 1}], said
    assert scoped(direct, "a").recorded("x") is False  # outside a workflow nothing is recorded
    # Nested scopes are bounded together, when made: an escalation's step id (scopes included) has at most 256.
    deep = scoped(direct, "x" * 60 + "0")
    deep = scoped(deep, "x" * 60 + "1")
    with pytest.raises(ValueError, match="are 185 characters; at most 128"):
        scoped(deep, "x" * 60 + "2")


async def test_a_direct_run_cancelled_while_a_person_is_asked_withdraws_its_escalation(orch: Orch) -> None:
    """Outside a workflow: the caller stops waiting (a timeout), and the question is withdrawn, not left PENDING for a
    person to decide after nobody waits (a workflow's cancel withdrew its escalations; a direct run's did not)."""
    await orch.serve(DeskAgent())
    assert await orch.mesh.node.registry.wait_for_capability("approve-refund", 1, timeout=10)
    operator = EscalationClient(orch.env.operator.channel)
    run = asyncio.ensure_future(Pipeline([Step("approve-refund", ask_human=True)]).run(orch.mesh, {"question": "r"}))
    (pending,) = await wait_until(lambda: operator.list("PENDING"), 15, "the refund's escalation")
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run

    async def withdrawn() -> Any:
        info = await operator.get(pending.id)
        return info if info.status == "CANCELED" else None

    # The withdrawal is shielded and bounded (5 s): on a loaded host it can outlast the cancellation and land after.
    info = await wait_until(withdrawn, 20, "the escalation withdrawn (CANCELED)")
    assert "stopped waiting" in info.note, info


def _held_creations(monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, asyncio.Event]:
    """Escalation creations that make the real request, set `created` once the question exists, and hand their
    answer back only once `release` is set: a cancellation can land between the two."""
    created, release = asyncio.Event(), asyncio.Event()
    real_create = EscalationClient.create

    async def create(self: EscalationClient, *args: Any, **kwargs: Any) -> Any:
        info = await real_create(self, *args, **kwargs)
        created.set()
        await release.wait()
        return info

    monkeypatch.setattr(EscalationClient, "create", create)
    return created, release


async def test_a_direct_run_cancelled_while_its_question_is_being_asked_withdraws_it(
    orch: Orch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while the escalation's creation is in flight (the control plane may have created it, and only that
    request's answer says under which id): the question is still withdrawn once the answer comes. It was left
    PENDING (a loaded run of the suite: the test above listed the question before the run had read its answer)."""
    await orch.serve(DeskAgent())
    assert await orch.mesh.node.registry.wait_for_capability("approve-refund", 1, timeout=10)
    operator = EscalationClient(orch.env.operator.channel)
    created, release = _held_creations(monkeypatch)
    run = asyncio.ensure_future(Pipeline([Step("approve-refund", ask_human=True)]).run(orch.mesh, {"question": "r"}))
    await asyncio.wait_for(created.wait(), 15)
    run.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await run

    async def withdrawn() -> Any:
        found = await operator.list()
        return found if found and all(i.status == "CANCELED" for i in found) else None

    (info,) = await wait_until(withdrawn, 20, "the escalation created, then withdrawn (CANCELED)")
    assert "stopped waiting" in info.note, info


BODY_CANCELLED = asyncio.Event()


async def ask_and_note_the_cancel(run: WorkflowRun, inp: Any) -> Any:
    """Asks a person; says when its cancellation reaches it."""
    try:
        info = await run.escalate("s1", "approve?", {"x": 1})
    except asyncio.CancelledError:
        BODY_CANCELLED.set()
        raise
    return {"status": info.status}


async def test_a_workflow_run_cancelled_while_its_question_is_being_asked_withdraws_it(
    orch: Orch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same cut in a durable run cancelled on request: the question is created but not yet recorded, so the
    run's recorded escalations do not name it; the engine withdraws what the cut-off creation created."""
    BODY_CANCELLED.clear()
    created, release = _held_creations(monkeypatch)
    async with WorkflowEngine(orch.mesh) as engine:
        await engine.submit(ask_and_note_the_cancel, None, workflow_id="cut")
        await asyncio.wait_for(created.wait(), 15)
        cancel = asyncio.ensure_future(engine.cancel("cut", wait_s=30))
        await asyncio.wait_for(BODY_CANCELLED.wait(), 15)
        release.set()
        final = await cancel
        assert final.state == "CANCELED", final.state
        assert "s1" not in final.escalations  # never recorded
        (info,) = await engine.escalations.list(workflow_id=final.id)
        assert info.status == "CANCELED" and "the workflow run was cancelled" in info.note, info

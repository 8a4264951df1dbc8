"""A durable FanOut(all_instances_of=...) run started before instance keys named the agent (commit 2606ba0),
resumed after the upgrade, over the real mesh and etcd.

Its journal holds the plan as the older version memoized it: bare instance ids ("w-1") as keys and branch ids
"upper@w-1". The run is written through the real WorkflowStore (as the older orchestrator left it: created,
started, the plan's memo, maybe a finished branch) and then resumed by a WorkflowEngine that imports the
definition from its recorded reference, as `hivemesh workflows resume` does.
"""

from __future__ import annotations

from typing import Any

import pytest

from hivemesh.sdk import AgentServerConfig
from hivemesh.sdk.patterns import FanOut, PatternResult, Runner
from hivemesh.sdk.workflow import WorkflowEngine, WorkflowState
from hivemesh.sdk.workflow.definition import definition_ref
from tests.support.orch_agents import WorkerAgent
from tests.support.orch_env import Orch

pytestmark = pytest.mark.timeout(90)

SHARDS = FanOut(all_instances_of="upper", name="shards", branch_timeout=10)


async def shards_flow(run: Runner, inp: Any) -> PatternResult:
    """The definition both versions run: every instance of "upper", its plan memoized as "shards-instances"."""
    return await SHARDS.run(run, inp)


class SpareWorker(WorkerAgent):
    name = "spare-worker"


def _old_plan(*ids: str) -> list[list[str]]:
    """The plan as FanOut memoized it before 2606ba0: [branch id, capability, bare instance id]."""
    return [[f"upper@{i}", "upper", i] for i in ids]


async def _old_run(engine: WorkflowEngine, local_id: str, plan: list[list[str]],
                   finished: dict[str, dict[str, Any]] | None = None) -> str:
    """A run as the older orchestrator left it when it died: created, started, the plan memoized and maybe some
    branches finished (branch id -> the StepResult JSON it recorded). Its id."""
    wid = engine.run_id_for(local_id)
    state = WorkflowState(wid)
    store = engine.store
    await store.create(state, {"definition": definition_ref(shards_flow), "input": {"text": "x"},
                               "owner": engine.owner, "labels": {}})
    await store.append(state, "started", {"owner": engine.owner, "pid": 1, "host": "old-orchestrator",
                                          "resume": False})
    await store.append(state, "memo", {"key": "shards-instances", "value": plan})
    for branch_id, result in (finished or {}).items():
        step = f"branch-{branch_id}"
        await store.append(state, "step_started", {"step": step, "capability": "upper", "key": f"{wid}/{step}",
                                                   "idempotent": True, "attempt": 1, "resent": False})
        await store.append(state, "step_completed", {"step": step, "result": {"step": step, **result}})
    return wid


async def test_a_plan_of_bare_instance_ids_reaches_each_live_instance_after_the_upgrade(orch: Orch) -> None:
    for instance_id in ("w-1", "w-2", "w-3"):
        await orch.serve(WorkerAgent(), AgentServerConfig(instance_id=instance_id))
    # Joined after the plan was made: not in it, so not fanned out to (the resumed run keeps its plan).
    await orch.serve(SpareWorker(), AgentServerConfig(instance_id="s-1"))
    assert await orch.mesh.node.registry.wait_for_capability("upper", 4, timeout=10)
    async with WorkflowEngine(orch.mesh) as engine:
        before = {"capability": "upper", "output": {"text": "BEFORE"}, "state": "COMPLETED", "agent": "worker",
                  "instance": "w-3", "elapsed_ms": 1.0}
        wid = await _old_run(engine, "wf-old-plan", _old_plan("w-1", "w-2", "w-3"), {"upper@w-3": before})

        handle = await engine.resume(wid, wait_s=0)  # the definition comes from the journal's import reference
        state = await handle.result(timeout=60)

        assert state.state == "COMPLETED", (state.error, state.output)
        details = state.output["details"]
        assert details["failed"] == {}, details["failed"]
        # The old branch ids stay: results are keyed by them, and w-3's was recorded before the upgrade.
        assert details["branches"] == ["upper@w-1", "upper@w-2", "upper@w-3"]
        assert state.output["output"] == {"upper@w-1": {"text": "X"}, "upper@w-2": {"text": "X"},
                                          "upper@w-3": {"text": "BEFORE"}}
        assert [(s["step"], s["agent"], s["instance"]) for s in state.output["steps"]] == [
            ("branch-upper@w-1", "worker", "w-1"), ("branch-upper@w-2", "worker", "w-2"),
            ("branch-upper@w-3", "worker", "w-3")]
        events = await engine.store.events(wid)
        resumed_at = [e["seq"] for e in events if e["type"] == "started"][-1]
        called = [e["data"]["step"] for e in events if e["type"] == "step_started" and e["seq"] > resumed_at]
        assert sorted(called) == ["branch-upper@w-1", "branch-upper@w-2"]  # w-3's result was replayed
        assert [e["data"]["value"] for e in events if e["type"] == "memo"] == [_old_plan("w-1", "w-2", "w-3")]


async def test_a_bare_instance_id_that_two_agents_now_share_fails_its_branch_naming_both(orch: Orch) -> None:
    await orch.serve(WorkerAgent(), AgentServerConfig(instance_id="w-1"))
    await orch.serve(WorkerAgent(), AgentServerConfig(instance_id="w-2"))
    await orch.serve(SpareWorker(), AgentServerConfig(instance_id="w-1"))
    assert await orch.mesh.node.registry.wait_for_capability("upper", 3, timeout=10)
    async with WorkflowEngine(orch.mesh) as engine:
        wid = await _old_run(engine, "wf-ambiguous", _old_plan("w-1", "w-2", "w-9"))

        state = await (await engine.resume(wid, wait_s=0)).result(timeout=60)

        assert state.state == "COMPLETED", (state.error, state.output)  # min_success 1: w-2 answered
        details = state.output["details"]
        assert state.output["output"] == {"upper@w-2": {"text": "X"}}
        assert [(s["agent"], s["instance"]) for s in state.output["steps"]] == [("worker", "w-2")]
        assert sorted(details["failed"]) == ["upper@w-1", "upper@w-9"]
        ambiguous = details["failed"]["upper@w-1"]
        assert (ambiguous["code"], ambiguous["reason"]) == ("FAILED_PRECONDITION", "AMBIGUOUS_INSTANCE")
        assert "predates agent-qualified" in ambiguous["message"]
        assert "spare-worker/w-1, worker/w-1" in ambiguous["message"]
        assert details["failed"]["upper@w-9"] == {"code": "UNAVAILABLE", "reason": "NO_LIVE_INSTANCE",
                                                  "message": "instance w-9 is gone"}
        # Neither instance "w-1" was called: a guess could have sent the branch to the wrong agent.
        events = await engine.store.events(wid)
        assert [e["data"]["step"] for e in events if e["type"] == "step_started"] == ["branch-upper@w-2"]


async def test_a_finished_branch_whose_instance_has_left_is_replayed_on_resume(orch: Orch) -> None:
    """A branch finished before the orchestrator died; its instance has left the mesh since. The resumed run
    answers it from the journal: it needs no live instance, so it must not fail "gone" (with both key forms)."""
    await orch.serve(WorkerAgent(), AgentServerConfig(instance_id="w-1"))
    assert await orch.mesh.node.registry.wait_for_capability("upper", 1, timeout=10)
    async with WorkflowEngine(orch.mesh) as engine:
        done = {"capability": "upper", "output": {"text": "DONE"}, "state": "COMPLETED", "agent": "worker",
                "instance": "w-3", "elapsed_ms": 1.0}
        plan = [*_old_plan("w-1", "w-3"), ["upper@worker/w-4", "upper", "worker/w-4"]]
        wid = await _old_run(engine, "wf-left", plan, {"upper@w-3": done, "upper@worker/w-4": done})

        state = await (await engine.resume(wid, wait_s=0)).result(timeout=60)

        assert state.state == "COMPLETED", (state.error, state.output)
        assert state.output["details"]["failed"] == {}
        assert state.output["output"] == {"upper@w-1": {"text": "X"}, "upper@w-3": {"text": "DONE"},
                                          "upper@worker/w-4": {"text": "DONE"}}

"""Durable workflows over the real mesh and etcd: events, replay, resume after a killed orchestrator (a real
child process), exactly-once non-idempotent steps, cancellation of in-flight calls, human escalation
through the real CLI, deadline policies."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import grpc
import pytest

from hivemesh.agents.customer_service import SupervisorDeskAgent, Tier1Agent, Tier2Agent
from hivemesh.mesh.errors import (
    FailedPreconditionError,
    HivemeshError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
)
from hivemesh.sdk.escalation import EscalationClient
from hivemesh.sdk.patterns import Pipeline, Step
from hivemesh.sdk.workflow import WorkflowEngine, WorkflowState
from hivemesh.v1 import escalation_pb2, escalation_pb2_grpc
from tests.support.orch_agents import DeskAgent, RelayAgent, WorkerAgent
from tests.support.orch_env import REPO, Orch, wait_until

pytestmark = pytest.mark.timeout(120)
OWNER = "client-orchestrator"
"""The orchestrator's runs' id prefix: every run id starts with its owner's `<kind>-<name>`."""


def _cli_json(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


async def test_a_run_is_its_events_and_the_cli_shows_each_step(orch: Orch) -> None:
    await orch.serve(WorkerAgent())
    async with WorkflowEngine(orch.mesh) as engine:
        pipeline = Pipeline([Step("upper"), Step("summarize")])
        state = await engine.run(pipeline, {"text": "one two three four five six"}, workflow_id="wf-basic")
        assert state.state == "COMPLETED" and state.output["output"] == {"text": "ONE TWO THREE FOUR FIVE"}
        assert state.id == f"{OWNER}/wf-basic"  # the run belongs to the orchestrator's identity
        events = await engine.store.events(state.id)
        assert [e["type"] for e in events] == [
            "created", "started", "step_started", "step_completed", "step_started", "step_completed", "completed"]
        assert [e["seq"] for e in events] == list(range(1, 8))
        replayed = WorkflowState.replay(state.id, events)
        assert replayed.to_json() == state.to_json()
        assert replayed.tokens > 0 and state.definition == ""  # an in-process object: no import reference
        with pytest.raises(FailedPreconditionError):
            await engine.submit(pipeline, {}, workflow_id="wf-basic")
        with pytest.raises(InvalidInputError):
            await engine.submit(pipeline, {}, workflow_id="Bad/Id")
        with pytest.raises(NotFoundError):
            await engine.get("wf-nope")

    listed = _cli_json(await orch.hivemesh("workflows", "list", "--json"))
    assert [(r["id"], r["state"], r["steps"]) for r in listed] == [(f"{OWNER}/wf-basic", "COMPLETED", 2)]
    shown = _cli_json(await orch.hivemesh("workflows", "show", "wf-basic", "--json"))
    steps = shown["step_list"]
    assert [(s["step"], s["capability"], s["agent"], s["status"]) for s in steps] == [
        ("01-upper", "upper", "worker", "COMPLETED"), ("02-summarize", "summarize", "worker", "COMPLETED")]
    assert all(s["elapsed_ms"] is not None and s["started_at"] > 0 for s in steps)
    assert steps[1]["usage"]["output_tokens"] == 5
    human = await orch.hivemesh("workflows", "show", f"{OWNER}/wf-basic")
    assert human.returncode == 0 and "01-upper" in human.stdout and "COMPLETED" in human.stdout
    missing = await orch.hivemesh("workflows", "show", "wf-missing")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr and "Traceback" not in missing.stderr


def _spawn_orchestrator(orch: Orch, token: str, *args: str) -> subprocess.Popen[str]:
    env = {**orch.cli_env(), "HIVEMESH_JOIN_TOKEN": token, "HIVEMESH_LOCK_TTL_S": "2"}
    return subprocess.Popen([sys.executable, "-m", "tests.support.orchestrator_main", *args], cwd=str(REPO), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.kill()
    out, _ = proc.communicate(timeout=30)
    return out or ""


@pytest.mark.slow
async def test_killed_orchestrator_resumes_and_no_non_idempotent_step_runs_twice(orch: Orch) -> None:
    worker = WorkerAgent()
    server = await orch.serve(worker)
    token = (await orch.env.operator.create_join_token("orchestrator", "client", 120)).token
    child = _spawn_orchestrator(orch, token, "start", "wf-kill", "acme")
    killed: list[int] = []

    def kill_after_first_effect(effect: dict[str, Any]) -> None:
        # The worst moment: the effect is committed, the orchestrator has not heard back (nor recorded it).
        if not killed:
            os.kill(child.pid, signal.SIGKILL)
            killed.append(child.pid)

    worker.on_effect = kill_after_first_effect
    try:
        await wait_until(lambda: child.poll() is not None, 60, "the orchestrator to be killed mid-workflow")
        assert child.returncode == -signal.SIGKILL and killed == [child.pid]
        before = json.loads((await orch.hivemesh("workflows", "show", "wf-kill", "--json")).stdout)
        assert before["state"] == "WORKING"
        by_step = {s["step"]: s["status"] for s in before["step_list"]}
        assert by_step == {"normalize": "COMPLETED", "charge-1": "WORKING"}  # started, never recorded as done

        resumed = await orch.hivemesh("workflows", "resume", "wf-kill", "--json", timeout=90)
    finally:
        _stop(child)
    state = _cli_json(resumed)
    assert state["state"] == "COMPLETED", state
    assert state["output"] == {"account": "ACME", "receipts": [1, 2]}
    # Exactly once: one effect per non-idempotent step, though charge-1 was sent twice with the same key.
    keys = [e["key"] for e in worker.effects]
    assert keys == [f"{OWNER}/wf-kill/charge-1", f"{OWNER}/wf-kill/charge-2"]
    # the resend was replayed, not re-run
    assert worker.started == [f"{OWNER}/wf-kill/charge-1", f"{OWNER}/wf-kill/charge-2"]
    assert server.dedupe.replays == 1  # type: ignore[attr-defined]
    steps = {s["step"]: s for s in state["step_list"]}
    assert steps["normalize"]["attempts"] == 1  # completed steps are not called again on resume
    assert steps["charge-1"]["attempts"] == 2 and steps["charge-2"]["attempts"] == 1
    assert len(state["runs"]) == 2 and state["runs"][1]["owner"].endswith("/operator/admin")


@pytest.mark.slow
async def test_restarted_orchestrator_resumes_its_runs_automatically(orch: Orch) -> None:
    worker = WorkerAgent()
    await orch.serve(worker)
    token = (await orch.env.operator.create_join_token("orchestrator", "client", 120)).token
    # charge-1 sleeps 3 s before its effect: the kill lands while the agent is still working on it.
    child = _spawn_orchestrator(orch, token, "start", "wf-restart", "globex", "3")
    try:
        await wait_until(lambda: f"{OWNER}/wf-restart/charge-1" in worker.started, 60, "charge-1 to start")
        child.kill()
        child.wait(timeout=30)
    finally:
        _stop(child)
    # the orchestrator's connection died, so the agent's handler was cancelled before its effect
    assert worker.effects == []
    again = (await orch.env.operator.create_join_token("orchestrator", "client", 120)).token
    restarted = _spawn_orchestrator(orch, again, "resume-all")
    try:
        await wait_until(lambda: restarted.poll() is not None, 90, "the restarted orchestrator to finish")
    finally:
        out = _stop(restarted)
    assert f"driving {OWNER}/wf-restart" in out and f"done {OWNER}/wf-restart COMPLETED" in out, out
    assert [e["key"] for e in worker.effects] == [f"{OWNER}/wf-restart/charge-1", f"{OWNER}/wf-restart/charge-2"]


async def test_cancelling_a_run_cancels_its_in_flight_calls_down_the_chain(orch: Orch) -> None:
    worker = WorkerAgent()
    await orch.serve(worker)
    await orch.serve(RelayAgent())
    async with WorkflowEngine(orch.mesh) as engine:
        handle = await engine.submit("tests.support.orch_workflows:nap_flow", {"seconds": 60, "tag": "deep"},
                                     workflow_id="wf-cancel")
        await wait_until(lambda: "deep" in worker.started, 20, "the nap two hops down to start")
        started = time.monotonic()
        cancelled = await orch.hivemesh("workflows", "cancel", "wf-cancel", "--reason", "changed my mind", "--json")
        assert _cli_json(cancelled)["state"] == "CANCELED"
        state = await handle.result(timeout=10)
    assert state.state == "CANCELED" and state.reason == "changed my mind"
    assert state.cancel_requested is not None and state.cancel_requested["by"].endswith("/operator/admin")
    # relay's call to nap was cancelled too: the handler two hops down saw CancelledError
    await wait_until(lambda: "deep" in worker.cancelled, 10, "the downstream call's cancellation")
    assert time.monotonic() - started < 15
    assert state.steps["relay"].status == "WORKING"  # never completed
    again = await orch.hivemesh("workflows", "resume", "wf-cancel")
    assert again.returncode == 1 and "CANCELED" in again.stderr
    # Cancelling a finished run is a mistake a script must see: non-zero, FAILED_PRECONDITION, as JSON with --json.
    twice = await orch.hivemesh("workflows", "cancel", "wf-cancel", "--json")
    assert twice.returncode == 1 and twice.stdout == "", twice
    error = json.loads(twice.stderr)["error"]
    assert error["code"] == "FAILED_PRECONDITION" and "already finished (CANCELED)" in error["message"], error


async def test_supervisor_escalation_resolved_through_the_cli_resumes_the_run(orch: Orch) -> None:
    for agent in (Tier1Agent(), Tier2Agent(), SupervisorDeskAgent()):
        await orch.serve(agent)
    async with WorkflowEngine(orch.mesh) as engine:
        handle = await engine.submit(
            "hivemesh.agents.customer_service:CUSTOMER_SERVICE",
            {"customer": "initech", "tier": "pro", "message": "I want a refund of $2500 for the annual plan."},
            workflow_id="wf-refund",
        )
        await wait_until(lambda: _state(engine, "wf-refund", "INPUT_REQUIRED"), 30, "the run to wait for a person")
        pending = _cli_json(await orch.hivemesh("escalations", "list", "--json"))
        assert len(pending) == 1
        esc = pending[0]
        assert esc["workflow_id"] == f"{OWNER}/wf-refund" and esc["status"] == "PENDING"
        assert esc["reason"] == "confidence 0.55 is below 0.70"
        assert esc["context"]["proposed"]["handled_by"] == "supervisor"
        shown = await orch.hivemesh("escalations", "show", esc["id"])
        assert shown.returncode == 0 and "PENDING" in shown.stdout
        wf = _cli_json(await orch.hivemesh("workflows", "show", "wf-refund", "--json"))
        assert wf["state"] == "INPUT_REQUIRED"

        answer = {"answer": "Refund of $2500 approved by a manager.", "action": "refund", "confidence": 1.0}
        approved = await orch.hivemesh("escalations", "approve", esc["id"], "--note", "long-time customer",
                                       "--answer", json.dumps(answer), "--json")
        assert _cli_json(approved)["status"] == "APPROVED"
        state = await handle.result(timeout=30)
    assert state.state == "COMPLETED"
    assert state.output["output"]["replies"]["request-1"] == answer
    resolution = state.escalations["request-1/human"]["resolution"]
    assert resolution["resolved_by"].endswith("/operator/admin") and resolution["note"] == "long-time customer"
    twice = await orch.hivemesh("escalations", "approve", esc["id"])
    assert twice.returncode == 1 and "already approved" in twice.stderr


def _state(engine: WorkflowEngine, wid: str, want: str) -> Any:
    async def check() -> bool:
        return (await engine.get(wid)).state == want
    return check()


async def test_escalation_deadlines_follow_their_policy_and_access_is_checked(orch: Orch) -> None:
    operator = EscalationClient(orch.env.operator.channel)
    agent_side = EscalationClient(orch.mesh.node.controlplane)
    rejecting = await agent_side.create("approve the thing", {"x": 1}, deadline_s=1)
    defaulting = await agent_side.create("pick a size", {}, deadline_s=1, on_deadline="default",
                                         default_answer={"size": "M"})
    started = time.monotonic()
    r = await agent_side.wait(rejecting.id, timeout=15)
    d = await agent_side.wait(defaulting.id, timeout=15)
    assert time.monotonic() - started < 8
    assert (r.status, r.resolved_by) == ("REJECTED", "policy:deadline")
    assert (d.status, d.answer, d.resolved_by) == ("APPROVED", {"size": "M"}, "policy:deadline")
    # idempotent create by id; only operators resolve; requesters see their own
    again = await agent_side.create("approve the thing", escalation_id=rejecting.id)
    assert again.id == rejecting.id and again.status == "REJECTED"
    mine = await agent_side.create("needs a person", escalation_id="esc-mine")
    with pytest.raises(PermissionDeniedError):
        await agent_side.resolve(mine.id, approve=True)
    assert {e.id for e in await agent_side.list()} == {rejecting.id, defaulting.id, "esc-mine"}
    with pytest.raises(InvalidInputError):
        await agent_side.create("")
    with pytest.raises(InvalidInputError):
        await agent_side.create("x", on_deadline="later")  # type: ignore[arg-type]
    stub = escalation_pb2_grpc.EscalationsStub(orch.mesh.node.controlplane.channel)
    for bad in (escalation_pb2.CreateEscalationRequest(reason="x", context_json="[1]"),
                escalation_pb2.CreateEscalationRequest(reason="x", id="../etc"),
                escalation_pb2.CreateEscalationRequest(
                    reason="x", on_deadline=escalation_pb2.DEADLINE_POLICY_DEFAULT_ANSWER),
                escalation_pb2.CreateEscalationRequest(reason="x", deadline_seconds=10**9)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateEscalation(bad, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(NotFoundError):
        await operator.get("esc-none")
    cancelled = await agent_side.cancel(mine.id, note="not needed")
    assert cancelled.status == "CANCELED"
    with pytest.raises(FailedPreconditionError):
        await operator.resolve(mine.id, approve=True)
    # every creation and resolution is in the control plane's tamper-evident audit log
    log = orch.tmp / "cp-state" / "audit" / "log.jsonl"
    records = [json.loads(line)["record"] for line in log.read_text().splitlines()]
    audited = [(r["action"], r["id"], r["actor"].rsplit("/", 1)[-1]) for r in records if r.get("event") == "escalation"]
    assert audited == [
        ("created", rejecting.id, "orchestrator"), ("created", defaulting.id, "orchestrator"),
        ("expired", rejecting.id, "policy:deadline"), ("expired", defaulting.id, "policy:deadline"),
        ("created", "esc-mine", "orchestrator"), ("canceled", "esc-mine", "orchestrator"),
    ]


async def test_an_agent_asks_a_person_mid_pipeline_a2a_style(orch: Orch) -> None:
    await orch.serve(DeskAgent())
    operator = EscalationClient(orch.env.operator.channel)
    async with WorkflowEngine(orch.mesh) as engine:
        pipeline = Pipeline([Step("approve-refund")])
        handle = await engine.submit(pipeline, {"question": "refund order 7"}, workflow_id="wf-ask")
        pending = await wait_until(lambda: operator.list("PENDING"), 20, "the agent's escalation")
        assert pending[0].reason == "a refund needs a person's approval" and pending[0].workflow_id == f"{OWNER}/wf-ask"
        await operator.resolve(pending[0].id, approve=True, note="fine", answer="yes")
        state = await handle.result(timeout=20)
    assert state.state == "COMPLETED"
    assert state.output["output"] == {"refunded": True, "answer": "yes", "note": "fine"}
    assert state.steps["01-approve-refund"].status == "INPUT_REQUIRED"
    assert state.steps["01-approve-refund/answered"].status == "COMPLETED"


async def test_keyed_non_idempotent_calls_take_effect_once(orch: Orch) -> None:
    worker = WorkerAgent()
    await orch.serve(worker)
    mesh = orch.mesh
    req = {"account": "a", "amount": 1.0, "delay": 0.3}
    first, second = await asyncio.gather(mesh.call("charge", req, idempotency_key="k1", timeout=10),
                                         mesh.call("charge", req, idempotency_key="k1", timeout=10))
    third = await mesh.call("charge", req, idempotency_key="k1", timeout=10)
    assert first == second == third and [e["key"] for e in worker.effects] == ["k1"]
    with pytest.raises(InvalidInputError) as reused:
        await mesh.call("charge", {**req, "amount": 2.0}, idempotency_key="k1", timeout=10)
    assert reused.value.field_violations == {"context.idempotency_key": "reused with a different input"}
    # an attempt cancelled before its effect releases the key: the retry runs, once
    slow = {**req, "delay": 0.6}
    with pytest.raises(HivemeshError) as late:
        await mesh.call("charge", slow, idempotency_key="k2", timeout=0.2)
    assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_until(lambda: worker.started.count("k2") == 1, 5, "the first k2 attempt to start")
    await mesh.call("charge", slow, idempotency_key="k2", timeout=10)
    await mesh.call("charge", slow, idempotency_key="k2", timeout=10)
    await mesh.call("charge", req, timeout=10)  # no key: no dedupe
    await mesh.call("charge", req, timeout=10)
    assert [e["key"] for e in worker.effects] == ["k1", "k2", "", ""]
    assert worker.started.count("k2") == 2

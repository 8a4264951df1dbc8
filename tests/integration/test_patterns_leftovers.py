"""Leftovers of the multi-agent patterns review, over the real mesh (real agents, mTLS, etcd registry; durable runs
in real etcd): a handoff's conversation id under a workflow, a handoff to a name that is no capability name, and a
decomposition with no bound but the message size."""

from __future__ import annotations

from typing import Any

import pytest

from hivemesh.mesh.errors import AgentError
from hivemesh.sdk import Agent, Context, capability
from hivemesh.sdk.patterns import EscalationRules, Handoff, Subtask, Supervisor
from hivemesh.sdk.workflow import WorkflowEngine
from tests.support.orch_env import Orch

pytestmark = pytest.mark.timeout(120)


class _Desks(Agent):
    """Desk agents that record the conversation id each call carried (in its context and in its input)."""

    name = "leftover-desks"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str, str]] = []
        """(capability, CallContext.conversation_id, input conversation.id) of every call."""
        self.answered = 0

    def _record(self, cap: str, req: dict[str, Any], ctx: Context) -> None:
        self.seen.append((cap, ctx.call.conversation_id, str((req.get("conversation") or {}).get("id", ""))))

    @capability(name="lo-desk", description="Hand every conversation to the expert", idempotent=True)
    async def desk(self, req: dict[str, Any], ctx: Context) -> dict[str, Any]:
        self._record("lo-desk", req, ctx)
        return {"reply": "one moment", "handoff": {"to": "lo-expert", "reason": "needs an expert"}}

    @capability(name="lo-expert", description="Answer the conversation", idempotent=True)
    async def expert(self, req: dict[str, Any], ctx: Context) -> dict[str, Any]:
        self._record("lo-expert", req, ctx)
        return {"reply": "solved"}

    @capability(name="lo-astray", description="Hand over to a target that is no capability name", idempotent=True)
    async def astray(self, req: dict[str, Any], ctx: Context) -> dict[str, Any]:
        self._record("lo-astray", req, ctx)
        return {"handoff": {"to": str((req.get("conversation") or {}).get("context", {}).get("to", ""))}}

    @capability(name="lo-plan", description="Decompose into as many subtasks as asked", idempotent=True)
    async def plan(self, req: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"id": f"s{i}", "capability": "lo-answer", "input": {"i": i}} for i in range(int(req["count"]))]

    @capability(name="lo-answer", description="Answer a subtask", idempotent=True)
    async def answer(self, req: dict[str, Any]) -> dict[str, Any]:
        self.answered += 1
        return {"answer": req.get("i"), "confidence": 0.9}


async def test_a_handoff_under_a_workflow_sends_its_conversation_id_on_every_call(orch: Orch) -> None:
    """Under a workflow a Handoff called through `WorkflowRun.step`, which had no conversation id: its calls carried
    the engine's (none by default), not the conversation's, so an agent's conversation memory was not that
    conversation's. Every call now carries the id the agents also get in `conversation.id`, and the journal's step
    ids and idempotency keys are what they were (a resumed run finds its steps)."""
    desks = _Desks()
    await orch.serve(desks)
    chat = Handoff("lo-desk", max_handoffs=2)
    async with WorkflowEngine(orch.mesh) as engine:
        state = await engine.run(chat, {"message": "hi", "conversation_id": "chat-42"}, workflow_id="wf-conv-given")
        assert state.state == "COMPLETED", state.error
        assert state.output["output"]["conversation_id"] == "chat-42"
        assert desks.seen == [("lo-desk", "chat-42", "chat-42"), ("lo-expert", "chat-42", "chat-42")]
        assert {s: info.key for s, info in state.steps.items()} == {
            "turn-1-lo-desk": f"{state.id}/turn-1-lo-desk", "turn-2-lo-expert": f"{state.id}/turn-2-lo-expert"}

        desks.seen.clear()
        state = await engine.run(chat, {"message": "hi"}, workflow_id="wf-conv-made")
        assert state.state == "COMPLETED", state.error
        made = state.output["output"]["conversation_id"]
        assert made and desks.seen == [("lo-desk", made, made), ("lo-expert", made, made)]

    # An engine-wide conversation id is the conversation's when its input names none (not a second, made-up id).
    desks.seen.clear()
    async with WorkflowEngine(orch.mesh, conversation_id="cust-7") as engine:
        state = await engine.run(chat, {"message": "hi"}, workflow_id="wf-conv-engine")
        assert state.state == "COMPLETED", state.error
        assert desks.seen == [("lo-desk", "cust-7", "cust-7"), ("lo-expert", "cust-7", "cust-7")]
        desks.seen.clear()
        state = await engine.run(chat, {"message": "hi", "conversation_id": "chat-9"}, workflow_id="wf-conv-both")
        assert state.state == "COMPLETED", state.error
        assert desks.seen == [("lo-desk", "chat-9", "chat-9"), ("lo-expert", "chat-9", "chat-9")]

    # Outside a workflow, as before: the conversation's id on every call.
    desks.seen.clear()
    result = await chat.run(orch.mesh, {"message": "hi", "conversation_id": "chat-43"})
    assert desks.seen == [("lo-desk", "chat-43", "chat-43"), ("lo-expert", "chat-43", "chat-43")]
    assert result.output["conversation_id"] == "chat-43"


@pytest.mark.parametrize("bad", ["Security/Triage", "-x", "a" * 64, "esc\nape"])
async def test_a_handoff_to_no_capability_name_is_an_agent_error_before_any_step(orch: Orch, bad: str) -> None:
    """An agent's handoff target (text a model wrote) went into the next step id (`turn-N-<target>`) and a journal
    note unchecked: a `/` or an over-long name made a step id and idempotency key of it, and the call then failed as
    the mesh's error, not the agent's. It is now an AgentError naming the agent and the target, before the handoff
    is noted or another step is recorded."""
    await orch.serve(_Desks())
    chat = Handoff("lo-astray", max_handoffs=2)
    start = {"message": "hi", "context": {"to": bad}}
    with pytest.raises(AgentError, match=r"lo-astray handed the conversation to .* which is not a capability name"):
        await chat.run(orch.mesh, start)
    async with WorkflowEngine(orch.mesh) as engine:
        state = await engine.run(chat, start, workflow_id="wf-astray")
        assert state.state == "FAILED" and state.error is not None
        assert state.error["reason"] == "AGENT_ERROR" and "lo-astray" in state.error["message"]
        assert repr(bad[:80]) in state.error["message"]
        assert list(state.steps) == ["turn-1-lo-astray"] and state.notes == []


async def test_a_decomposition_larger_than_max_subtasks_is_an_agent_error_before_any_subtask(orch: Orch) -> None:
    """A decomposer's subtask list was bounded only by the message size: thousands of subtasks were each delegated
    (and reviewed, retried, noted) one after another. More than `max_subtasks` (64 by default) is now an AgentError
    naming the decomposer and the count, before any subtask is started; exactly the bound still runs."""
    desks = _Desks()
    await orch.serve(desks)
    rules = EscalationRules(tiers=())
    with pytest.raises(AgentError, match="decompose capability 'lo-plan' produced 65 subtasks, more than the 64"):
        await Supervisor("lo-plan", rules=rules).run(orch.mesh, {"count": 65})
    assert desks.answered == 0
    with pytest.raises(AgentError, match="'lo-plan' produced 3 subtasks, more than the 2"):
        await Supervisor("lo-plan", rules=rules, max_subtasks=2).run(orch.mesh, {"count": 3})
    assert desks.answered == 0
    async with WorkflowEngine(orch.mesh) as engine:
        state = await engine.run(Supervisor("lo-plan", rules=rules, max_subtasks=2), {"count": 3},
                                 workflow_id="wf-too-many")
        assert state.state == "FAILED" and state.error is not None and state.error["reason"] == "AGENT_ERROR"
        assert list(state.steps) == ["decompose"] and desks.answered == 0
    done = await Supervisor("lo-plan", rules=rules, max_subtasks=2).run(orch.mesh, {"count": 2})
    assert done.state == "COMPLETED" and done.output == {"s0": {"answer": 0, "confidence": 0.9},
                                                          "s1": {"answer": 1, "confidence": 0.9}}
    # A local decompose function is the caller's own code: a ValueError, as its other mistakes are.
    with pytest.raises(ValueError, match="decompose produced 3 subtasks, more than the 2"):
        await Supervisor(lambda _t: [Subtask(f"s{i}", "lo-answer", {}) for i in range(3)], rules=rules,
                         max_subtasks=2).run(orch.mesh, {})
    assert desks.answered == 2


@pytest.mark.parametrize("bound", [0, -1, True, 2.5, "64"])
def test_a_supervisor_refuses_a_subtask_bound_that_is_no_positive_int(bound: Any) -> None:
    with pytest.raises(ValueError, match="max_subtasks must be a positive int"):
        Supervisor("lo-plan", max_subtasks=bound)

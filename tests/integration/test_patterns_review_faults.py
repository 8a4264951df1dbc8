"""Patterns against a caller that gives up, agents that answer wrongly and configurations that cannot work, over
the real mesh (real agents, mTLS, etcd registry; durable runs in real etcd)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hivemesh.mesh.errors import AgentError
from hivemesh.sdk import Agent, capability
from hivemesh.sdk.patterns import Branch, EscalationRules, FanOut, PeerReview, Subtask, Supervisor
from tests.support.orch_agents import WorkerAgent
from tests.support.orch_env import Orch, wait_until

pytestmark = pytest.mark.timeout(90)


def _branch_tasks() -> list[asyncio.Task[Any]]:
    """The fan-out's branch tasks still alive in this loop."""
    return [t for t in asyncio.all_tasks()
            if "FanOut.run.<locals>.branch" in getattr(t.get_coro(), "__qualname__", "") and not t.done()]


async def test_a_cancelled_fail_fast_fanout_has_stopped_its_branches_when_the_cancel_returns(orch: Orch) -> None:
    """Cancelling a fail-fast fan-out's caller cancelled its branches but did not wait for them: when the cancelled
    run returned, its branch tasks (and their calls) were still running, unowned; a loop closing then destroys them
    pending. Both modes now return from a cancel only with every branch finished."""
    worker = WorkerAgent()
    await orch.serve(worker)
    for fail_fast in (True, False):
        tags = [f"ff{fail_fast}-a", f"ff{fail_fast}-b"]
        fan = FanOut([Branch("nap", name=tag, input=lambda _r, t=tag: {"seconds": 30.0, "tag": t}) for tag in tags],
                     fail_fast=fail_fast, branch_timeout=60)
        run = asyncio.ensure_future(fan.run(orch.mesh, {}))
        await wait_until(lambda tags=tags: all(t in worker.started for t in tags), 10, "both branches at the agent")
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        assert _branch_tasks() == [], f"fail_fast={fail_fast}: branches still running after the cancel returned"
        await wait_until(lambda tags=tags: all(t in worker.cancelled for t in tags), 10, "the calls cancelled")


class _Judges(Agent):
    """A writer and reviewers as a model might answer: verdicts whose `approved` is text, or no object at all."""

    name = "judges"

    @capability(name="judge-write", description="Write a draft", idempotent=True)
    async def write(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"draft": f"draft {req.get('round')}"}

    @capability(name="judge-text-verdict", description="Review, saying approved as the text false", idempotent=True)
    async def text_verdict(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"approved": "false", "feedback": ["not yet"]}

    @capability(name="judge-answer", description="Answer a subtask", idempotent=True)
    async def answer(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"answer": "42", "confidence": 0.9}

    @capability(name="judge-plan", description="Decompose, reassigning to one capability given as text",
                idempotent=True)
    async def plan(self, req: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"id": "s1", "capability": "judge-prose", "input": {}, "reassign_to": "expert"}]

    @capability(name="judge-prose", description="Review a subtask in prose, not a verdict object", idempotent=True)
    async def prose(self, req: dict[str, Any]) -> str:
        return "REJECTED: the answer is wrong"


async def test_a_reviewer_whose_verdict_is_not_a_boolean_is_an_agent_error_not_an_approval(orch: Orch) -> None:
    """`bool(verdict["approved"])` made the text "false" an approval, and a supervisor's review capability answering
    anything but an object (prose saying REJECTED) approved the result. Both are now an AgentError naming the
    reviewer, so a muddled reviewer never waves a result through."""
    await orch.serve(_Judges())
    with pytest.raises(AgentError, match="judge-text-verdict answered approved that is str, not a boolean"):
        await PeerReview("judge-write", ["judge-text-verdict"], max_rounds=2).run(orch.mesh, {"brief": "b"})
    no_escalation = EscalationRules(tiers=(), min_confidence=None)
    with pytest.raises(AgentError, match="review capability 'judge-prose' answered str, not"):
        await Supervisor(lambda _t: [Subtask("s1", "judge-answer", {})], review="judge-prose",
                         rules=no_escalation).run(orch.mesh, {})
    with pytest.raises(AgentError, match="review capability 'judge-text-verdict' answered approved that is str"):
        await Supervisor(lambda _t: [Subtask("s1", "judge-answer", {})], review="judge-text-verdict",
                         rules=no_escalation).run(orch.mesh, {})


def test_configurations_that_cannot_work_are_refused_when_the_pattern_is_made() -> None:
    """A capability named twice in one peer review shares its step id each round (`round-N/<capability>`), so in a
    durable run its second call replays the first's answer (a writer among its reviewers "reviews" with its own
    draft); a fan-out needing more answers than it has branches calls them all and then fails. Both are refused
    at construction."""
    with pytest.raises(ValueError, match="distinct"):
        PeerReview("judge-write", ["judge-write"])
    with pytest.raises(ValueError, match="distinct"):
        PeerReview("judge-write", ["judge-text-verdict", "judge-text-verdict"])
    with pytest.raises(ValueError, match="min_success 3 is more than the 2 branches"):
        FanOut(["upper", "nap"], min_success=3)




async def test_a_decomposer_reassigning_to_text_is_an_agent_error_not_a_call_per_letter(orch: Orch) -> None:
    """A decomposing capability answering `"reassign_to": "expert"` (one name, not a list) had the subtask
    reassigned along tuple() of the text: to capabilities "e", "x", "p", ... (each name valid, each called and
    failing, twice). It is now an AgentError naming the decomposer, before any subtask is delegated."""
    judges = _Judges()
    await orch.serve(judges)
    with pytest.raises(AgentError, match=r"judge-plan' produced a subtask .*reassign_to is str, not a list"):
        await Supervisor("judge-plan", rules=EscalationRules(max_errors=None)).run(orch.mesh, {})

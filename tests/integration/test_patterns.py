"""Each orchestration pattern end to end over the real mesh (real agents, mTLS, tokens, etcd registry)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hivemesh.agents.content import CONTENT_LOOP, EditorAgent, FactCheckerAgent, WriterAgent
from hivemesh.agents.helpdesk import (
    HELPDESK,
    HELPDESK_CHAT,
    ApplicationSpecialist,
    NetworkSpecialist,
    SecuritySpecialist,
)
from hivemesh.agents.research import RESEARCH, NewsSearchAgent, PapersSearchAgent, WikiSearchAgent
from hivemesh.mesh.errors import AgentError, DeadlineExceededError
from hivemesh.sdk import Agent, AgentServerConfig, capability
from hivemesh.sdk.escalation import EscalationClient
from hivemesh.sdk.patterns import (
    Branch,
    EscalationRules,
    FanOut,
    FanOutError,
    Handoff,
    HashingEmbedder,
    PeerReview,
    Pipeline,
    Router,
    Rule,
    Step,
    Subtask,
    Supervisor,
)
from tests.support.orch_agents import DeskAgent, WorkerAgent
from tests.support.orch_env import Orch, wait_until

pytestmark = pytest.mark.timeout(90)


async def test_pipeline_feeds_each_output_to_the_next_and_a_validation_step_stops_it(orch: Orch) -> None:
    await orch.serve(WorkerAgent())
    pipeline = Pipeline([
        Step("upper"),
        Step("summarize", input=lambda prev, ctx: {"text": prev["text"] + " " + ctx.input["text"]}),
    ])
    result = await pipeline.run(orch.mesh, {"text": "alpha beta gamma delta epsilon zeta"})
    assert result.state == "COMPLETED"
    assert result.output == {"text": "ALPHA BETA GAMMA DELTA EPSILON"}
    assert [s.capability for s in result.steps] == ["upper", "summarize"]
    assert [s.agent for s in result.steps] == ["worker", "worker"]
    # token usage is counted by the agent and reported per call (InvokeResponse.usage)
    assert result.steps[1].usage is not None and result.steps[1].usage["output_tokens"] == 5
    assert result.steps[0].usage is None and result.tokens == result.steps[1].tokens > 5

    stopping = Pipeline([
        Step("upper", stop_if=lambda out: "shouting is not allowed" if out["text"].isupper() else None),
        Step("summarize"),
    ])
    stopped = await stopping.run(orch.mesh, {"text": "quiet please"})
    assert stopped.state == "REJECTED" and stopped.reason == "shouting is not allowed"
    assert [s.capability for s in stopped.steps] == ["upper"]  # summarize never ran
    assert stopped.details["stopped_at"] == "upper"


async def test_fanout_degrades_gracefully_naming_the_failed_branches(orch: Orch) -> None:
    worker = WorkerAgent()
    await orch.serve(worker)
    text_only = lambda req: {"text": req["text"]}  # noqa: E731
    fan = FanOut([Branch("upper", input=text_only), Branch("broken", input=text_only),
                  Branch("nap", input=lambda req: {"seconds": req["seconds"], "tag": req["tag"]})],
                 branch_timeout=0.5, aggregate=lambda outs: sorted(outs))
    result = await fan.run(orch.mesh, {"text": "hi", "seconds": 5.0, "tag": "late"})
    assert result.output == ["upper"]
    assert result.details["partial"] is True
    failed = result.details["failed"]
    assert set(failed) == {"broken", "nap"}
    assert failed["broken"]["reason"] == "AGENT_ERROR"
    assert failed["nap"]["reason"] == "DEADLINE_EXCEEDED"
    assert "nap missed its 0.5 s deadline" in failed["nap"]["message"]
    # the late branch was really cancelled at the agent, not left running
    await wait_until(lambda: "late" in worker.cancelled, 5, "the late branch's cancellation")

    with pytest.raises(FanOutError) as fast:
        await FanOut([Branch("broken", input=text_only),
                      Branch("nap", input=lambda r: {"seconds": 3.0, "tag": "fast"})],
                     fail_fast=True, branch_timeout=5).run(orch.mesh, {"text": "x"})
    assert "broken" in fast.value.failed and fast.value.reason == "AGENT_ERROR"
    await wait_until(lambda: "fast" in worker.cancelled, 5, "fail-fast cancelling the other branch")

    with pytest.raises(FanOutError) as none:
        await FanOut(["broken"]).run(orch.mesh, {"text": "x"})
    assert "only 0 of 1 branches answered" in none.value.message

    # A branch whose own code raises (its input function, or an input that is no JSON) is a failed branch like
    # any other: named, the rest aggregated; fail-fast names it. Before, fail-fast raised IndexError (and lost
    # the branch's error) and the graceful run raised the bare exception, dropping the other branches' answers.
    def missing_field(req: dict[str, str]) -> dict[str, str]:
        return {"text": req["absent"]}

    graceful = await FanOut([Branch("upper", input=text_only), Branch("broken", input=missing_field),
                             Branch("nap", input=lambda _: {"seconds": {1, 2}})],
                            branch_timeout=5).run(orch.mesh, {"text": "hi"})
    assert set(graceful.output) == {"upper"} and set(graceful.details["failed"]) == {"broken", "nap"}
    assert "branch broken raised KeyError" in graceful.details["failed"]["broken"]["message"]
    assert "branch nap raised TypeError" in graceful.details["failed"]["nap"]["message"]
    with pytest.raises(FanOutError) as named:
        await FanOut([Branch("nap", input=lambda r: {"seconds": 3.0, "tag": "named"}),
                      Branch("broken", input=missing_field)], fail_fast=True, branch_timeout=5).run(
            orch.mesh, {"text": "x"})
    assert named.value.message.startswith("fan-out branch broken failed: branch broken raised KeyError")
    assert named.value.failed["broken"]["reason"] == "AGENT_ERROR"
    await wait_until(lambda: "named" in worker.cancelled, 5, "fail-fast cancelling the other branch")


class SpareWorker(WorkerAgent):
    name = "spare-worker"


async def test_fanout_to_every_instance_of_a_capability(orch: Orch) -> None:
    """Every instance, however named: "w-1" is a worker's instance id and a spare worker's too."""
    await orch.serve(WorkerAgent(), AgentServerConfig(instance_id="w-1"))
    await orch.serve(WorkerAgent(), AgentServerConfig(instance_id="w-2"))
    await orch.serve(SpareWorker(), AgentServerConfig(instance_id="w-1"))
    assert await orch.mesh.node.registry.wait_for_capability("upper", 3, timeout=10)
    result = await FanOut(all_instances_of="upper").run(orch.mesh, {"text": "x"})
    assert sorted(result.output) == ["upper@spare-worker/w-1", "upper@worker/w-1", "upper@worker/w-2"]
    assert sorted((s.agent, s.instance) for s in result.steps) == [
        ("spare-worker", "w-1"), ("worker", "w-1"), ("worker", "w-2")]


async def test_research_fanout_over_three_corpora(orch: Orch) -> None:
    for agent in (PapersSearchAgent(), NewsSearchAgent(), WikiSearchAgent()):
        await orch.serve(agent)
    result = await RESEARCH.run(orch.mesh, {"query": "raft consensus leader", "limit": 2})
    sources = {h["source"] for h in result.output}
    assert sources == {"papers", "wiki"} or sources >= {"papers", "wiki"}
    assert result.output[0]["id"] in ("raft", "consensus", "etcd")
    assert not result.details["failed"]


async def test_supervisor_reassigns_weak_answers_and_escalates_by_rule(orch: Orch) -> None:
    await orch.serve(DeskAgent())
    sup = Supervisor(
        lambda task: [Subtask("q1", "answer", {"question": task["q"], "confidence": 0.4},
                              reassign_to=("answer-expert",)),
                      Subtask("q2", "answer", {"question": "easy", "confidence": 0.9})],
        rules=EscalationRules(tiers=("enterprise",)),
    )
    result = await sup.run(orch.mesh, {"q": "hard one", "tier": "free"})
    assert result.state == "COMPLETED"
    assert result.output["q1"]["answer"] == "expert re: hard one"  # reassigned from a 0.4 answer
    assert result.output["q2"]["answer"] == "re: easy"
    q1 = result.details["subtasks"][0]
    assert [a["capability"] for a in q1["attempts"]] == ["answer", "answer-expert"]
    assert not result.details["escalations"]

    # enterprise tier: a person must approve; approve it from here (the operator path is tested via the CLI)
    operator = EscalationClient(orch.env.operator.channel)
    task = asyncio.ensure_future(sup.run(orch.mesh, {"q": "hard one", "tier": "enterprise"}))
    pending = await wait_until(lambda: operator.list("PENDING"), 15, "the enterprise escalation")
    assert len(pending) == 1 and "enterprise" in pending[0].reason
    await operator.resolve(pending[0].id, approve=True, note="ok")
    pending = await wait_until(lambda: operator.list("PENDING"), 15, "the second subtask's escalation")
    await operator.resolve(pending[0].id, approve=False, note="no")
    done = await asyncio.wait_for(task, 15)
    assert done.state == "REJECTED" and done.details["rejected"] == ["q2"]
    assert done.output == {"q1": {"answer": "expert re: hard one", "confidence": 0.95}}


async def test_peer_review_content_loop_rounds_until_all_approve(orch: Orch) -> None:
    for agent in (WriterAgent(), EditorAgent(), FactCheckerAgent()):
        await orch.serve(agent)
    seen: list[dict[str, object]] = []
    loop = CONTENT_LOOP
    loop.on_round = seen.append
    try:
        result = await loop.run(orch.mesh, {"brief": {"topic": "etcd"}})
    finally:
        loop.on_round = None
    assert result.state == "COMPLETED" and result.output["approved"] is True and result.output["rounds"] == 2
    draft = result.output["draft"]
    assert "port 2379" in draft and "4001" not in draft and "really" not in draft
    rounds = result.details["rounds"]
    assert [r["approved"] for r in rounds] == [False, True] and seen == rounds
    first = {v["reviewer"]: v for v in rounds[0]["verdicts"]}
    assert first["edit-draft"]["revised"] is True
    assert any("'4001' should be '2379'" in f for f in first["fact-check"]["feedback"])
    assert [s.capability for s in result.steps] == ["write-draft", "edit-draft", "fact-check"] * 2


async def test_router_picks_specialists_from_registry_descriptions_and_hands_off(orch: Orch) -> None:
    for agent in (NetworkSpecialist(), SecuritySpecialist(), ApplicationSpecialist()):
        await orch.serve(agent)
    vpn = await HELPDESK.run(orch.mesh, {"text": "My VPN keeps dropping every few minutes"})
    assert vpn.details["route"]["capabilities"] == ["network-support"]
    assert vpn.details["route"]["method"] == "keywords" and vpn.output["team"] == "network"
    ransom = await HELPDESK.run(orch.mesh, {"text": "ransomware note on my screen"})
    assert ransom.details["route"]["method"] == "rule" and ransom.output["team"] == "security"
    excel = await HELPDESK.run(orch.mesh, {"text": "Excel crashes when I open a file"})
    assert excel.output["team"] == "application" and excel.output["diagnosis"] == "Application crash"

    # unknown requests go to the fallback (or a person: see test_orchestration_cli)
    with_fallback = Router(candidates_tag="helpdesk", fallback="application-support")
    unknown = await with_fallback.run(orch.mesh, {"text": "zzz qqq"})
    assert unknown.details["route"]["method"] == "fallback"

    # embedding router: used when rules and keywords find nothing (a deterministic offline embedder here)
    embedded = Router(candidates_tag="helpdesk", embedder=HashingEmbedder(), min_score=5.0, min_similarity=0.05)
    decision = embedded.decide("connectivity trouble with wifi networks", embedded.candidates(
        __import__("hivemesh.sdk.patterns.base", fromlist=["DirectRunner"]).DirectRunner(orch.mesh)))
    assert decision["method"] == "embedding" and decision["capabilities"] == ["network-support"]

    # multi-intent: every specialist close to the best score is called and the results aggregated
    multi = Router(candidates_tag="helpdesk", multi=True, multi_ratio=0.5,
                   rules=[Rule("network-support", pattern="^$")])
    both = await multi.run(orch.mesh, {"text": "VPN drops and Excel crashes"})
    assert set(both.output) == {"network-support", "application-support"}

    chat = await HELPDESK_CHAT.run(orch.mesh, {"message": "A strange login page asks for my password",
                                               "context": {"user": "ana"}})
    assert chat.details["path"] == ["application-support", "security-support"]
    assert chat.output["team"] == "security" and chat.output["diagnosis"] == "Possible credential phishing"
    assert chat.details["context"] == {"user": "ana", "app_checked": True, "signals": ["login", "password"]}
    assert chat.details["handoffs"][0]["reason"].startswith("looks like a credential problem")


async def test_step_errors_are_typed_and_more_than_two_errors_go_to_a_person(orch: Orch) -> None:
    await orch.serve(WorkerAgent())
    with pytest.raises(DeadlineExceededError):
        await Pipeline([Step("nap", timeout=0.3)]).run(orch.mesh, {"seconds": 3, "tag": "p"})
    # every assignee fails: with the error rule off the subtask just fails ...
    quiet = Supervisor(lambda _t: [Subtask("s", "broken", {"text": "x"})], rules=EscalationRules(max_errors=None))
    failed = await quiet.run(orch.mesh, {})
    assert failed.state == "FAILED" and failed.details["failed"] == ["s"]
    assert [a["error"]["reason"] for a in failed.details["subtasks"][0]["attempts"]] == ["AGENT_ERROR"] * 2
    # ... with it on (more than 2 errors), a person decides, and their answer becomes the result
    loud = Supervisor(lambda _t: [Subtask("s", "broken", {"text": "x"}, reassign_to=("broken",))])
    operator = EscalationClient(orch.env.operator.channel)
    task = asyncio.ensure_future(loud.run(orch.mesh, {}))
    (pending,) = await wait_until(lambda: operator.list("PENDING"), 15, "the errors escalation")
    assert pending.reason == "4 errors on subtask s (more than 2)"
    await operator.resolve(pending.id, approve=True, answer={"text": "done by hand"})
    done = await asyncio.wait_for(task, 15)
    assert done.state == "COMPLETED" and done.output == {"s": {"text": "done by hand"}}


class _Muddled(Agent):
    """An agent (think: a model) whose answers have the right outer shape and wrong insides."""

    name = "muddled"

    @capability(name="muddled-plan", description="Decompose into subtasks that lack their capability",
                idempotent=True)
    async def plan(self, req: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"id": "s1", "input": {}}]

    @capability(name="muddled-write", description="Write a draft", idempotent=True)
    async def write(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"draft": "a draft"}

    @capability(name="muddled-review", description="Review with feedback that is a number", idempotent=True)
    async def review(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"approved": False, "feedback": 5}

    @capability(name="muddled-desk", description="Hand over with a context that is a list", idempotent=True)
    async def desk(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"handoff": {"to": "muddled-write", "context": ["not", "an", "object"]}}

    @capability(name="muddled-nowhere", description="Hand over to no one", idempotent=True)
    async def nowhere(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"handoff": {"reason": "someone else"}}


async def test_patterns_name_an_agent_whose_answer_is_wrong_inside(orch: Orch) -> None:
    """A supervisor's decomposer, a peer reviewer or a desk agent answering an object of the wrong make (a
    subtask with no capability, feedback that is a number, a handoff context that is a list or a handoff to no
    one) raised KeyError or TypeError from the pattern's own reading. Each is an AgentError naming who answered."""
    await orch.serve(_Muddled())
    with pytest.raises(AgentError, match="decompose capability 'muddled-plan' produced a subtask"):
        await Supervisor("muddled-plan").run(orch.mesh, {"task": "t"})
    with pytest.raises(AgentError, match="muddled-review answered feedback that is int, not a list"):
        await PeerReview("muddled-write", ["muddled-review"]).run(orch.mesh, {"brief": "b"})
    with pytest.raises(AgentError, match="muddled-desk handed over a context that is list"):
        await Handoff("muddled-desk").run(orch.mesh, {"message": "hi"})
    with pytest.raises(AgentError, match="muddled-nowhere handed the conversation to no capability"):
        await Handoff("muddled-nowhere").run(orch.mesh, {"message": "hi"})

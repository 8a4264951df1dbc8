"""The reference agents of every example, over the real mesh: each capability with valid and invalid input,
and each example's pattern end to end."""

from __future__ import annotations

from typing import Any

import pytest

from hivemesh.agents.content import EditorAgent, FactCheckerAgent, WriterAgent
from hivemesh.agents.contract import (
    CONTRACT_REVIEW,
    BusinessReviewer,
    ContractDrafter,
    FinanceReviewer,
    LegalReviewer,
)
from hivemesh.agents.customer_service import (
    CUSTOMER_SERVICE,
    SupervisorDeskAgent,
    Tier1Agent,
    Tier2Agent,
    decompose,
)
from hivemesh.agents.helpdesk import ApplicationSpecialist, NetworkSpecialist, SecuritySpecialist
from hivemesh.agents.research import NewsSearchAgent, PapersSearchAgent, ResearchAgent, WikiSearchAgent, search
from hivemesh.mesh.errors import InvalidInputError
from hivemesh.sdk import MeshClient
from tests.support.orch_env import Orch

pytestmark = pytest.mark.timeout(90)


async def _refused(mesh: MeshClient, capability: str, payload: Any, field: str | None = None) -> None:
    with pytest.raises(InvalidInputError) as bad:
        await mesh.call(capability, payload, timeout=10)
    if field is not None:
        assert any(field in k for k in bad.value.field_violations), bad.value.field_violations


async def test_research_agents(orch: Orch) -> None:
    for agent in (PapersSearchAgent(), WikiSearchAgent(), ResearchAgent()):
        await orch.serve(agent)
    mesh = orch.mesh
    hits = await mesh.call("search-papers", {"query": "idempotency key retries", "limit": 1}, timeout=10)
    assert hits["source"] == "papers" and [h["id"] for h in hits["hits"]] == ["idempotency"]
    assert hits["hits"] == search("papers", "idempotency key retries", 1)  # deterministic
    wiki = await mesh.call("search-wiki", {"query": "etcd leases"}, timeout=10)
    assert wiki["hits"][0]["id"] == "etcd"
    await _refused(mesh, "search-papers", {"query": ""}, "input.query")
    await _refused(mesh, "search-papers", {"query": "the of and"}, "input.query")
    await _refused(mesh, "search-wiki", {"query": "x", "limit": 99}, "input.limit")
    await _refused(mesh, "search-wiki", {"q": "etcd"})  # schema: unknown field
    # The news corpus agent is not running: the brief is compiled from the rest, the gap named.
    report = await mesh.call_detailed("research", {"query": "lease expiry and fencing"}, timeout=20)
    assert report.output["missing"] == ["search-news"]
    assert {h["source"] for h in report.output["sources"]} <= {"papers", "wiki"}
    assert "[news:" not in report.output["brief"] and "[papers:" in report.output["brief"]
    assert report.usage is not None and report.usage.output_tokens > 0
    await orch.serve(NewsSearchAgent())
    full = await mesh.call("research", {"query": "phishing login pages"}, timeout=20)
    assert full["missing"] == [] and full["sources"][0]["id"] == "phishing-wave"
    await _refused(mesh, "research", {"query": "   "}, "input.query")


async def test_helpdesk_specialists(orch: Orch) -> None:
    for agent in (NetworkSpecialist(), SecuritySpecialist(), ApplicationSpecialist()):
        await orch.serve(agent)
    mesh = orch.mesh
    net = await mesh.call("network-support", {"text": "wifi keeps disconnecting"}, timeout=10)
    assert (net["team"], net["diagnosis"], net["confidence"]) == ("network", "Wi-Fi association problem", 0.9)
    assert net["ticket"].startswith("NET-") and net["steps"]
    sec = await mesh.call("security-support", {"text": "I clicked a phishing link"}, timeout=10)
    assert sec["diagnosis"] == "Possible credential phishing"
    app = await mesh.call("application-support", {"text": "Outlook crashes on start"}, timeout=10)
    assert app["team"] == "application" and app["diagnosis"] == "Application crash"
    handed = await mesh.call("application-support", {"text": "the app shows a suspicious login page"}, timeout=10)
    assert handed["handoff"]["to"] == "security-support"
    for cap in ("network-support", "security-support", "application-support"):
        await _refused(mesh, cap, {"text": ""}, "input.text")
        await _refused(mesh, cap, {"text": "x" * 5000}, "input.text")
        await _refused(mesh, cap, {"body": "vpn"})


async def test_customer_service_chain(orch: Orch) -> None:
    for agent in (Tier1Agent(), Tier2Agent(), SupervisorDeskAgent()):
        await orch.serve(agent)
    mesh = orch.mesh
    t1 = await mesh.call("tier1-support", {"tier": "free", "message": "Where is my order?"}, timeout=10)
    assert (t1["action"], t1["confidence"], t1["handled_by"]) == ("sent-tracking", 0.92, "tier1")
    t2 = await mesh.call("tier2-support", {"tier": "pro", "message": "refund $120 please"}, timeout=10)
    assert (t2["action"], t2["confidence"]) == ("refund", 0.8)
    sup = await mesh.call("supervisor-support", {"tier": "pro", "message": "refund $5000"}, timeout=10)
    assert sup["confidence"] == 0.55
    for cap in ("tier1-support", "tier2-support", "supervisor-support"):
        await _refused(mesh, cap, {"tier": "free", "message": ""}, "input.message")
        await _refused(mesh, cap, {"tier": "gold", "message": "hi"}, "input.tier")
    # the chain: a $120 refund is too much for tier 1, tier 2 handles it; the password goes no further
    result = await CUSTOMER_SERVICE.run(mesh, {"customer": "c1", "tier": "pro",
                                               "message": "Please refund $120 for order 42. Also reset my password?"})
    assert result.state == "COMPLETED"
    replies = result.output["replies"]
    assert replies["request-1"]["handled_by"] == "tier2" and replies["request-2"]["handled_by"] == "tier1"
    assert [a["capability"] for a in result.details["subtasks"][0]["attempts"]] == ["tier1-support", "tier2-support"]
    assert decompose({"message": "My lawyer says delete my data."})[0].sensitive is True
    with pytest.raises(InvalidInputError):
        decompose({"message": ""})


async def test_content_agents(orch: Orch) -> None:
    for agent in (WriterAgent(), EditorAgent(), FactCheckerAgent()):
        await orch.serve(agent)
    mesh = orch.mesh
    draft = (await mesh.call("write-draft", {"brief": {"topic": "grpc"}, "draft": None, "feedback": [], "round": 1},
                             timeout=10))["draft"]
    assert "gRPC runs over HTTP/2." in draft
    edited = await mesh.call("edit-draft", {"brief": {"topic": "grpc"}, "draft": draft}, timeout=10)
    assert edited["approved"] is False and "really" not in edited["draft"]
    checked = await mesh.call("fact-check", {"brief": {"topic": "grpc"}, "draft": edited["draft"]}, timeout=10)
    assert checked == {"approved": True, "feedback": [], "corrections": {}}
    wrong = await mesh.call("fact-check", {"brief": {"topic": "raft"},
                                           "draft": "Raft elects a leader that orders every write."}, timeout=10)
    assert wrong["approved"] is False and "missing claim: majority" in wrong["feedback"]
    await _refused(mesh, "write-draft", {"brief": {"topic": "cooking"}}, "input.brief.topic")
    await _refused(mesh, "edit-draft", {"brief": {"topic": "etcd"}, "draft": ""}, "input.draft")
    await _refused(mesh, "fact-check", {"brief": {"topic": "etcd"}, "draft": 7})


async def test_contract_review_peers(orch: Orch) -> None:
    for agent in (ContractDrafter(), LegalReviewer(), FinanceReviewer(), BusinessReviewer()):
        await orch.serve(agent)
    mesh = orch.mesh
    terms = {"payment_days": 60, "liability_cap_multiple": 0.5, "term_months": 48, "termination_notice_days": 10,
             "auto_renew": True, "governing_law": "", "discount_percent": 10, "annual_fee": 120000}
    legal = await mesh.call("legal-review", {"draft": terms}, timeout=10)
    assert legal["approved"] is False
    assert legal["corrections"] == {"liability_cap_multiple": 1, "governing_law": "Delaware"}
    assert (await mesh.call("finance-review", {"draft": terms}, timeout=10))["corrections"] == {"payment_days": 45}
    business = await mesh.call("business-review", {"draft": terms}, timeout=10)
    assert business["corrections"] == {"term_months": 36, "termination_notice_days": 30}
    result = await CONTRACT_REVIEW.run(mesh, {"brief": {"party": "Initech", "terms": terms}})
    assert result.state == "COMPLETED" and result.output["rounds"] == 2
    final = result.output["draft"]
    assert (final["payment_days"], final["liability_cap_multiple"], final["term_months"]) == (45, 1, 36)
    assert (final["governing_law"], final["termination_notice_days"]) == ("Delaware", 30)
    rounds = result.details["rounds"]
    assert [sorted(v["reviewer"] for v in r["verdicts"] if not v["approved"]) for r in rounds] == [
        ["business-review", "finance-review", "legal-review"], []]
    await _refused(mesh, "legal-review", {"draft": {"bogus": 1}}, "input.draft.bogus")
    await _refused(mesh, "finance-review", {"draft": {"payment_days": "30"}}, "input.draft.payment_days")
    await _refused(mesh, "business-review", {"draft": {"term_months": -1}}, "input.draft.term_months")
    await _refused(mesh, "contract-draft", {"brief": {"party": "x"}}, "input.brief.terms")

"""The lead qualification, risk assessment and sales support examples and the sales assistant's tool loop over
the real mesh (one mesh_env serves all eleven agents): each pattern end to end with its expected output, each
demo as `hivemesh up --demo NAME` runs it (durable workflows), and invalid input refused with INVALID_ARGUMENT
naming the field."""

from __future__ import annotations

import importlib
import json
from typing import Any

import grpc
import pytest

from hivemesh.agents.demos import DEMOS, DemoContext, run_demo
from hivemesh.agents.leads import LEAD_QUALIFICATION, LeadEnricher, LeadResearcher, LeadRouter, LeadScorer
from hivemesh.agents.risk import RISK_ASSESSMENT, ComplianceAnalyst, CreditAnalyst, MarketAnalyst
from hivemesh.agents.run import SDK_AGENTS
from hivemesh.agents.sales import SALES_SUPPORT, PricingSpecialist, ProductSpecialist, TechnicalSpecialist
from hivemesh.agents.sales_assistant import SalesAssistant
from hivemesh.mesh.errors import HivemeshError, InvalidInputError
from hivemesh.sdk import AgentServer, AgentServerConfig, MeshClient
from hivemesh.sdk.escalation import EscalationClient
from hivemesh.sdk.workflow import WorkflowEngine
from tests.support.orch_env import Orch, wait_until

pytestmark = pytest.mark.timeout(90)

INITECH = {"company": "Initech", "email": "bill@initech.example", "employees": 4200, "industry": "logistics",
           "budget_usd": 150000, "message": "We want a demo and pricing for a rollout; security matters."}
APPLICATION = {"company": "Initech", "country": "US", "industry": "software", "amount_usd": 250000,
               "term_months": 36, "annual_revenue_usd": 4000000, "debt_usd": 600000, "years_in_business": 12}


async def _refused(mesh: MeshClient, capability: str, payload: Any, field: str) -> None:
    with pytest.raises(InvalidInputError) as bad:
        await mesh.call(capability, payload, timeout=10)
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
    violations = bad.value.field_violations
    assert any(field in k or field in v for k, v in violations.items()), violations


async def _check_leads(mesh: MeshClient) -> None:
    result = await LEAD_QUALIFICATION.run(mesh, {"lead": INITECH})
    assert result.state == "COMPLETED" and [s.capability for s in result.steps] == [
        "score-lead", "research-lead", "enrich-lead", "route-lead"]
    out = result.output
    assert out["lead"] == INITECH
    assert (out["score"]["points"], out["score"]["grade"]) == (90, "A")
    assert "intent: demo, pricing, rollout (+15)" in out["score"]["signals"]
    assert out["research"] == {"domain": "initech.example", "known": True, "funding": "public",
                               "tech": ["kubernetes", "postgres", "sap"],
                               "news": ["Initech opens a logistics hub in Austin"]}
    assert out["enrichment"] == {"segment": "enterprise", "region": "amer", "interests": ["kubernetes", "security"]}
    assert out["route"]["queue"] == "enterprise-ae-amer" and out["route"]["sla_hours"] == 4
    # A non-lead stops after scoring: nobody researches it.
    cold = await LEAD_QUALIFICATION.run(mesh, {"lead": {"company": "Bob", "email": "bob@gmail.com"}})
    assert cold.state == "REJECTED" and cold.details["stopped_at"] == "score-lead" and len(cold.steps) == 1
    assert cold.reason == "score 0 is below 20: not a sales lead"
    await _refused(mesh, "score-lead", {"lead": {"company": "X", "email": "not-an-email"}}, "input.lead.email")
    await _refused(mesh, "score-lead", {"lead": {"company": " ", "email": "a@b.example"}}, "input.lead.company")
    await _refused(mesh, "score-lead", {"lead": {**INITECH, "employees": -1}}, "input.lead.employees")
    await _refused(mesh, "score-lead", {"lead": {"company": "X"}}, "email")  # schema: required
    await _refused(mesh, "research-lead", {"lead": INITECH}, "input.score")  # out of order
    await _refused(mesh, "route-lead", {"lead": INITECH, "score": out["score"], "research": out["research"]},
                   "input.enrichment")


async def _check_risk(mesh: MeshClient) -> None:
    result = await RISK_ASSESSMENT.run(mesh, APPLICATION)
    assert result.state == "COMPLETED" and sorted(result.details["succeeded"]) == [
        "compliance-risk", "credit-risk", "market-risk"]
    out = result.output
    assert (out["score"], out["level"], out["decision"]) == (15, "low", "approve")
    assert {p: v["score"] for p, v in out["perspectives"].items()} == {
        "credit-risk": 8, "market-risk": 30, "compliance-risk": 10}
    sanctioned = await RISK_ASSESSMENT.run(mesh, {**APPLICATION, "country": "KP"})
    assert sanctioned.output["decision"] == "decline" and sanctioned.output["reason"] == "compliance risk is high"
    assert sanctioned.output["perspectives"]["compliance-risk"]["factors"] == ["KP is under sanctions"]
    risky = await RISK_ASSESSMENT.run(mesh, {**APPLICATION, "debt_usd": 8000000, "years_in_business": 1})
    assert (risky.output["decision"], risky.output["reason"]) == ("refer", "credit-risk is high")
    for cap in ("credit-risk", "market-risk", "compliance-risk"):
        await _refused(mesh, cap, {**APPLICATION, "country": "usa"}, "input.country")
        await _refused(mesh, cap, {**APPLICATION, "amount_usd": 0}, "input.amount_usd")
        await _refused(mesh, cap, {**APPLICATION, "term_months": 999}, "input.term_months")
    await _refused(mesh, "credit-risk", {k: v for k, v in APPLICATION.items() if k != "debt_usd"}, "debt_usd")
    # Every perspective must answer: one refusal fails the whole assessment with the refusal's status.
    with pytest.raises(HivemeshError) as failed:
        await RISK_ASSESSMENT.run(mesh, {**APPLICATION, "country": "usa"})
    assert failed.value.code == grpc.StatusCode.INVALID_ARGUMENT


async def _check_sales(mesh: MeshClient) -> None:
    routed: dict[str, Any] = {}
    for text, seats in (("Which plan fits a team of 40 engineers?", 40), ("How much would 120 seats cost?", 120),
                        ("Can we run it self-hosted on Kubernetes?", None)):
        result = await SALES_SUPPORT.run(mesh, {"text": text, **({"seats": seats} if seats else {})})
        routed[result.details["route"]["capabilities"][0]] = result.output
    assert list(routed) == ["product-advice", "pricing-quote", "technical-advice"]
    assert routed["product-advice"]["plan"] == "team" and "SSO" in routed["product-advice"]["features"]
    assert routed["pricing-quote"] == {
        "specialist": "pricing", "plan": "team", "seats": 120, "per_seat_usd": 25.0, "discount_percent": 10,
        "monthly_usd": 2700.0, "annual_usd": 32400.0,
        "answer": "120 seats on team: $2,700.00 a month after a 10% volume discount."}
    assert routed["technical-advice"]["plan"] == "enterprise"
    assert routed["technical-advice"]["features"] == ["kubernetes", "self-hosted"]
    await _refused(mesh, "pricing-quote", {"text": "a quote please"}, "input.seats")
    await _refused(mesh, "pricing-quote", {"text": "a quote please", "seats": 0}, "input.seats")
    for cap in ("product-advice", "pricing-quote", "technical-advice"):
        await _refused(mesh, cap, {"text": "  ", "seats": 3}, "input.text")
        await _refused(mesh, cap, {"text": "hi there", "seats": 3, "plan": "gold"}, "input.plan")  # schema: enum


async def _check_assistant(mesh: MeshClient, pricing: AgentServer) -> None:
    """The tool loop in a reference agent, offline model: a local tool and a mesh capability as tools."""
    question = {"customer": "acme", "text": "How much would 120 seats cost?", "seats": 120}
    out = await mesh.call("sales-assist", question, timeout=20)
    assert out["tools"] == [{"name": "account_lookup", "ok": True, "round": 1},
                            {"name": "pricing-quote", "ok": True, "round": 1}] and out["rounds"] == 1
    assert out["answer"] == ("acme is on team with 40 seats, renewing 2027-03-01. "
                             "120 seats on team: $2,700.00 a month after a 10% volume discount.")
    # The tool's call was a mesh call under the assistant's identity, on record at the pricing specialist.
    assert pricing.audit is not None
    records = [json.loads(x) for x in pricing.audit.spool.lines()]
    by_assistant = [r for r in records if r.get("caller") == "spiffe://hivemesh.local/agent/sales-assistant"]
    assert [(r["kind"], r["capability"], r["decision"]) for r in by_assistant] == [
        ("inbound", "pricing-quote", "allow")], by_assistant
    # A failing tool goes back to the model as its result; the agent still answers (with list pricing).
    unknown = await mesh.call("sales-assist", {"customer": "umbrella", "text": "30 seats on team?", "seats": 30,
                                               "plan": "team"}, timeout=20)
    assert [(t["name"], t["ok"]) for t in unknown["tools"]] == [("account_lookup", False), ("pricing-quote", True)]
    assert unknown["answer"] == ("I found no account for umbrella, so this is list pricing. "
                                 "30 seats on team: $750.00 a month.")
    # No seats: the model is not asked to price, only to look the account up.
    plain = await mesh.call("sales-assist", {"customer": "globex", "text": "What plan are we on?"}, timeout=20)
    assert plain["tools"] == [{"name": "account_lookup", "ok": True, "round": 1}]
    assert plain["answer"] == "globex is on starter with 8 seats, renewing 2027-01-31."
    await _refused(mesh, "sales-assist", {"customer": "Acme Inc!", "text": "hi there"}, "input.customer")
    await _refused(mesh, "sales-assist", {"customer": "acme", "text": " ? "}, "input.text")
    await _refused(mesh, "sales-assist", {"customer": "acme", "text": "a quote", "seats": 0}, "input.seats")
    await _refused(mesh, "sales-assist", {"text": "a quote"}, "customer")  # schema: required


async def test_lead_risk_and_sales_examples(orch: Orch) -> None:
    for agent in (LeadScorer(), LeadResearcher(), LeadEnricher(), LeadRouter(), CreditAnalyst(), MarketAnalyst(),
                  ComplianceAnalyst(), ProductSpecialist(), TechnicalSpecialist(), SalesAssistant()):
        await orch.serve(agent)
    pricing = await orch.serve(PricingSpecialist(), AgentServerConfig(audit_dir=orch.tmp / "pricing-audit"))
    mesh = orch.mesh
    await _check_leads(mesh)
    await _check_risk(mesh)
    await _check_sales(mesh)
    await _check_assistant(mesh, pricing)
    # The demos, as `hivemesh up --demo leads|risk|sales` runs them: durable workflows over the same agents.
    said: list[str] = []
    async with WorkflowEngine(mesh) as engine:
        dc = DemoContext(engine, EscalationClient(orch.env.operator.channel), said.append, once=True)
        rows = {name: await run_demo(name, dc) for name in ("leads", "risk", "sales", "tools")}
    assert {n: r["state"] for n, r in rows.items()} == {n: "COMPLETED" for n in rows}, said
    assert rows["leads"]["highlight"] == "queued to enterprise-ae-amer, account-exec-amer, sdr-amer"
    assert rows["risk"]["highlight"] == "decisions: approve, decline"
    assert rows["sales"]["highlight"] == "answered by product, pricing, technical"
    assert rows["tools"]["highlight"] == (
        "tool calls: acme: account_lookup ✓, pricing-quote ✓; umbrella: account_lookup ✗, pricing-quote ✓")
    assert [r["steps"] for r in rows.values()] == [12, 6, 3, 2]
    assert rows["tools"]["tokens"] > 0  # the model's turns are metered like any completion
    assert any("→ pricing-quote (by rule)" in line for line in said), said
    for name in rows:  # what `hivemesh up` spawns for the demo serves exactly what it waits for
        served = {c for a in DEMOS[name].agents for c in _agent(a).capabilities}
        assert served == set(DEMOS[name].capabilities), name
    # With no pricing specialist left, the mesh tool's call fails: the model hears why and the agent answers.
    await pricing.stop()
    await wait_until(lambda: not mesh.instances("pricing-quote"), 10, "the pricing specialist to deregister")
    alone = await mesh.call("sales-assist", {"customer": "acme", "text": "Price 5 seats?", "seats": 5}, timeout=20)
    assert [(t["name"], t["ok"]) for t in alone["tools"]] == [("account_lookup", True), ("pricing-quote", False)]
    assert alone["answer"].startswith("acme is on team with 40 seats, renewing 2027-03-01. I could not get a quote "
                                      "just now ("), alone["answer"]


def _agent(name: str) -> Any:
    module, cls = SDK_AGENTS[name]
    return getattr(importlib.import_module(module), cls)()

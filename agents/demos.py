"""The demos `hivemesh up` runs: one per example, each a pattern run as a durable workflow over the mesh.

    hivemesh up --demo list        # the menu
    hivemesh up --demo research    # one example
    hivemesh up                    # the document pipeline, then a short tour of the other five patterns

Every demo reports progress as it goes (`say`) and returns a summary row; the tour ends with a table of them.
The workflows stay in etcd, so `hivemesh workflows list` / `show ID` work on them afterwards.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hivemesh.sdk.escalation import EscalationClient
from hivemesh.sdk.workflow import WorkflowEngine, WorkflowState

Say = Callable[[str], None]


@dataclass(frozen=True)
class Demo:
    name: str
    pattern: str
    title: str
    agents: tuple[str, ...]
    """Agents (names in hivemesh.agents.run) served for it, in one process."""
    capabilities: tuple[str, ...]
    """What must be registered before it runs."""


DEMOS: dict[str, Demo] = {d.name: d for d in (
    Demo("pipeline", "sequential pipeline", "document pipeline: OCR → extraction → validation → storage",
         (), ("ocr", "extract", "validate", "store")),
    Demo("research", "parallel fan-out / fan-in", "research compilation: three corpora searched at once",
         ("papers", "news", "wiki", "research"), ("search-papers", "search-news", "search-wiki", "research")),
    Demo("helpdesk", "dynamic routing + handoff", "IT helpdesk: a router picks the specialist",
         ("network-desk", "security-desk", "application-desk"),
         ("network-support", "security-support", "application-support")),
    Demo("support", "hierarchical supervision", "customer service: tier 1 → tier 2 → supervisor → a person",
         ("tier1", "tier2", "cs-supervisor"), ("tier1-support", "tier2-support", "supervisor-support")),
    Demo("content", "peer-to-peer collaboration", "content loop: writer → editor → fact-checker rounds",
         ("writer", "editor", "fact-checker"), ("write-draft", "edit-draft", "fact-check")),
    Demo("contract", "peer-to-peer collaboration", "contract review: legal, finance and business peers",
         ("contract-drafter", "legal", "finance", "business"),
         ("contract-draft", "legal-review", "finance-review", "business-review")),
    Demo("leads", "sequential pipeline", "lead qualification: scoring → research → enrichment → routing",
         ("lead-scorer", "lead-researcher", "lead-enricher", "lead-router"),
         ("score-lead", "research-lead", "enrich-lead", "route-lead")),
    Demo("risk", "parallel fan-out / fan-in", "risk assessment: credit, market and compliance views combined",
         ("credit-analyst", "market-analyst", "compliance-analyst"), ("credit-risk", "market-risk", "compliance-risk")),
    Demo("sales", "dynamic routing", "sales support: a router picks the product, pricing or technical specialist",
         ("product-specialist", "pricing-specialist", "technical-specialist"),
         ("product-advice", "pricing-quote", "technical-advice")),
    Demo("tools", "tool-calling loop", "sales assistant: a model calls an account lookup and the pricing "
         "specialist as tools", ("pricing-specialist", "sales-assistant"), ("pricing-quote", "sales-assist")),
)}
TOUR = ("research", "helpdesk", "support", "content", "contract")
"""The default run's tour; `leads`, `risk`, `sales` and `tools` run by name only, to keep `hivemesh up` short."""


def demos_for(choice: str) -> list[str]:
    """'default' → pipeline + tour; 'tour' → the five patterns; a name → that one."""
    if choice == "default":
        return ["pipeline", *TOUR]
    if choice == "tour":
        return list(TOUR)
    if choice not in DEMOS:
        raise ValueError(f"unknown demo {choice!r}: choose from {', '.join(['default', 'tour', *DEMOS])}")
    return [choice]


@dataclass
class DemoContext:
    engine: WorkflowEngine
    operator: EscalationClient
    say: Say
    once: bool
    """--once: nobody is at the keyboard, so the demo itself plays the person who approves."""


def _row(demo: Demo, states: list[WorkflowState], started: float, highlight: str) -> dict[str, Any]:
    return {
        "demo": demo.name, "pattern": demo.pattern,
        "state": "COMPLETED" if all(s.state == "COMPLETED" for s in states) else (
            "INPUT_REQUIRED" if all(s.state in ("COMPLETED", "INPUT_REQUIRED") for s in states)
            else ",".join(s.state for s in states)),
        "workflows": [s.id for s in states], "steps": sum(len(s.steps) for s in states),
        "tokens": sum(s.tokens for s in states), "seconds": round(time.monotonic() - started, 2),
        "highlight": highlight,
    }


async def _research(dc: DemoContext) -> tuple[list[WorkflowState], str]:
    state = await dc.engine.run("hivemesh.agents.research:RESEARCH", {"query": "leases and fencing", "limit": 2})
    hits = state.output["output"] if state.state == "COMPLETED" else []
    failed = state.output["details"]["failed"] if state.output else {}
    top = ", ".join(f"{h['source']}:{h['id']}" for h in hits[:3])
    dc.say(f"  research: {len(hits)} hits from {len({h['source'] for h in hits})} corpora in parallel "
           f"(top: {top}){'; missing ' + ', '.join(failed) if failed else ''}")
    return [state], f"top hit {hits[0]['source']}:{hits[0]['id']}" if hits else "no hits"


async def _helpdesk(dc: DemoContext) -> tuple[list[WorkflowState], str]:
    states = []
    routes = []
    for ticket in ("My VPN drops every few minutes", "Excel crashes when I open the budget", "ransomware on my PC"):
        s = await dc.engine.run("hivemesh.agents.helpdesk:HELPDESK", {"text": ticket})
        route = s.output["details"]["route"] if s.output else {}
        team = (s.output or {}).get("output", {}).get("team", "?")
        dc.say(f"  helpdesk: {ticket!r} → {', '.join(route.get('capabilities', []))} (by {route.get('method')}) "
               f"→ {team} team")
        routes.append(team)
        states.append(s)
    chat = await dc.engine.run("hivemesh.agents.helpdesk:HELPDESK_CHAT",
                               {"message": "Outlook shows a strange login page asking for my password",
                                "context": {"user": "ana"}})
    path = " → ".join(chat.output["details"]["path"]) if chat.output else "?"
    dc.say(f"  helpdesk: a conversation handed over: {path}")
    states.append(chat)
    return states, f"routed to {', '.join(routes)}; handoff {path}"


async def _support(dc: DemoContext) -> tuple[list[WorkflowState], str]:
    routine = await dc.engine.run("hivemesh.agents.customer_service:CUSTOMER_SERVICE", {
        "customer": "acme", "tier": "pro",
        "message": "Please refund $120 for order 42. Also, how do I reset my password?"})
    replies = (routine.output or {}).get("output", {}).get("replies", {})
    dc.say("  support: " + "; ".join(f"{k} handled by {v.get('handled_by')}" for k, v in sorted(replies.items())))
    handle = await dc.engine.submit("hivemesh.agents.customer_service:CUSTOMER_SERVICE", {
        "customer": "globex", "tier": "enterprise", "message": "We need a refund of $2500 for the annual plan."})
    pending = []
    for _ in range(200):
        pending = await dc.operator.list("PENDING", workflow_id=handle.id)
        if pending:
            break
        if handle.task.done():
            break
        await asyncio.sleep(0.05)
    if pending:
        esc = pending[0]
        dc.say(f"  support: enterprise customer → run {handle.id} is INPUT_REQUIRED, escalation {esc.id}: {esc.reason}")
        if dc.once:
            dc.say(f"  support: (--once) approving as the operator, as `hivemesh escalations approve {esc.id}` would")
            await dc.operator.resolve(esc.id, approve=True, note="approved in the demo",
                                      answer={"answer": "Refund of $2500 approved by a manager.", "action": "refund",
                                              "confidence": 1.0, "handled_by": "person"})
        else:
            dc.say(f"  support: a person decides it:  hivemesh escalations approve {esc.id} --note 'ok'   (or reject "
                   f"it); the run resumes then — follow it with  hivemesh workflows show {handle.id}")
            # The escalation is listed a moment before the run records that it waits for it: read the run
            # once it does (bounded), so the row shows INPUT_REQUIRED and not a run caught mid-step.
            waiting = await dc.engine.get(handle.id)
            for _ in range(200):
                if waiting.state != "WORKING" or handle.task.done():
                    break
                await asyncio.sleep(0.05)
                waiting = await dc.engine.get(handle.id)
            return [routine, waiting], f"waiting for a person: hivemesh escalations approve {esc.id}"
    escalated = await handle.result()
    dc.say(f"  support: enterprise run {escalated.state}")
    return [routine, escalated], f"enterprise request decided by a person ({escalated.state})"


async def _content(dc: DemoContext) -> tuple[list[WorkflowState], str]:
    state = await dc.engine.run("hivemesh.agents.content:CONTENT_LOOP", {"brief": {"topic": "etcd"}})
    rounds = state.output["details"]["rounds"] if state.output else []
    for r in rounds:
        verdicts = ", ".join(f"{v['reviewer']} {'✓' if v['approved'] else '✗'}" for v in r["verdicts"])
        dc.say(f"  content: round {r['round']}: {verdicts}")
    return [state], f"approved after {len(rounds)} round(s)"


async def _contract(dc: DemoContext) -> tuple[list[WorkflowState], str]:
    terms = {"payment_days": 60, "liability_cap_multiple": 0.5, "term_months": 48, "termination_notice_days": 10,
             "auto_renew": True, "governing_law": "", "discount_percent": 10, "annual_fee": 120000}
    state = await dc.engine.run("hivemesh.agents.contract:CONTRACT_REVIEW", {"brief": {"party": "Initech",
                                                                                        "terms": terms}})
    rounds = state.output["details"]["rounds"] if state.output else []
    for r in rounds:
        asks = [f"{v['reviewer']}: {'; '.join(v['feedback'])}" for v in r["verdicts"] if not v["approved"]]
        dc.say(f"  contract: round {r['round']}: " + (" | ".join(asks) if asks else "all three approve"))
    return [state], f"signed off after {len(rounds)} round(s)"


LEADS = (
    {"company": "Initech", "email": "bill@initech.example", "employees": 4200, "industry": "logistics",
     "budget_usd": 150000, "message": "We want a demo and pricing for a rollout this quarter."},
    {"company": "Globex", "email": "hank@globex.example", "employees": 300, "industry": "retail",
     "budget_usd": 20000, "message": "Could you send pricing?"},
    {"company": "Bob's Bikes", "email": "bob@bobsbikes.example", "employees": 25, "industry": "retail",
     "budget_usd": 6000, "message": "Looking at pricing for next year."},
)


async def _leads(dc: DemoContext) -> tuple[list[WorkflowState], str]:
    states, queues = [], []
    for lead in LEADS:
        s = await dc.engine.run("hivemesh.agents.leads:LEAD_QUALIFICATION", {"lead": lead})
        out = s.output or {}
        if s.state == "COMPLETED":
            score, route = out["output"]["score"], out["output"]["route"]
            dc.say(f"  leads: {lead['company']}: {score['points']} points (grade {score['grade']}) → {route['queue']} "
                   f"within {route['sla_hours']} h")
            queues.append(route["queue"])
        else:
            dc.say(f"  leads: {lead['company']}: {s.state} ({s.reason or s.error})")
            queues.append(s.state.lower())
        states.append(s)
    return states, f"queued to {', '.join(queues)}"


APPLICATIONS = (
    {"company": "Initech", "country": "US", "industry": "software", "amount_usd": 250000, "term_months": 36,
     "annual_revenue_usd": 4000000, "debt_usd": 600000, "years_in_business": 12},
    {"company": "Fly-by-night Hotels", "country": "VE", "industry": "hospitality", "amount_usd": 900000,
     "term_months": 84, "annual_revenue_usd": 1000000, "debt_usd": 1200000, "years_in_business": 2,
     "kyc_complete": False},
)


async def _risk(dc: DemoContext) -> tuple[list[WorkflowState], str]:
    states, decisions = [], []
    for app in APPLICATIONS:
        s = await dc.engine.run("hivemesh.agents.risk:RISK_ASSESSMENT", app)
        out = (s.output or {}).get("output") or {}
        views = ", ".join(f"{p.removesuffix('-risk')} {v['score']}" for p, v in out.get("perspectives", {}).items())
        dc.say(f"  risk: {app['company']}: {views} in parallel → {out.get('decision', s.state)} "
               f"({out.get('reason', s.reason or s.error)})")
        decisions.append(str(out.get("decision", s.state.lower())))
        states.append(s)
    return states, f"decisions: {', '.join(decisions)}"


QUESTIONS = (
    {"text": "Which plan fits a team of 40 engineers?", "seats": 40},
    {"text": "How much would 120 seats cost?", "seats": 120},
    {"text": "Do you support SSO with SAML?"},
)


async def _sales(dc: DemoContext) -> tuple[list[WorkflowState], str]:
    states, specialists = [], []
    for question in QUESTIONS:
        s = await dc.engine.run("hivemesh.agents.sales:SALES_SUPPORT", question)
        route = (s.output or {}).get("details", {}).get("route", {})
        out = (s.output or {}).get("output") or {}
        dc.say(f"  sales: {question['text']!r} → {', '.join(route.get('capabilities', []))} "
               f"(by {route.get('method')}): {out.get('answer', s.state)}")
        node = " (Node.js)" if out.get("served_by") == "node" else ""  # the Node pricing agent, when it is live
        specialists.append(f"{out.get('specialist', '?')}{node}")
        states.append(s)
    return states, f"answered by {', '.join(specialists)}"


ASSISTED = (
    {"customer": "acme", "text": "How much would 120 seats cost?", "seats": 120},
    {"customer": "umbrella", "text": "What would 30 seats on team cost?", "seats": 30, "plan": "team"},
)
"""The second customer has no account: the lookup tool fails, the model hears why and answers anyway."""


def tool_calls(assist: Mapping[str, Any]) -> str:
    """`account_lookup ✓, pricing-quote ✓`: the tool calls an assisted answer made, in order."""
    return ", ".join(f"{t['name']} {'✓' if t['ok'] else '✗'}" for t in assist.get("tools", []))


async def _tools(dc: DemoContext) -> tuple[list[WorkflowState], str]:
    states, made = [], []
    for question in ASSISTED:
        s = await dc.engine.run("hivemesh.agents.sales_assistant:SALES_ASSIST", question)
        out = (s.output or {}).get("output") or {}
        calls = tool_calls(out)
        dc.say(f"  tools: {question['customer']}: {question['text']!r} → the model called {calls or 'no tool'} "
               f"in {out.get('rounds', '?')} round(s): {out.get('answer', s.state)}")
        made.append(f"{question['customer']}: {calls or s.state}")
        states.append(s)
    return states, f"tool calls: {'; '.join(made)}"


RUNNERS: Mapping[str, Callable[[DemoContext], Awaitable[tuple[list[WorkflowState], str]]]] = {
    "research": _research, "helpdesk": _helpdesk, "support": _support, "content": _content, "contract": _contract,
    "leads": _leads, "risk": _risk, "sales": _sales, "tools": _tools,
}


async def run_demo(name: str, dc: DemoContext) -> dict[str, Any]:
    """Run one pattern demo as durable workflows; returns its summary row."""
    demo = DEMOS[name]
    dc.say(f"demo {name}: {demo.title} [{demo.pattern}]")
    started = time.monotonic()
    states, highlight = await RUNNERS[name](dc)
    return _row(demo, states, started, highlight)

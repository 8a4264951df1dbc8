"""Lead qualification: scoring → research → enrichment → routing, each stage an agent (Pipeline).

A lead file `{"lead": {...}}` goes through four agents; each checks the stage before it ran, adds its own
section and passes the whole file on: `lead-scorer` (`score-lead`: points and a grade from size, budget,
industry and buying intent), `lead-researcher` (`research-lead`: what a built-in company directory knows
about the email domain, no network), `lead-enricher` (`enrich-lead`: segment, region, interests) and
`lead-router` (`route-lead`: the sales queue and its response time). `LEAD_QUALIFICATION` stops a grade-D
lead after scoring (REJECTED, with the reason), so nobody researches a non-lead.
"""

from __future__ import annotations

import re
from typing import Any, TypedDict

from hivemesh.agents._text import mentioned
from hivemesh.sdk import Agent, InvalidInputError, capability
from hivemesh.sdk.patterns import Pipeline, Step

MAX_TEXT = 2000
EMAIL_RE = re.compile(r"[^@\s]+@((?:[a-z0-9-]+\.)+[a-z]{2,})")
FREE_MAIL = frozenset({"gmail.com", "yahoo.com", "hotmail.com", "outlook.com", "proton.me"})
TARGET_INDUSTRIES = frozenset({"software", "finance", "healthcare", "logistics"})
INTENT = ("demo", "pricing", "buy", "purchase", "trial", "quote", "evaluate", "rollout")
MIN_GRADE_POINTS = 20

# The company directory the researcher consults (stands in for a CRM or data provider; offline by design).
DIRECTORY: dict[str, dict[str, Any]] = {
    "initech.example": {"company": "Initech", "funding": "public", "tech": ["kubernetes", "postgres", "sap"],
                        "news": ["Initech opens a logistics hub in Austin"]},
    "globex.example": {"company": "Globex", "funding": "series-c", "tech": ["aws", "kafka"],
                       "news": ["Globex raises a $120M series C"]},
    "hooli.example": {"company": "Hooli", "funding": "public", "tech": ["gcp", "grpc", "kubernetes"],
                      "news": []},
}
REGIONS = {"de": "emea", "fr": "emea", "uk": "emea", "nl": "emea", "es": "emea", "it": "emea",
           "jp": "apac", "au": "apac", "sg": "apac", "in": "apac", "br": "latam", "mx": "latam"}


class _LeadRequired(TypedDict):
    company: str
    email: str


class Lead(_LeadRequired, total=False):
    employees: int
    industry: str
    budget_usd: float
    message: str


class Score(TypedDict):
    points: int
    grade: str
    signals: list[str]


class Research(TypedDict):
    domain: str
    known: bool
    funding: str
    tech: list[str]
    news: list[str]


class Enrichment(TypedDict):
    segment: str
    region: str
    interests: list[str]


class Route(TypedDict):
    queue: str
    sla_hours: int
    reason: str


class _FileRequired(TypedDict):
    lead: Lead


class LeadFile(_FileRequired, total=False):
    """What every stage takes and returns: the lead plus the sections of the stages so far."""

    score: Score
    research: Research
    enrichment: Enrichment
    route: Route


def check_lead(lead: Lead) -> str:
    """The lead's email domain; bad fields refused by name (the schema checks only types)."""
    if not lead["company"].strip() or len(lead["company"]) > 200:
        raise InvalidInputError("company must be 1..200 characters", field_violations={"input.lead.company": "empty"})
    m = EMAIL_RE.fullmatch(lead["email"].strip().lower())
    if m is None:
        raise InvalidInputError(f"{lead['email']!r} is not an email address",
                                field_violations={"input.lead.email": "not an email address"})
    for key, value in (("employees", lead.get("employees", 0)), ("budget_usd", lead.get("budget_usd", 0.0))):
        if value < 0:
            raise InvalidInputError(f"{key} must not be negative", field_violations={f"input.lead.{key}": "negative"})
    if len(lead.get("message", "")) > MAX_TEXT:
        raise InvalidInputError(f"message is longer than {MAX_TEXT} characters",
                                field_violations={"input.lead.message": "too long"})
    return m.group(1)


def _need(file: LeadFile, *sections: str) -> None:
    for section in sections:
        if section not in file:
            raise InvalidInputError(f"this stage runs after the {section} stage: the lead file has no {section!r}",
                                    field_violations={f"input.{section}": "missing"})


def score_lead(lead: Lead) -> Score:
    """Points (0..100) for size, budget, industry fit and buying intent; free-mail addresses lose points."""
    domain = check_lead(lead)
    points, signals = 0, []
    employees, budget = lead.get("employees", 0), lead.get("budget_usd", 0.0)
    for floor, pts in ((1000, 30), (200, 20), (20, 10)):
        if employees >= floor:
            points += pts
            signals.append(f"{employees} employees (+{pts})")
            break
    for floor, pts in ((100_000, 30), (20_000, 20), (5_000, 10)):
        if budget >= floor:
            points += pts
            signals.append(f"budget ${budget:,.0f} (+{pts})")
            break
    if lead.get("industry", "").lower() in TARGET_INDUSTRIES:
        points += 15
        signals.append(f"target industry {lead.get('industry', '').lower()} (+15)")
    intent = mentioned(INTENT, lead.get("message", ""))
    if intent:
        points += min(5 * len(intent), 25)
        signals.append(f"intent: {', '.join(intent)} (+{min(5 * len(intent), 25)})")
    if domain in FREE_MAIL:
        points -= 20
        signals.append(f"free-mail address {domain} (-20)")
    points = max(0, min(points, 100))
    grade = "A" if points >= 70 else "B" if points >= 40 else "C" if points >= MIN_GRADE_POINTS else "D"
    return {"points": points, "grade": grade, "signals": signals}


class LeadScorer(Agent):
    """Scores a lead."""

    name = "lead-scorer"

    @capability(name="score-lead", tags=["leads"], idempotent=True,
                description="Score a sales lead 0..100 (grade A-D) from size, budget, industry and intent")
    async def score(self, req: LeadFile) -> LeadFile:
        return {**req, "score": score_lead(req["lead"])}


class LeadResearcher(Agent):
    """Looks the lead's company up in the directory."""

    name = "lead-researcher"

    @capability(name="research-lead", tags=["leads"], idempotent=True,
                description="Look a scored lead's company up by email domain: funding, technology, news")
    async def research(self, req: LeadFile) -> LeadFile:
        _need(req, "score")
        domain = check_lead(req["lead"])
        facts = DIRECTORY.get(domain, {})
        research: Research = {"domain": domain, "known": bool(facts), "funding": facts.get("funding", "unknown"),
                              "tech": list(facts.get("tech", [])), "news": list(facts.get("news", []))}
        return {**req, "research": research}


class LeadEnricher(Agent):
    """Adds segment, region and interests."""

    name = "lead-enricher"

    @capability(name="enrich-lead", tags=["leads"], idempotent=True,
                description="Enrich a researched lead with its segment, region and product interests")
    async def enrich(self, req: LeadFile) -> LeadFile:
        _need(req, "score", "research")
        lead = req["lead"]
        employees = lead.get("employees", 0)
        segment = "enterprise" if employees >= 1000 else "mid-market" if employees >= 200 else "smb"
        region = REGIONS.get(req["research"]["domain"].rsplit(".", 1)[-1], "amer")
        interests = sorted({*(t for t in req["research"]["tech"] if t in ("kubernetes", "grpc", "kafka")),
                            *mentioned(("security", "compliance", "analytics", "integration"),
                                       lead.get("message", ""))})
        return {**req, "enrichment": {"segment": segment, "region": region, "interests": interests}}


class LeadRouter(Agent):
    """Assigns the sales queue."""

    name = "lead-router"

    @capability(name="route-lead", tags=["leads"], idempotent=True,
                description="Route an enriched lead to a sales queue with a response-time target")
    async def route(self, req: LeadFile) -> LeadFile:
        _need(req, "score", "research", "enrichment")
        grade, segment, region = req["score"]["grade"], req["enrichment"]["segment"], req["enrichment"]["region"]
        if grade == "A" and segment == "enterprise":
            route: Route = {"queue": f"enterprise-ae-{region}", "sla_hours": 4,
                            "reason": "grade A enterprise lead: an account executive calls within 4 h"}
        elif grade in ("A", "B"):
            route = {"queue": f"account-exec-{region}", "sla_hours": 24, "reason": f"grade {grade} {segment} lead"}
        else:
            route = {"queue": f"sdr-{region}", "sla_hours": 72, "reason": f"grade {grade}: qualify by email first"}
        return {**req, "route": route}


def _stop_non_leads(out: Any) -> str | None:
    score = out["score"]
    return None if score["grade"] != "D" else f"score {score['points']} is below {MIN_GRADE_POINTS}: not a sales lead"


LEAD_QUALIFICATION = Pipeline(
    [Step("score-lead", stop_if=_stop_non_leads), Step("research-lead"), Step("enrich-lead"), Step("route-lead")],
    name="lead-qualification",
)
"""Qualify a lead {"lead": {...}}: COMPLETED with the routed lead file, or REJECTED after scoring."""

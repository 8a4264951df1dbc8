"""Risk assessment: credit, market and compliance analysts judge one application at once (FanOut + combine).

Each analyst serves one perspective on the same application and answers a score (0 = no risk, 100 = worst),
a level and the factors behind it: `credit-analyst` (`credit-risk`: leverage, loan size, track record),
`market-analyst` (`market-risk`: industry volatility, term), `compliance-analyst` (`compliance-risk`:
sanctioned and high-risk jurisdictions, regulated industries, KYC). `RISK_ASSESSMENT` asks all three in
parallel and `combine_risk` weighs them into one decision. A decision missing a perspective would understate
the risk, so every branch must answer (`fail_fast`, `min_success=3`): one refusal fails the assessment.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal, TypedDict

from hivemesh.sdk import Agent, InvalidInputError, capability
from hivemesh.sdk.patterns import FanOut

PERSPECTIVES = ("credit-risk", "market-risk", "compliance-risk")
WEIGHTS = {"credit-risk": 0.5, "market-risk": 0.3, "compliance-risk": 0.2}
SANCTIONED = frozenset({"KP", "IR", "SY", "CU"})
HIGH_RISK_COUNTRIES = frozenset({"RU", "BY", "VE", "MM", "AF"})
REGULATED = frozenset({"gambling", "crypto", "arms", "tobacco"})
VOLATILITY = {"software": 30, "healthcare": 25, "logistics": 40, "finance": 45, "manufacturing": 45,
              "retail": 55, "construction": 60, "energy": 65, "hospitality": 70, "crypto": 85}
COUNTRY_RE = re.compile(r"[A-Z]{2}")

Level = Literal["low", "medium", "high"]


class _ApplicationRequired(TypedDict):
    company: str
    country: str
    industry: str
    amount_usd: float
    term_months: int
    annual_revenue_usd: float
    debt_usd: float
    years_in_business: int


class Application(_ApplicationRequired, total=False):
    kyc_complete: bool


class Opinion(TypedDict):
    perspective: str
    score: int
    level: Level
    factors: list[str]


def check_application(app: Application) -> None:
    """Refuse what no analyst could judge, naming the field (the schema checks only the types)."""
    if not app["company"].strip():
        raise InvalidInputError("company must not be empty", field_violations={"input.company": "empty"})
    if not COUNTRY_RE.fullmatch(app["country"]):
        raise InvalidInputError(f"country {app['country']!r} is not an ISO 3166 alpha-2 code such as 'DE'",
                                field_violations={"input.country": "not an ISO 3166 alpha-2 code"})
    for key, value in (("amount_usd", app["amount_usd"]), ("annual_revenue_usd", app["annual_revenue_usd"])):
        if value <= 0:
            raise InvalidInputError(f"{key} must be positive", field_violations={f"input.{key}": "not positive"})
    if app["debt_usd"] < 0:
        raise InvalidInputError("debt_usd must not be negative", field_violations={"input.debt_usd": "negative"})
    if not 1 <= app["term_months"] <= 360:
        raise InvalidInputError("term_months must be 1..360", field_violations={"input.term_months": "out of range"})
    if app["years_in_business"] < 0:
        raise InvalidInputError("years_in_business must not be negative",
                                field_violations={"input.years_in_business": "negative"})


def _level(score: int) -> Level:
    return "low" if score < 35 else "medium" if score < 65 else "high"


def _opinion(perspective: str, score: float, factors: list[str]) -> Opinion:
    clamped = max(0, min(round(score), 100))
    return {"perspective": perspective, "score": clamped, "level": _level(clamped), "factors": factors}


def credit_opinion(app: Application) -> Opinion:
    check_application(app)
    leverage = app["debt_usd"] / app["annual_revenue_usd"]
    loan = app["amount_usd"] / app["annual_revenue_usd"]
    youth = max(0, 5 - app["years_in_business"])
    factors = [f"debt is {leverage:.0%} of revenue", f"the loan is {loan:.0%} of revenue"]
    if youth:
        factors.append(f"{app['years_in_business']} years in business")
    return _opinion("credit-risk", min(leverage, 1.5) * 40 + min(loan, 1.0) * 40 + youth * 5, factors)


def market_opinion(app: Application) -> Opinion:
    check_application(app)
    industry = app["industry"].lower()
    score = VOLATILITY.get(industry, 50)
    factors = [f"{industry} volatility {score}" if industry in VOLATILITY else f"unrated industry {industry!r}"]
    if app["term_months"] > 60:
        score += 10
        factors.append(f"long term ({app['term_months']} months)")
    return _opinion("market-risk", score, factors)


def compliance_opinion(app: Application) -> Opinion:
    check_application(app)
    score, factors = 10, []
    if app["country"] in SANCTIONED:
        score, factors = 100, [f"{app['country']} is under sanctions"]
    elif app["country"] in HIGH_RISK_COUNTRIES:
        score += 50
        factors.append(f"{app['country']} is a high-risk jurisdiction")
    if app["industry"].lower() in REGULATED:
        score += 30
        factors.append(f"regulated industry {app['industry'].lower()}")
    if not app.get("kyc_complete", True):
        score += 30
        factors.append("KYC is not complete")
    return _opinion("compliance-risk", score, factors or ["no compliance findings"])


class CreditAnalyst(Agent):
    """Credit perspective."""

    name = "credit-analyst"

    @capability(name="credit-risk", tags=["risk"], idempotent=True,
                description="Credit risk of a loan application: leverage, loan size, track record")
    async def credit_risk(self, req: Application) -> Opinion:
        return credit_opinion(req)


class MarketAnalyst(Agent):
    """Market perspective."""

    name = "market-analyst"

    @capability(name="market-risk", tags=["risk"], idempotent=True,
                description="Market risk of a loan application: industry volatility and term")
    async def market_risk(self, req: Application) -> Opinion:
        return market_opinion(req)


class ComplianceAnalyst(Agent):
    """Compliance perspective."""

    name = "compliance-analyst"

    @capability(name="compliance-risk", tags=["risk"], idempotent=True,
                description="Compliance risk of a loan application: sanctions, jurisdictions, regulated industries")
    async def compliance_risk(self, req: Application) -> Opinion:
        return compliance_opinion(req)


def combine_risk(outputs: Mapping[str, Any]) -> dict[str, Any]:
    """Fan-in: the weighted score; a sanctioned or high compliance finding declines whatever the others say."""
    score = round(sum(WEIGHTS[p] * outputs[p]["score"] for p in PERSPECTIVES))
    levels = {p: outputs[p]["level"] for p in PERSPECTIVES}
    if levels["compliance-risk"] == "high":
        decision, reason = "decline", "compliance risk is high"
    elif score >= 65:
        decision, reason = "decline", f"combined risk {score} is high"
    elif score >= 35 or "high" in levels.values():
        worst = [p for p in PERSPECTIVES if levels[p] == "high"]
        decision = "refer"
        reason = f"{', '.join(worst)} is high" if worst else f"combined risk {score} is medium"
    else:
        decision, reason = "approve", f"combined risk {score} is low"
    return {"score": score, "level": _level(score), "decision": decision, "reason": reason,
            "perspectives": {p: dict(outputs[p]) for p in PERSPECTIVES}}


RISK_ASSESSMENT = FanOut(list(PERSPECTIVES), aggregate=combine_risk, branch_timeout=5.0, fail_fast=True,
                         min_success=len(PERSPECTIVES), name="risk-assessment")
"""Assess an application with every perspective in parallel ('hivemesh.agents.risk:RISK_ASSESSMENT')."""

"""Contract review peers: legal, finance and business review a contract's terms until all three sign off.

A drafter (`contract-draft`) revises the terms; three reviewers check them against their team's policy and
say exactly which term must change to what (`corrections`). `CONTRACT_REVIEW` (PeerReview) runs rounds of
drafter → legal → finance → business until every reviewer approves, or the round limit, where a person
decides on the last draft.

Terms: payment_days, liability_cap_multiple (× annual fees), term_months, termination_notice_days,
auto_renew, governing_law, discount_percent, annual_fee.
"""

from __future__ import annotations

from typing import Any, TypedDict

from hivemesh.sdk import Agent, InvalidInputError, capability
from hivemesh.sdk.patterns import PeerReview

TERM_TYPES: dict[str, type | tuple[type, ...]] = {
    "payment_days": int,
    "liability_cap_multiple": (int, float),
    "term_months": int,
    "termination_notice_days": int,
    "auto_renew": bool,
    "governing_law": str,
    "discount_percent": (int, float),
    "annual_fee": (int, float),
}


class ContractBrief(TypedDict, total=False):
    party: str
    terms: dict[str, Any]


class DraftRequest(TypedDict, total=False):
    brief: ContractBrief
    draft: dict[str, Any] | None
    feedback: list[dict[str, Any]]
    round: int


class ReviewRequest(TypedDict, total=False):
    brief: ContractBrief
    draft: dict[str, Any]
    round: int


class Verdict(TypedDict):
    approved: bool
    feedback: list[str]
    corrections: dict[str, Any]


def check_terms(terms: Any, where: str) -> dict[str, Any]:
    if not isinstance(terms, dict) or not terms:
        raise InvalidInputError(f"{where} must be an object of contract terms", field_violations={where: "missing"})
    for name, value in terms.items():
        expected = TERM_TYPES.get(name)
        if expected is None:
            raise InvalidInputError(f"unknown contract term {name!r}", field_violations={f"{where}.{name}": "unknown"})
        if isinstance(value, bool) and expected is not bool:
            raise InvalidInputError(f"term {name} has the wrong type", field_violations={f"{where}.{name}": "type"})
        if not isinstance(value, expected):
            raise InvalidInputError(f"term {name} has the wrong type", field_violations={f"{where}.{name}": "type"})
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise InvalidInputError(f"term {name} is negative", field_violations={f"{where}.{name}": "negative"})
    return dict(terms)


class ContractDrafter(Agent):
    """Drafts contract terms and applies reviewers' corrections."""

    name = "contract-drafter"

    @capability(name="contract-draft", description="Draft or revise contract terms", tags=["contracts"],
                idempotent=True)
    async def contract_draft(self, req: DraftRequest) -> dict[str, Any]:
        brief = req.get("brief") or {}
        current = req.get("draft") or brief.get("terms")
        terms = check_terms(current, "input.draft" if req.get("draft") else "input.brief.terms")
        applied = []
        for item in req.get("feedback") or []:
            for name, value in (item.get("corrections") or {}).items():
                if name in TERM_TYPES and terms.get(name) != value:
                    terms[name] = value
                    applied.append(name)
        return {"draft": terms, "applied": sorted(applied)}


def _verdict(problems: dict[str, tuple[Any, str]]) -> Verdict:
    return {"approved": not problems, "feedback": [why for _, why in problems.values()],
            "corrections": {k: v for k, (v, _) in problems.items()}}


class LegalReviewer(Agent):
    """Legal: liability, governing law, termination."""

    name = "legal"

    @capability(name="legal-review", description="Legal review of contract terms", tags=["contracts"],
                idempotent=True)
    async def legal_review(self, req: ReviewRequest) -> Verdict:
        t = check_terms(req.get("draft"), "input.draft")
        problems: dict[str, tuple[Any, str]] = {}
        if float(t.get("liability_cap_multiple", 0)) < 1:
            problems["liability_cap_multiple"] = (1, "liability must be capped at no less than 1x annual fees")
        if not t.get("governing_law"):
            problems["governing_law"] = ("Delaware", "a governing law is required")
        if int(t.get("termination_notice_days", 0)) > 90:
            problems["termination_notice_days"] = (90, "termination notice may not exceed 90 days")
        return _verdict(problems)


class FinanceReviewer(Agent):
    """Finance: payment terms and discounts."""

    name = "finance"

    @capability(name="finance-review", description="Finance review of contract terms", tags=["contracts"],
                idempotent=True)
    async def finance_review(self, req: ReviewRequest) -> Verdict:
        t = check_terms(req.get("draft"), "input.draft")
        problems: dict[str, tuple[Any, str]] = {}
        if int(t.get("payment_days", 30)) > 45:
            problems["payment_days"] = (45, "payment terms longer than net 45 need the CFO; use net 45")
        if float(t.get("discount_percent", 0)) > 20:
            problems["discount_percent"] = (20, "discounts above 20% are not allowed")
        return _verdict(problems)


class BusinessReviewer(Agent):
    """Business: commitment length and renewals."""

    name = "business"

    @capability(name="business-review", description="Business review of contract terms", tags=["contracts"],
                idempotent=True)
    async def business_review(self, req: ReviewRequest) -> Verdict:
        t = check_terms(req.get("draft"), "input.draft")
        problems: dict[str, tuple[Any, str]] = {}
        if int(t.get("term_months", 12)) > 36:
            problems["term_months"] = (36, "commitments longer than 36 months are not offered")
        if t.get("auto_renew") and int(t.get("termination_notice_days", 0)) < 30:
            problems["termination_notice_days"] = (30, "auto-renewing contracts need at least 30 days' notice")
        return _verdict(problems)


CONTRACT_REVIEW = PeerReview(
    writer="contract-draft",
    reviewers=["legal-review", "finance-review", "business-review"],
    max_rounds=3,
    ask_human_at_limit=True,
    name="contract-review",
)
"""Workflow definition 'hivemesh.agents.contract:CONTRACT_REVIEW'; input {"brief": {"party", "terms"}}."""

"""Customer-service escalation: tier 1 → tier 2 → supervisor → a person.

Three agents answer with a confidence: tier 1 handles the routine (shipping, passwords, small refunds), tier
2 larger refunds and complaints, the supervisor agent anything but with a recommendation rather than a
commitment for big amounts. `CUSTOMER_SERVICE` is the Supervisor pattern over them: the message is split
into requests (one subtask each), each starts at tier 1 and is reassigned up the chain while the answer is
not confident enough, and a person decides when the rules say so (confidence < 0.7 at the top, a sensitive
request such as legal threats or data deletion, more than 2 errors, or an enterprise customer).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypedDict

from hivemesh.sdk import Agent, InvalidInputError, capability
from hivemesh.sdk.llm import llm_from_env
from hivemesh.sdk.patterns import EscalationRules, Subtask, Supervisor

TIERS = ("free", "pro", "enterprise")
_AMOUNT = re.compile(r"\$\s?(\d+(?:\.\d{1,2})?)")
_SENSITIVE = re.compile(r"\b(lawyer|legal|sue|gdpr|delete my (data|account)|chargeback)\b", re.IGNORECASE)


class Request(TypedDict, total=False):
    customer: str
    tier: str
    message: str


class Reply(TypedDict):
    answer: str
    action: str
    confidence: float
    handled_by: str


def _check(req: Request) -> tuple[str, str, float | None]:
    message = str(req.get("message", "")).strip()
    if not message or len(message) > 2000:
        raise InvalidInputError("message must be 1..2000 characters", field_violations={"input.message": "bad"})
    tier = str(req.get("tier", "free"))
    if tier not in TIERS:
        raise InvalidInputError(f"tier must be one of {', '.join(TIERS)}", field_violations={"input.tier": tier[:40]})
    m = _AMOUNT.search(message)
    return message.lower(), tier, float(m.group(1)) if m else None


class _Desk(Agent):
    level = ""

    def __init__(self) -> None:
        super().__init__()
        self.llm = llm_from_env({"reply": lambda p: p.split("\n", 1)[0]})

    async def _reply(self, answer: str, action: str, confidence: float, message: str) -> Reply:
        text = await self.llm.complete(f"{answer}\nCustomer wrote: {message}", task="reply")
        return {"answer": text.text, "action": action, "confidence": confidence, "handled_by": self.level}


class Tier1Agent(_Desk):
    """First-line support: routine questions and small refunds."""

    name = "tier1"
    level = "tier1"

    @capability(name="tier1-support", description="First-line customer support", tags=["support"], idempotent=True)
    async def tier1_support(self, req: Request) -> Reply:
        msg, _tier, amount = _check(req)
        if "where is my order" in msg or "shipping" in msg or "delivery" in msg:
            return await self._reply("Your order ships within 2 business days; tracking is in your account.",
                                     "sent-tracking", 0.92, msg)
        if "password" in msg:
            return await self._reply("Use 'Forgot password' on the sign-in page.", "sent-reset-link", 0.95, msg)
        if "refund" in msg and amount is not None and amount <= 50:
            return await self._reply(f"Refund of ${amount:.2f} issued.", "refund", 0.85, msg)
        return await self._reply("Let me look into this for you.", "none", 0.4, msg)


class Tier2Agent(_Desk):
    """Second-line support: larger refunds, complaints."""

    name = "tier2"
    level = "tier2"

    @capability(name="tier2-support", description="Second-line customer support", tags=["support"], idempotent=True)
    async def tier2_support(self, req: Request) -> Reply:
        msg, _tier, amount = _check(req)
        if "refund" in msg and amount is not None and amount <= 500:
            return await self._reply(f"Refund of ${amount:.2f} approved after review.", "refund", 0.8, msg)
        if "complaint" in msg or "broken" in msg or "damaged" in msg:
            return await self._reply("We will replace the item at no cost.", "replacement", 0.75, msg)
        return await self._reply("This needs a supervisor.", "none", 0.45, msg)


class SupervisorDeskAgent(_Desk):
    """The support supervisor agent: recommends, and commits only up to $2000."""

    name = "cs-supervisor"
    level = "supervisor"

    @capability(name="supervisor-support", description="Support supervisor", tags=["support"], idempotent=True)
    async def supervisor_support(self, req: Request) -> Reply:
        msg, _tier, amount = _check(req)
        if "refund" in msg and amount is not None:
            conf = 0.8 if amount <= 2000 else 0.55
            return await self._reply(f"Recommend a refund of ${amount:.2f}.", "refund", conf, msg)
        return await self._reply("Offer a goodwill credit and a call back.", "credit", 0.72, msg)


def decompose(task: Any) -> list[Subtask]:
    """One subtask per sentence-level request, each starting at tier 1 and reassignable up the chain."""
    if not isinstance(task, dict) or not str(task.get("message", "")).strip():
        raise InvalidInputError("a support task needs a 'message'")
    parts = [p.strip() for p in re.split(r"(?<=[.!?])\s+|\n+", str(task["message"])) if p.strip()]
    requests = [p for p in parts if re.search(r"refund|order|password|shipping|delivery|complaint|broken|damaged|"
                                              r"lawyer|legal|gdpr|delete|help|\?", p, re.IGNORECASE)] or parts[:1]
    return [
        Subtask(
            id=f"request-{i + 1}",
            capability="tier1-support",
            input={"customer": task.get("customer", ""), "tier": task.get("tier", "free"), "message": text},
            reassign_to=("tier2-support", "supervisor-support"),
            sensitive=bool(_SENSITIVE.search(text)),
        )
        for i, text in enumerate(requests[:5])
    ]


def combine(task: Any, answers: Mapping[str, Any]) -> dict[str, Any]:
    return {"customer": task.get("customer", ""), "replies": answers}


CUSTOMER_SERVICE = Supervisor(
    decompose,
    combine=combine,
    rules=EscalationRules(min_confidence=0.7, max_errors=2, tiers=("enterprise",), deadline_s=3600),
    name="customer-service",
)
"""tier 1 → tier 2 → supervisor → person; a workflow definition: 'hivemesh.agents.customer_service:CUSTOMER_SERVICE'."""

"""Sales support: a router sends each customer question to the product, pricing or technical specialist.

`product-specialist` (`product-advice`: which plan fits, what it includes), `pricing-specialist`
(`pricing-quote`: a priced quote per seat with volume discounts) and `technical-specialist`
(`technical-advice`: SSO, API, deployment and security answers) describe themselves in their cards;
`SALES_SUPPORT` (Router) picks one per question: explicit rules for money and for technical terms first,
then keywords over the cards' descriptions and tags; a question nothing fits goes to a person.

Each takes `{"text": ..., "seats": N, "plan": ...}`; the pricing specialist needs `seats`.

The pricing specialist may be another language's agent: when the Node.js pricing agent of `examples/node`
(`pricing.quote`, behind a sidecar) is live, `SALES_SUPPORT` sends it the pricing questions that give a seat
count, as a catalogue order of that many CRM seats, and answers from its quote (`served_by: node`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypedDict

from hivemesh.agents._text import mentioned
from hivemesh.sdk import Agent, InvalidInputError, capability
from hivemesh.sdk.patterns import Router, Rule
from hivemesh.sdk.patterns.base import Caller, PatternResult, Runner, as_runner
from hivemesh.sdk.patterns.router import words

MAX_TEXT = 2000
MAX_SEATS = 100_000

Plan = Literal["starter", "team", "enterprise"]
PER_SEAT_USD: dict[str, int] = {"starter": 10, "team": 25, "enterprise": 45}
FEATURES: dict[str, list[str]] = {
    "starter": ["mesh registry", "mTLS", "audit log (7 days)"],
    "team": ["everything in starter", "SSO", "workflows", "audit log (90 days)"],
    "enterprise": ["everything in team", "self-hosted", "SCIM", "audit log (7 years)", "24/7 support"],
}
VOLUME_DISCOUNTS = ((500, 20), (100, 10))
"""(seats at least, percent off), largest first."""

# (keywords, answer) per technical topic; the first that matches wins.
TECH_ANSWERS: list[tuple[frozenset[str], str, Plan]] = [
    (frozenset({"sso", "saml", "oidc", "scim"}), "SSO with SAML 2.0 or OIDC; SCIM provisioning on enterprise", "team"),
    (frozenset({"api", "grpc", "rest", "sdk"}), "gRPC and REST APIs with Python and Node.js SDKs", "starter"),
    (frozenset({"on-prem", "on-premises", "self-hosted", "kubernetes", "helm"}),
     "self-hosted on Kubernetes with the Helm chart", "enterprise"),
    (frozenset({"soc", "iso", "gdpr", "encryption"}),
     "SOC 2 Type II report under NDA; TLS 1.3 everywhere, data encrypted at rest", "team"),
]


class _QuestionRequired(TypedDict):
    text: str


class Question(_QuestionRequired, total=False):
    seats: int
    plan: Plan


class Advice(TypedDict):
    specialist: str
    answer: str
    plan: Plan
    features: list[str]
    confidence: float


class Quote(TypedDict):
    specialist: str
    plan: Plan
    seats: int
    per_seat_usd: float
    discount_percent: int
    monthly_usd: float
    annual_usd: float
    answer: str


def check_question(req: Mapping[str, Any]) -> str:
    """The question's text; an empty or oversized question or a bad seat count is refused by name."""
    text: str = req["text"]
    if not text.strip() or not words(text):
        raise InvalidInputError("the question needs some words", field_violations={"input.text": "empty"})
    if len(text) > MAX_TEXT:
        raise InvalidInputError(f"the question is longer than {MAX_TEXT} characters",
                                field_violations={"input.text": "too long"})
    if "seats" in req and not 1 <= req["seats"] <= MAX_SEATS:
        raise InvalidInputError(f"seats must be 1..{MAX_SEATS}", field_violations={"input.seats": "out of range"})
    return text


def plan_for(req: Question) -> Plan:
    """The plan asked for, else the one that fits the seat count."""
    if "plan" in req:
        return req["plan"]
    seats = req.get("seats", 1)
    return "starter" if seats < 10 else "team" if seats < 250 else "enterprise"


class ProductSpecialist(Agent):
    """Product questions."""

    name = "product-specialist"

    @capability(name="product-advice", tags=["sales", "product", "plan", "features", "compare"], idempotent=True,
                description="Product questions: which plan fits a team, what a plan includes, plan comparisons")
    async def product_advice(self, req: Question) -> Advice:
        said = check_question(req)
        plan = plan_for(req)
        if plan != "enterprise" and mentioned(("audit", "compliance", "scim", "self-hosted"), said):
            plan = "enterprise"
        features = list(FEATURES[plan])
        seats = req.get("seats")
        for_whom = f" for {seats} seats" if seats else ""
        return {"specialist": "product", "plan": plan, "features": features, "confidence": 0.85,
                "answer": f"The {plan} plan fits{for_whom}: {', '.join(features)}."}


class PricingSpecialist(Agent):
    """Quotes."""

    name = "pricing-specialist"

    @capability(name="pricing-quote", tags=["sales", "pricing", "price", "quote", "discount", "cost"],
                idempotent=True, description="Pricing: a quote per seat and plan, volume discounts, annual cost")
    async def pricing_quote(self, req: Question) -> Quote:
        check_question(req)
        if "seats" not in req:
            raise InvalidInputError("a quote needs the number of seats", field_violations={"input.seats": "missing"})
        seats, plan = req["seats"], plan_for(req)
        per_seat = float(PER_SEAT_USD[plan])
        discount = next((pct for floor, pct in VOLUME_DISCOUNTS if seats >= floor), 0)
        monthly = round(seats * per_seat * (100 - discount) / 100, 2)
        off = f" after a {discount}% volume discount" if discount else ""
        return {"specialist": "pricing", "plan": plan, "seats": seats, "per_seat_usd": per_seat,
                "discount_percent": discount, "monthly_usd": monthly, "annual_usd": round(monthly * 12, 2),
                "answer": f"{seats} seats on {plan}: ${monthly:,.2f} a month{off}."}


class TechnicalSpecialist(Agent):
    """Technical questions."""

    name = "technical-specialist"

    @capability(name="technical-advice", idempotent=True,
                tags=["sales", "technical", "integration", "api", "sso", "security", "deployment"],
                description="Technical questions: SSO, APIs and SDKs, self-hosted deployment, security, compliance")
    async def technical_advice(self, req: Question) -> Advice:
        said = check_question(req)
        for keys, answer, plan in TECH_ANSWERS:
            topics = sorted(mentioned(keys, said))
            if topics:
                return {"specialist": "technical", "answer": answer, "plan": plan, "confidence": 0.9,
                        "features": topics}
        return {"specialist": "technical", "answer": "A solutions engineer will follow up on this.",
                "plan": plan_for(req), "features": [], "confidence": 0.4}


PRICING = "pricing-quote"
NODE_PRICING = "pricing.quote"
"""The Node.js pricing agent's capability (examples/node/agent.js): a catalogue order in, a quote in cents out."""
NODE_SEAT_SKU = "CRM-SEAT"


def node_order(req: Mapping[str, Any]) -> dict[str, Any]:
    """A sales question with a seat count as the Node pricing agent's input: that many CRM seats, list tier."""
    return {"customer_tier": "standard", "items": [{"sku": NODE_SEAT_SKU, "quantity": req["seats"]}]}


def from_node(req: Mapping[str, Any], quote: Mapping[str, Any]) -> dict[str, Any]:
    """The Node agent's quote as the sales answer."""
    line = quote["lines"][0]
    volume = int(line["volume_discount_percent"])
    off = f" after a {volume}% volume discount" if volume else ""
    total = quote["total_cents"] / 100
    return {"specialist": "pricing", "served_by": "node", "seats": req["seats"], "currency": quote["currency"],
            "discount_percent": volume, "annual_total": total,
            "answer": f"{req['seats']} seats: {quote['currency']} {total:,.2f} a year{off}."}


class SalesSupport:
    """The sales router, with pricing served by the Node.js pricing agent when one is live.

    A question the router sends to `pricing-quote` that gives a seat count goes to `pricing.quote` instead
    while an instance of it is live. The choice is memoized, so a resumed run keeps it. Everything else is
    the Router's.
    """

    kind = "router"

    def __init__(self, router: Router) -> None:
        self.router = router
        self.name = router.name

    async def run(self, target: Runner | Caller, input: Any) -> PatternResult:
        runner = as_runner(target)
        if isinstance(input, Mapping) and "seats" in input:
            def to_node() -> bool:
                decision = self.router.decide(self.router.text_of(input), self.router.candidates(runner))
                return decision["capabilities"] == [PRICING] and bool(runner.instances(NODE_PRICING))

            if await runner.memo(f"{self.name}-node-pricing", to_node):
                route = {"capabilities": [NODE_PRICING], "method": "rule", "score": 1.0, "served_by": "node"}
                await runner.note(f"{self.name}-route", route)
                step = await runner.step(f"route-{NODE_PRICING}", NODE_PRICING, node_order(input),
                                         timeout=self.router.timeout)
                return PatternResult(output=from_node(input, step.output), steps=[step], details={"route": route})
        return await self.router.run(runner, input)


SALES_SUPPORT = SalesSupport(Router(
    candidates_tag="sales",
    exclude=(NODE_PRICING,),  # its input is a catalogue order, not a question: reached only as above
    rules=[Rule(PRICING, keywords=("price", "pricing", "quote", "cost", "discount", "how much")),
           Rule("technical-advice", keywords=("sso", "saml", "api", "self-hosted", "kubernetes", "soc"))],
    ask_human=True,
    name="sales-support",
))
"""Route a customer question {"text": ..., "seats": N} to one specialist; unknown → a person picks; pricing to
the Node.js agent when it is live."""

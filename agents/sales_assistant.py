"""Sales assistant: a model answers a customer by calling tools, a local one and a mesh capability.

`sales-assistant` serves `sales-assist` (`{"customer": "acme", "text": "...", "seats": 120}`). Its model is
given two tools in the OpenAI tool format and runs the tool-calling loop (`hivemesh.sdk.tools`):

- `account_lookup`, a local `@tool` function over a small built-in account book (plan, seats, renewal);
- `pricing-quote`, the pricing specialist's capability (`sales.py`) used as a tool: each call is an onward
  mesh call under this agent's identity, so authorization, grants, rate limits, budgets, the audit log and
  tracing apply to it as to any call.

A tool that fails (an unknown customer, a pricing specialist that is down or refuses) goes back to the model
as that call's result, and the model still answers with what it has. The model is the deterministic offline
one by default (it calls the tools the prompt names, then answers by the `answer` rule below from their
results), or the OpenAI-compatible provider when `HIVEMESH_LLM=openai` (see docs/tools.md).
"""

from __future__ import annotations

import json
import re
from typing import Any, TypedDict

from hivemesh.agents.sales import Plan, check_question
from hivemesh.mesh import json_depth
from hivemesh.sdk import Agent, Context, InvalidInputError, UnknownCapabilityError, capability
from hivemesh.sdk.llm import llm_from_env
from hivemesh.sdk.patterns import Pipeline
from hivemesh.sdk.tools import Tool, mesh_tool, mesh_tools, run_with_tools, tool

PRICING = "pricing-quote"
MAX_ROUNDS = 3
CUSTOMER_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
SYSTEM = ("You are a sales assistant. Look the customer up and price what they ask with the tools, then answer in "
          "at most three sentences, quoting prices exactly as the pricing tool gives them.")


class Account(TypedDict):
    customer: str
    plan: Plan
    seats: int
    renews: str


ACCOUNTS: dict[str, Account] = {
    "acme": {"customer": "acme", "plan": "team", "seats": 40, "renews": "2027-03-01"},
    "initech": {"customer": "initech", "plan": "enterprise", "seats": 600, "renews": "2027-09-15"},
    "globex": {"customer": "globex", "plan": "starter", "seats": 8, "renews": "2027-01-31"},
}
"""The account book the local tool reads (a CRM in a real deployment)."""


@tool
async def account_lookup(customer: str) -> Account:
    """The customer's account: their current plan, seat count and renewal date."""
    account = ACCOUNTS.get(customer.strip().lower())
    if account is None:
        raise LookupError(f"no account on file for {customer!r}")
    return account


class _AssistRequired(TypedDict):
    customer: str
    text: str


class AssistRequest(_AssistRequired, total=False):
    seats: int
    plan: Plan


class ToolUse(TypedDict):
    name: str
    ok: bool
    round: int


class Assist(TypedDict):
    customer: str
    answer: str
    tools: list[ToolUse]
    """Every tool call the model made, in order, and whether it worked."""
    rounds: int


def check_request(req: AssistRequest) -> tuple[str, str]:
    """The customer id and the question on one line; bad ones are refused by field (INVALID_ARGUMENT)."""
    customer = req["customer"].strip().lower()
    if not CUSTOMER_RE.fullmatch(customer):
        raise InvalidInputError("customer must be an account id: lower-case letters, digits and '-', 1..63",
                                field_violations={"input.customer": "not an account id"})
    text = " ".join(check_question(req).split())  # one line: the prompt's structure stays the agent's
    return customer, text


def prompt_for(customer: str, text: str, req: AssistRequest) -> str:
    """The instructions first (the offline model calls the tools in the order they are named, with the JSON
    after each name as arguments), then the customer's words."""
    ask = f"Look the customer up with account_lookup({json.dumps({'customer': customer})})"
    if "seats" in req:
        quote: dict[str, Any] = {"text": text, "seats": req["seats"]}
        if "plan" in req:
            quote["plan"] = req["plan"]
        ask += f" and price their request with {PRICING}({json.dumps(quote)})"
    return f"{ask}.\nCustomer {customer} asks: {text}"


def _result(lines: list[str], name: str) -> dict[str, Any] | None:
    """The last result the named tool gave (results follow the prompt, one `name: json` line each)."""
    for line in reversed(lines):
        if line.startswith(f"{name}: "):
            try:
                value = json_depth.loads(line[len(name) + 2:])
            except ValueError:
                return {"error": {"message": "unreadable result"}}
            return value if isinstance(value, dict) else {"error": {"message": "unexpected result"}}
    return None


def _error_text(result: dict[str, Any]) -> str:
    err = result.get("error") or {}
    return str(err.get("reason") or err.get("type") or err.get("message") or "error")


def answer_rule(conversation: str) -> str:
    """The offline model's answer from the tool results: what the account says, then the quote."""
    lines = conversation.splitlines()
    customer = next((ln.split()[1] for ln in lines if ln.startswith("Customer ")), "the customer")
    sentences = []
    account = _result(lines, "account_lookup")
    if account is not None and "error" in account:
        sentences.append(f"I found no account for {customer}, so this is list pricing.")
    elif account is not None:
        sentences.append(f"{customer} is on {account['plan']} with {account['seats']} seats, renewing "
                         f"{account['renews']}.")
    quote = _result(lines, PRICING)
    if quote is not None and "error" in quote:
        sentences.append(f"I could not get a quote just now ({_error_text(quote)}); a colleague will send one.")
    elif quote is not None:
        sentences.append(str(quote.get("answer", "")))
    return " ".join(sentences) or "A colleague will follow up on this."


class SalesAssistant(Agent):
    """Answers customers with a model that calls an account lookup and the pricing specialist as tools."""

    name = "sales-assistant"

    def __init__(self) -> None:
        super().__init__()
        self.llm = llm_from_env({"answer": answer_rule})

    def _tools(self, ctx: Context) -> list[Tool]:
        """The local tool and the pricing capability as the registry describes it; when no pricing specialist
        is live, the tool is still offered (its call fails, and the model hears why)."""
        try:
            priced = mesh_tools(ctx, [PRICING])
        except UnknownCapabilityError:
            priced = [mesh_tool(PRICING, description="Pricing: a quote per seat and plan, volume discounts")]
        return [account_lookup, *priced]

    @capability(name="sales-assist", tags=["assistant", "tools"],
                description="Answer a customer's sales question with a model that looks up their account and "
                            "asks the pricing specialist, as tools")
    async def sales_assist(self, req: AssistRequest, ctx: Context) -> Assist:
        customer, text = check_request(req)
        run = await run_with_tools(self.llm, prompt_for(customer, text, req), self._tools(ctx), ctx=ctx,
                                   system=SYSTEM, task="answer", max_rounds=MAX_ROUNDS)
        return {"customer": customer, "answer": run.text, "rounds": run.rounds,
                "tools": [{"name": c.name, "ok": c.ok, "round": c.round} for c in run.calls]}


SALES_ASSIST = Pipeline(["sales-assist"], name="sales-assist")
"""One assisted answer as a durable workflow ('hivemesh.agents.sales_assistant:SALES_ASSIST'), for the demo."""

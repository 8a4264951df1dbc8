"""Small agents the orchestration tests serve on the real mesh (nothing mocked: real servers, real calls).

`WorkerAgent` counts what it really did, so tests can prove effects happened once and calls were cancelled.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

from hivemesh.sdk import Agent, Context, capability
from hivemesh.sdk.escalation import InputRequired
from hivemesh.sdk.llm import RuleBasedLLM


class Text(TypedDict):
    text: str


class Charge(TypedDict, total=False):
    account: str
    amount: float
    delay: float


class Sleep(TypedDict, total=False):
    seconds: float
    tag: str


class WorkerAgent(Agent):
    """Test worker: upper-cases, charges (non-idempotent, counted), sleeps (cancellable, counted), fails."""

    name = "worker"

    def __init__(self, effects_file: Path | None = None) -> None:
        super().__init__()
        self.on_effect: Callable[[dict[str, Any]], None] | None = None
        """Called synchronously right after an effect is recorded (tests kill the orchestrator here)."""
        self.effects: list[dict[str, Any]] = []
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.effects_file = effects_file
        self.llm = RuleBasedLLM({"summarize": lambda p: " ".join(p.split()[:5])})

    @capability(description="Upper-case text", tags=["text"], idempotent=True)
    async def upper(self, req: Text) -> Text:
        return {"text": req["text"].upper()}

    @capability(description="Summarize text with the rule-based model (tokens counted)", idempotent=True)
    async def summarize(self, req: Text) -> Text:
        done = await self.llm.complete(req["text"], task="summarize")
        return {"text": done.text}

    @capability(description="Charge an account: NOT idempotent, every effect is recorded")
    async def charge(self, req: Charge, ctx: Context) -> dict[str, Any]:
        self.started.append(ctx.idempotency_key)
        await asyncio.sleep(float(req.get("delay", 0.0)))
        # The effect is the last thing the handler does (no await after it): see hivemesh.sdk.idempotency.
        effect = {"account": req.get("account", ""), "amount": req.get("amount", 0.0), "key": ctx.idempotency_key,
                  "at": time.time(), "pid": os.getpid()}
        self.effects.append(effect)
        if self.effects_file is not None:
            with self.effects_file.open("a") as f:
                f.write(json.dumps(effect) + "\n")
        if self.on_effect is not None:
            self.on_effect(effect)
        return {"charged": effect["amount"], "receipt": len(self.effects)}

    @capability(description="Sleep (cancellation tests)", idempotent=True)
    async def nap(self, req: Sleep, ctx: Context) -> Sleep:
        tag = req.get("tag", "")
        self.started.append(tag)
        try:
            await asyncio.sleep(float(req.get("seconds", 1.0)))
        except asyncio.CancelledError:
            self.cancelled.append(tag)
            raise
        return req

    @capability(description="Always fails")
    async def broken(self, req: Text) -> Text:
        raise RuntimeError("broken on purpose")

    @capability(description="Report what this worker did", idempotent=True)
    async def effects_report(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"effects": self.effects, "started": self.started, "cancelled": self.cancelled}


class Answer(TypedDict, total=False):
    question: str
    confidence: float
    human: dict[str, Any]


class DeskAgent(Agent):
    """Answers with a confidence taken from the input; `approve-refund` asks a person (INPUT_REQUIRED)."""

    name = "desk"

    @capability(description="Answer a question (confidence from the input)", idempotent=True)
    async def answer(self, req: Answer) -> dict[str, Any]:
        return {"answer": f"re: {req.get('question', '')}", "confidence": float(req.get("confidence", 0.9))}

    @capability(description="Second-line answer, always confident", idempotent=True)
    async def answer_expert(self, req: Answer) -> dict[str, Any]:
        return {"answer": f"expert re: {req.get('question', '')}", "confidence": 0.95}

    @capability(description="Approve a refund; asks a person before committing", idempotent=True)
    async def approve_refund(self, req: Answer) -> dict[str, Any]:
        human = req.get("human")
        if not human:
            raise InputRequired("a refund needs a person's approval", {"question": req.get("question", "")},
                                options=["approve", "reject"])
        return {"refunded": True, "answer": human.get("answer"), "note": human.get("note", "")}


class RelayAgent(Agent):
    """Calls `nap` on the worker within its own call: a chain for cancellation to travel down."""

    name = "relay"

    @capability(name="relay-nap", description="Relay a nap to the worker", idempotent=True)
    async def relay_nap(self, req: Sleep, ctx: Context) -> dict[str, Any]:
        return {"relayed": await ctx.call_capability("nap", dict(req))}

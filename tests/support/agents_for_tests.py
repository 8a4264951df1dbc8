"""Small SDK agents the integration tests serve (real agents on the real mesh, nothing mocked)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, TypedDict

from hivemesh.sdk import Agent, Context, capability


class Text(TypedDict):
    text: str


class Echo(TypedDict):
    text: str
    caller: str
    served_by: str


class EchoAgent(Agent):
    """Echoes text back; the workhorse of the integration tests."""

    name = "echo"
    version = "1.0.0"
    owner = "tests"

    def __init__(self, tag: str = "") -> None:
        super().__init__()
        self.tag = tag
        self.calls = 0

    @capability(description="Return the text unchanged", tags=["test"], idempotent=True)
    async def echo(self, req: Text, ctx: Context) -> Echo:
        self.calls += 1
        return {"text": req["text"], "caller": ctx.caller, "served_by": self.tag}

    @capability(description="Stream the words of the text in upper case", tags=["test"])
    async def shout(self, req: Text) -> AsyncIterator[str]:
        for word in req["text"].split():
            yield word.upper()

    @capability(description="Sleep, then answer (deadline tests)")
    async def slow(self, req: dict[str, float]) -> dict[str, float]:
        await asyncio.sleep(req.get("seconds", 1.0))
        return req

    @capability(description="A capability no grant gives to agents")
    async def restricted(self, req: Text) -> Text:
        return req

    @capability(description="Fail on purpose")
    async def boom(self, req: Text) -> Text:
        raise RuntimeError("kaboom")


class TaggedTwin(Agent):
    """Base of agents that offer the same capabilities under different names (alpha, beta): every answer and
    every streamed item names the agent and the instance (tag) that served it, so a test sees where calls went."""

    name = ""
    version = "1.0.0"

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag

    @capability(description="Echo, saying who served it", idempotent=True)
    async def echo(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"text": req.get("text"), "agent": self.name, "served_by": self.tag}

    @capability(description="Stream three items, each saying who served it")
    async def tally(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        for n in range(3):
            yield {"n": n, "agent": self.name, "served_by": self.tag}

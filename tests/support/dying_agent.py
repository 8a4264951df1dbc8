"""A `PlainAgent` in a process of its own that dies under a call, as an agent in any language may (a crash, an
OOM kill): `crash` exits the process as soon as a call reaches it; `drip` streams two chunks and holds the stream
open, and the process exits once the test writes a line to its stdin (after it saw the chunks, so no test sleeps on a
guess). `python -m tests.support.dying_agent [--link]` prints its port, then serves until told to die (a line on
stdin: exit at once, as a killed process) or its stdin closes (a clean stop)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc

from hivemesh.v1 import agent_pb2
from tests.support.plain_agent import PlainAgent

_JSON = "application/json"


class DyingAgent(PlainAgent):
    """PlainAgent's capabilities plus `crash` (unary, not idempotent) and `drip` (streaming)."""

    def card(self) -> agent_pb2.AgentCard:
        card = super().card()
        card.capabilities.add(name="crash", description="exit the process under the call",
                              input_modes=[_JSON], output_modes=[_JSON])
        card.capabilities.add(name="drip", description="two chunks, then exit once told on stdin", streaming=True,
                              input_modes=[_JSON], output_modes=[_JSON])
        return card

    async def Invoke(
        self, request: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.InvokeResponse:
        if request.capability == "crash":
            os._exit(3)  # the call reached the agent, which dies under it without answering
        return await super().Invoke(request, context)

    async def InvokeStream(
        self, request: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[agent_pb2.InvokeChunk]:
        if request.capability != "drip":
            async for chunk in super().InvokeStream(request, context):
                yield chunk
            return
        for word in ("one", "two"):
            yield agent_pb2.InvokeChunk(data=json.dumps(word).encode(), content_type=_JSON,
                                        state=agent_pb2.TASK_STATE_WORKING)
        await asyncio.get_running_loop().create_future()  # held open until the process dies


async def _main() -> None:
    async with DyingAgent("plain", link="--link" in sys.argv[1:]) as agent:
        print(agent.port, flush=True)
        if await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline):
            os._exit(3)  # told to die: no graceful stop, every open call and stream breaks


if __name__ == "__main__":
    asyncio.run(_main())

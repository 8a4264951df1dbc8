"""A unary Invoke of a streaming capability collects the stream into one answer: that answer is bounded by what
the agent's server sends in one message (`hivemesh.mesh.tls.MAX_MESSAGE_BYTES`). Before, a stream that never
ended (or yielded gigabytes) was collected without bound and grew the agent's memory until it died; now the call
is RESOURCE_EXHAUSTED as soon as the bound is passed, the capability's generator is closed, and the agent serves
on. Served over real gRPC and mutual TLS, called both as a plain unary Invoke and as a frame on a Link."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from hivemesh.mesh.errors import AgentError, HivemeshError
from hivemesh.mesh.tls import MAX_MESSAGE_BYTES
from hivemesh.sdk import Agent, AgentServer, AgentServerConfig, capability
from tests.support.orch_env import Orch
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(120)

CHUNK = "x" * (256 * 1024)
"""One item of the endless stream: ~32 of them pass the bound."""


class Endless(Agent):
    """Streams that never end, counting what they yielded and noting, in their `finally`, that they were closed."""

    name = "endless"

    def __init__(self) -> None:
        super().__init__()
        self.yielded = 0
        self.closed = 0
        self.server: AgentServer | None = None

    @capability(idempotent=True)
    async def forever(self, req: dict[str, Any]) -> AsyncIterator[str]:
        try:
            while True:
                await asyncio.sleep(0)  # gives the loop a turn, so a call's deadline could still end it
                self.yielded += 1
                yield CHUNK
        finally:
            self.closed += 1

    @capability(idempotent=True)
    async def nan_then_forever(self, req: dict[str, Any]) -> AsyncIterator[Any]:
        try:
            yield {"v": 1}
            yield {"v": float("nan")}
            while True:
                await asyncio.sleep(0.001)
                self.yielded += 1
                yield {"v": 2}
        finally:
            self.closed += 1

    @capability(idempotent=True)
    async def few(self, req: dict[str, Any]) -> AsyncIterator[dict[str, int]]:
        for i in range(3):
            yield {"i": i}

    @capability(idempotent=True)
    async def ping(self, req: dict[str, Any]) -> dict[str, Any]:
        return req


@pytest.fixture(params=[True, False], ids=["link", "unary"])
async def endless(orch: Orch, request: pytest.FixtureRequest) -> Endless:
    agent = Endless()
    agent.server = await orch.serve(agent, AgentServerConfig(link=request.param))
    return agent


def _link_calls(agent: Endless) -> int:
    """Calls the agent served on links (0 when it serves none): the link case must really go over the link."""
    links = agent.server._link if agent.server is not None else None
    return links.calls if links is not None else 0


async def test_an_endless_stream_called_unary_is_resource_exhausted_closed_and_the_agent_serves_on(
    orch: Orch, endless: Endless
) -> None:
    started = time.monotonic()
    with pytest.raises(HivemeshError) as failed:
        await orch.mesh.call("forever", {}, timeout=30)
    assert failed.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, failed.value
    message = failed.value.message
    assert f"passed {MAX_MESSAGE_BYTES} bytes" in message and "InvokeStream" in message, message
    assert time.monotonic() - started < 20, "answered only at the deadline"
    # Closed (its finally ran), so it yields no more: what it yielded is what the call collected.
    assert await until(lambda: endless.closed == 1, 5), "the capability's generator was not closed"
    yielded = endless.yielded
    assert yielded * len(CHUNK) <= MAX_MESSAGE_BYTES + 2 * len(CHUNK), f"collected past the bound: {yielded} items"
    assert await orch.mesh.call("ping", {"x": 1}, timeout=10) == {"x": 1}
    assert await orch.mesh.call("few", {}, timeout=10) == [{"i": 0}, {"i": 1}, {"i": 2}]
    linked = endless.server is not None and endless.server.config.link
    assert _link_calls(endless) == (3 if linked else 0), "the calls did not go the way this case is about"


async def test_a_stream_item_that_is_not_json_ends_a_unary_call_with_agent_error_and_closes_it(
    orch: Orch, endless: Endless
) -> None:
    with pytest.raises(AgentError, match="not JSON") as failed:
        await orch.mesh.call("nan-then-forever", {}, timeout=30)
    assert failed.value.code == grpc.StatusCode.INTERNAL
    assert await until(lambda: endless.closed == 1, 5), "the capability's generator was not closed"
    assert endless.yielded == 0, "the stream was read on past the item that is not JSON"
    assert await orch.mesh.call("ping", {"x": 1}, timeout=10) == {"x": 1}

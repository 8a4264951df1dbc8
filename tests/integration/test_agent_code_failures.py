"""What a caller gets when a capability's own code goes wrong in ways beyond a plain exception: each is that call's
AgentError at once, and the agent keeps serving. Before, a CancelledError from a task the code awaited, or a
BaseException of its own, left the caller waiting for its deadline with no answer; a SystemExit stopped the agent;
an exception whose str() raises, or output nested past what json writes, was UNKNOWN; NaN went out as JSON."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from hivemesh.mesh.errors import AgentError
from hivemesh.sdk import Agent, capability
from tests.support.orch_env import Orch


class OwnFailure(BaseException):
    """Not an Exception: the agent's own odd class."""


class UnprintableError(RuntimeError):
    def __str__(self) -> str:
        raise RuntimeError("str() of this exception fails")


class Failing(Agent):
    name = "failing"

    @capability(idempotent=True)
    async def ping(self, req: dict[str, Any]) -> dict[str, Any]:
        return req

    @capability(idempotent=True)
    async def inner_cancelled(self, req: dict[str, Any]) -> dict[str, Any]:
        sub = asyncio.ensure_future(asyncio.sleep(30))
        asyncio.get_running_loop().call_later(0.05, sub.cancel)
        await sub  # CancelledError from the sub-task: not a cancel of this call
        return req

    @capability(idempotent=True)
    async def base_exception(self, req: dict[str, Any]) -> dict[str, Any]:
        raise OwnFailure("odd")

    @capability(idempotent=True)
    async def exits(self, req: dict[str, Any]) -> dict[str, Any]:
        raise SystemExit(3)

    @capability(idempotent=True)
    async def unprintable(self, req: dict[str, Any]) -> dict[str, Any]:
        raise UnprintableError()

    @capability(idempotent=True)
    async def too_deep(self, req: dict[str, Any]) -> Any:
        out: Any = []
        for _ in range(100_000):
            out = [out]
        return out

    @capability(idempotent=True)
    async def not_a_number(self, req: dict[str, Any]) -> Any:
        return {"v": float("nan")}

    @capability()
    async def streams_nan(self, req: dict[str, Any]) -> AsyncIterator[Any]:
        yield {"v": 1}
        yield {"v": float("inf")}


@pytest.fixture
async def failing(orch: Orch) -> Orch:
    await orch.serve(Failing())
    return orch


@pytest.mark.parametrize("cap, says", [
    ("inner-cancelled", "CancelledError"), ("base-exception", "OwnFailure"), ("exits", "SystemExit"),
    ("unprintable", "an unprintable UnprintableError"), ("too-deep", "not JSON"), ("not-a-number", "not JSON"),
])
async def test_each_is_its_calls_agent_error_at_once_and_the_agent_serves_on(
    failing: Orch, cap: str, says: str
) -> None:
    started = time.monotonic()
    with pytest.raises(AgentError) as failed:
        await failing.mesh.call(cap, {}, timeout=20)
    assert failed.value.code == grpc.StatusCode.INTERNAL and says in failed.value.message, failed.value.message
    assert time.monotonic() - started < 15, "answered only at the deadline"  # 20 s asked: a hang shows
    assert await failing.mesh.call("ping", {"x": 1}, timeout=10) == {"x": 1}


async def test_a_stream_item_that_is_not_json_ends_the_stream_with_agent_error(failing: Orch) -> None:
    got: list[Any] = []
    with pytest.raises(AgentError, match="not JSON"):
        async for item in failing.mesh.stream("streams-nan", {}, timeout=20):
            got.append(item)
    assert got == [{"v": 1}]

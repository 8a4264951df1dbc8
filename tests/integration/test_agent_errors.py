"""Whose fault a failure is, as the caller sees it over the real mesh: only `InvalidInputError` (and input the
mesh's schema check refuses) is the caller's (INVALID_ARGUMENT); anything else an agent's capability raises,
a `TypeError` or `ValueError` included, is the agent's own bug (INTERNAL / AGENT_ERROR), unary and streaming."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypedDict

import grpc
import pytest

from hivemesh.mesh.errors import AgentError, InvalidInputError
from hivemesh.sdk import Agent, capability
from tests.support.orch_env import Orch


class Text(TypedDict):
    text: str


class Buggy(Agent):
    """Capabilities that fail in the agent's own code, and ones that refuse the caller's input."""

    name = "buggy"

    @capability(description="a bug: TypeError", idempotent=True)
    async def type_bug(self, req: Text) -> Text:
        return {"text": req["text"] + 1}  # type: ignore[operator]  # the bug under test

    @capability(description="a bug: ValueError", idempotent=True)
    async def value_bug(self, req: Text) -> Text:
        return {"text": str(int(req["text"]))}  # ValueError for any non-number

    @capability(description="refuses input it cannot use", idempotent=True)
    async def refuse(self, req: Text) -> Text:
        raise InvalidInputError("text must be a greeting", field_violations={"input.text": "not a greeting"})

    @capability(description="streams, then hits a bug")
    async def stream_bug(self, req: Text) -> AsyncIterator[str]:
        yield req["text"]
        raise ValueError("the agent's own bug, mid-stream")

    @capability(description="streams nothing: refuses the input")
    async def stream_refuse(self, req: Text) -> AsyncIterator[str]:
        raise InvalidInputError("text must be a greeting")
        yield ""  # pragma: no cover - makes this an async generator


async def _stream(orch: Orch, capability: str) -> list[Any]:
    return [item async for item in orch.mesh.stream(capability, {"text": "x"}, timeout=10)]


@pytest.fixture
async def buggy(orch: Orch) -> Orch:
    await orch.serve(Buggy())
    return orch


@pytest.mark.parametrize("capability", ["type-bug", "value-bug"])
async def test_an_agents_own_error_is_agent_error_not_the_callers(buggy: Orch, capability: str) -> None:
    with pytest.raises(AgentError) as unary:
        await buggy.mesh.call(capability, {"text": "x"}, timeout=10)
    assert unary.value.code == grpc.StatusCode.INTERNAL and unary.value.reason == "AGENT_ERROR"
    with pytest.raises(AgentError) as streamed:  # the same capability over InvokeStream
        await _stream(buggy, capability)
    assert streamed.value.reason == "AGENT_ERROR"


async def test_a_streaming_capabilitys_own_error_is_agent_error(buggy: Orch) -> None:
    with pytest.raises(AgentError) as streamed:
        await _stream(buggy, "stream-bug")
    assert streamed.value.reason == "AGENT_ERROR" and "ValueError" in streamed.value.message
    with pytest.raises(AgentError):  # over Invoke, the items are collected first: the same bug
        await buggy.mesh.call("stream-bug", {"text": "x"}, timeout=10)


async def test_invalid_input_raised_by_a_capability_is_the_callers_fault(buggy: Orch) -> None:
    with pytest.raises(InvalidInputError) as unary:
        await buggy.mesh.call("refuse", {"text": "x"}, timeout=10)
    assert unary.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert unary.value.field_violations == {"input.text": "not a greeting"}
    with pytest.raises(InvalidInputError):
        await _stream(buggy, "stream-refuse")
    with pytest.raises(InvalidInputError):
        await _stream(buggy, "refuse")


async def test_input_failing_the_schema_is_the_callers_fault(buggy: Orch) -> None:
    for name in ("type-bug", "stream-bug"):
        with pytest.raises(InvalidInputError) as refused:
            await buggy.mesh.call(name, {"words": 3}, timeout=10)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(InvalidInputError):
            [item async for item in buggy.mesh.stream(name, {"words": 3}, timeout=10)]

"""Tools end to end: a model behind a real OpenAI-compatible HTTP server on 127.0.0.1 calls mesh capabilities
as tools from inside an agent, through the agent's ctx (so the mesh's grants decide each tool call), and the
official `openai` client's retries, streaming, timeouts and cancellation against the same server."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, TypedDict

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from hivemesh.mesh import tracing
from hivemesh.mesh.errors import (
    AgentUnavailableError,
    DeadlineExceededError,
    HivemeshError,
    InvalidInputError,
    RateLimitedError,
    ToolRoundsExceededError,
)
from hivemesh.sdk import Agent, AgentServer, Context, MeshClient, capability
from hivemesh.sdk.llm import OpenAICompatibleLLM, OpenAIConfig, UsageMeter, llm_from_env, metering
from hivemesh.sdk.tools import mesh_tools, run_with_tools, tool
from tests.support.chat_server import chat_server
from tests.support.meshenv import MeshEnv


class Text(TypedDict):
    text: str


class Worker(Agent):
    name = "worker"

    @capability(description="Upper-case the text", idempotent=True)
    async def upper(self, req: Text) -> Text:
        return {"text": req["text"].upper()}

    @capability(description="No grant gives this to agents")
    async def restricted(self, req: Text) -> Text:
        return req


@tool
async def explode(text: str) -> str:
    """A local tool that always fails."""
    raise ValueError(f"cannot handle {text}")


class Ask(TypedDict):
    question: str
    model: str


class Assistant(Agent):
    """Answers with a model that may call mesh capabilities and a local function as tools."""

    name = "assistant"

    def __init__(self, base_url: str) -> None:
        super().__init__()
        self.base_url = base_url

    @capability(description="Answer a question, using tools")
    async def assist(self, req: Ask, ctx: Context) -> dict[str, Any]:
        llm = OpenAICompatibleLLM(OpenAIConfig(self.base_url, req["model"], max_retries=0, timeout_s=10))
        try:
            tools = [*mesh_tools(ctx, ["upper", "restricted"]), explode]
            run = await run_with_tools(llm, req["question"], tools, ctx=ctx, max_rounds=2)
        finally:
            await llm.close()
        return {"text": run.text, "rounds": run.rounds, "ok": [c.ok for c in run.calls]}


async def test_a_model_calls_mesh_capabilities_as_tools_through_the_agents_ctx(mesh_env: MeshEnv) -> None:
    with chat_server() as (base_url, script):
        async with (AgentServer(Worker(), await mesh_env.settings_for("worker")),
                    AgentServer(Assistant(base_url), await mesh_env.settings_for("assistant")),
                    MeshClient.connect(name="asker", settings=await mesh_env.settings_for("asker", "client")) as mesh):
            for cap in ("upper", "restricted", "assist"):
                assert await mesh.node.registry.wait_for_capability(cap, 1, timeout=10), cap
            exporter, provider = InMemorySpanExporter(), TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            tracing.enable(provider)
            try:
                answer = await mesh.call_detailed("assist", {"question": "shout it", "model": "tooler"}, timeout=20)
            finally:
                tracing.disable()
                provider.shutdown()
            assert answer.output["rounds"] == 1 and answer.output["ok"] == [True, False, False]
            upper, restricted, exploded = answer.output["text"].removeprefix("done: ").split(" | ")
            assert json.loads(upper) == {"text": "MESH"}  # a real mesh call to the worker
            refused = json.loads(restricted)["error"]  # the agent's grants do not cover it: a refusal, not a crash
            assert refused["code"] == "PERMISSION_DENIED" and refused["reason"] == "GRANT_DENIED"
            assert json.loads(exploded) == {"error": {"type": "ValueError", "message": "cannot handle mesh"}}
            assert answer.usage is not None and (answer.usage.input_tokens, answer.usage.output_tokens) == (20, 10)

            # Tracing applies per tool: each call has a span under the handler, the mesh call's spans under it.
            finished = {s.context.span_id: s for s in exporter.get_finished_spans()}

            def ancestors(span: ReadableSpan) -> list[str]:
                names = []
                while span.parent is not None and span.parent.span_id in finished:
                    span = finished[span.parent.span_id]
                    names.append(span.name)
                return names

            by_name = {s.name: s for s in finished.values()}
            path = [n for n in ancestors(by_name["handler upper"]) if n in ("execute_tool upper", "handler assist")]
            assert path == ["execute_tool upper", "handler assist"]
            assert "handler assist" in ancestors(by_name["chat tooler"])
            assert by_name["execute_tool upper"].status.status_code == StatusCode.UNSET
            for failed in ("execute_tool restricted", "execute_tool explode"):
                assert by_name[failed].status.status_code == StatusCode.ERROR
            assert (by_name["execute_tool upper"].attributes or {})["hivemesh.capability"] == "upper"

            first, second = (s["body"] for s in script.seen)
            offered = {t["function"]["name"]: t["function"] for t in first["tools"]}
            assert list(offered) == ["upper", "restricted", "explode"]
            assert offered["upper"]["description"] == "Upper-case the text"
            assert offered["upper"]["parameters"]["properties"] == {"text": {"type": "string"}}
            assert [m["role"] for m in second["messages"]] == ["user", "assistant", "tool", "tool", "tool"]
            assert second["messages"][1]["tool_calls"][0]["function"]["name"] == "upper"

            with pytest.raises(HivemeshError) as bounded:  # a model that never stops asking meets the round bound
                await mesh.call("assist", {"question": "again", "model": "insistent"}, timeout=20)
            assert bounded.value.code == grpc.StatusCode.INTERNAL and bounded.value.reason == "TOOL_ROUNDS_EXCEEDED"
            assert type(bounded.value) is ToolRoundsExceededError and bounded.value.metadata == {"max_rounds": "2"}
            assert "after 2 rounds" in bounded.value.message
            assert sum(1 for s in script.seen if s["body"]["model"] == "insistent") == 3


async def test_the_openai_client_retries_streams_times_out_and_cancels() -> None:
    with chat_server() as (base_url, script):
        llm = OpenAICompatibleLLM(OpenAIConfig(base_url, "busy", api_key="sk-test", max_retries=2))
        meter = UsageMeter()
        with metering(meter):
            done = await llm.complete("hello", system="be brief")
        assert done.text == "finally" and len(script.seen) == 2  # 429 (Retry-After-Ms: 20), then the answer
        assert script.seen[1]["auth"] == "Bearer sk-test"
        assert script.seen[1]["body"]["messages"] == [{"role": "system", "content": "be brief"},
                                                      {"role": "user", "content": "hello"}]
        assert meter.usage.total == 15

        script.busy_failures = 10
        no_retries = OpenAICompatibleLLM(OpenAIConfig(base_url, "busy", max_retries=0))
        with pytest.raises(RateLimitedError, match="HTTP 429") as limited:  # still after the retries: pace it
            await no_retries.complete("x")
        assert limited.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and limited.value.retry_after_s == 0.02

        streamer = OpenAICompatibleLLM(OpenAIConfig(base_url, "streamer"))
        with metering(meter):
            parts = [p async for p in streamer.stream("go")]
        assert parts == ["str", "eam", "ed"] and script.seen[-1]["body"]["stream"] is True
        assert meter.usage.total == 21  # the stream's reported usage was recorded

        script.slow_s = 3.0
        slow = OpenAICompatibleLLM(OpenAIConfig(base_url, "slow", timeout_s=0.3, max_retries=0))
        with pytest.raises(DeadlineExceededError):
            await slow.complete("x")
        started = time.monotonic()
        with pytest.raises(TimeoutError):  # cancelling the caller abandons the request at once
            await asyncio.wait_for(OpenAICompatibleLLM(OpenAIConfig(base_url, "slow")).complete("x"), 0.2)
        assert time.monotonic() - started < 1.5
        with pytest.raises(AgentUnavailableError):
            await OpenAICompatibleLLM(OpenAIConfig("http://127.0.0.1:1/v1", "m", max_retries=0)).complete("x")
        for client in (llm, no_retries, streamer, slow):
            await client.close()


def test_the_openai_provider_is_configured_from_the_environment() -> None:
    env = {"HIVEMESH_LLM": "openai", "HIVEMESH_LLM_MODEL": "m", "HIVEMESH_LLM_BASE_URL": "http://127.0.0.1:9/v1",
           "HIVEMESH_LLM_TIMEOUT_S": "2.5", "HIVEMESH_LLM_MAX_RETRIES": "5"}
    llm = llm_from_env(env=env)
    assert isinstance(llm, OpenAICompatibleLLM)
    assert (llm.config.timeout_s, llm.config.max_retries) == (2.5, 5)
    for bad in ({"HIVEMESH_LLM_MAX_RETRIES": "many"}, {"HIVEMESH_LLM_MAX_RETRIES": "11"},
                {"HIVEMESH_LLM_TIMEOUT_S": "0"}, {"HIVEMESH_LLM_BASE_URL": "ftp://x"}):
        with pytest.raises(InvalidInputError, match="HIVEMESH_LLM=openai"):
            llm_from_env(env={**env, **bad})

"""Traces across the real mesh (mutual TLS, tokens, etcd), collected by the SDK's in-memory exporter.

One call from a Python MeshClient through an SDK agent, which calls onward through a sidecar to a plain agent
(generated stubs only), which calls back through its sidecar's `Mesh.Call` (forwarding the W3C headers it got,
as any instrumented agent would) to the SDK agent again: one trace id, the right parent of every span, no
orphans. Also: a refusal's spans carry the ErrorInfo reason; a workflow run is one trace with a span per step,
and a resumed run links to the original.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from hivemesh.mesh import tracing
from hivemesh.mesh.errors import HivemeshError
from hivemesh.mesh.sidecar import CALL_HANDLE_KEY, Sidecar, SidecarConfig
from hivemesh.sdk import Agent, Context, capability
from hivemesh.sdk.patterns import Pipeline, Step
from hivemesh.sdk.workflow import WorkflowEngine
from hivemesh.v1 import agent_pb2, mesh_pb2_grpc
from tests.support.orch_agents import WorkerAgent
from tests.support.orch_env import Orch, wait_until
from tests.support.plain_agent import PlainAgent

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for this test (every span sampled), into memory; off again afterwards."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    try:
        yield exporter
    finally:
        tracing.disable()
        provider.shutdown()


class Relay(Agent):
    """An SDK agent: `relay` calls the plain agent onward; `leaf` answers (the plain agent calls it back)."""

    name = "relay"

    @capability(description="Call the plain agent's onward capability")
    async def relay(self, req: dict[str, Any], ctx: Context) -> dict[str, Any]:
        out: dict[str, Any] = await ctx.call_capability("plain-onward", {"text": req["text"]}, timeout=20)
        return {"via": "relay", **out}

    @capability(description="Upper-case text", recursion=1)  # the plain agent calls back into this agent: A->B->A
    async def leaf(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"text": str(req["text"]).upper()}


class OnwardPlain(PlainAgent):
    """The plain agent plus `plain-onward`: it calls `leaf` through its sidecar's `Mesh.Call`, handing on the
    traceparent/tracestate/baggage it received (and its call handle), as an agent in any language would."""

    mesh_endpoint = ""

    async def Invoke(
        self, request: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.InvokeResponse:
        if request.capability != "plain-onward":
            return await super().Invoke(request, context)
        self.calls += 1
        keep = {"traceparent", "tracestate", "baggage", CALL_HANDLE_KEY}
        md = tuple((k, v) for k, v in context.invocation_metadata() or () if k in keep)
        onward = agent_pb2.InvokeRequest(capability="leaf", input=request.input, content_type="application/json")
        async with grpc.aio.insecure_channel(self.mesh_endpoint) as channel:
            raw = await mesh_pb2_grpc.MeshStub(channel).Call(onward, metadata=md, timeout=20)
        return agent_pb2.InvokeResponse(output=raw.output, content_type="application/json",
                                        state=agent_pb2.TASK_STATE_COMPLETED)

    def card(self) -> agent_pb2.AgentCard:
        card = super().card()
        card.capabilities.add(name="plain-onward", description="Call leaf through the sidecar",
                              input_schema=card.capabilities[0].input_schema)
        return card


@contextlib.asynccontextmanager
async def plain_behind_sidecar(orch: Orch, *, leaf: bool = True) -> AsyncIterator[tuple[OnwardPlain, Sidecar]]:
    """The plain agent behind a started sidecar, both seen by the registry (and the relay's `leaf` if asked)."""
    async with OnwardPlain("plain", prefix="plain-") as plain:
        sidecar = Sidecar(SidecarConfig(agent=plain.endpoint), await orch.env.settings_for("plain"))
        async with sidecar:
            plain.mesh_endpoint = sidecar.mesh_endpoint
            assert sidecar.node is not None
            waits = [("plain-onward", orch.mesh.node)] + ([("leaf", sidecar.node)] if leaf else [])
            for cap, node in waits:
                assert await node.registry.wait_for_capability(cap, 1, timeout=10), cap
            yield plain, sidecar


def _name(span: ReadableSpan) -> str:
    return f"{span.kind.name} {span.name}"


def _chain(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[str]:
    """The names from span up to its root, following parent links."""
    out = [_name(span)]
    while span.parent is not None:
        span = by_id[span.parent.span_id]
        out.append(_name(span))
    return out


def _one_trace(finished: Sequence[ReadableSpan]) -> dict[int, ReadableSpan]:
    """Assert one trace, every parent present (0 orphans), exactly one root; the spans by id."""
    assert finished
    assert {s.context.trace_id for s in finished} == {finished[0].context.trace_id}, [_name(s) for s in finished]
    by_id = {s.context.span_id: s for s in finished}
    orphans = [_name(s) for s in finished if s.parent is not None and s.parent.span_id not in by_id]
    assert orphans == []
    assert len([s for s in finished if s.parent is None]) == 1
    return by_id


async def test_one_trace_from_a_client_through_an_sdk_agent_a_sidecar_and_a_plain_agent_and_back(
    spans: InMemorySpanExporter, orch: Orch
) -> None:
    await orch.serve(Relay())
    async with plain_behind_sidecar(orch):
        spans.clear()  # registration traffic is not this call's
        out = await orch.mesh.call("relay", {"text": "hi"}, timeout=30)
        assert out == {"via": "relay", "text": "HI"}

    finished = spans.get_finished_spans()
    by_id = _one_trace(finished)
    [leaf] = [s for s in finished if s.name == "handler leaf"]
    assert _chain(leaf, by_id) == [
        "INTERNAL handler leaf",
        "SERVER hivemesh.v1.Agent/Invoke",          # the SDK agent's inbound chain (leaf)
        "INTERNAL attempt leaf",
        "CLIENT hivemesh.v1.Agent/Invoke",          # the sidecar's outbound pipeline
        "SERVER hivemesh.v1.Mesh/Call",             # the plain agent's Mesh.Call, its traceparent honoured
        "CLIENT forward plain-onward",              # the sidecar's forward to the plain agent
        "SERVER hivemesh.v1.Agent/Invoke",          # the sidecar's inbound chain
        "INTERNAL attempt plain-onward",
        "CLIENT hivemesh.v1.Agent/Invoke",          # the relay's onward call (ctx.call_capability)
        "INTERNAL handler relay",
        "SERVER hivemesh.v1.Agent/Invoke",          # the relay's inbound chain
        "INTERNAL attempt relay",
        "CLIENT hivemesh.v1.Agent/Invoke",          # the MeshClient's call: the root
    ]
    servers = [s for s in finished if s.kind == SpanKind.SERVER and s.name.startswith("hivemesh.v1.Agent/")]
    assert sorted((s.attributes or {})["hivemesh.packaging"] for s in servers) == ["sdk", "sdk", "sidecar"]
    for s in servers:
        attrs = s.attributes or {}
        assert attrs["rpc.system"] == "grpc" and attrs["rpc.service"] == "hivemesh.v1.Agent"
        assert attrs["rpc.method"] == "Invoke" and attrs["rpc.grpc.status_code"] == 0
        assert attrs["hivemesh.decision"] == "allow"
        assert str(attrs["hivemesh.caller"]).startswith("spiffe://")
    root = next(s for s in finished if s.parent is None)
    assert (root.attributes or {})["hivemesh.capability"] == "relay"
    assert str((root.attributes or {})["hivemesh.agent"]).endswith("/agent/relay")
    attempts = [s for s in finished if s.name.startswith("attempt ")]
    assert all((s.attributes or {})["hivemesh.retry.attempt"] == 1 for s in attempts) and len(attempts) == 3


async def test_a_refusal_span_carries_the_reason(spans: InMemorySpanExporter, orch: Orch) -> None:
    await orch.serve(Relay())
    spans.clear()
    with pytest.raises(HivemeshError) as refused:
        await orch.mesh.call("leaf", "not an object", timeout=10)  # the input guard refuses a non-object
    reason = refused.value.reason
    assert reason
    finished = spans.get_finished_spans()
    _one_trace(finished)
    [server] = [s for s in finished if s.kind == SpanKind.SERVER]
    attrs = server.attributes or {}
    assert attrs["hivemesh.reason"] == reason and attrs["hivemesh.decision"] == "invalid"
    assert attrs["rpc.grpc.status_code"] == refused.value.code.value[0]
    assert server.status.status_code == StatusCode.ERROR
    assert not [s for s in finished if s.name.startswith("handler")]  # refused before the handler
    client = next(s for s in finished if s.parent is None)
    assert (client.attributes or {})["hivemesh.reason"] == reason and client.status.status_code == StatusCode.ERROR


async def test_a_workflow_run_is_one_trace_with_a_span_per_step_and_a_resume_links_to_it(
    spans: InMemorySpanExporter, orch: Orch
) -> None:
    await orch.serve(WorkerAgent())
    spans.clear()
    async with WorkflowEngine(orch.mesh) as engine:
        state = await engine.run(Pipeline([Step("upper"), Step("summarize")]), {"text": "a b c"},
                                 workflow_id="wf-traced")
        assert state.state == "COMPLETED"
        started = [e for e in await engine.store.events(state.id) if e["type"] == "started"]
    finished = spans.get_finished_spans()
    by_id = _one_trace(finished)
    [run] = [s for s in finished if s.parent is None]
    assert run.name == f"workflow {state.id}" and not run.links
    steps = [s for s in finished if s.name.startswith("step ")]
    assert len(steps) == 2 and all(s.parent is not None and s.parent.span_id == run.context.span_id for s in steps)
    for step in steps:  # each step's call (client, attempt, server, handler) hangs under its step
        handlers = [s for s in finished if s.name.startswith("handler ") and step.context.span_id in
                    [by_id[p].context.span_id for p in _ancestors(s, by_id)]]
        assert len(handlers) == 1
    assert started[0]["data"]["trace_id"] == f"{run.context.trace_id:032x}"


async def test_a_resumed_workflow_run_is_a_new_trace_linked_to_the_original(
    spans: InMemorySpanExporter, orch: Orch
) -> None:
    await orch.serve(WorkerAgent())
    gate = asyncio.Event()

    async def body(run: Any, value: Any) -> Any:
        first = await run.step("one", "upper", value)
        await gate.wait()  # the first run stops here (its task is cancelled, as a dying process would be)
        return (await run.step("two", "upper", first.output)).output

    spans.clear()
    async with WorkflowEngine(orch.mesh) as engine:
        handle = await engine.submit(body, {"text": "x"}, workflow_id="wf-resumed")
        await wait_until(lambda: any(s.name == "step one" for s in spans.get_finished_spans()), 20, "step one")
        handle.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await handle.task
        gate.set()
        resumed = await engine.resume("wf-resumed", definition=body)
        assert (await resumed.result(timeout=30)).state == "COMPLETED"
    runs = [s for s in spans.get_finished_spans() if s.name == f"workflow {handle.id}"]
    assert len(runs) == 2
    first, second = runs
    assert first.context.trace_id != second.context.trace_id  # one trace per run
    assert [link.context.span_id for link in second.links] == [first.context.span_id]
    assert (second.attributes or {})["hivemesh.workflow.resumed"] is True
    [two] = [s for s in spans.get_finished_spans() if s.name == "step two"]
    assert two.context.trace_id == second.context.trace_id


def _ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[int]:
    out = []
    while span.parent is not None:
        out.append(span.parent.span_id)
        span = by_id[span.parent.span_id]
    return out


def test_the_sampler_is_parent_based_ratio_from_the_standard_environment() -> None:
    assert "ParentBased" in type(tracing.sampler_from({})).__name__
    sampler = tracing.sampler_from({"OTEL_TRACES_SAMPLER_ARG": "0.25"})
    assert "0.25" in sampler.get_description()
    assert tracing.sampler_from({"OTEL_TRACES_SAMPLER": "always_off"}).get_description() == "AlwaysOffSampler"
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER_ARG"):
        tracing.sampler_from({"OTEL_TRACES_SAMPLER_ARG": "2"})
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER="):
        tracing.sampler_from({"OTEL_TRACES_SAMPLER": "sometimes"})
    assert not tracing.configure({})  # off by default
    assert not tracing.configure({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_SDK_DISABLED": "true"})
    assert tracing.TRACER is None


def test_json_log_lines_carry_the_trace_and_span_ids(spans: InMemorySpanExporter) -> None:
    import io
    import logging

    from hivemesh.mesh.logjson import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("hivemesh.test.tracing")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with tracing.span("work") as span:
            assert span is not None
            logger.warning("inside %s", "a span")
        logger.warning("outside")
    finally:
        logger.removeHandler(handler)
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    ctx = span.get_span_context()
    assert inside["message"] == "inside a span" and inside["level"] == "WARNING"
    assert (inside["trace_id"], inside["span_id"]) == (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
    assert "trace_id" not in outside and outside["logger"] == "hivemesh.test.tracing"
    from hivemesh.mesh.logjson import basic_config

    with pytest.raises(ValueError, match="HIVEMESH_LOG_FORMAT='xml'"):
        basic_config(logging.INFO, {"HIVEMESH_LOG_FORMAT": "xml"})


def test_the_audit_records_trace_id_is_the_server_spans(spans: InMemorySpanExporter) -> None:
    import grpc as _grpc

    from hivemesh.mesh.audit.record import decision_fields
    from hivemesh.mesh.layers import Inbound

    def record(metadata: dict[str, Any]) -> Any:
        call = Inbound(method="Invoke", request=agent_pb2.InvokeRequest(capability="leaf"), wire_size=0,
                       metadata=metadata, auth_context={})
        return decision_fields(call, None, _grpc.StatusCode.OK, 0.0, now=0.0)["trace_id"]

    remote = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    parent = tracing.extract([("traceparent", remote)])
    with tracing.span("server", SpanKind.SERVER, parent=parent) as child:  # the caller's trace, continued
        assert child is not None
        assert record({"traceparent": remote}) == "0af7651916cd43dd8448eb211c80319c"
    with tracing.span("server", SpanKind.SERVER) as root:  # no traceparent: the span's own new trace
        assert root is not None
        assert record({}) == f"{root.get_span_context().trace_id:032x}"
    tracing.disable()
    assert record({"traceparent": remote}) == "0af7651916cd43dd8448eb211c80319c"  # off: the header, as before


class Fanner(Agent):
    """Fans out from inside a capability, on behalf of its caller (delegation), to two capabilities at once."""

    name = "fanner"

    @capability(description="Fan out to upper and summarize")
    async def fan(self, req: dict[str, Any], ctx: Context) -> dict[str, Any]:
        from hivemesh.sdk.patterns import FanOut

        result = await FanOut(["upper", "summarize"]).run(ctx, req)
        delegated: dict[str, Any] = await ctx.call_capability("upper", req, on_behalf=True, timeout=20)
        return {"fan": result.output, "delegated": delegated}


async def test_fan_out_and_delegation_inside_a_handler_stay_in_the_callers_trace(
    spans: InMemorySpanExporter, orch: Orch
) -> None:
    await orch.serve(WorkerAgent())
    await orch.serve(Fanner())
    spans.clear()
    out = await orch.mesh.call("fan", {"text": "a b"}, timeout=30)
    assert out["delegated"] == {"text": "A B"}
    finished = spans.get_finished_spans()
    by_id = _one_trace(finished)
    [fan] = [s for s in finished if s.name == "handler fan"]
    onward = [s for s in finished if s.kind == SpanKind.CLIENT and s.parent is not None
              and s.parent.span_id == fan.context.span_id]
    assert sorted((s.attributes or {})["hivemesh.capability"] for s in onward) == ["summarize", "upper", "upper"]
    for name in ("handler upper", "handler summarize"):  # every branch's handler hangs under the fan handler
        assert all(fan.context.span_id in _ancestors(s, by_id) for s in finished if s.name == name)
    assert len([s for s in finished if s.name == "handler upper"]) == 2


async def test_an_unsampled_trace_records_nothing_yet_still_propagates_its_decision(orch: Orch) -> None:
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBasedTraceIdRatio(0.0))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    try:
        async with plain_behind_sidecar(orch, leaf=False) as (plain, _sidecar):
            before = len(plain.metadata)
            out = await orch.mesh.call("plain-echo", {"text": "quiet"}, timeout=20)
            assert out["text"] == "quiet"
            [md] = plain.metadata[before:]
    finally:
        tracing.disable()
        provider.shutdown()
    assert exporter.get_finished_spans() == ()
    [traceparent] = [v for k, v in md if k == "traceparent"]
    assert isinstance(traceparent, str) and traceparent.startswith("00-")
    assert int(traceparent[-2:], 16) & 1 == 0  # the sampled flag is clear: downstream records nothing either


def test_the_cli_refuses_an_unknown_log_format_with_a_usage_error(tmp_path: Any) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "HIVEMESH_LOG_FORMAT": "xml", "HIVEMESH_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "hivemesh.controlplane.cli", "status", "--json"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "HIVEMESH_LOG_FORMAT='xml': use text or json" in proc.stderr and "Traceback" not in proc.stderr


async def test_a_stream_through_a_sidecar_is_one_trace_and_leaves_the_consumers_context_alone(
    spans: InMemorySpanExporter, orch: Orch
) -> None:
    from opentelemetry import trace

    async with plain_behind_sidecar(orch, leaf=False) as (plain, _sidecar):
        assert await orch.mesh.node.registry.wait_for_capability("plain-shout", 1, timeout=10)
        spans.clear()
        before = len(plain.metadata)
        words = []
        async for word in orch.mesh.stream("plain-shout", {"text": "a b"}, timeout=20):
            assert not trace.get_current_span().get_span_context().is_valid  # the stream's span is not current
            words.append(word)
        assert words == ["A", "B"]
        [md] = plain.metadata[before:]
    finished = spans.get_finished_spans()
    _one_trace(finished)
    [client] = [s for s in finished if s.parent is None]
    assert (client.kind, client.name) == (SpanKind.CLIENT, "hivemesh.v1.Agent/InvokeStream")
    [server] = [s for s in finished if s.kind == SpanKind.SERVER]
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    assert (server.attributes or {})["hivemesh.packaging"] == "sidecar"
    [traceparent] = [v for k, v in md if k == "traceparent"]
    sc = server.context
    assert traceparent == f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"  # the agent's parent


class Tenant(Agent):
    """An SDK agent that reports model usage, answers with the baggage it sees, and calls the plain agent onward."""

    name = "tenant"

    @capability(description="Echo through the plain agent, with the caller's baggage as seen here")
    async def tenant(self, req: dict[str, Any], ctx: Context) -> dict[str, Any]:
        from opentelemetry import baggage

        from hivemesh.sdk.llm import Usage, record_usage

        record_usage(Usage(120, 30, "sdk-model"))
        out: dict[str, Any] = await ctx.call_capability("plain-echo", {"text": req["text"]}, timeout=20)
        return {"seen": baggage.get_baggage("tenant"), "text": out["text"]}


async def test_baggage_and_model_usage_reach_every_hop_in_both_packagings(
    spans: InMemorySpanExporter, orch: Orch
) -> None:
    """The caller's baggage reaches an in-process agent's handler and, through both sides of a sidecar, the plain
    agent, as does a remote parent's tracestate; the handler's span and the sidecar's forward carry
    `gen_ai.usage.*` (a stream's final chunk too); the client's span names the instance that answered."""
    from opentelemetry import baggage, context, trace

    await orch.serve(Tenant())
    async with plain_behind_sidecar(orch, leaf=False) as (plain, _sidecar):
        plain.usage = agent_pb2.Usage(input_tokens=700, output_tokens=300, model="plain-model")
        for cap in ("plain-echo", "plain-shout"):
            assert await orch.mesh.node.registry.wait_for_capability(cap, 1, timeout=10)
        spans.clear()
        before = len(plain.metadata)
        token = context.attach(baggage.set_baggage("tenant", "acme"))
        try:
            out = await orch.mesh.call("tenant", {"text": "hi"}, timeout=30)
        finally:
            context.detach(token)
        assert out == {"seen": "acme", "text": "hi"}
        [md] = plain.metadata[before:]
        assert [v for k, v in md if k == "baggage"] == ["tenant=acme"]
        finished = spans.get_finished_spans()
        # A caller inside a remote trace with vendor state: the plain agent gets that trace and its tracestate.
        remote = trace.SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=trace.TraceFlags(1),
                                   trace_state=trace.TraceState([("vendor", "v1")]))
        before = len(plain.metadata)
        token = context.attach(trace.set_span_in_context(trace.NonRecordingSpan(remote)))
        try:
            await orch.mesh.call("plain-echo", {"text": "in a remote trace"}, timeout=20)
        finally:
            context.detach(token)
        [md] = plain.metadata[before:]
        assert [v for k, v in md if k == "tracestate"] == ["vendor=v1"]
        [traceparent] = [v for k, v in md if k == "traceparent"]
        assert str(traceparent).startswith(f"00-{0x1234:032x}-")
        spans.clear()
        assert [w async for w in orch.mesh.stream("plain-shout", {"text": "a b"}, timeout=20)] == ["A", "B"]
    streamed = spans.get_finished_spans()  # the sidecar has stopped: its stream's server span has ended

    by_id = _one_trace(finished)
    [handler] = [s for s in finished if s.name == "handler tenant"]
    attrs = handler.attributes or {}
    assert (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"]) == (120, 30)
    assert attrs["gen_ai.request.model"] == "sdk-model" and attrs["hivemesh.packaging"] == "sdk"
    [forward] = [s for s in finished if s.name == "forward plain-echo"]
    attrs = forward.attributes or {}
    assert (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"]) == (700, 300)
    assert attrs["gen_ai.request.model"] == "plain-model" and attrs["hivemesh.packaging"] == "sidecar"
    assert handler.context.span_id in _ancestors(forward, by_id)
    root = next(s for s in finished if s.parent is None)
    assert str((root.attributes or {})["hivemesh.instance"])  # the instance that answered
    assert str((root.attributes or {})["hivemesh.agent"]).endswith("/agent/tenant")
    [server] = [s for s in streamed if s.kind == SpanKind.SERVER]
    attrs = server.attributes or {}
    assert (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"]) == (700, 300)

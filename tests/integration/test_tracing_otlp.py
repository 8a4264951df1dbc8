"""Spans exported by the real OTLP/gRPC exporter, configured only by the standard OTEL_* environment, from a
caller process (a MeshClient in a child process) to a real OTLP receiver built on opentelemetry-proto's
collector TraceService here; the caller program's own span (through the global provider the mesh sets) parents
the mesh's client span, and the callee (an SDK agent in this process) continues the caller's trace."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from hivemesh.mesh import tracing
from tests.support.orch_agents import WorkerAgent
from tests.support.orch_env import REPO, Orch
from tests.support.otlp_receiver import Receiver, otlp_receiver

pytestmark = pytest.mark.timeout(120)

CALLER = """
import asyncio, json
from opentelemetry import trace
from hivemesh.sdk import MeshClient

async def main() -> None:
    async with MeshClient.connect(name="traced-caller") as mesh:
        assert await mesh.node.registry.wait_for_capability("upper", 1, timeout=20)
        with trace.get_tracer("caller-app").start_as_current_span("app work"):  # the program's own span
            print(json.dumps(await mesh.call("upper", {"text": "over otlp"}, timeout=20)))

asyncio.run(main())
"""


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, int]]:
    async with otlp_receiver() as got:
        yield got


async def test_a_callers_spans_reach_a_real_otlp_receiver_and_the_callee_continues_its_trace(
    receiver: tuple[Receiver, int], orch: Orch
) -> None:
    rcv, port = receiver
    exporter = InMemorySpanExporter()  # this process (the callee) traces into memory
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    try:
        await orch.serve(WorkerAgent())
        env = {
            **orch.cli_env(),
            "HIVEMESH_JOIN_TOKEN": (await orch.env.operator.create_join_token("traced-caller", "client", 120)).token,
            "HIVEMESH_HOME": str(orch.tmp / "caller-home"),
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_SERVICE_NAME": "traced-caller",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "1.0",
        }
        env = {k: v for k, v in env.items() if k != "OTEL_SDK_DISABLED"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CALLER, env=env, cwd=str(REPO),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 90)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, err.decode()[-3000:]
        assert b"OVER OTLP" in out
        await asyncio.wait_for(rcv.got.wait(), 30)  # the exporter flushes at exit; the receiver has them
    finally:
        tracing.disable()
        provider.shutdown()

    exported = rcv.spans()
    names = {span.name for _, span in exported}
    assert {"hivemesh.v1.Agent/Invoke", "attempt upper"} <= names
    [app] = [span for _, span in exported if span.name == "app work"]  # the global provider is the mesh's
    assert not app.parent_span_id
    [client] = [span for _, span in exported if span.name == "hivemesh.v1.Agent/Invoke"]
    assert client.parent_span_id == app.span_id and client.trace_id == app.trace_id
    services = {a.value.string_value for res, _ in exported for a in res.attributes if a.key == "service.name"}
    assert services == {"traced-caller"}
    attrs = {a.key: a.value for a in client.attributes}
    assert attrs["rpc.system"].string_value == "grpc" and attrs["hivemesh.capability"].string_value == "upper"
    [attempt] = [span for _, span in exported if span.name == "attempt upper"]
    assert attempt.parent_span_id == client.span_id and attempt.trace_id == client.trace_id

    [server] = [s for s in exporter.get_finished_spans() if s.name == "hivemesh.v1.Agent/Invoke"]
    assert server.context.trace_id == int.from_bytes(client.trace_id, "big")  # one trace across processes
    assert server.parent is not None and server.parent.span_id == int.from_bytes(attempt.span_id, "big")
    assert server.parent.is_remote
    assert os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") is None  # nothing leaked into this process

"""What tracing costs on the call path: calls/s with tracing off, on with sampling 0, and on with sampling 1.

One process, the real mesh: a real etcd (mutual TLS, auth), the control plane, an SDK agent (AgentServer) and a
MeshClient calling it over mutual TLS with tokens, so every hook runs (client span, attempt span, server span,
handler span, propagation headers). "on" uses the SDK's TracerProvider with the parent-based ratio sampler the
mesh configures from OTEL_TRACES_SAMPLER_ARG and a BatchSpanProcessor into an exporter that drops the batch (the
export itself happens off the call path, on the processor's thread). Modes interleave, each first in one
round; the figures are medians; ratios are to "off" in the same run.

    .venv/bin/python bench/tracing_cost.py             # 3 rounds x 3 modes x 4 s (~1 min)
    .venv/bin/python bench/tracing_cost.py --quick     # 1 round x 3 modes x 2 s
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support: the tests' mesh rig

from hivemesh.controlplane.ca import init_ca, load_ca
from hivemesh.controlplane.etcd_certs import issue_etcd_certs
from hivemesh.mesh import tracing
from hivemesh.mesh.etcd import EtcdServer
from hivemesh.sdk import Agent, AgentServer, MeshClient, capability
from tests.support import meshenv
from tests.support.meshenv import TRUST_DOMAIN, start_mesh_env, stop_mesh_env

GRANTS = {"grants": [{"name": "all", "subjects": [f"spiffe://{TRUST_DOMAIN}/client/*"], "capabilities": ["*"]}]}


class Text(TypedDict):
    text: str


class Echo(Agent):
    name = "echo"

    @capability(description="Echo", idempotent=True)
    async def echo(self, req: Text) -> Text:
        return req


class Drop(SpanExporter):
    """Counts and drops batches: the span work is measured, not a collector's."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


def provider(ratio: float, exporter: Drop) -> TracerProvider:
    p = TracerProvider(sampler=tracing.sampler_from({"OTEL_TRACES_SAMPLER_ARG": str(ratio)}))
    p.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=65536))
    return p


async def throughput(mesh: MeshClient, concurrency: int, seconds: float) -> float:
    stop = time.perf_counter() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await mesh.call("echo", {"text": "hello"}, timeout=10)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


async def run(rounds: int, seconds: float, concurrency: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tracing-bench-") as tmp_s:
        tmp = Path(tmp_s)
        files = init_ca(tmp / "session-ca" / "certs", TRUST_DOMAIN)
        meshenv.SESSION_CA_DIR = files.certs_dir
        etcd = EtcdServer(data_dir=tmp / "etcd" / "data", log_path=tmp / "etcd" / "etcd.log",
                          tls=issue_etcd_certs(load_ca(files.certs_dir), files.certs_dir))
        etcd.start()
        env = await start_mesh_env(tmp / "mesh", etcd.endpoint, GRANTS)
        exporters = {"on, sampling 0": Drop(), "on, sampling 1": Drop()}
        providers = {"off": None, "on, sampling 0": provider(0.0, exporters["on, sampling 0"]),
                     "on, sampling 1": provider(1.0, exporters["on, sampling 1"])}
        results: dict[str, list[float]] = {mode: [] for mode in providers}
        try:
            async with contextlib.AsyncExitStack() as stack:
                await stack.enter_async_context(AgentServer(Echo(), await env.settings_for("echo")))
                mesh = await stack.enter_async_context(
                    MeshClient.connect(name="bench", settings=await env.settings_for("bench", "client")))
                assert await mesh.node.registry.wait_for_capability("echo", 1, timeout=20)
                await throughput(mesh, concurrency, 1.0)  # warm up: channels, tokens
                order = list(providers.items())
                for r in range(rounds):
                    for mode, prov in order[r % 3:] + order[:r % 3]:  # each mode goes first once
                        if prov is None:
                            tracing.disable()
                        else:
                            tracing.enable(prov)
                        await throughput(mesh, concurrency, 0.5)  # settle into the mode
                        results[mode].append(await throughput(mesh, concurrency, seconds))
                tracing.disable()
        finally:
            for prov in providers.values():
                if prov is not None:
                    prov.shutdown()
            await stop_mesh_env(env)
            etcd.stop()
    off = statistics.median(results["off"])
    return {
        "concurrency": concurrency, "seconds": seconds, "rounds": rounds,
        "calls_per_s": {m: round(statistics.median(v), 1) for m, v in results.items()},
        "ratio_to_off": {m: round(statistics.median(v) / off, 3) for m, v in results.items()},
        "per_round": {m: [round(x, 1) for x in v] for m, v in results.items()},
        "spans_exported": {m: e.spans for m, e in exporters.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--concurrency", type=int, default=16)
    opts = ap.parse_args(argv)
    rounds, seconds = (1, 2.0) if opts.quick else (3, 4.0)
    out = asyncio.run(run(rounds, seconds, opts.concurrency))
    sys.stdout.write(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A real Prometheus server (Debian's `prometheus`) scrapes a running mesh through the file-based discovery files
`hivemesh up` writes (the same writer), and its HTTP API returns the mesh's series after traffic: inbound and
outbound RED from an SDK agent, a sidecar fronting a plain agent and a client, a refusal among them, model
tokens, and the control plane's own node. Prometheus runs on 127.0.0.1 with a free port and a temporary TSDB,
and is always stopped."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, TypedDict

import pytest

from hivemesh.controlplane.metrics_sd import JOB_CONTROLPLANE, JOB_NODES, ScrapeTarget, write_file_sd
from hivemesh.mesh.errors import InvalidInputError
from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
from hivemesh.sdk import Agent, AgentServerConfig, Context, MeshClient, capability
from tests.support.meshenv import TRUST_DOMAIN
from tests.support.orch_env import Orch, wait_until
from tests.support.plain_agent import PlainAgent
from tests.support.prometheus_server import prometheus, query

CLIENT = f"spiffe://{TRUST_DOMAIN}/client/watcher"


class Text(TypedDict):
    text: str


class Greeter(Agent):
    name = "greeter"

    @capability(description="greets")
    async def greet(self, req: Text, ctx: Context) -> Text:
        return {"text": f"hello {req['text']}"}


async def _value(base: str, promql: str, timeout: float = 90.0) -> dict[str, Any]:
    """The one series promql returns once Prometheus has scraped it (bounded wait)."""
    found = await wait_until(lambda: asyncio.to_thread(query, base, promql), timeout, f"Prometheus to return {promql}",
                             interval=0.5)
    assert len(found) == 1, found
    series: dict[str, Any] = found[0]
    return series


async def test_a_real_prometheus_finds_the_series_through_file_sd(
    orch: Orch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HIVEMESH_PRICES", json.dumps(
        {"plain-model": {"input_per_1k": 1.0, "output_per_1k": 2.0, "currency": "USD"}}))
    greeter = await orch.serve(Greeter(), AgentServerConfig())  # metrics on by default for an agent
    async with PlainAgent("plain", prefix="plain-", usage=(100, 50)) as plain:
        sidecar = Sidecar(SidecarConfig(agent=plain.endpoint), await orch.env.settings_for("plain"))
        async with sidecar:
            watcher = MeshClient.connect(name="watcher", settings=await orch.env.settings_for("watcher", "client"),
                                         metrics_listen="127.0.0.1:0")
            async with watcher:
                assert sidecar.node is not None and sidecar.node.metrics is not None
                assert watcher.node.metrics is not None and greeter.metrics_address is not None
                cp = orch.env.controlplane.metrics
                assert cp is not None
                sd = tmp_path / "sd"
                write_file_sd(sd, [
                    ScrapeTarget(greeter.metrics_address, JOB_NODES, "greeter"),
                    ScrapeTarget(sidecar.node.metrics.address, JOB_NODES, "plain"),
                    ScrapeTarget(watcher.node.metrics.address, JOB_NODES, "watcher"),
                    ScrapeTarget(cp.address, JOB_CONTROLPLANE, "controlplane"),
                ])
                assert await watcher.node.registry.wait_for_capability("plain-echo", 1, timeout=10)
                assert await watcher.call("greet", {"text": "a"}, timeout=10) == {"text": "hello a"}
                await watcher.call("plain-echo", {"text": "b"}, timeout=10)
                with pytest.raises(InvalidInputError):
                    await watcher.call("plain-echo", {"nope": 1}, timeout=10)

                with prometheus(tmp_path, sd) as base:
                    ok = await _value(base, 'hivemesh_requests_total{job="hivemesh",node="greeter",'
                                            'direction="inbound",capability="greet",code="OK"}')
                    assert ok["metric"]["caller"] == CLIENT and ok["value"][1] == "1"
                    refused = await _value(base, 'hivemesh_requests_total{node="plain",direction="inbound",'
                                                 'code="INVALID_ARGUMENT"}')
                    assert refused["metric"]["reason"] == "INVALID_INPUT"
                    out = await _value(base, 'sum by (code) (hivemesh_requests_total{node="watcher",'
                                             'direction="outbound",capability="plain-echo",code="OK"})')
                    assert out["value"][1] == "1"
                    tokens = await _value(base, 'hivemesh_llm_tokens_total{node="plain",direction="input"}')
                    assert tokens["metric"]["model"] == "plain-model" and tokens["value"][1] == "100"
                    await _value(base, 'histogram_quantile(0.99, sum by (le) (rate('
                                       'hivemesh_request_duration_seconds_bucket{node="greeter"}[1m])))')
                    node = await _value(base, 'hivemesh_node_info{job="hivemesh-controlplane"}')
                    assert node["metric"]["packaging"] == "controlplane"
                    up = await _value(base, 'count(up{job=~"hivemesh|hivemesh-controlplane"} == 1)')
                    assert up["value"][1] == "4"

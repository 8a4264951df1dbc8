"""Every node of a real mesh serves its metrics: an SDK agent, a sidecar fronting a plain agent, a MeshClient
that asked for a metrics port, and the control plane. After traffic that includes a refusal, each node's
`/metrics` is scraped over HTTP and holds the documented series with the right labels, and Prometheus's own
`promtool check metrics` finds nothing wrong. Real etcd, control plane, mutual TLS and tokens."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import ssl
import subprocess
import urllib.request
from importlib import metadata
from typing import TypedDict

import pytest

from hivemesh.mesh.errors import InvalidInputError
from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
from hivemesh.sdk import Agent, AgentServerConfig, Context, MeshClient, capability
from tests.support.meshenv import TRUST_DOMAIN
from tests.support.orch_env import Orch
from tests.support.plain_agent import PlainAgent

CLIENT = f"spiffe://{TRUST_DOMAIN}/client/watcher"
PRICES = {"plain-model": {"input_per_1k": 2.0, "output_per_1k": 4.0, "currency": "EUR"},
          "_limit_per_hour": {"EUR": 5.0}}


class Text(TypedDict):
    text: str


class Greeter(Agent):
    name = "greeter"

    @capability(description="greets")
    async def greet(self, req: Text, ctx: Context) -> Text:
        return {"text": f"hello {req['text']}"}


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the one series of name whose labels include labels (fails if none or several)."""
    found = []
    for line in text.splitlines():
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)", line)
        if m is None or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            found.append(float(m.group(4)))
    assert len(found) == 1, f"{name}{labels}: {len(found)} series match in\n" + "\n".join(
        line for line in text.splitlines() if line.startswith(name))
    return found[0]


def promtool_clean(text: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool (Debian's prometheus package) is required"
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stdout + done.stderr


async def test_every_node_exports_the_documented_series(orch: Orch, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVEMESH_PRICES", json.dumps(PRICES))
    greeter = await orch.serve(Greeter(), AgentServerConfig(metrics_listen="127.0.0.1:0"))
    async with PlainAgent("plain", prefix="plain-", usage=(700, 300)) as plain:
        sidecar = Sidecar(SidecarConfig(agent=plain.endpoint), await orch.env.settings_for("plain"))
        async with sidecar:
            watcher = MeshClient.connect(name="watcher", settings=await orch.env.settings_for("watcher", "client"),
                                         metrics_listen="127.0.0.1:0")
            async with watcher:
                assert await watcher.node.registry.wait_for_capability("plain-echo", 1, timeout=10)
                assert await watcher.node.registry.wait_for_capability("greet", 1, timeout=10)
                assert await watcher.call("greet", {"text": "a"}, timeout=10) == {"text": "hello a"}
                await watcher.call("plain-echo", {"text": "b"}, timeout=10)
                await watcher.call("plain-echo", {"text": "c"}, timeout=10)
                with pytest.raises(InvalidInputError):  # refused by the sidecar's input guard (schema)
                    await watcher.call("plain-echo", {"nope": 1}, timeout=10)
                with pytest.raises(InvalidInputError):  # refused by the SDK agent's input guard
                    await watcher.call("greet", {"text": 5}, timeout=10)

                assert greeter.metrics_address is not None and sidecar.node is not None
                assert sidecar.node.metrics is not None and watcher.node.metrics is not None
                cp = orch.env.controlplane.metrics
                assert cp is not None
                texts = await asyncio.gather(*(asyncio.to_thread(scrape, a) for a in (
                    greeter.metrics_address, sidecar.node.metrics.address, watcher.node.metrics.address,
                    cp.address)))
                # The agent's audit records reach the control plane in the background: shipped, then counted.
                deadline = asyncio.get_running_loop().time() + 15
                while sample(texts[0], "hivemesh_audit_records_shipped_total") < 2:  # its two decisions
                    assert asyncio.get_running_loop().time() < deadline, "no audit record was shipped"
                    await asyncio.sleep(0.05)
                    texts[0] = await asyncio.to_thread(scrape, greeter.metrics_address)
    agent_t, side_t, client_t, cp_t = texts

    # The SDK agent (in-process packaging): RED inbound per capability × caller × code × reason.
    assert sample(agent_t, "hivemesh_node_info", packaging="in-process") == 1
    assert sample(agent_t, "hivemesh_requests_total", direction="inbound", capability="greet", caller=CLIENT,
                  code="OK", reason="") == 1
    assert sample(agent_t, "hivemesh_requests_total", direction="inbound", capability="greet", caller=CLIENT,
                  code="INVALID_ARGUMENT", reason="INVALID_INPUT") == 1
    assert sample(agent_t, "hivemesh_request_duration_seconds_count", direction="inbound", capability="greet",
                  code="OK") == 1
    assert sample(agent_t, "hivemesh_requests_in_flight", direction="inbound", capability="greet") == 0
    assert sample(agent_t, "hivemesh_registry_live_instances", capability="plain-echo") == 1
    assert 0 < sample(agent_t, "hivemesh_certificate_expiry_seconds") <= 3600
    assert sample(agent_t, "hivemesh_token_cache_lookups_total", result="miss") >= 1
    assert sample(agent_t, "hivemesh_etcd_connected") == 1
    assert sample(agent_t, "hivemesh_registry_watch_lag_revisions") >= 0  # exported; its meaning: test_watch_lag
    assert 0 <= sample(agent_t, "hivemesh_jwks_age_seconds") < 600  # an age (not a time stamp) of this run
    assert sample(agent_t, "hivemesh_revocations_in_force") == 0
    assert sample(agent_t, "hivemesh_audit_spool_lag_records") >= 0
    assert sample(agent_t, "hivemesh_audit_records_shipped_total") >= 2
    assert sample(agent_t, "hivemesh_etcd_errors_total") == 0  # no watch broke; its meaning: test_watch's outage

    # The sidecar: the same inbound series, and the plain agent's model usage priced from HIVEMESH_PRICES.
    assert sample(side_t, "hivemesh_node_info", packaging="sidecar") == 1
    assert sample(side_t, "hivemesh_requests_total", direction="inbound", capability="plain-echo", caller=CLIENT,
                  code="OK", reason="") == 2
    assert sample(side_t, "hivemesh_requests_total", direction="inbound", capability="plain-echo", caller=CLIENT,
                  code="INVALID_ARGUMENT", reason="INVALID_INPUT") == 1
    assert sample(side_t, "hivemesh_llm_tokens_total", model="plain-model", caller=CLIENT, direction="input") == 1400
    assert sample(side_t, "hivemesh_llm_tokens_total", model="plain-model", caller=CLIENT, direction="output") == 600
    assert sample(side_t, "hivemesh_llm_cost_total", model="plain-model", caller=CLIENT,
                  currency="EUR") == pytest.approx(2 * (0.7 * 2.0 + 0.3 * 4.0))
    assert sample(side_t, "hivemesh_llm_cost_limit_per_hour", currency="EUR") == 5.0
    # One token for its three calls: verified, then found in the verifier's cache.
    assert sample(side_t, "hivemesh_token_cache_lookups_total", result="miss") >= 1
    assert sample(side_t, "hivemesh_token_cache_lookups_total", result="hit") >= 2

    # The client: outbound RED, the refusal with its code and reason as the callee gave them.
    assert sample(client_t, "hivemesh_node_info", packaging="client") == 1
    assert sample(client_t, "hivemesh_requests_total", direction="outbound", capability="plain-echo", caller=CLIENT,
                  code="OK", reason="") == 2
    assert sample(client_t, "hivemesh_requests_total", direction="outbound", capability="plain-echo", caller=CLIENT,
                  code="INVALID_ARGUMENT", reason="INVALID_INPUT") == 1
    assert sample(client_t, "hivemesh_request_duration_seconds_count", direction="outbound", capability="greet",
                  code="OK") == 1
    assert sample(client_t, "hivemesh_controlplane_reachable") == 1  # it was issued tokens
    assert sample(client_t, "hivemesh_controlplane_failovers_total") == 0  # one replica, always answering
    assert sample(client_t, "hivemesh_controlplane_hedges_total") == 0

    # The control plane.
    assert sample(cp_t, "hivemesh_node_info", packaging="controlplane") == 1
    assert sample(cp_t, "hivemesh_escalations_open") == 0

    for text in texts:
        promtool_clean(text)
        # What each node runs on, the OpenSSL of its direct links' TLS among it: one series, constant per process.
        assert sample(text, "hivemesh_build_info", openssl=ssl.OPENSSL_VERSION, grpcio=metadata.version("grpcio")) == 1
        # Bounded labels: no call ids or free text, only the catalog's label names (build_info's four are constant
        # per process).
        for name in re.findall(r'(\w+)="', text):
            assert name in {"direction", "capability", "caller", "code", "reason", "peer_instance", "result",
                            "model", "currency", "definition", "event", "packaging", "node", "le",
                            "version", "python", "grpcio", "openssl"}, name


async def test_a_workflow_run_is_counted_by_its_engines_node(orch: Orch) -> None:
    from hivemesh.sdk.patterns import Pipeline, Step
    from hivemesh.sdk.workflow import WorkflowEngine
    from tests.support.orch_agents import WorkerAgent

    await orch.serve(WorkerAgent())
    watcher = MeshClient.connect(name="watcher", settings=await orch.env.settings_for("watcher", "client"),
                                 metrics_listen="127.0.0.1:0")
    async with watcher, WorkflowEngine(watcher) as engine:
        state = await engine.run(Pipeline([Step("upper"), Step("summarize")]), {"text": "one two"},
                                 workflow_id="wf-metrics")
        assert state.state == "COMPLETED"
        assert watcher.node.metrics is not None
        text = await asyncio.to_thread(scrape, watcher.node.metrics.address)
    # An in-process definition object has no import reference: counted under `_unnamed`.
    assert sample(text, "hivemesh_workflows_total", definition="_unnamed", event="started") == 1
    assert sample(text, "hivemesh_workflows_total", definition="_unnamed", event="completed") == 1
    assert sample(text, "hivemesh_workflow_step_duration_seconds_count", definition="_unnamed") == 2
    promtool_clean(text)

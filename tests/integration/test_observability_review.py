"""What a review of `hivemesh up` with a real Prometheus found wrong in the mesh's metrics, dashboards, alerts and
Prometheus configurations, each checked against the real thing: a real Prometheus scraping real metrics ports, its
own promtool evaluating the shipped rules and the dashboard's queries, real agents and a real sidecar on a real
mesh (etcd, control plane, mutual TLS), and the Kubernetes manifests as `kubectl kustomize` renders them.

- a breaker's label was `instance`, which Prometheus replaces with the scrape target's address;
- a call whose deadline passed while its agent ran it was recorded CANCELLED, which spends no error budget;
- the SLO rule file the docs wrote was not one prometheus.yml loads;
- prometheus-k8s.yml did not exist and no pod carried prometheus.io annotations;
- the metrics doc showed another sidecar ready line than the sidecar prints;
- error ratios showed no series, not 0, for a capability with calls and no failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypedDict

import pytest
import yaml

from hivemesh.controlplane.metrics_sd import JOB_CONTROLPLANE, JOB_NODES, ScrapeTarget, write_file_sd
from hivemesh.controlplane.slo import SLOS, objectives, render_rules
from hivemesh.mesh.errors import DeadlineExceededError
from hivemesh.mesh.metrics import STATE, MeshMetrics, MetricsServer
from hivemesh.mesh.policy import PolicyDoc
from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
from hivemesh.sdk import Agent, AgentServerConfig, Context, MeshClient, capability
from tests.integration.test_k8s_manifests import Manifests
from tests.integration.test_metrics_mesh import sample, scrape
from tests.support.orch_env import Orch, wait_until
from tests.support.plain_agent import PlainAgent
from tests.support.prometheus_server import prometheus, promtool, query

REPO = Path(__file__).resolve().parents[2]
PROM = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "hivemesh-overview.json"


def _alert_expr(name: str) -> str:
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    (expr,) = [r["expr"] for g in groups for r in g["rules"] if r.get("alert") == name]
    return str(expr)


def _panel_expr(title: str) -> str:
    """A dashboard panel's query with Grafana's variables as a dashboard showing every capability sets them."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    (expr,) = [t["expr"] for p in panels if p["title"] == title for t in p.get("targets", [])]
    return str(expr).replace("$capability", ".*").replace("$__rate_interval", "5m")


# --- a breaker's label, through a real Prometheus scrape ----------------------------------------------------------

def _caller_node(name: str, breakers: list[tuple[str, str, float]]) -> MeshMetrics:
    """A caller node's metrics with its breakers as (capability, instance guarded or "" for the capability's own,
    state), read at scrape time as a node reads them, under the label names of the catalog."""
    capability_label, guarded_label = STATE["hivemesh_breaker_state"].labels
    m = MeshMetrics(packaging="client", node=name)
    m.state.add("hivemesh_breaker_state", lambda: [
        ({capability_label: cap, guarded_label: guarded}, value) for cap, guarded, value in breakers])
    return m


async def test_a_breaker_names_the_instance_it_guards_after_a_real_prometheus_scrape(tmp_path: Path) -> None:
    """Two callers (two scrape targets) see extract/ext-1's breaker open, one sees ocr's own breaker open. With the
    label called `instance`, Prometheus stored the target's address there: the alert said "circuit open for
    127.0.0.1:PORT" once per caller, and the capability's own breaker could not be told apart."""
    gateway = MetricsServer(_caller_node("gateway/i-1", [("extract", "extract/ext-1", 2.0),
                                                         ("extract", "extract/ext-2", 1.0), ("ocr", "", 0.0)]))
    batch = MetricsServer(_caller_node("batch/i-1", [("extract", "extract/ext-1", 2.0), ("ocr", "", 2.0)]))
    with contextlib.ExitStack() as stack:
        for server in (gateway, batch):
            server.start()
            stack.callback(server.stop)
        sd = tmp_path / "sd"
        write_file_sd(sd, [ScrapeTarget(gateway.address, JOB_NODES, "gateway"),
                           ScrapeTarget(batch.address, JOB_NODES, "batch")])
        with prometheus(tmp_path / "prometheus", sd) as base:
            await wait_until(lambda: asyncio.to_thread(query, base, 'count(up{job="hivemesh"} == 1) == 2'), 60,
                             "Prometheus to scrape both callers", interval=0.5)
            opened = await asyncio.to_thread(query, base, _alert_expr("HivemeshBreakerOpen"))
            panel = await asyncio.to_thread(query, base, _panel_expr("Breakers open (2) / half-open (1)"))
            stored = await asyncio.to_thread(query, base, 'hivemesh_breaker_state{capability="extract"}')

    def labels(series: list[dict[str, Any]]) -> list[dict[str, str]]:
        return sorted(({k: v for k, v in s["metric"].items() if k != "__name__"} for s in series),
                      key=lambda d: sorted(d.items()))

    # One alert per breaker, whichever callers report it: extract/ext-1's, and ocr's own (no peer_instance).
    assert labels(opened) == [{"capability": "extract", "peer_instance": "extract/ext-1"}, {"capability": "ocr"}]
    assert labels(panel) == [{"capability": "extract", "peer_instance": "extract/ext-1"},
                             {"capability": "extract", "peer_instance": "extract/ext-2"}, {"capability": "ocr"}]
    # As stored: the target's own labels beside the breaker's, none renamed exported_*.
    assert {(s["metric"]["peer_instance"], s["metric"]["node"]) for s in stored} == {
        ("extract/ext-1", "gateway"), ("extract/ext-2", "gateway"), ("extract/ext-1", "batch")}
    assert not [k for s in stored for k in s["metric"] if k.startswith("exported_")], stored


# --- a call past its deadline ----------------------------------------------------------------------------------------

class Text(TypedDict):
    text: str


class Hung(Agent):
    """An agent that never answers (as one stopped with SIGSTOP, or stuck): its handler runs until cancelled."""

    name = "hung"

    def __init__(self) -> None:
        super().__init__()
        self.started = asyncio.Event()

    @capability(description="never answers")
    async def hang(self, req: Text, ctx: Context) -> Text:
        self.started.set()
        await asyncio.sleep(3600)
        return req


async def _inbound(address: str, code: str, capability: str = "hang") -> float:
    """The inbound calls of capability recorded with code, summed over callers and reasons (0 when none)."""
    text = await asyncio.to_thread(scrape, address)
    total = 0.0
    for line in text.splitlines():
        if line.startswith("hivemesh_requests_total{") and 'direction="inbound"' in line \
                and f'capability="{capability}"' in line and f'code="{code}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("link", [True, False], ids=["link", "unary"])
async def test_a_call_whose_deadline_passes_while_the_agent_runs_it_is_recorded_deadline_exceeded(
    orch: Orch, link: bool
) -> None:
    """The caller got DEADLINE_EXCEEDED; the agent recorded CANCELLED (in no error-code set), so a hung agent never
    spent availability budget. On a link (frames) and as a unary Invoke."""
    agent = Hung()
    server = await orch.serve(agent, AgentServerConfig(metrics_listen="127.0.0.1:0"))
    assert server.metrics_address is not None
    async with MeshClient.connect(name="deadlines", settings=await orch.env.settings_for("deadlines", "client"),
                                  link=link) as client:
        assert await client.node.registry.wait_for_capability("hang", 1, timeout=10)
        with pytest.raises(DeadlineExceededError):
            await client.call("hang", {"text": "x"}, timeout=1.0)
        assert agent.started.is_set()
        await wait_until(lambda: _inbound(server.metrics_address or "", "DEADLINE_EXCEEDED"), 10,
                         "the agent to record the call DEADLINE_EXCEEDED")
        assert await _inbound(server.metrics_address, "CANCELLED") == 0
        text = await asyncio.to_thread(scrape, server.metrics_address)
        assert sample(text, "hivemesh_request_duration_seconds_count", direction="inbound", capability="hang",
                      code="DEADLINE_EXCEEDED") == 1


@pytest.mark.parametrize("link", [True, False], ids=["link", "unary"])
async def test_a_callers_own_cancel_before_its_deadline_stays_cancelled(orch: Orch, link: bool) -> None:
    agent = Hung()
    server = await orch.serve(agent, AgentServerConfig(metrics_listen="127.0.0.1:0"))
    assert server.metrics_address is not None
    async with MeshClient.connect(name="cancels", settings=await orch.env.settings_for("cancels", "client"),
                                  link=link) as client:
        assert await client.node.registry.wait_for_capability("hang", 1, timeout=10)
        call = asyncio.ensure_future(client.call("hang", {"text": "x"}, timeout=30.0))
        await asyncio.wait_for(agent.started.wait(), 10)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        await wait_until(lambda: _inbound(server.metrics_address or "", "CANCELLED"), 10,
                         "the agent to record the call CANCELLED")
        assert await _inbound(server.metrics_address, "DEADLINE_EXCEEDED") == 0


async def test_a_sidecar_records_a_call_its_plain_agent_held_past_the_deadline_deadline_exceeded(orch: Orch) -> None:
    async with PlainAgent("plain", prefix="plain-") as plain:
        sidecar = Sidecar(SidecarConfig(agent=plain.endpoint), await orch.env.settings_for("plain"))
        async with sidecar:
            assert sidecar.node is not None and sidecar.node.metrics is not None
            address = sidecar.node.metrics.address
            assert await orch.mesh.node.registry.wait_for_capability("plain-slow", 1, timeout=10)
            with pytest.raises(DeadlineExceededError):
                await orch.mesh.call("plain-slow", {"seconds": 30}, timeout=1.0)
            await wait_until(lambda: _inbound(address, "DEADLINE_EXCEEDED", "plain-slow"), 10,
                             "the sidecar to record the call DEADLINE_EXCEEDED")
            assert await _inbound(address, "CANCELLED", "plain-slow") == 0


# --- where the SLO rules go ------------------------------------------------------------------------------------------

def _checkable(config: Path) -> Path:
    """config as Debian's promtool can check it: its build has no Kubernetes discovery ("field kubernetes_sd_configs
    not found"), so pod discovery is swapped for file discovery, all else kept (rules, relabelling). A promtool that
    knows it checks the file as it is."""
    doc = yaml.safe_load(config.read_text())
    swapped = False
    for job in doc["scrape_configs"]:
        if "kubernetes_sd_configs" in job:
            assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}], job["job_name"]
            job["file_sd_configs"] = [{"files": [f"{job['job_name']}-pods*.json"]}]
            swapped = True
    if not swapped:
        return config
    promtool = shutil.which("promtool")
    assert promtool is not None
    as_is = subprocess.run([promtool, "check", "config", config.name], cwd=config.parent, capture_output=True,
                           text=True, timeout=120)
    if "kubernetes_sd_configs not found" not in as_is.stdout + as_is.stderr:
        return config
    derived = config.with_name(f".{config.stem}-file-sd.yml")
    derived.write_text(yaml.safe_dump(doc, sort_keys=False))
    return derived


def _documented_slo_path() -> str:
    (path,) = set(re.findall(r"hivemesh slo rules > (\S+)", (REPO / "docs" / "observability.md").read_text()))
    return path


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-k8s.yml"])
def test_the_slo_rules_written_where_the_docs_say_are_loaded_by_the_shipped_config(tmp_path: Path,
                                                                                   config: str) -> None:
    """The docs wrote deploy/prometheus/slo.yml; prometheus.yml loads slo/*.yml: Prometheus found only alerts.yml."""
    documented = _documented_slo_path()
    assert documented.startswith("deploy/prometheus/"), documented
    folder = tmp_path / "prometheus"
    shutil.copytree(PROM, folder)
    doc = SLOS.validate(PolicyDoc("slos", "docs", {"objectives": [
        {"capability": "extract", "availability": 0.999, "latency": {"threshold_ms": 500, "target": 0.99}}]}))
    rules = render_rules(objectives({"docs": doc}))
    written = folder / documented.removeprefix("deploy/prometheus/")
    written.parent.mkdir(parents=True, exist_ok=True)
    written.write_text(yaml.safe_dump(rules))
    out = promtool("check", "config", _checkable(folder / config).name, cwd=folder)
    assert "SUCCESS: 2 rule files found" in out, out
    count = sum(len(g["rules"]) for g in rules["groups"])
    assert re.search(rf"Checking {re.escape(str(written.relative_to(folder)))}\n\s+SUCCESS: {count} rules found",
                     out), out


# --- Prometheus on Kubernetes ----------------------------------------------------------------------------------------

def _metrics_ports(pod: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])
            if p.get("name") == "metrics" or str(p.get("name", "")).endswith("-metrics")}


def _template(manifests: Manifests, w: Any) -> dict[str, Any]:
    """A workload's pod template metadata (labels, annotations), as rendered."""
    (obj,) = [o for o in manifests.objects if o["kind"] == w.kind and o["metadata"]["name"] == w.name]
    found: dict[str, Any] = obj["spec"]["template"]["metadata"]
    return found


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_every_pod_template_serving_metrics_is_annotated_with_its_metrics_port(overlay: str) -> None:
    manifests = Manifests(overlay)
    served = 0
    for w in manifests.workloads:
        ports = _metrics_ports(w.pod)
        annotations = _template(manifests, w).get("annotations", {})
        if not ports:
            assert "prometheus.io/scrape" not in annotations, (w.name, annotations)
            continue
        served += 1
        (port,) = ports.values()
        assert annotations.get("prometheus.io/scrape") == "true", (w.name, annotations)
        assert annotations.get("prometheus.io/port") == str(port), (w.name, annotations, ports)
        assert annotations.get("prometheus.io/path") == "/metrics", (w.name, annotations)
    assert served == 4  # etcd, the control plane, the validator's sidecar, the caller's sidecar


def test_the_kubernetes_config_loads_the_same_rules_and_checks(tmp_path: Path) -> None:
    k8s = yaml.safe_load((PROM / "prometheus-k8s.yml").read_text())
    assert k8s["rule_files"] == yaml.safe_load((PROM / "prometheus.yml").read_text())["rule_files"]
    folder = tmp_path / "prometheus"
    shutil.copytree(PROM, folder)
    out = promtool("check", "config", _checkable(folder / "prometheus-k8s.yml").name, cwd=folder)
    assert "SUCCESS: 1 rule files found" in out and "SUCCESS: 14 rules found" in out, out


def _meta_name(key: str) -> str:
    """A Kubernetes label or annotation key as pod discovery writes it into a meta label name."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def _pod_targets(w: Any, template: dict[str, Any], namespace: str, pod: str, ip: str,
                 port_for: dict[str, str]) -> list[dict[str, Any]]:
    """The target groups Kubernetes pod discovery makes of one running pod: one per container port (the __meta
    labels its documentation lists), the pod annotated as the manifests annotate it, its port annotation replaced
    by port_for's (where this test's stand-in serves)."""
    meta = {"__meta_kubernetes_namespace": namespace, "__meta_kubernetes_pod_name": pod,
            "__meta_kubernetes_pod_ip": ip, "__meta_kubernetes_pod_phase": "Running",
            "__meta_kubernetes_pod_ready": "true"}
    for key, value in template.get("labels", {}).items():
        meta[f"__meta_kubernetes_pod_label_{_meta_name(key)}"] = value
        meta[f"__meta_kubernetes_pod_labelpresent_{_meta_name(key)}"] = "true"
    for key, value in template.get("annotations", {}).items():
        value = port_for.get(w.name, value) if key == "prometheus.io/port" else value
        meta[f"__meta_kubernetes_pod_annotation_{_meta_name(key)}"] = value
        meta[f"__meta_kubernetes_pod_annotationpresent_{_meta_name(key)}"] = "true"
    groups = []
    for c in w.pod["containers"]:
        for p in c.get("ports", []):
            labels = {**meta, "__meta_kubernetes_pod_container_name": c["name"],
                      "__meta_kubernetes_pod_container_port_name": p.get("name", ""),
                      "__meta_kubernetes_pod_container_port_number": str(p["containerPort"]),
                      "__meta_kubernetes_pod_container_port_protocol": "TCP"}
            groups.append({"targets": [f"{ip}:{p['containerPort']}"], "labels": labels})
    return groups


@contextlib.contextmanager
def _stand_ins(names: list[str]) -> Iterator[dict[str, MetricsServer]]:
    servers = {name: MetricsServer(MeshMetrics(packaging="sidecar", node=name)) for name in names}
    try:
        for s in servers.values():
            s.start()
        yield servers
    finally:
        for s in servers.values():
            s.stop()


async def test_a_real_prometheus_labels_the_annotated_pods_as_the_file_discovery_does(tmp_path: Path) -> None:
    """prometheus-k8s.yml's relabelling, run by a real Prometheus on the targets Kubernetes pod discovery makes of the
    dev overlay's pods (fed through file discovery, which this Prometheus build has; the same __meta labels), each
    pod's metrics port served by a real metrics server: one target per pod, labelled job and node as `hivemesh up`'s
    discovery labels them, plus namespace and pod; a pod not annotated, or not a hivemesh pod, is not scraped."""
    manifests = Manifests("dev")
    served = [w for w in manifests.workloads if _metrics_ports(w.pod)]
    pods = {w.name: f"{w.name}-0" if w.kind == "StatefulSet" else f"{w.name}-7d9c-x2x4q" for w in manifests.workloads}
    with _stand_ins([w.name for w in served]) as servers:
        port_for = {name: str(s.port) for name, s in servers.items()}
        groups = [g for w in manifests.workloads for g in _pod_targets(
            w, _template(manifests, w), manifests.namespace, pods[w.name], "127.0.0.1", port_for)]
        stranger = _pod_targets(served[0], _template(manifests, served[0]), manifests.namespace, "other-app-0",
                                "127.0.0.1", port_for)
        for g in stranger:  # annotated like a mesh pod, but not one
            g["labels"]["__meta_kubernetes_pod_label_app_kubernetes_io_name"] = "other-app"
        sd = tmp_path / "sd"
        sd.mkdir()
        (sd / "hivemesh-pods.json").write_text(json.dumps(groups + stranger))
        config = yaml.safe_load((PROM / "prometheus-k8s.yml").read_text())
        (job,) = config["scrape_configs"]
        assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
        job["file_sd_configs"] = [{"files": [str(sd / "hivemesh-pods.json")], "refresh_interval": "1s"}]
        config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = []
        with prometheus(tmp_path / "prometheus", sd, config=yaml.safe_dump(config)) as base:
            targets = await wait_until(lambda: asyncio.to_thread(_scraped, base), 60,
                                       "Prometheus to scrape every annotated pod", interval=0.5)
            up = await asyncio.to_thread(query, base, "up")
    active, dropped = targets
    # One target per pod, though discovery makes one per container port; the stranger's are all dropped.
    assert len(active) == len(served), active
    assert {t["discoveredLabels"]["__meta_kubernetes_pod_name"] for t in dropped} >= {"other-app-0"}
    assert not [t for t in active if t["discoveredLabels"]["__meta_kubernetes_pod_name"] == "other-app-0"]
    up = [{k: v for k, v in s["metric"].items() if k != "__name__"} for s in up]
    expected = {
        ("hivemesh-etcd", pods["hivemesh-etcd"], f"127.0.0.1:{port_for['hivemesh-etcd']}"),
        (JOB_CONTROLPLANE, pods["hivemesh-controlplane"], f"127.0.0.1:{port_for['hivemesh-controlplane']}"),
        (JOB_NODES, "validator", f"127.0.0.1:{port_for['hivemesh-validator']}"),
        (JOB_NODES, "caller", f"127.0.0.1:{port_for['hivemesh-caller']}"),
    }
    assert {(s["job"], s["node"], s["instance"]) for s in up} == expected, up
    assert {s["namespace"] for s in up} == {manifests.namespace}
    assert {s["pod"] for s in up} == {pods[w.name] for w in served}
    assert not [k for s in up for k in s if k.startswith("__")], up


def _scraped(base: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    """Prometheus's (active, dropped) targets once every active one was scraped, and scraped up; else None."""
    try:
        with urllib.request.urlopen(f"{base}/api/v1/targets?state=any", timeout=5) as resp:
            data = json.loads(resp.read())["data"]
    except OSError:
        return None  # not listening yet
    active: list[dict[str, Any]] = data["activeTargets"]
    if not active or any(t["health"] != "up" for t in active):
        return None
    return active, data["droppedTargets"]


# --- the sidecar's ready line ----------------------------------------------------------------------------------------

async def test_the_sidecar_ready_line_is_the_one_the_metrics_doc_shows(orch: Orch) -> None:
    (shown,) = re.findall(r"`(sidecar ready [^`]*)`", (REPO / "docs" / "metrics.md").read_text().replace("\n", " "))
    pattern = re.escape(shown).replace(re.escape("..."), r"\S+").replace(re.escape("HOST:PORT"), r"\S+")
    async with PlainAgent("plain", prefix="plain-") as plain:
        sidecar = Sidecar(SidecarConfig(agent=plain.endpoint, metrics_listen="127.0.0.1:0"),
                          await orch.env.settings_for("plain"))
        async with sidecar:
            line = sidecar.ready_line
            assert sidecar.node is not None and sidecar.node.metrics is not None
            metrics = sidecar.node.metrics.address
    assert re.fullmatch(pattern + r"( health=\S+)?( link=\S+)?", line), (shown, line)
    assert f"metrics={metrics}" in line


# --- error ratios: 0, not no series, for a capability with calls and no failure -----------------------------------

_CALLS = 'hivemesh_requests_total{job="hivemesh",instance="127.0.0.1:19464",node="%s",direction="inbound",' \
         'capability="%s",caller="spiffe://t/client/c",code="%s",reason="%s"}'


def test_the_error_ratio_panel_and_slo_rules_are_zero_for_a_capability_with_calls_and_no_failure(
    tmp_path: Path,
) -> None:
    """An error code's series exists only from its first call: `errors / calls` was no series at all (an empty
    graph, and an SLO ratio that could not be told from no traffic). Evaluated by promtool on series as Prometheus
    stores them; the burn-rate alerts stay silent on the healthy capability and fire on the failing one."""
    doc = SLOS.validate(PolicyDoc("slos", "all", {"objectives": [
        {"capability": c, "availability": 0.99} for c in ("extract", "pdf", "idle")]}))
    (tmp_path / "slo.yml").write_text(yaml.safe_dump(render_rules(objectives({"all": doc}))))
    panel = _panel_expr("Error ratio by capability")
    test = {
        "rule_files": ["slo.yml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": _CALLS % ("extract", "extract", "OK", ""), "values": "0+75x90"},
                {"series": _CALLS % ("extract", "extract", "UNAVAILABLE", "NO_LIVE_INSTANCE"), "values": "0+25x90"},
                {"series": _CALLS % ("pdf", "pdf", "OK", ""), "values": "0+50x90"},
                # A caller's mistake and a stale routing refusal are no failure of the agent's.
                {"series": _CALLS % ("pdf", "pdf", "INVALID_ARGUMENT", "INVALID_INPUT"), "values": "0+5x90"},
                {"series": _CALLS % ("pdf", "pdf", "UNAVAILABLE", "STALE_REGISTRATION"), "values": "0+5x90"},
            ],
            "promql_expr_test": [
                {"expr": panel, "eval_time": "30m", "exp_samples": [
                    {"labels": '{capability="extract"}', "value": 0.25},
                    {"labels": '{capability="pdf"}', "value": 0},
                ]},
                {"expr": 'hivemesh:slo_errors:ratio_rate5m{capability="pdf"}', "eval_time": "30m", "exp_samples": [
                    {"labels": 'hivemesh:slo_errors:ratio_rate5m{capability="pdf",slo="availability"}',
                     "value": 0}]},
                {"expr": 'hivemesh:slo_errors:ratio_rate1h{capability=~"pdf|idle"}', "eval_time": "70m",
                 "exp_samples": [
                     {"labels": 'hivemesh:slo_errors:ratio_rate1h{capability="pdf",slo="availability"}',
                      "value": 0}]},
                {"expr": 'hivemesh:slo_errors:ratio_rate5m{capability="extract"}', "eval_time": "30m",
                 "exp_samples": [
                     {"labels": 'hivemesh:slo_errors:ratio_rate5m{capability="extract",slo="availability"}',
                      "value": 0.25}]},
            ],
            "alert_rule_test": [
                {"eval_time": "70m", "alertname": "HivemeshSLOBurnFast", "exp_alerts": [
                    {"exp_labels": {"severity": "critical", "capability": "extract", "slo": "availability"},
                     "exp_annotations": {
                         "summary": "extract: availability error budget burning fast",
                         "description": ("The availability objective of extract (0.99 over 28 d) is spending its "
                                         "error budget at a rate that exhausts it early (page threshold)."),
                     }}]},
            ],
        }],
    }
    (tmp_path / "slo.test.yml").write_text(yaml.safe_dump(test))
    assert "SUCCESS" in promtool("test", "rules", "slo.test.yml", cwd=tmp_path)


_BUILD = ('hivemesh_build_info{job="hivemesh",instance="127.0.0.1:%d",version="0.1.0",python="CPython 3.11.7",'
          'grpcio="1.85.1",openssl="%s"}')


def test_the_runtime_table_counts_nodes_by_the_openssl_of_their_links(tmp_path: Path) -> None:
    """The dashboard's runtime table, evaluated by promtool on series as Prometheus stores them: a row per runtime
    with the nodes on it, so nodes whose links' TLS runs on an older OpenSSL stand out from the rest."""
    panel = _panel_expr("Nodes by runtime (the OpenSSL of the links' TLS)")
    old, new = "OpenSSL 3.0.19 27 Jan 2026", "OpenSSL 3.5.7 9 Jun 2026"
    row = '{grpcio="1.85.1",openssl="%s",python="CPython 3.11.7",version="0.1.0"}'
    test = {"evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": _BUILD % (port, lib), "values": "1x10"}
                         for port, lib in ((19464, old), (19465, old), (19466, new))],
        "promql_expr_test": [{"expr": panel, "eval_time": "5m", "exp_samples": [
            {"labels": row % old, "value": 2}, {"labels": row % new, "value": 1}]}],
    }]}
    (tmp_path / "runtime.test.yml").write_text(yaml.safe_dump(test))
    assert "SUCCESS" in promtool("test", "rules", "runtime.test.yml", cwd=tmp_path)


async def test_the_dashboards_error_ratio_is_zero_on_a_real_prometheus_for_an_agent_that_never_failed(
    orch: Orch, tmp_path: Path
) -> None:
    """The same, end to end: an agent served calls, none failed, and a real Prometheus scraped it."""

    class Greeter(Agent):
        name = "greeter"

        @capability(description="greets")
        async def greet(self, req: Text, ctx: Context) -> Text:
            return {"text": f"hello {req['text']}"}

    server = await orch.serve(Greeter(), AgentServerConfig(metrics_listen="127.0.0.1:0"))
    assert server.metrics_address is not None

    async def traffic() -> None:  # calls all along, so the window's rate of calls is never 0 (0 / 0 is NaN)
        while True:
            await orch.mesh.call("greet", {"text": "x"}, timeout=10)
            await asyncio.sleep(0.2)

    sd = tmp_path / "sd"
    write_file_sd(sd, [ScrapeTarget(server.metrics_address, JOB_NODES, "greeter")])
    panel = _panel_expr("Error ratio by capability").replace("[5m]", "[10s]")
    calls = asyncio.ensure_future(traffic())
    try:
        with prometheus(tmp_path / "prometheus", sd) as base:
            await wait_until(lambda: asyncio.to_thread(query, base, 'rate(hivemesh_requests_total[10s]) > 0'), 60,
                             "Prometheus to see the calls", interval=0.5)
            found = await asyncio.to_thread(query, base, panel)
    finally:
        calls.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await calls
    assert [(s["metric"], s["value"][1]) for s in found] == [({"capability": "greet"}, "0")]

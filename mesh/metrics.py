"""The mesh's Prometheus metrics: one catalog, one registry per node, a plaintext exposition port.

Why a registry per node and not prometheus-client's global one: a process may hold several nodes (an SDK
agent and the MeshClient it calls others with, or a test's whole fleet), and each node's series must carry
that node's own state. Every name here follows Prometheus conventions (`hivemesh_` prefix, base units,
`_total` for counters), and every label takes values from a bounded set: capabilities, workload identities,
status codes and ErrorInfo reasons, instance ids, model names. Never a call id or free text.

The call path touches only counters and histograms through pre-bound children (`RedMetrics.child`), a dict
lookup and two increments; everything that is state (breakers, registry, certificates, spools) is read at
scrape time by `StateCollector`, so it costs nothing between scrapes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest, start_http_server
from prometheus_client.registry import Collector

LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
"""Seconds: 1 ms resolves a proxyless loopback call, 60 s an LLM-backed capability's slowest answer."""

DIRECTIONS: Final = frozenset({"inbound", "outbound"})
"""inbound: calls this node served (or refused) as the callee; outbound: calls it made as the caller."""


@dataclass(frozen=True, slots=True)
class _RedChild:
    requests: Counter
    duration: Histogram


class RedMetrics:
    """Rate, errors, duration per direction × capability × caller × code × reason, and calls in flight."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "hivemesh_requests", "Calls decided, by outcome (code OK, or the refusal's code and ErrorInfo reason).",
            ["direction", "capability", "caller", "code", "reason"], registry=registry,
        )
        self.duration = Histogram(
            "hivemesh_request_duration_seconds", "Time from the call's arrival (or start) to its final status.",
            ["direction", "capability", "code"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.in_flight = Gauge(
            "hivemesh_requests_in_flight", "Calls started and not yet finished.", ["direction", "capability"],
            registry=registry,
        )
        self._children: dict[tuple[str, str, str, str, str], _RedChild] = {}
        self._lock = threading.Lock()

    def child(self, direction: str, capability: str, caller: str, code: str, reason: str) -> _RedChild:
        """The bound series for one label set, cached: the call path pays one dict lookup, not label parsing."""
        key = (direction, capability, caller, code, reason)
        found = self._children.get(key)
        if found is None:
            with self._lock:
                found = self._children.get(key)
                if found is None:
                    found = _RedChild(
                        self.requests.labels(direction, capability, caller, code, reason),
                        self.duration.labels(direction, capability, code),
                    )
                    self._children[key] = found
        return found

    def observe(
        self, direction: str, capability: str, caller: str, code: str, reason: str, seconds: float
    ) -> None:
        """Count one finished call (reason: its ErrorInfo reason, "" when it succeeded)."""
        c = self.child(direction, capability, caller, code, reason)
        c.requests.inc()
        c.duration.observe(seconds)


class EventMetrics:
    """Counters of what the layers decide besides the call's outcome: resilience, security, audit, agents."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
            return Counter(name, doc, list(labels), registry=registry)

        # resilience
        self.retries = counter("hivemesh_retries", "Attempts after the first.", ["capability"])
        self.retry_budget_refusals = counter(
            "hivemesh_retry_budget_refusals", "Retries the retry budget refused.", ["capability"])
        self.ejections = counter(
            "hivemesh_ejections", "Instances ejected by their circuit breaker (outlier detection).", ["capability"])
        self.ratelimit_refusals = counter(
            "hivemesh_ratelimit_refusals", "Calls refused by a rate limit.", ["capability"])
        self.shed = counter("hivemesh_admission_shed", "Calls shed by admission control.", ["capability"])
        self.fallbacks = counter("hivemesh_fallbacks", "Calls answered by a fallback capability.", ["capability"])
        self.cached_answers = counter(
            "hivemesh_cached_answers", "Calls answered from the degraded-mode answer cache.", ["capability"])
        # security
        self.refusals = counter("hivemesh_refusals", "Calls refused by a security layer, by reason.", ["reason"])
        self.tls_handshake_refusals = counter(
            "hivemesh_tls_handshake_refusals", "TLS handshakes refused on a mesh port, by reason.", ["reason"])
        self.token_cache = counter(
            "hivemesh_token_cache_lookups", "Token verifications by cache result (hit, miss).", ["result"])
        # audit
        self.audit_records_shipped = counter(
            "hivemesh_audit_records_shipped", "Audit records shipped to the control plane.")
        # agents
        self.llm_tokens = counter(
            "hivemesh_llm_tokens", "Model tokens used by capabilities, by model, caller and direction (input, output).",
            ["model", "caller", "direction"])
        self.llm_cost = counter(
            "hivemesh_llm_cost", "Model spend from the configured price table, in the table's currency.",
            ["model", "caller", "currency"])
        self.workflows = counter(
            "hivemesh_workflows", "Workflow runs by definition and event (started, completed, failed, escalated).",
            ["definition", "event"])
        self.workflow_step_duration = Histogram(
            "hivemesh_workflow_step_duration_seconds", "Duration of one workflow step.", ["definition"],
            buckets=LATENCY_BUCKETS, registry=registry)
        self.handoffs = counter("hivemesh_handoffs", "Hand-offs from one agent to another.", ["capability"])


StateReading = Callable[[], Iterable[tuple[Mapping[str, str], float]]]
"""Returns the current value of one gauge family as (labels, value) pairs; called at scrape time only."""


@dataclass(frozen=True, slots=True)
class StateGauge:
    name: str
    doc: str
    labels: tuple[str, ...]
    read: StateReading


class StateCollector(Collector):
    """Gauges read from the node's own state when Prometheus scrapes, never on the call path.

    A reading that raises is skipped for that scrape (and counted in hivemesh_metrics_read_errors), so one
    broken part cannot take the whole exposition down.
    """

    def __init__(self) -> None:
        self._gauges: dict[str, StateGauge] = {}
        self._errors = 0

    def add(self, name: str, doc: str, labels: Iterable[str], read: StateReading) -> None:
        if name in self._gauges:
            raise ValueError(f"gauge {name} is already registered")
        self._gauges[name] = StateGauge(name, doc, tuple(labels), read)

    def collect(self) -> Iterator[Metric]:
        for g in list(self._gauges.values()):
            family = GaugeMetricFamily(g.name, g.doc, labels=list(g.labels))
            try:
                for labels, value in g.read():
                    family.add_metric([labels.get(k, "") for k in g.labels], float(value))
            except Exception:  # noqa: BLE001 - a scrape must survive one part's failure
                self._errors += 1
                continue
            yield family
        errors = GaugeMetricFamily("hivemesh_metrics_read_errors", "State readings that failed during scrapes.")
        errors.add_metric([], float(self._errors))
        yield errors

    def describe(self) -> Iterator[Metric]:
        return iter(())


class MeshMetrics:
    """Everything one node exports. `red` and `events` are updated by the layers; `state` is read at scrape."""

    def __init__(self, *, packaging: str, node: str) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.red = RedMetrics(self.registry)
        self.events = EventMetrics(self.registry)
        self.state = StateCollector()
        self.registry.register(self.state)
        info = Gauge("hivemesh_node_info", "Constant 1, labelled with what this node is.", ["packaging", "node"],
                     registry=self.registry)
        info.labels(packaging, node).set(1)
        started = Gauge("hivemesh_node_start_time_seconds", "Unix time the node started.", registry=self.registry)
        started.set(time.time())

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes (what `/metrics` serves)."""
        return generate_latest(self.registry)


class MetricsServer:
    """Plaintext `/metrics` over HTTP on its own port, separate from the mTLS ports: scrapers need no
    certificate and leave no audit noise (Istio's and Linkerd's admin ports do the same)."""

    def __init__(self, metrics: MeshMetrics, host: str = "127.0.0.1", port: int = 0) -> None:
        self._metrics = metrics
        self._host = host
        self._port = port
        self._server: object | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self) -> None:
        server, thread = start_http_server(self._port, addr=self._host, registry=self._metrics.registry)
        self._server, self._thread = server, thread
        self.port = int(server.server_port)

    @property
    def address(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{self.port}"

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

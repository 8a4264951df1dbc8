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

import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final
from wsgiref.simple_server import make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler, generate_latest, make_wsgi_app
from prometheus_client.registry import Collector

from hivemesh.mesh import build_info

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
    """Rate, errors, duration per direction × capability × caller × code × reason (calls in flight are state:
    `hivemesh_requests_in_flight`, read from the node's traffic counts at scrape)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "hivemesh_requests", "Calls decided, by outcome (code OK, or the refusal's code and ErrorInfo reason).",
            ["direction", "capability", "caller", "code", "reason"], registry=registry,
        )
        self.duration = Histogram(
            "hivemesh_request_duration_seconds", "Time from the call's arrival (or start) to its final status.",
            ["direction", "capability", "code"], buckets=LATENCY_BUCKETS, registry=registry,
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
        self.peer_unreachable = counter(
            "hivemesh_peer_unreachable", "Attempts that could not connect to an instance of peer (a SPIFFE id).",
            ["capability", "peer"])
        self.peer_unanswered = counter(
            "hivemesh_peer_unanswered", "Attempts an instance of peer (a SPIFFE id) held until their deadline.",
            ["capability", "peer"])
        self.ratelimit_refusals = counter(
            "hivemesh_ratelimit_refusals", "Calls refused by a rate limit.", ["capability"])
        self.shed = counter("hivemesh_admission_shed", "Calls shed by admission control.", ["capability"])
        self.fallbacks = counter("hivemesh_fallbacks", "Calls answered by a fallback capability.", ["capability"])
        self.cached_answers = counter(
            "hivemesh_cached_answers", "Calls answered from the degraded-mode answer cache.", ["capability"])
        self.shadow_calls = counter(
            "hivemesh_shadow_calls", "Mirrored (shadow) calls by result: same, different, error, dropped.",
            ["capability", "result"])
        # security
        self.refusals = counter("hivemesh_refusals", "Calls refused by a security layer, by reason.", ["reason"])
        # agents
        self.llm_tokens = counter(
            "hivemesh_llm_tokens", "Model tokens used by capabilities, by model, caller and direction (input, output).",
            ["model", "caller", "direction"])
        self.llm_cost = counter(
            "hivemesh_llm_cost", "Model spend from the configured price table, in the table's currency.",
            ["model", "caller", "currency"])
        self.workflows = counter(
            "hivemesh_workflows",
            "Workflow runs by definition and event (started or resumed, completed, failed, escalated, canceled).",
            ["definition", "event"])
        self.workflow_step_duration = Histogram(
            "hivemesh_workflow_step_duration_seconds", "Duration of one workflow step.", ["definition"],
            buckets=LATENCY_BUCKETS, registry=registry)
        self.handoffs = counter("hivemesh_handoffs", "Hand-offs from one agent to another.", ["capability"])


StateReading = Callable[[], Iterable[tuple[Mapping[str, str], float]]]
"""Returns the current value of one family as (labels, value) pairs; called at scrape time only."""


@dataclass(frozen=True, slots=True)
class StateSpec:
    """One family read from state: its help text, labels, and whether it only ever grows (a counter)."""

    doc: str
    labels: tuple[str, ...] = ()
    counter: bool = False


STATE: Final[Mapping[str, StateSpec]] = {
    "hivemesh_requests_in_flight": StateSpec("Calls started and not yet finished.", ("direction", "capability")),
    # resilience
    # `peer_instance`, never `instance`: Prometheus sets `instance` (and `job`) on every series it scrapes, so
    # a metric's own label of that name would be renamed `exported_instance` and grouped by scrape target.
    "hivemesh_breaker_state": StateSpec(
        "Circuit breaker state: 0 closed, 1 half-open, 2 open (peer_instance empty: the capability's own breaker).",
        ("capability", "peer_instance")),
    "hivemesh_admission_queue_depth": StateSpec("Calls waiting for an in-flight slot of the agent.", ("agent",)),
    # registry and store
    "hivemesh_registry_live_instances": StateSpec("Live instances serving a capability.", ("capability",)),
    "hivemesh_registry_watch_lag_revisions": StateSpec("etcd revisions the registry watch is behind."),
    "hivemesh_registry_impostors_refused": StateSpec(
        "Registry entries ignored because their identity is not their agent's.", counter=True),
    "hivemesh_etcd_connected": StateSpec("1 while the node's etcd watches are connected, else 0."),
    "hivemesh_etcd_errors": StateSpec("etcd watch streams that broke and were re-established.", counter=True),
    "hivemesh_controlplane_reachable": StateSpec("1 while the node's last control-plane call succeeded, else 0."),
    "hivemesh_controlplane_failovers": StateSpec(
        "Control-plane calls that moved on from an unreachable replica.", counter=True),
    "hivemesh_controlplane_hedges": StateSpec(
        "Control-plane calls also sent to the next replica because the one asked stayed silent.", counter=True),
    # trust
    "hivemesh_tls_handshake_refusals": StateSpec(
        "TLS handshakes refused on a mesh port, by reason (counted beside the audit record).", ("reason",),
        counter=True),
    "hivemesh_token_cache_lookups": StateSpec(
        "Token verifications by cache result (hit, miss).", ("result",), counter=True),
    "hivemesh_certificate_expiry_seconds": StateSpec("Seconds until the node's workload certificate expires."),
    "hivemesh_jwks_age_seconds": StateSpec("Seconds since the token key set the node verifies with was issued."),
    "hivemesh_revocations_in_force": StateSpec("Revoked token ids and identities the node enforces."),
    # audit
    "hivemesh_audit_spool_lag_records": StateSpec("Audit records written to the spool and not yet shipped."),
    "hivemesh_audit_records_shipped": StateSpec("Audit records shipped to the control plane.", counter=True),
    "hivemesh_audit_checkpoint_age_seconds": StateSpec("Seconds since the last signed checkpoint (control plane)."),
    "hivemesh_audit_verify_failures": StateSpec("Audit verifications that found a break (control plane).",
                                                counter=True),
    # people and spend
    "hivemesh_escalations_open": StateSpec("Human escalations waiting for an answer."),
    "hivemesh_escalation_oldest_age_seconds": StateSpec("Age of the oldest open escalation."),
    "hivemesh_llm_cost_limit_per_hour": StateSpec("The configured hourly model spend limit.", ("currency",)),
    # control-plane replicas
    "hivemesh_controlplane_leader": StateSpec(
        "1 while this control-plane replica leads (runs the once-per-mesh duties), else 0."),
}
"""Every family a node may read from its state. A family not listed here cannot be added: the dashboards,
alerts and docs are checked against this catalog, so a name cannot appear in one place only."""


class StateCollector(Collector):
    """Gauges read from the node's own state when Prometheus scrapes, never on the call path.

    A reading that raises is skipped for that scrape (and counted in hivemesh_metrics_read_errors), so one
    broken part cannot take the whole exposition down.
    """

    def __init__(self) -> None:
        self._readings: dict[str, StateReading] = {}
        self._errors = 0

    def add(self, name: str, read: StateReading) -> None:
        """Read the catalog family `name` (see STATE) from `read` at every scrape."""
        if name not in STATE:
            raise ValueError(f"{name} is not in the metrics catalog (hivemesh.mesh.metrics.STATE)")
        if name in self._readings:
            raise ValueError(f"{name} is already registered")
        self._readings[name] = read

    def collect(self) -> Iterator[Metric]:
        for name, read in list(self._readings.items()):
            spec = STATE[name]
            family: GaugeMetricFamily | CounterMetricFamily = (
                CounterMetricFamily(name, spec.doc, labels=list(spec.labels)) if spec.counter
                else GaugeMetricFamily(name, spec.doc, labels=list(spec.labels))
            )
            try:
                for labels, value in read():
                    family.add_metric([labels.get(k, "") for k in spec.labels], float(value))
            except Exception:  # noqa: BLE001 - a scrape must survive one part's failure
                self._errors += 1
                continue
            yield family
        errors = CounterMetricFamily("hivemesh_metrics_read_errors", "State readings that failed during scrapes.")
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
        runtime = build_info.runtime()
        built = Gauge("hivemesh_build_info", "Constant 1, labelled with what the node runs on: hivemesh's version, "
                      "the interpreter, grpcio, and the OpenSSL of its direct links' TLS.", list(runtime),
                      registry=self.registry)
        built.labels(**runtime).set(1)
        started = Gauge("hivemesh_node_start_time_seconds", "Unix time the node started.", registry=self.registry)
        started.set(time.time())

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes (what `/metrics` serves)."""
        return generate_latest(self.registry)


MAX_CONNECTIONS: Final = 32
"""Connections `/metrics` serves at once; more are closed at once. A scraper holds one or two."""
IDLE_TIMEOUT_S: Final = 10.0
"""A connection silent this long is closed: with neither bound, 400 half-sent requests held 400 server threads
for good on a port the Kubernetes manifests open to the pod network (slowloris)."""


class _BoundedServer(ThreadingWSGIServer):
    """prometheus-client's threading server with a bound on connections (see MAX_CONNECTIONS)."""

    max_connections = MAX_CONNECTIONS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(self.max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: closed at once, never queued behind the slow ones
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went silent past the timeout or away: nothing to print (socketserver writes a traceback
        to stderr)."""


class MetricsServer:
    """Plaintext `/metrics` over HTTP on its own port, separate from the mTLS ports: scrapers need no
    certificate and leave no audit noise (Istio's and Linkerd's admin ports do the same). At most
    `max_connections` at once, each closed after `idle_timeout_s` of silence."""

    def __init__(self, metrics: MeshMetrics, host: str = "127.0.0.1", port: int = 0, *,
                 max_connections: int = MAX_CONNECTIONS, idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
        self._metrics = metrics
        self._host = host
        self._port = port
        self._max_connections = max_connections
        self._idle_timeout_s = idle_timeout_s
        self._server: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self) -> None:
        # prometheus-client's start_http_server, with a short poll interval: stopping a node waits for the
        # serving loop to notice, and a test fleet stops many nodes.
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        server_class = type("_MetricsHTTPServer", (_BoundedServer,),
                            {"address_family": family, "max_connections": self._max_connections})
        handler_class = type("_MetricsHandler", (_SilentHandler,), {"timeout": self._idle_timeout_s})
        app = make_wsgi_app(self._metrics.registry)
        server: ThreadingWSGIServer = make_server(self._host, self._port, app, server_class,
                                                  handler_class=handler_class)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  name=f"metrics-{self._host}:{self._port}", daemon=True)
        thread.start()
        self._server, self._thread = server, thread
        self.port = int(server.server_port)

    @property
    def address(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{self.port}"

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def exported_names() -> frozenset[str]:
    """Every metric family name a node can export (as written in PromQL, without sample suffixes)."""
    m = MeshMetrics(packaging="catalog", node="catalog")
    names = {metric.name for metric in m.registry.collect()}
    names.update(STATE)
    names.add("hivemesh_metrics_read_errors")
    return frozenset(names)

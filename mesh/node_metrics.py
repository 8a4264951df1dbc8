"""A node's metrics wired to its parts: the inbound decisions, the outbound pipeline's events, and its state.

`hivemesh.mesh.metrics` is the catalog; this module feeds it from one `MeshNode` (an SDK agent, a sidecar, a
MeshClient) and serves it on the node's plaintext metrics port. Hot-path hooks only bump pre-bound counters;
state (breakers, registry, certificate, key set, revocations, audit spool) is read when Prometheus scrapes.
Label values are bounded here: a capability not declared by this agent (inbound) and names past a cap
(outbound) count as `_other`, so a caller cannot mint series with made-up capability names.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import grpc

from hivemesh.mesh import invoke_wire, json_depth
from hivemesh.mesh.errors import HivemeshError
from hivemesh.mesh.layers.base import Inbound
from hivemesh.mesh.metrics import MeshMetrics, MetricsServer
from hivemesh.mesh.resilience.breaker import State
from hivemesh.mesh.server import ANY_LISTENER, METRICS, listen_failure
from hivemesh.v1 import agent_pb2

if TYPE_CHECKING:
    from hivemesh.mesh.audit import AuditLog
    from hivemesh.mesh.audit.handshake import HandshakeAudit
    from hivemesh.mesh.node import MeshNode
    from hivemesh.mesh.registry import CapabilityInfo
    from hivemesh.mesh.tokens import TokenVerifier

METRICS_LISTEN_ENV: Final = "HIVEMESH_METRICS_LISTEN"
"""HOST:PORT of a node's plaintext metrics port ("off": none). Overrides a packaging's default."""
PRICES_ENV: Final = "HIVEMESH_PRICES"
"""The model price table: JSON, or a path to a JSON file (see `PriceTable`)."""
OWNED_DEFAULT: Final = "127.0.0.1:0"
"""Processes the mesh owns (agents, sidecars, the control plane) serve metrics by default on a free loopback
port; an embedded MeshClient serves none unless asked."""
OTHER: Final = "_other"
_MAX_LABEL_VALUES = 256
_BREAKER_VALUE: Final = {State.CLOSED: 0.0, State.HALF_OPEN: 1.0, State.OPEN: 2.0}
_RATE_LIMITED = "RATE_LIMITED"
_SHED = frozenset({"OVERLOADED"})
_WORKFLOW_EVENTS: Final = {"started": "started", "completed": "completed", "failed": "failed",
                           "rejected": "failed", "canceled": "canceled", "input_required": "escalated"}
"""Run events (as the workflow store records them) -> the `event` label of hivemesh_workflows_total."""
_SECURITY_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
_NO_LIVE_INSTANCE = "NO_LIVE_INSTANCE"
GONE_KEPT_S: Final = 3600.0
"""How long hivemesh_registry_live_instances keeps reporting 0 for a capability no instance serves any more, after
it went and after this node's last call to it refused NO_LIVE_INSTANCE (see `LiveInstances`)."""


def parse_listen(text: str) -> tuple[str, int] | None:
    """'HOST:PORT' (IPv6 as [addr]:port) -> (host, port); 'off' or '' -> None. Raises ValueError, saying why."""
    text = text.strip()
    if text in ("", "off", "none"):
        return None
    host, sep, port_s = text.rpartition(":")
    if not sep or not host or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"a metrics listen address is HOST:PORT (port 0: a free one) or 'off': {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_s)


def metrics_listen(given: str | None, default: str | None) -> str | None:
    """What a node listens on for metrics: given (config or flag), else $HIVEMESH_METRICS_LISTEN, else default.
    Validated here, so a mistake fails at start with the address in the message."""
    chosen = given if given is not None else os.environ.get(METRICS_LISTEN_ENV, default)
    if chosen is None:
        return None
    return chosen if parse_listen(chosen) is not None else None


@dataclass(frozen=True, slots=True)
class Price:
    input_per_1k: float
    output_per_1k: float
    currency: str


class PriceTable:
    """Model prices from configuration: `{model: {input_per_1k, output_per_1k, currency}}`, plus an optional
    `"_limit_per_hour": {currency: amount}` the spend alert compares against. A model not listed costs nothing
    (its tokens are still counted)."""

    def __init__(self, prices: Mapping[str, Price], limits: Mapping[str, float] | None = None) -> None:
        self.prices = dict(prices)
        self.limits = dict(limits or {})

    @classmethod
    def parse(cls, text: str) -> PriceTable:
        try:
            raw = json_depth.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the price table is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError("the price table must be a JSON object {model: {input_per_1k, output_per_1k, currency}}")
        limits = raw.pop("_limit_per_hour", {})
        prices: dict[str, Price] = {}
        for model, p in raw.items():
            try:
                prices[model] = Price(float(p["input_per_1k"]), float(p["output_per_1k"]), str(p["currency"]))
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"price of model {model!r} needs input_per_1k, output_per_1k and currency: {p!r}"
                                 ) from None
        if not isinstance(limits, dict):
            raise ValueError("_limit_per_hour must map a currency to an amount")
        return cls(prices, {str(k): float(v) for k, v in limits.items()})

    @classmethod
    def from_env(cls) -> PriceTable:
        """$HIVEMESH_PRICES: inline JSON, or the path of a JSON file; empty table when unset."""
        text = os.environ.get(PRICES_ENV, "").strip()
        if not text:
            return cls({})
        if not text.startswith("{"):
            text = Path(text).read_text()
        return cls.parse(text)


class _Bounded:
    """Keeps at most _MAX_LABEL_VALUES distinct values of one label; the rest become `_other`."""

    __slots__ = ("seen",)

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        self.seen: set[str] = set(allowed)

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) < _MAX_LABEL_VALUES:
            self.seen.add(value)
            return value
        return OTHER


class LiveInstances:
    """hivemesh_registry_live_instances: every capability served now, and 0 for one this node reported live before
    and no instance serves any more.

    The registry lists only capabilities served now, and a series that vanishes instead of reading 0 left an
    outage as "no data": nothing to graph, and no rule can test an absent series for 0. The zeros are bounded (a
    workload registering ever new names would otherwise grow every scrape for good): one is dropped once it has
    been gone, and not called by this node (`called`), for `kept_s` (gone that long with no caller, it was
    retired); past `limit` zeros, the longest gone go first.
    Read from the scrape threads, noted from the event loop: a lock keeps the two apart.
    """

    __slots__ = ("_called", "_clock", "_gone", "_kept_s", "_limit", "_live", "_lock")

    def __init__(self, *, kept_s: float = GONE_KEPT_S, limit: int = _MAX_LABEL_VALUES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._kept_s = kept_s
        self._limit = limit
        self._clock = clock
        self._lock = threading.Lock()
        self._live: frozenset[str] = frozenset()  # reported live by the last read
        self._gone: dict[str, float] = {}  # capability -> when a read first found it gone, oldest first
        self._called: dict[str, float] = {}  # capability gone -> this node's last call refused NO_LIVE_INSTANCE

    def called(self, capability: str) -> None:
        """A call of this node found no live instance of capability: keep its 0 while callers still want it."""
        with self._lock:
            if capability in self._gone:
                self._called[capability] = self._clock()

    def read(self, infos: Iterable[CapabilityInfo]) -> list[tuple[Mapping[str, str], float]]:
        """The series for the capabilities infos lists (the registry's now), and the zeros still kept."""
        counts = {i.capability.name: float(i.instances) for i in infos}
        out: list[tuple[Mapping[str, str], float]] = [({"capability": c}, n) for c, n in counts.items()]
        live = frozenset(counts)
        with self._lock:
            now = self._clock()
            gone, called = self._gone, self._called
            for name in self._live - live:
                gone[name] = now
            self._live = live
            for name in [n for n in gone if n in live]:  # back: live again
                del gone[name]
                called.pop(name, None)
            excess = len(gone) - self._limit
            for name in list(gone):
                if excess > 0 or now - max(gone[name], called.get(name, 0.0)) > self._kept_s:
                    del gone[name]
                    called.pop(name, None)
                    excess -= 1
            out.extend(({"capability": name}, 0.0) for name in gone)
        return out


class NodeMetrics:
    """One node's metrics and their port. `start`/`stop` with the node; the hooks below are what it calls."""

    def __init__(self, *, packaging: str, node: str, listen: str, prices: PriceTable | None = None) -> None:
        parsed = parse_listen(listen)
        if parsed is None:
            raise ValueError("NodeMetrics needs a listen address (use None for no metrics at all)")
        self.metrics = MeshMetrics(packaging=packaging, node=node)
        self.server = MetricsServer(self.metrics, *parsed)
        self._listen = listen.strip()
        self._listener = METRICS.get(packaging, ANY_LISTENER)
        self.prices = prices if prices is not None else PriceTable.from_env()
        self.identity = ""
        """This node's SPIFFE id: the caller label of its outbound calls (set at start)."""
        self._out_caps = _Bounded()
        self._callers = _Bounded()
        self._definitions = _Bounded()
        self._in_caps: frozenset[str] = frozenset()
        self._verifiers: list[TokenVerifier] = []
        self._audits: list[AuditLog] = []
        self._handshakes: list[HandshakeAudit] = []
        self._watched = False
        self._cost_children: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self.live_instances = LiveInstances()
        ev = self.metrics.events
        self._ratelimited = ev.ratelimit_refusals
        self._shed = ev.shed

    @property
    def address(self) -> str:
        return self.server.address

    def start(self) -> None:
        """Serve `/metrics`; a port that cannot be bound is named with its cause and where to give another (the
        HTTP server's own error said "[Errno 98] Address already in use", no address)."""
        try:
            self.server.start()
        except OSError as exc:
            raise listen_failure(self._listen, self._listener, cause=exc) from None

    def stop(self) -> None:
        self.server.stop()

    # --- inbound ----------------------------------------------------------------------------------------------
    def inbound_observer(
        self, capabilities: Iterable[agent_pb2.Capability]
    ) -> Callable[[Inbound, HivemeshError | None, grpc.StatusCode, float], None]:
        """The DecisionObserver of this node's inbound chain (RED, and refusals by kind)."""
        known = frozenset(c.name for c in capabilities)
        self._in_caps |= known
        red = self.metrics.red
        ev = self.metrics.events
        callers = self._callers

        def observe(call: Inbound, err: HivemeshError | None, code: grpc.StatusCode, seconds: float) -> None:
            req = call.request
            cap = req.capability if req is not None else ""
            if cap not in known:
                cap = OTHER if cap else ""
            peer = call.peer
            caller = callers(str(peer.spiffe_id)) if peer is not None else ""
            reason = err.reason if err is not None else ""
            red.observe("inbound", cap, caller, code.name, reason, seconds)
            if err is not None:
                if reason == _RATE_LIMITED:
                    ev.ratelimit_refusals.labels(cap).inc()
                elif reason in _SHED:
                    ev.shed.labels(cap).inc()
                elif code in _SECURITY_CODES:
                    ev.refusals.labels(reason).inc()

        return observe

    def usage(self, caller: str, response: Any, method: str, noted: agent_pb2.Usage | None = None) -> None:
        """Count the model tokens (and cost, from the price table) an answer reports (noted: the usage its
        writer noted it carries, `Inbound.noted_usage`; None: read from it)."""
        if noted is not None:
            u = noted
        else:
            if isinstance(response, bytes):
                try:
                    response = invoke_wire.answer(method, response)
                except Exception:  # noqa: BLE001 - an unreadable answer reports no usage
                    return
            if not isinstance(response, agent_pb2.InvokeResponse | agent_pb2.InvokeChunk):
                return
            u = response.usage
        if not (u.input_tokens or u.output_tokens):
            return
        model = self._out_caps(u.model or "unknown")  # bounded like any other label
        key = (model, caller)
        children = self._cost_children.get(key)
        if children is None:
            ev = self.metrics.events
            price = self.prices.prices.get(model)
            cost = ev.llm_cost.labels(model, caller, price.currency) if price is not None else None
            children = (ev.llm_tokens.labels(model, caller, "input"), ev.llm_tokens.labels(model, caller, "output"),
                        cost)
            self._cost_children[key] = children
        tin, tout, cost = children
        tin.inc(u.input_tokens)
        tout.inc(u.output_tokens)
        if cost is not None:
            price = self.prices.prices[model]
            cost.inc(u.input_tokens / 1000 * price.input_per_1k + u.output_tokens / 1000 * price.output_per_1k)

    def usage_layer(self) -> UsageMeter:
        return UsageMeter(self)

    # --- workflows (hivemesh.sdk.workflow reports each event it records) --------------------------------------
    def workflow_event(self, definition: str, kind: str, data: Mapping[str, Any]) -> None:
        """Count a workflow run's event: run outcomes, step latency, and hand-offs (a `handoff-N` note)."""
        ev = self.metrics.events
        name = self._definitions(definition or "_unnamed")
        event = _WORKFLOW_EVENTS.get(kind)
        if event is not None:
            ev.workflows.labels(name, event).inc()
        elif kind == "step_completed":
            result = data.get("result")
            if isinstance(result, Mapping):
                ev.workflow_step_duration.labels(name).observe(float(result.get("elapsed_ms") or 0.0) / 1000)
        elif kind == "note" and str(data.get("key", "")).startswith("handoff-"):
            note = data.get("data")
            source = str(note.get("from", "")) if isinstance(note, Mapping) else ""
            ev.handoffs.labels(self._out_caps(source)).inc()

    # --- outbound (hivemesh.mesh.outbound.events.OutboundEvents) ---------------------------------------------
    def finished(self, capability: str, error: HivemeshError | None, seconds: float, retries: int) -> None:
        cap = self._out_caps(capability)
        if error is None:
            self.metrics.red.observe("outbound", cap, self.identity, "OK", "", seconds)
        else:
            self.metrics.red.observe("outbound", cap, self.identity, error.code.name, error.reason, seconds)
            if error.reason == _NO_LIVE_INSTANCE and cap != OTHER:
                self.live_instances.called(cap)
        if retries:
            self.metrics.events.retries.labels(cap).inc(retries)

    def budget_refused(self, capability: str) -> None:
        self.metrics.events.retry_budget_refusals.labels(self._out_caps(capability)).inc()

    def ejected(self, capability: str) -> None:
        self.metrics.events.ejections.labels(self._out_caps(capability)).inc()

    def unreachable(self, capability: str, peer: str) -> None:
        self.metrics.events.peer_unreachable.labels(self._out_caps(capability), peer).inc()

    def unanswered(self, capability: str, peer: str) -> None:
        self.metrics.events.peer_unanswered.labels(self._out_caps(capability), peer).inc()

    def fallback(self, capability: str) -> None:
        self.metrics.events.fallbacks.labels(self._out_caps(capability)).inc()

    def cached(self, capability: str) -> None:
        self.metrics.events.cached_answers.labels(self._out_caps(capability)).inc()

    def shadowed(self, capability: str, result: str) -> None:
        self.metrics.events.shadow_calls.labels(self._out_caps(capability), result).inc()

    # --- state, read at scrape --------------------------------------------------------------------------------
    def watch_verifier(self, verifier: TokenVerifier) -> None:
        self._verifiers.append(verifier)

    def watch_handshakes(self, handshakes: HandshakeAudit) -> None:
        self._handshakes.append(handshakes)

    def _handshake_refusals(self) -> Iterator[tuple[Mapping[str, str], float]]:
        totals: dict[str, int] = {}
        for h in self._handshakes:
            for reason, n in list(h.refused_by_reason.items()):
                totals[reason] = totals.get(reason, 0) + n
        for reason, n in totals.items():
            yield {"reason": reason}, float(n)

    def watch_audit(self, audit: AuditLog) -> None:
        self._audits.append(audit)

    def watch_node(self, node: MeshNode) -> None:
        """Read node's state at every scrape (see the catalog's STATE families)."""
        if self._watched:
            return
        self._watched = True
        add = self.metrics.state.add
        self.identity = node.workload.spiffe_id
        state = node.traffic.state

        def breakers() -> Iterator[tuple[Mapping[str, str], float]]:
            for cap, inst, breaker in state.breakers():
                yield {"capability": cap, "peer_instance": inst}, _BREAKER_VALUE[breaker.state]

        def queues() -> Iterator[tuple[Mapping[str, str], float]]:
            for agent, waiting in state.queue_depths():
                yield {"agent": agent}, float(waiting)

        def in_flight() -> Iterator[tuple[Mapping[str, str], float]]:
            totals: dict[tuple[str, str], int] = {}
            for direction, cap, n in state.in_flight():
                key = (direction, bound(direction, cap))
                totals[key] = totals.get(key, 0) + n
            for (direction, cap), n in totals.items():
                yield {"direction": direction, "capability": cap}, float(n)

        def bound(direction: str, cap: str) -> str:
            return cap if cap in self._out_caps.seen or cap in self._in_caps else OTHER

        cache = node.registry.cache
        add("hivemesh_requests_in_flight", in_flight)
        add("hivemesh_breaker_state", breakers)
        add("hivemesh_admission_queue_depth", queues)
        add("hivemesh_registry_live_instances", lambda: self.live_instances.read(node.registry.capabilities()))
        add("hivemesh_registry_watch_lag_revisions", lambda: [({}, float(cache.lag_revisions))])
        add("hivemesh_registry_impostors_refused", lambda: [({}, float(node.registry.impostors_refused))])
        add("hivemesh_etcd_connected", lambda: [({}, 1.0 if cache.connected else 0.0)])
        add("hivemesh_etcd_errors", lambda: [({}, float(cache.reconnects))])  # each a watch that broke
        cp = node.controlplane
        add("hivemesh_controlplane_reachable",
            lambda: [] if cp.reachable is None else [({}, 1.0 if cp.reachable else 0.0)])
        add("hivemesh_controlplane_failovers", lambda: [({}, float(cp.failovers))])
        add("hivemesh_controlplane_hedges", lambda: [({}, float(cp.hedges))])
        add("hivemesh_certificate_expiry_seconds", lambda: [({}, node.workload.expires_at - time.time())])
        add("hivemesh_revocations_in_force", lambda: [({}, float(len(node.revocations)))])
        add("hivemesh_jwks_age_seconds",
            lambda: [({}, time.time() - node.jwks_issued_at)] if node.jwks_issued_at else [])
        add("hivemesh_token_cache_lookups", self._token_cache)
        add("hivemesh_tls_handshake_refusals", self._handshake_refusals)
        add("hivemesh_audit_spool_lag_records", lambda: [({}, float(sum(a.spool.pending for a in self._audits)))])
        add("hivemesh_audit_records_shipped", lambda: [
            ({}, float(sum(a.shipper.shipped for a in self._audits if a.shipper is not None)))])
        add("hivemesh_llm_cost_limit_per_hour", lambda: [({"currency": c}, v) for c, v in self.prices.limits.items()])

    def _token_cache(self) -> Iterator[tuple[Mapping[str, str], float]]:
        yield {"result": "hit"}, float(sum(v.cache_hits for v in self._verifiers))
        yield {"result": "miss"}, float(sum(v.cache_misses for v in self._verifiers))


class UsageMeter:
    """A settling inbound layer: counts the model tokens and cost each answer reports, per verified caller."""

    name = "usage-meter"

    def __init__(self, metrics: NodeMetrics) -> None:
        self._metrics = metrics

    def check(self, call: Inbound) -> None:
        return None

    def settle(self, call: Inbound, response: Any) -> None:
        peer = call.peer
        caller = self._metrics._callers(str(peer.spiffe_id)) if peer is not None else ""
        self._metrics.usage(caller, response, call.method, call.noted_usage(response))

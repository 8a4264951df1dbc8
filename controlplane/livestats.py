"""What `hivemesh top` shows, computed from two scrapes of the nodes' `/metrics`: no rendering here.

Rates are the difference of two scrapes over the time between them (per target, as Prometheus's `rate` would
over two points); a counter that went down means the node restarted, and its new value is the increase. Quantiles
come from the latency histogram's bucket increases, interpolated linearly inside the bucket the rank falls in, the
way PromQL's `histogram_quantile` does, so `top` and a dashboard agree.

Rows are per capability (every node's series for it summed) with one row per instance under it: an instance is a
scraped node (named by `hivemesh_node_info{node}`), or an instance only a caller's breaker knows about (a node
that cannot be scraped still shows up when its callers broke the circuit to it). Model tokens and spend carry no
capability label, so an instance row shows its node's, and a capability row the sum over the nodes serving it
(a node serving several capabilities counts toward each; the mesh-wide total is exact).
"""

from __future__ import annotations

import http.client
import json
import math
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from prometheus_client.parser import text_string_to_metric_families

from hivemesh.mesh import json_depth

SORT_KEYS: Final = ("calls", "errors", "p99", "cost")
BREAKER_STATES: Final = {0: "closed", 1: "half-open", 2: "open"}
_MAX_BODY: Final = 16 << 20

Labels = tuple[tuple[str, str], ...]
Samples = Mapping[tuple[str, Labels], float]


# --- targets ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One node to scrape: `host:port` of its plaintext metrics port, and the labels service discovery gave it."""

    address: str
    labels: Mapping[str, str] = field(default_factory=dict)


def parse_endpoint(text: str) -> Target:
    """`HOST:PORT` (IPv6 as `[::1]:9100`) as a target; ValueError saying what is wrong otherwise."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return Target(text.strip())


def load_targets(path: Path) -> list[Target]:
    """The targets of a Prometheus file-based service-discovery file (JSON: [{"targets": [...], "labels": {}}])."""
    try:
        raw = json_depth.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(raw, list):
        raise ValueError(f"{path}: a file-SD file is a JSON list of {{\"targets\": [...], \"labels\": {{...}}}}")
    found: list[Target] = []
    for i, group in enumerate(raw):
        where = f"{path}: [{i}]"
        if not isinstance(group, dict) or not isinstance(group.get("targets"), list):
            raise ValueError(f"{where}: needs \"targets\", a list of \"host:port\"")
        labels = group.get("labels", {})
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise ValueError(f"{where}.labels: must map names to strings")
        for j, address in enumerate(group["targets"]):
            if not isinstance(address, str):
                raise ValueError(f"{where}.targets[{j}]: must be a string \"host:port\"")
            try:
                found.append(Target(parse_endpoint(address).address, dict(labels)))
            except ValueError as exc:
                raise ValueError(f"{where}.targets[{j}]: {exc}") from None
    return found


# --- scraping --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scrape:
    """One target's exposition at one moment (`at`: time.monotonic()), or the reason it could not be read."""

    target: Target
    at: float
    samples: Samples | None
    error: str = ""

    @property
    def node(self) -> str:
        """The node's name: `hivemesh_node_info{node}`, else the discovery label `node`, else the address."""
        for (name, labels), _v in (self.samples or {}).items():
            if name == "hivemesh_node_info":
                node = dict(labels).get("node", "")
                if node:
                    return node
        return self.target.labels.get("node", "") or self.target.address


def parse_exposition(text: str) -> dict[tuple[str, Labels], float]:
    """Every sample of a text exposition keyed by (sample name, sorted labels); `_created` samples dropped, and
    samples that are not finite (NaN, ±Inf: no hivemesh family exports one) too, so one odd target can neither
    stop the view (an infinite breaker state raised OverflowError) nor put NaN in `--json` output."""
    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            value = float(s.value)
            if s.name.endswith("_created") or not math.isfinite(value):
                continue
            samples[(s.name, tuple(sorted(s.labels.items())))] = value
    return samples


def scrape(target: Target, *, timeout: float = 2.0) -> Scrape:
    """GET http://target/metrics and parse it; a failure is recorded on the Scrape, never raised."""
    at = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://{target.address}/metrics", timeout=timeout) as resp:
            body = resp.read(_MAX_BODY + 1)
        if len(body) > _MAX_BODY:
            return Scrape(target, at, None, f"exposition larger than {_MAX_BODY} bytes")
        return Scrape(target, at, parse_exposition(body.decode("utf-8")))
    except (OSError, urllib.error.URLError, http.client.HTTPException) as exc:
        return Scrape(target, at, None, str(getattr(exc, "reason", exc)) or type(exc).__name__)
    except ValueError as exc:  # not the text format
        return Scrape(target, at, None, f"not a Prometheus exposition: {exc}")


def scrape_all(targets: Sequence[Target], *, timeout: float = 2.0) -> list[Scrape]:
    """Every target at once (a slow node costs one timeout, not one per node)."""
    if not targets:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(targets))) as pool:
        return list(pool.map(lambda t: scrape(t, timeout=timeout), targets))


# --- the computation -------------------------------------------------------------------------------------------------
def quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The q-quantile from cumulative bucket counts [(upper bound, count)], as PromQL's histogram_quantile: linear
    inside the bucket the rank falls in, the highest finite bound if it falls in +Inf; None without observations."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in ordered:
        if count >= rank:
            if math.isinf(upper):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


@dataclass
class Row:
    """One line of the view: a capability (instance "") or one instance of it."""

    capability: str
    instance: str = ""
    calls_per_s: float | None = None
    """None when the rate is unknown (the node was not scraped twice)."""
    error_pct: float | None = None
    """Share of calls that ended with a code other than OK, in percent; None without calls."""
    p50_ms: float | None = None
    p99_ms: float | None = None
    breaker: str = ""
    """closed, half-open or open; "" when no caller reports a breaker for it."""
    in_flight: int = 0
    queue: int = 0
    tokens_per_s: float | None = None
    cost_per_min: dict[str, float] = field(default_factory=dict)
    """Spend per minute by currency."""
    scraped: bool = True
    """False for an instance known only from a caller's breaker."""
    instances: list[Row] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "capability": self.capability, "calls_per_s": _round(self.calls_per_s),
            "error_pct": _round(self.error_pct), "p50_ms": _round(self.p50_ms), "p99_ms": _round(self.p99_ms),
            "breaker": self.breaker, "in_flight": self.in_flight, "queue": self.queue,
            "tokens_per_s": _round(self.tokens_per_s),
            "cost_per_min": {k: round(v, 6) for k, v in sorted(self.cost_per_min.items())},
        }
        if self.instance:
            doc = {"instance": self.instance, "scraped": self.scraped, **doc}
            del doc["capability"]
        else:
            doc["instances"] = [i.to_json() for i in self.instances]
        return doc

    def sort_value(self, key: str) -> float:
        if key == "calls":
            return self.calls_per_s or 0.0
        if key == "errors":
            return self.error_pct or 0.0
        if key == "p99":
            return self.p99_ms or 0.0
        if key == "cost":
            return sum(self.cost_per_min.values())
        raise ValueError(f"cannot sort by {key!r}; use one of {', '.join(SORT_KEYS)}")


def _round(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else round(v, 3)


@dataclass(frozen=True)
class TargetState:
    address: str
    node: str
    up: bool
    error: str


@dataclass
class View:
    """The whole picture at one moment: capability rows (each with its instances), totals and target health."""

    direction: str
    rows: list[Row]
    total: Row
    targets: list[TargetState]

    def sorted(self, key: str) -> View:
        """Rows (and each capability's instances) by key, largest first; ties by name."""
        rows = [replace(r, instances=sorted(r.instances, key=lambda i: (-i.sort_value(key), i.instance)))
                for r in sorted(self.rows, key=lambda r: (-r.sort_value(key), r.capability))]
        return View(self.direction, rows, self.total, self.targets)

    def to_json(self) -> dict[str, Any]:
        return {
            "direction": self.direction,
            "targets": [{"address": t.address, "node": t.node, "up": t.up, "error": t.error} for t in self.targets],
            "capabilities": [r.to_json() for r in self.rows],
            "total": {"calls_per_s": _round(self.total.calls_per_s), "tokens_per_s": _round(self.total.tokens_per_s),
                      "cost_per_min": {k: round(v, 6) for k, v in sorted(self.total.cost_per_min.items())}},
        }


class _Window:
    """One target's two scrapes: increases of counters between them, current gauges from the later one."""

    def __init__(self, before: Scrape | None, after: Scrape) -> None:
        self.now: Samples = after.samples or {}
        self.then: Samples | None = before.samples if before is not None else None
        self.seconds = after.at - before.at if before is not None else 0.0
        restarted = False
        if self.then is not None:
            started = [s.get(("hivemesh_node_start_time_seconds", ()), 0.0) for s in (self.then, self.now)]
            restarted = started[0] != started[1]
        self.restarted = restarted

    @property
    def has_rates(self) -> bool:
        return self.then is not None and self.seconds > 0

    def increase(self, key: tuple[str, Labels]) -> float:
        """How much a counter grew (a series new since the first scrape grew from 0; a reset from 0)."""
        now = self.now.get(key, 0.0)
        if self.then is None or self.restarted:
            return now
        then = self.then.get(key, 0.0)
        return now if now < then else now - then


def _select(samples: Samples, name: str, **want: str) -> Iterable[tuple[tuple[str, Labels], dict[str, str]]]:
    for key in samples:
        if key[0] != name:
            continue
        labels = dict(key[1])
        if all(labels.get(k, "") == v for k, v in want.items()):
            yield key, labels


@dataclass
class _Acc:
    """Per-second rates (summed over series, and over nodes for a capability) and current gauges."""

    rated: bool = False
    """False when some part had no earlier scrape to diff against: rates unknown."""
    calls: float = 0.0
    failed: float = 0.0
    buckets: dict[float, float] = field(default_factory=lambda: defaultdict(float))
    in_flight: float = 0.0
    queue: float = 0.0
    breaker: int | None = None
    tokens: float = 0.0
    cost: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, other: _Acc) -> None:
        self.rated = self.rated or other.rated
        self.calls += other.calls
        self.failed += other.failed
        for le, v in other.buckets.items():
            self.buckets[le] += v
        self.in_flight += other.in_flight
        self.queue += other.queue
        self.tokens += other.tokens
        for cur, v in other.cost.items():
            self.cost[cur] += v

    def row(self, capability: str, instance: str = "", *, scraped: bool = True) -> Row:
        rated = self.rated
        return Row(
            capability=capability, instance=instance,
            calls_per_s=self.calls if rated else None,
            error_pct=100 * self.failed / self.calls if rated and self.calls > 0 else None,
            p50_ms=_ms(quantile(0.5, self.buckets.items())), p99_ms=_ms(quantile(0.99, self.buckets.items())),
            breaker=BREAKER_STATES.get(self.breaker, "") if self.breaker is not None else "",
            in_flight=int(self.in_flight), queue=int(self.queue),
            tokens_per_s=self.tokens if rated else None,
            cost_per_min={k: 60 * v for k, v in self.cost.items()} if rated else {},
            scraped=scraped,
        )


def _bound(text: str | None) -> float | None:
    try:
        le = float(text) if text is not None else None
    except ValueError:
        return None
    return None if le is None or math.isnan(le) else le


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _same_instance(node: str, instance: str) -> bool:
    """A breaker's `peer_instance` label names a node called `<agent>/<instance id>`: the label is that same key (a
    bare instance id from nodes before 5 Dec 2026)."""
    return bool(instance) and (node == instance or node.endswith("/" + instance))


def compute(before: Sequence[Scrape], after: Sequence[Scrape], *, direction: str = "inbound") -> View:
    """The view from two rounds of scrapes of the same targets (before may be empty: gauges only, no rates)."""
    earlier = {s.target.address: s for s in before if s.samples is not None}
    caps: dict[str, dict[str, _Acc]] = defaultdict(dict)  # capability -> node -> its rates and gauges
    spend: dict[str, _Acc] = {}  # node -> its model tokens and cost rates
    breakers: dict[tuple[str, str], int] = {}  # (capability, instance id or "") -> worst state any caller reports
    for scraped in after:
        if scraped.samples is None:
            continue
        node, w = scraped.node, _Window(earlier.get(scraped.target.address), scraped)
        per_s = 1 / w.seconds if w.has_rates else 0.0
        mine = spend[node] = _Acc(rated=w.has_rates)
        for key, _labels in _select(w.now, "hivemesh_llm_tokens_total"):
            mine.tokens += w.increase(key) * per_s
        for key, labels in _select(w.now, "hivemesh_llm_cost_total"):
            mine.cost[labels.get("currency", "")] += w.increase(key) * per_s
        for key, labels in _select(w.now, "hivemesh_breaker_state"):
            # `peer_instance`; `instance` from nodes before 6 Dec 2026 (read directly, never renamed by a scrape).
            k = (labels.get("capability", ""), labels.get("peer_instance", labels.get("instance", "")))
            breakers[k] = max(breakers.get(k, 0), int(w.now[key]))

        def acc(labels: Mapping[str, str], node: str = node, rated: bool = w.has_rates) -> _Acc:
            return caps[labels.get("capability", "")].setdefault(node, _Acc(rated=rated))

        for key, labels in _select(w.now, "hivemesh_requests_total", direction=direction):
            a, n = acc(labels), w.increase(key) * per_s
            a.calls += n
            if labels.get("code") != "OK":
                a.failed += n
        for key, labels in _select(w.now, "hivemesh_request_duration_seconds_bucket", direction=direction):
            le = _bound(labels.get("le"))
            if le is not None:  # a bucket with no bound (not from a hivemesh node) says nothing
                acc(labels).buckets[le] += w.increase(key) * per_s
        for key, labels in _select(w.now, "hivemesh_requests_in_flight", direction=direction):
            acc(labels).in_flight += w.now[key]
        if direction == "inbound":  # the admission queue is per agent, in front of every capability it serves
            queued = sum(w.now[key] for key, _labels in _select(w.now, "hivemesh_admission_queue_depth"))
            for per_node in caps.values():
                if node in per_node:  # only onto rows the node already has
                    per_node[node].queue += queued
    rows: list[Row] = []
    for capability in sorted(set(caps) | {c for c, _i in breakers}):
        per_node = caps.get(capability, {})
        total = _Acc()
        instances: list[Row] = []
        for node, a in sorted(per_node.items()):
            a.tokens, a.cost = spend[node].tokens, spend[node].cost
            a.breaker = max((s for (c, i), s in breakers.items() if c == capability and _same_instance(node, i)),
                            default=None)
            instances.append(a.row(capability, node))
            total.add(a)
        # Instances only a caller's breaker knows (for example a node that no longer answers scrapes).
        for (c, instance), state in sorted(breakers.items()):
            if c == capability and instance and not any(_same_instance(n, instance) for n in per_node):
                instances.append(_Acc(breaker=state).row(capability, instance, scraped=False))
        total.breaker = breakers.get((capability, ""))
        row = total.row(capability)
        row.instances = instances
        rows.append(row)
    everything = _Acc()
    for a in spend.values():
        everything.add(a)
    for r in rows:
        everything.calls += r.calls_per_s or 0.0
    return View(direction, rows, everything.row(""),
                [TargetState(s.target.address, s.node, s.samples is not None, s.error) for s in after])

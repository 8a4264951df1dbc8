"""The traffic policy kinds: routes, retries, timeouts, breakers, ratelimits, concurrency.

Each is a `hivemesh.mesh.policy.PolicyKind` (listed in `TRAFFIC_KINDS`): a JSON Schema for `spec`, per-document checks,
and a compiler into an immutable `Table` the call path reads. Every document targets capabilities by glob
(`capabilities`, default every capability); the inbound kinds (ratelimits, concurrency) also pick the agents
that enforce them (`agents`). When several documents of a kind match a call, the most specific one wins: an
exact name beats a glob, a longer literal part beats a shorter one, then the capability pattern counts before
the agent pattern. Two documents of one kind with the very same target are refused as ambiguous.

Examples (YAML):

    kind: routes                       kind: retries                     kind: ratelimits
    name: extract-canary               name: default                     name: extract
    spec:                              spec:                             spec:
      capabilities: [extract]            attempts: 3                       agents: [extractor]
      load_balancer: least_outstanding   per_try_timeout_ms: 500           capabilities: [extract]
      rules:                             retryable_codes: [UNAVAILABLE]    cluster_total_rps: 300
        - name: canary                   backoff: {base_ms: 25, max_ms: 500} per_identity_rps: 50  # cluster-wide
          split:                         budget: {ratio: 0.2}
            - {weight: 90, version: "1.*"}
            - {weight: 10, version: "2.*"}
      fallback: extract-lite
      cache: {ttl_s: 300}
      shadow: {version: "3.*", percent: 10}   # mirror 10% to 3.*, compare (idempotent capabilities only)

`rollouts` (read by the control-plane leader, not by nodes) steps a canary's weight in a routes document:
see `hivemesh.controlplane.rollouts` and docs/rollouts.md.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Literal, TypeVar

import grpc

from hivemesh.mesh.globs import Globs
from hivemesh.mesh.policy import Mistakes, PolicyDoc, PolicyKind
from hivemesh.mesh.resilience.balancer import MODES, ROUND_ROBIN
from hivemesh.mesh.resilience.breaker import DEFAULT_FAILURE_CODES, BreakerPolicy
from hivemesh.mesh.resilience.concurrency import ConcurrencyPolicy, PriorityClass
from hivemesh.mesh.resilience.ratelimit import IdentityOverride, RateLimitPolicy
from hivemesh.mesh.resilience.retry import NEVER_RETRIED, Backoff, RetryPolicy
from hivemesh.mesh.resilience.routes import RoutePolicy, RouteRule, ShadowRule, Subset

T = TypeVar("T")

_NAME: Final = "^[a-z0-9][a-z0-9._-]{0,62}$"
_GLOB: Final = {"type": "string", "minLength": 1, "maxLength": 128, "pattern": r"^[a-z0-9*?.\[\]!_-]+$"}
_TARGETS: Final = {"type": "array", "minItems": 1, "maxItems": 64, "uniqueItems": True, "items": _GLOB}
_MS: Final = {"type": "integer", "minimum": 1, "maximum": 3_600_000}
_CODE_NAMES: Final = [c.name for c in grpc.StatusCode if c is not grpc.StatusCode.OK]
_CODE_BY_NAME: Final = {c.name: c for c in grpc.StatusCode if c is not grpc.StatusCode.OK}
_CODES: Final = {"type": "array", "minItems": 1, "uniqueItems": True, "items": {"enum": _CODE_NAMES}}
_LABELS: Final = {
    "type": "object", "maxProperties": 16,
    "additionalProperties": {"type": "string", "maxLength": 256},
}
_VERSION: Final = {"type": "string", "minLength": 1, "maxLength": 64}


def _obj(properties: Mapping[str, Any], *, required: Sequence[str] = (), **extra: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": dict(properties)}
    if required:
        schema["required"] = list(required)
    schema.update(extra)
    return schema


# The checks run on specs the schema refused too (`check_any_spec`), so that one apply lists every mistake: each
# judges only the parts that are well formed (a wrong type is the schema's to report) and never assumes a field.
def _num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _mappings(value: Any) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """(index, item) of each mapping in value, when value is a list."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, dict):
                yield i, item


# --- targeting ----------------------------------------------------------------------------------------------------
def _specificity(pattern: str) -> tuple[int, int]:
    glob = any(c in pattern for c in "*?[")
    literal = sum(1 for c in pattern if c not in "*?[]!")
    return (0 if glob else 1, literal)


@dataclass(frozen=True)
class _Target(Generic[T]):
    cap: re.Pattern[str]
    cap_rank: tuple[int, int]
    agent: re.Pattern[str]
    agent_rank: tuple[int, int]
    value: T
    doc: str


@dataclass(frozen=True)
class Table(Generic[T]):
    """Documents of one kind compiled for lookup by (agent, capability); lookups are memoized.

    Immutable as far as anyone can see: the memo only caches what `lookup` computes from the frozen targets.
    """

    targets: tuple[_Target[T], ...] = ()
    _memo: dict[tuple[str, str], T | None] = field(default_factory=dict, compare=False, repr=False)

    def lookup(self, capability: str, agent: str = "") -> T | None:
        key = (agent, capability)
        try:
            return self._memo[key]
        except KeyError:
            pass
        best: _Target[T] | None = None
        for t in self.targets:
            if not t.cap.fullmatch(capability) or (agent and not t.agent.fullmatch(agent)):
                continue
            if best is None or (t.cap_rank, t.agent_rank) > (best.cap_rank, best.agent_rank):
                best = t
        value = best.value if best is not None else None
        if len(self._memo) > 4096:
            self._memo.clear()
        self._memo[key] = value
        return value

    def __len__(self) -> int:
        return len({t.doc for t in self.targets})

    def __bool__(self) -> bool:
        # Same truth as len() > 0 (every target comes from a document), without building a set: every policy
        # lookup on the call path tests a table's truth first.
        return bool(self.targets)


def _compile_table(
    kind: str, docs: Mapping[str, PolicyDoc], build: Callable[[PolicyDoc], T], *, with_agents: bool = False,
    by: Literal["capabilities", "agents"] = "capabilities",
) -> Table[T]:
    """The documents' targets; PolicyError naming, in each document, every target another one has too (by: the
    field a clash is reported in)."""
    targets: list[_Target[T]] = []
    owner: dict[tuple[str, str], tuple[str, str]] = {}  # (agent, capability) -> (document, its field)
    clashes = Mistakes()
    for doc in sorted(docs.values(), key=lambda d: d.name):
        value = build(doc)
        caps = list(doc.spec.get("capabilities", ["*"]))
        agents = list(doc.spec.get("agents", ["*"])) if with_agents else ["*"]
        for ci, cap in enumerate(caps):
            for ai, agent in enumerate(agents):
                index = ci if by == "capabilities" else ai
                where = f"spec.{by}[{index}]" if by in doc.spec else f"spec.{by}"  # absent: every one, by default
                other = owner.get((agent, cap))
                if other is not None:
                    what = (f"{cap!r}" + (f" on agents {agent!r}" if with_agents else "")) if by == "capabilities" \
                        else f"agents {agent!r}"
                    for (mine, path), theirs in (((doc.name, where), other[0]), (other, doc.name)):
                        clashes.add(path, f"{kind}/{mine} and {kind}/{theirs} both target {what}: which one applies "
                                          "would be ambiguous", document=mine)
                    continue
                owner[(agent, cap)] = (doc.name, where)
                targets.append(
                    _Target(
                        re.compile(fnmatch.translate(cap)), _specificity(cap),
                        re.compile(fnmatch.translate(agent)), _specificity(agent), value, doc.name,
                    )
                )
    clashes.raise_any()
    return Table(tuple(targets))


def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern))


def _codes(names: Sequence[str]) -> frozenset[grpc.StatusCode]:
    return frozenset(grpc.StatusCode[n] for n in names)


# --- routes ----------------------------------------------------------------------------------------------------------
_SUBSET = _obj({"version": _VERSION, "labels": _LABELS}, minProperties=1)
_SPLIT = _obj({"weight": {"type": "integer", "minimum": 0, "maximum": 10_000}, "version": _VERSION,
               "labels": _LABELS}, required=["weight"])
_RULE = _obj({
    "name": {"type": "string", "minLength": 1, "maxLength": 63},
    "match": _obj({"metadata": {"type": "object", "minProperties": 1, "maxProperties": 16,
                                "additionalProperties": {"type": "string", "maxLength": 256}}}),
    "pin": _SUBSET,
    "split": {"type": "array", "minItems": 1, "maxItems": 16, "items": _SPLIT},
})
ROUTES_SCHEMA: Final = _obj({
    "capabilities": _TARGETS,
    "load_balancer": {"enum": list(MODES)},
    "rules": {"type": "array", "maxItems": 32, "items": _RULE},
    "fallback": {"type": "string", "pattern": _NAME},
    "cache": _obj({"ttl_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 86_400},
                   "max_entries": {"type": "integer", "minimum": 1, "maximum": 100_000}}),
    "shadow": _obj({
        "version": _VERSION, "labels": _LABELS,
        "percent": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
        "sandbox": {"type": "boolean"},
        "timeout_ms": _MS,
        "max_in_flight": {"type": "integer", "minimum": 1, "maximum": 1000},
        "compare": {"enum": ["json", "exact"]},
    }, required=["percent"]),
})


def _check_routes(doc: PolicyDoc) -> None:
    spec, found = doc.spec, Mistakes()
    for i, rule in _mappings(spec.get("rules")):
        if "pin" in rule and "split" in rule:
            found.add(f"spec.rules[{i}]", "give pin or split, not both")
        split = rule.get("split")
        weights = [s.get("weight") for _j, s in _mappings(split)]
        if isinstance(split, list) and split and len(weights) == len(split) and all(w == 0 for w in weights):
            found.add(f"spec.rules[{i}].split", "weights must not all be 0")
        for j, s in _mappings(split):
            if "version" not in s and "labels" not in s:
                found.add(f"spec.rules[{i}].split[{j}]", "needs a version or labels to select instances")
    shadow = spec.get("shadow")
    if isinstance(shadow, dict) and "version" not in shadow and "labels" not in shadow:
        found.add("spec.shadow", "needs a version or labels to select the candidate instances")
    fallback, caps = spec.get("fallback"), spec.get("capabilities")
    if isinstance(fallback, str) and isinstance(caps, list) and fallback in caps:
        found.add("spec.fallback", "a capability cannot fall back to itself")
    found.raise_any()


def _subset(raw: Mapping[str, Any]) -> Subset:
    version = raw.get("version")
    labels = tuple(sorted(raw.get("labels", {}).items()))
    text = " ".join([*([f"version {version}"] if version else []), *(f"{k}={v}" for k, v in labels)])
    return Subset(_glob(version) if version else None, labels, text)


def _route(doc: PolicyDoc) -> RoutePolicy:
    spec = doc.spec
    rules = []
    for i, r in enumerate(spec.get("rules", [])):
        rules.append(RouteRule(
            name=r.get("name", f"rules[{i}]"),
            metadata=tuple((k, _glob(v)) for k, v in sorted(r.get("match", {}).get("metadata", {}).items())),
            pin=_subset(r["pin"]) if "pin" in r else None,
            split=tuple((s["weight"], _subset(s)) for s in r.get("split", [])),
        ))
    cache = spec.get("cache")
    shadow = spec.get("shadow")
    return RoutePolicy(
        name=doc.name,
        load_balancer=spec.get("load_balancer", ROUND_ROBIN),
        rules=tuple(rules),
        fallback=spec.get("fallback"),
        cache_ttl_s=float(cache.get("ttl_s", 300)) if cache is not None else None,
        cache_max_entries=int(cache.get("max_entries", 1000)) if cache is not None else 1000,
        shadow=ShadowRule(
            _subset(shadow), float(shadow["percent"]), bool(shadow.get("sandbox", False)),
            shadow.get("timeout_ms", 2000) / 1000, int(shadow.get("max_in_flight", 8)), shadow.get("compare", "json"),
        ) if shadow is not None else None,
    )


ROUTES: Final[PolicyKind[Table[RoutePolicy]]] = PolicyKind(
    name="routes",
    spec_schema=ROUTES_SCHEMA,
    compile=lambda docs: _compile_table("routes", docs, _route),
    check=_check_routes,
    check_any_spec=True,
    description="per capability: weighted splits by version or label, pins, metadata matches, load balancer, "
                "fallback capability, cached last good response, shadow traffic to a candidate",
)


# --- retries -------------------------------------------------------------------------------------------------------
RETRIES_SCHEMA: Final = _obj({
    "capabilities": _TARGETS,
    "attempts": {"type": "integer", "minimum": 1, "maximum": 10},
    "per_try_timeout_ms": _MS,
    "backoff": _obj({"base_ms": {"type": "integer", "minimum": 0, "maximum": 60_000},
                     "max_ms": {"type": "integer", "minimum": 1, "maximum": 600_000},
                     "multiplier": {"type": "number", "minimum": 1, "maximum": 10},
                     "jitter": {"type": "number", "minimum": 0, "maximum": 1}}),
    "retryable_codes": _CODES,
    "budget": _obj({"ratio": {"type": "number", "minimum": 0, "maximum": 10},
                    "min_retries_per_s": {"type": "number", "minimum": 0, "maximum": 10_000},
                    "window_s": {"type": "number", "minimum": 1, "maximum": 600}}),
}, required=["attempts"])


def _check_retries(doc: PolicyDoc) -> None:
    found = Mistakes()
    codes = doc.spec.get("retryable_codes")
    for i, name in enumerate(codes if isinstance(codes, list) else []):
        code = _CODE_BY_NAME.get(name) if isinstance(name, str) else None  # another value: the schema's to name
        if code in NEVER_RETRIED:
            found.add(f"spec.retryable_codes[{i}]", f"{name} is never retried: the same request would fail the "
                      "same way (never INVALID_ARGUMENT, PERMISSION_DENIED, UNAUTHENTICATED, FAILED_PRECONDITION)")
    b = doc.spec.get("backoff")
    base: Any = b.get("base_ms", 25) if isinstance(b, dict) else None
    most: Any = b.get("max_ms") if isinstance(b, dict) else None
    if _num(base) and _num(most) and base > most:  # (no max_ms: it defaults to at least base_ms)
        found.add("spec.backoff.max_ms", "must be >= base_ms")
    found.raise_any()


def _retry(doc: PolicyDoc) -> RetryPolicy:
    s = doc.spec
    b = s.get("backoff", {})
    base = b.get("base_ms", 25) / 1000
    budget = s.get("budget", {})
    return RetryPolicy(
        attempts=s["attempts"],
        per_try_timeout_s=s["per_try_timeout_ms"] / 1000 if "per_try_timeout_ms" in s else None,
        backoff=Backoff(base, b.get("max_ms", max(1000, b.get("base_ms", 25))) / 1000, b.get("multiplier", 2.0),
                        b.get("jitter", 0.5)),
        retryable=_codes(s.get("retryable_codes", ["UNAVAILABLE"])),
        budget_ratio=budget.get("ratio", 0.2),
        budget_min_per_s=budget.get("min_retries_per_s", 1.0),
        budget_window_s=budget.get("window_s", 10.0),
    )


RETRIES: Final[PolicyKind[Table[RetryPolicy]]] = PolicyKind(
    name="retries",
    spec_schema=RETRIES_SCHEMA,
    compile=lambda docs: _compile_table("retries", docs, _retry),
    check=_check_retries,
    check_any_spec=True,
    description="attempts, per-try timeout, exponential backoff with jitter, retryable codes, retry budget",
)


# --- timeouts ------------------------------------------------------------------------------------------------------
TIMEOUTS_SCHEMA: Final = _obj({"capabilities": _TARGETS, "default_ms": _MS}, required=["default_ms"])

TIMEOUTS: Final[PolicyKind[Table[float]]] = PolicyKind(
    name="timeouts",
    spec_schema=TIMEOUTS_SCHEMA,
    compile=lambda docs: _compile_table("timeouts", docs, lambda d: d.spec["default_ms"] / 1000),
    description="the deadline of calls whose caller gave none (a caller's deadline always wins)",
)


# --- breakers ---------------------------------------------------------------------------------------------------------
_BREAKER_PROPS: Final = {
    "consecutive_failures": {"type": "integer", "minimum": 1, "maximum": 10_000},
    "failure_ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "window_s": {"type": "number", "minimum": 1, "maximum": 600},
    "min_calls": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
    "open_ms": _MS,
    "max_open_ms": _MS,
    "half_open_probes": {"type": "integer", "minimum": 1, "maximum": 100},
}
BREAKERS_SCHEMA: Final = _obj({
    "capabilities": _TARGETS,
    "failure_codes": _CODES,
    "instance": _obj({**_BREAKER_PROPS, "max_ejected_share": {"type": "number", "minimum": 0, "maximum": 1}}),
    "capability": _obj(_BREAKER_PROPS),
}, minProperties=1)


@dataclass(frozen=True)
class BreakerSettings:
    """The compiled breakers document for one capability."""

    name: str
    instance: BreakerPolicy | None
    capability: BreakerPolicy | None
    max_ejected_share: float = 0.5
    failure_codes: frozenset[grpc.StatusCode] = DEFAULT_FAILURE_CODES


def _check_breakers(doc: PolicyDoc) -> None:
    found = Mistakes()
    if "instance" not in doc.spec and "capability" not in doc.spec:
        found.add("spec", "give an instance breaker, a capability breaker, or both")
    for part in ("instance", "capability"):
        b = doc.spec.get(part)
        if not isinstance(b, dict):
            continue
        if "consecutive_failures" not in b and "failure_ratio" not in b:
            found.add(f"spec.{part}", "needs consecutive_failures or failure_ratio to know when to open")
        opens, most = b.get("open_ms", 5000), b.get("max_open_ms")
        if _num(opens) and _num(most) and most < opens:  # (no max_open_ms: it defaults to at least open_ms)
            found.add(f"spec.{part}.max_open_ms", "must be >= open_ms")
    found.raise_any()


def _breaker_policy(b: Mapping[str, Any] | None) -> BreakerPolicy | None:
    if b is None:
        return None
    open_ms = b.get("open_ms", 5000)
    return BreakerPolicy(
        consecutive_failures=b.get("consecutive_failures"),
        failure_ratio=b.get("failure_ratio"),
        window_s=b.get("window_s", 10.0),
        min_calls=b.get("min_calls", 20),
        open_s=open_ms / 1000,
        max_open_s=b.get("max_open_ms", max(60_000, open_ms)) / 1000,
        half_open_probes=b.get("half_open_probes", 1),
    )


def _breakers(doc: PolicyDoc) -> BreakerSettings:
    s = doc.spec
    return BreakerSettings(
        name=doc.name,
        instance=_breaker_policy(s.get("instance")),
        capability=_breaker_policy(s.get("capability")),
        max_ejected_share=float(s.get("instance", {}).get("max_ejected_share", 0.5)),
        failure_codes=_codes(s["failure_codes"]) if "failure_codes" in s else DEFAULT_FAILURE_CODES,
    )


BREAKERS: Final[PolicyKind[Table[BreakerSettings]]] = PolicyKind(
    name="breakers",
    spec_schema=BREAKERS_SCHEMA,
    compile=lambda docs: _compile_table("breakers", docs, _breakers),
    check=_check_breakers,
    check_any_spec=True,
    description="circuit breakers per target instance (with a maximum ejected share) and per capability",
)


# --- rate limits -----------------------------------------------------------------------------------------------------
_RPS: Final = {"type": "number", "minimum": 0, "maximum": 1_000_000}
RATELIMITS_SCHEMA: Final = _obj({
    "agents": _TARGETS,
    "capabilities": _TARGETS,
    "total_rps": _RPS,
    "cluster_total_rps": _RPS,
    "per_identity_rps": _RPS,
    "overrides": {"type": "array", "maxItems": 64, "items": _obj({
        "identities": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1, "maxLength": 512}},
        "rps": _RPS,
    }, required=["identities", "rps"])},
    "scope": {"enum": ["cluster", "instance"]},
    "burst_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 60},
})


def _check_ratelimits(doc: PolicyDoc) -> None:
    s, found = doc.spec, Mistakes()
    if "total_rps" in s and "cluster_total_rps" in s:
        found.add("spec.cluster_total_rps", "give total_rps (per instance) or cluster_total_rps, not both")
    if not any(k in s for k in ("total_rps", "cluster_total_rps", "per_identity_rps", "overrides")):
        found.add("spec", "needs a limit: total_rps, cluster_total_rps, per_identity_rps or overrides")
    if "scope" in s and not any(k in s for k in ("per_identity_rps", "overrides")):
        found.add("spec.scope", "scope applies to per_identity_rps and overrides, and there is neither (the total "
                                "is per instance as total_rps, or cluster-wide as cluster_total_rps)")
    found.raise_any()


def _ratelimit(doc: PolicyDoc) -> RateLimitPolicy:
    s = doc.spec
    return RateLimitPolicy(
        total_rps=s.get("total_rps"),
        cluster_total_rps=s.get("cluster_total_rps"),
        per_identity_rps=s.get("per_identity_rps"),
        overrides=tuple(
            IdentityOverride(Globs(o["identities"]), o["rps"])
            for o in s.get("overrides", [])
        ),
        identity_scope=s.get("scope", "cluster"),
        burst_s=s.get("burst_s", 0.1),
    )


RATELIMITS: Final[PolicyKind[Table[RateLimitPolicy]]] = PolicyKind(
    name="ratelimits",
    spec_schema=RATELIMITS_SCHEMA,
    compile=lambda docs: _compile_table("ratelimits", docs, _ratelimit, with_agents=True),
    check=_check_ratelimits,
    check_any_spec=True,
    description="token buckets per caller identity × capability with a total (per instance or cluster-wide)",
)


# --- concurrency ------------------------------------------------------------------------------------------------------
CONCURRENCY_SCHEMA: Final = _obj({
    "agents": _TARGETS,
    "max_in_flight": {"type": "integer", "minimum": 1, "maximum": 100_000},
    "max_queue": {"type": "integer", "minimum": 0, "maximum": 100_000},
    "queue_timeout_ms": {"type": "integer", "minimum": 0, "maximum": 600_000},
    "classes": {"type": "array", "maxItems": 16, "items": _obj({
        "name": {"type": "string", "pattern": _NAME},
        "min_priority": {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1},
        "reserved": {"type": "integer", "minimum": 0, "maximum": 100_000},
    }, required=["name", "min_priority"])},
}, required=["max_in_flight"])


def _check_concurrency(doc: PolicyDoc) -> None:
    s, found = doc.spec, Mistakes()
    classes = s.get("classes")
    seen: dict[str, int] = {}
    for i, c in _mappings(classes):
        n = c.get("name")
        if not isinstance(n, str):
            continue
        if n in seen:
            found.add(f"spec.classes[{i}].name", f"class {n!r} is defined twice (also classes[{seen[n]}])")
        else:
            seen[n] = i
    reserved = [c.get("reserved", 0) for _i, c in _mappings(classes)]
    if (isinstance(classes, list) and len(reserved) == len(classes) and all(_num(r) for r in reserved)
            and _num(s.get("max_in_flight")) and sum(reserved) >= s["max_in_flight"]):
        found.add("spec.classes", "reserved slots must add up to less than max_in_flight")
    found.raise_any()


def _concurrency(doc: PolicyDoc) -> ConcurrencyPolicy:
    s = doc.spec
    return ConcurrencyPolicy(
        max_in_flight=s["max_in_flight"],
        max_queue=s.get("max_queue", s["max_in_flight"]),
        queue_timeout_s=s.get("queue_timeout_ms", 1000) / 1000,
        classes=tuple(PriorityClass(c["name"], c["min_priority"], c.get("reserved", 0)) for c in s.get("classes", [])),
    )


def _compile_concurrency(docs: Mapping[str, PolicyDoc]) -> Table[ConcurrencyPolicy]:
    # One limit per agent: every capability of the agent shares it, so documents target agents only.
    plain = {n: PolicyDoc(d.kind, d.name, {**d.spec, "capabilities": ["*"]}, d.description) for n, d in docs.items()}
    return _compile_table("concurrency", plain, _concurrency, with_agents=True, by="agents")


CONCURRENCY: Final[PolicyKind[Table[ConcurrencyPolicy]]] = PolicyKind(
    name="concurrency",
    spec_schema=CONCURRENCY_SCHEMA,
    compile=_compile_concurrency,
    check=_check_concurrency,
    check_any_spec=True,
    description="a bounded number of calls in flight per agent, with priority classes; the excess is shed",
)

# --- rollouts -------------------------------------------------------------------------------------------------------
_PERCENT: Final = {"type": "integer", "minimum": 1, "maximum": 100}
ROLLOUTS_SCHEMA: Final = _obj({
    "capability": {"type": "string", "pattern": _NAME},
    "routes": {"type": "string", "pattern": _NAME},
    "stable": _SUBSET,
    "canary": _SUBSET,
    "steps": {"type": "array", "minItems": 1, "maxItems": 20, "items": _PERCENT},
    "interval_s": {"type": "number", "minimum": 0.05, "maximum": 86_400},
    "min_calls": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
    "max_error_rate": {"type": "number", "minimum": 0, "maximum": 1},
    "max_error_rate_increase": {"type": "number", "minimum": 0, "maximum": 1},
    "max_latency_ratio": {"type": "number", "minimum": 1, "maximum": 100},
}, required=["capability", "stable", "canary", "steps"])


@dataclass(frozen=True)
class RolloutSpec:
    """One compiled rollouts document: step `canary`'s weight in routes document `routes` through `steps` (%)."""

    name: str
    capability: str
    routes: str
    stable: Mapping[str, Any]
    canary: Mapping[str, Any]
    steps: tuple[int, ...]
    interval_s: float = 60.0
    min_calls: int = 20
    max_error_rate: float = 0.05
    max_error_rate_increase: float = 0.02
    max_latency_ratio: float = 1.5


def _check_rollouts(doc: PolicyDoc) -> None:
    spec, found = doc.spec, Mistakes()
    steps = spec.get("steps")
    if isinstance(steps, list) and steps and all(_num(step) for step in steps):
        for i in range(1, len(steps)):
            if steps[i] <= steps[i - 1]:
                found.add(f"spec.steps[{i}]", "steps must grow (e.g. 5, 25, 50, 100)")
        if steps[-1] != 100:
            found.add(f"spec.steps[{len(steps) - 1}]", "the last step must be 100 (the canary takes all traffic)")
    stable, canary = spec.get("stable"), spec.get("canary")
    if isinstance(stable, dict) and stable == canary:
        found.add("spec.canary", "the canary must select other instances than the stable version")
    found.raise_any()


def _rollout(doc: PolicyDoc) -> RolloutSpec:
    s = doc.spec
    return RolloutSpec(
        name=doc.name, capability=s["capability"], routes=s.get("routes", f"rollout-{doc.name}"),
        stable=dict(s["stable"]), canary=dict(s["canary"]), steps=tuple(s["steps"]),
        interval_s=float(s.get("interval_s", 60.0)), min_calls=int(s.get("min_calls", 20)),
        max_error_rate=float(s.get("max_error_rate", 0.05)),
        max_error_rate_increase=float(s.get("max_error_rate_increase", 0.02)),
        max_latency_ratio=float(s.get("max_latency_ratio", 1.5)),
    )


def _compile_rollouts(docs: Mapping[str, PolicyDoc]) -> Mapping[str, RolloutSpec]:
    out: dict[str, RolloutSpec] = {}
    owner: dict[str, str] = {}
    clashes = Mistakes()
    for doc in sorted(docs.values(), key=lambda d: d.name):
        spec = _rollout(doc)
        for fld, what in (("capability", f"capability {spec.capability!r}"),
                          ("routes", f"routes document {spec.routes!r}")):
            other = owner.setdefault(what, doc.name)
            if other != doc.name:
                for mine, theirs in ((doc.name, other), (other, doc.name)):
                    clashes.add(f"spec.{fld}", f"rollouts/{mine} and rollouts/{theirs} both drive {what}",
                                document=mine)
        out[doc.name] = spec
    clashes.raise_any()
    return out


ROLLOUTS: Final[PolicyKind[Mapping[str, RolloutSpec]]] = PolicyKind(
    name="rollouts",
    spec_schema=ROLLOUTS_SCHEMA,
    compile=_compile_rollouts,
    check=_check_rollouts,
    check_any_spec=True,
    description="automatic canary rollout: the control-plane leader steps a canary's routes weight while its error "
                "rate and latency stay within bounds of the stable version's, and rolls back when they do not",
)

TRAFFIC_KINDS: Final = (ROUTES, RETRIES, TIMEOUTS, BREAKERS, RATELIMITS, CONCURRENCY)
"""Every traffic kind: what a node's policy cache and the control plane's store are given."""

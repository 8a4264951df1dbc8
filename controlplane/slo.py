"""Service-level objectives as a policy kind (`slos`), rendered into Prometheus rules by one function.

Objectives and alerts cannot drift apart because the alerts are never written by hand: `render_rules` turns
the stored `slos` documents into recording rules (error and slow-call ratios per window) and the multi-window,
multi-burn-rate alerts of the Google SRE workbook (chapter 5, "Alerting on SLOs"): page when the error budget
burns fast over both a long and a short window, open a ticket when it burns slowly.

    kind: slos
    name: extract
    spec:
      objectives:
        - capability: extract
          availability: 0.999            # share of calls that did not fail on the agent's side
          latency: {threshold_ms: 500, target: 0.99}   # share of calls answered within 500 ms
          window_days: 28

Availability counts the codes that are the mesh's or the agent's fault (UNAVAILABLE, INTERNAL, UNKNOWN,
DEADLINE_EXCEEDED, DATA_LOSS, RESOURCE_EXHAUSTED when the agent is overloaded and sheds), except an UNAVAILABLE
STALE_REGISTRATION refusal (the call goes to another instance unrun); a caller's own mistakes
(INVALID_ARGUMENT, PERMISSION_DENIED, UNAUTHENTICATED, NOT_FOUND, FAILED_PRECONDITION) and a caller held to its
own quota (RESOURCE_EXHAUSTED RATE_LIMITED or TOKEN_BUDGET_EXCEEDED) spend no budget: one caller over its rate
limit must not page for a healthy capability.
The latency threshold must be one of the histogram's bucket bounds, so the ratio is exact, not interpolated.
A capability with calls and no failure has an error ratio of 0, not none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from hivemesh.mesh.errors import RateLimitedError, TokenBudgetExceededError
from hivemesh.mesh.metrics import LATENCY_BUCKETS
from hivemesh.mesh.policy import Mistakes, PolicyDoc, PolicyKind

KIND_NAME: Final = "slos"
ERROR_CODES: Final = ("UNAVAILABLE", "INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED", "DATA_LOSS", "RESOURCE_EXHAUSTED")
UNRUN_REASON: Final = "STALE_REGISTRATION"
"""An instance's refusal of a call routed by a registration of it that is gone: the caller sends the call to another
instance, unrun here, so it spends no budget (as in the HivemeshHighErrorRate alert and the dashboard)."""
CALLER_QUOTA_REASONS: Final = (RateLimitedError.reason, TokenBudgetExceededError.reason)
"""RESOURCE_EXHAUSTED refusals of one caller held to its own rate limit or token budget: the capability served
everyone else, so they spend no budget. OVERLOADED (the agent shed load) and any other RESOURCE_EXHAUSTED still do."""
NOT_SPENDING_REASONS: Final = (UNRUN_REASON, *CALLER_QUOTA_REASONS)
_THRESHOLDS_MS: Final = tuple(round(b * 1000, 3) for b in LATENCY_BUCKETS)


@dataclass(frozen=True)
class BurnAlert:
    """One row of the workbook's table: budget share spent over `long` (confirmed over `short`)."""

    severity: str
    budget_share: float
    long: str
    long_hours: float
    short: str


ALERT_WINDOWS: Final = (
    BurnAlert("page", 0.02, "1h", 1, "5m"),
    BurnAlert("page", 0.05, "6h", 6, "30m"),
    BurnAlert("ticket", 0.10, "1d", 24, "2h"),
    BurnAlert("ticket", 0.10, "3d", 72, "6h"),
)
RATE_WINDOWS: Final = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")

SPEC_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["objectives"],
    "additionalProperties": False,
    "properties": {
        "objectives": {
            "type": "array", "minItems": 1, "maxItems": 256,
            "items": {
                "type": "object",
                "required": ["capability"],
                "additionalProperties": False,
                "properties": {
                    "capability": {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,62}$"},
                    "availability": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                    "latency": {
                        "type": "object", "required": ["threshold_ms", "target"], "additionalProperties": False,
                        "properties": {
                            "threshold_ms": {"type": "number", "exclusiveMinimum": 0},
                            "target": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                        },
                    },
                    "window_days": {"type": "integer", "minimum": 1, "maximum": 90},
                },
            },
        }
    },
}


@dataclass(frozen=True)
class Objective:
    capability: str
    availability: float | None
    latency_threshold_s: float | None
    latency_target: float | None
    window_days: int


def _bucket_bound(threshold_ms: Any) -> bool:
    """Whether threshold_ms (a number the schema accepts) is one of the histogram's bucket bounds."""
    try:
        return round(float(threshold_ms), 3) in _THRESHOLDS_MS
    except OverflowError:  # an integer past any float (the schema sets no maximum): no bound is that large
        return False


def _check(doc: PolicyDoc) -> None:
    """Every objective's mistakes beyond the schema. It also runs on a spec the schema refused (`check_any_spec`),
    so it judges only the well-formed parts: a mistyped field is the schema's to name."""
    found = Mistakes()
    seen: dict[str, int] = {}
    objectives = doc.spec.get("objectives")
    for i, raw in enumerate(objectives if isinstance(objectives, list) else []):
        if not isinstance(raw, dict):
            continue
        path = f"spec.objectives[{i}]"
        if "availability" not in raw and "latency" not in raw:
            found.add(path, "an objective needs availability, latency or both")
        capability = raw.get("capability")
        if isinstance(capability, str):
            if capability in seen:
                found.add(f"{path}.capability", f"capability {capability!r} has two objectives here (also "
                                                 f"objectives[{seen[capability]}])")
            else:
                seen[capability] = i
        lat = raw.get("latency")
        threshold = lat.get("threshold_ms") if isinstance(lat, dict) else None
        if isinstance(threshold, int | float) and not isinstance(threshold, bool) and not _bucket_bound(threshold):
            shown = str(threshold) if len(str(threshold)) <= 24 else str(threshold)[:21] + "..."
            found.add(
                f"{path}.latency.threshold_ms",
                f"{shown} ms is not a histogram bucket bound; use one of "
                + ", ".join(f"{t:g}" for t in _THRESHOLDS_MS),
            )
    found.raise_any()


def objectives(docs: Mapping[str, PolicyDoc]) -> tuple[Objective, ...]:
    """Every objective of the stored documents, sorted by capability (one per capability across documents)."""
    out: dict[str, Objective] = {}
    for name in sorted(docs):
        for raw in docs[name].spec["objectives"]:
            lat = raw.get("latency")
            out.setdefault(raw["capability"], Objective(
                capability=raw["capability"],
                availability=float(raw["availability"]) if "availability" in raw else None,
                latency_threshold_s=float(lat["threshold_ms"]) / 1000 if lat else None,
                latency_target=float(lat["target"]) if lat else None,
                window_days=int(raw.get("window_days", 28)),
            ))
    return tuple(out[k] for k in sorted(out))


SLOS: Final[PolicyKind[tuple[Objective, ...]]] = PolicyKind(
    name=KIND_NAME,
    spec_schema=SPEC_SCHEMA,
    compile=objectives,
    check=_check,
    check_any_spec=True,
    description="availability and latency objectives per capability; `hivemesh slo rules` renders their alerts",
)


def _sel(capability: str, extra: str = "") -> str:
    return f'direction="inbound",capability="{capability}"{extra}'


def _le(seconds: float) -> str:
    """The `le` label value prometheus-client writes for a bucket bound (repr of the float)."""
    return repr(float(seconds))


def _burn_factor(alert: BurnAlert, window_days: int) -> float:
    """How many times faster than sustainable the budget burns when `budget_share` goes in `long_hours`."""
    return round(alert.budget_share * window_days * 24 / alert.long_hours, 4)


def render_rules(objs: Sequence[Objective]) -> dict[str, Any]:
    """A Prometheus rule file (as data: dump it as YAML) with one group of recording rules and one of alerts."""
    record: list[dict[str, Any]] = []
    alerts: list[dict[str, Any]] = []
    for o in objs:
        cap = o.capability
        for w in RATE_WINDOWS:
            total = f"sum(rate(hivemesh_requests_total{{{_sel(cap)}}}[{w}]))"
            if o.availability is not None:
                failed = _sel(cap, ',code=~"' + "|".join(ERROR_CODES)
                              + '",reason!~"' + "|".join(NOT_SPENDING_REASONS) + '"')
                # A code's series exists only from its first call: without `or`, a capability that never
                # failed would have no ratio at all (an empty graph, not 0).
                errors = f"sum(rate(hivemesh_requests_total{{{failed}}}[{w}]))"
                record.append({
                    "record": f"hivemesh:slo_errors:ratio_rate{w}",
                    "expr": f"({errors} or {total} * 0) / {total}",
                    "labels": {"capability": cap, "slo": "availability"},
                })
            if o.latency_threshold_s is not None:
                within = _sel(cap, ',le="' + _le(o.latency_threshold_s) + '"')
                fast = f"sum(rate(hivemesh_request_duration_seconds_bucket{{{within}}}[{w}]))"
                count = f"sum(rate(hivemesh_request_duration_seconds_count{{{_sel(cap)}}}[{w}]))"
                record.append({
                    "record": f"hivemesh:slo_slow:ratio_rate{w}",
                    "expr": f"1 - ({fast} / {count})",
                    "labels": {"capability": cap, "slo": "latency"},
                })
        for slo, series, objective in (
            ("availability", "hivemesh:slo_errors", o.availability),
            ("latency", "hivemesh:slo_slow", o.latency_target),
        ):
            if objective is None:
                continue
            budget = round(1 - objective, 6)
            for severity in ("page", "ticket"):
                rows = [a for a in ALERT_WINDOWS if a.severity == severity]
                match = f'{{capability="{cap}",slo="{slo}"}}'
                expr = " or ".join(
                    f"({series}:ratio_rate{a.long}{match} > ({_burn_factor(a, o.window_days)} * {budget})"
                    f" and {series}:ratio_rate{a.short}{match} > ({_burn_factor(a, o.window_days)} * {budget}))"
                    for a in rows
                )
                alerts.append({
                    "alert": f"HivemeshSLOBurn{'Fast' if severity == 'page' else 'Slow'}",
                    "expr": expr,
                    "labels": {"severity": "critical" if severity == "page" else "warning",
                               "capability": cap, "slo": slo},
                    "annotations": {
                        "summary": f"{cap}: {slo} error budget burning {'fast' if severity == 'page' else 'slowly'}",
                        "description": (
                            f"The {slo} objective of {cap} ({objective:g} over {o.window_days} d) is spending its "
                            f"error budget at a rate that exhausts it early ({severity} threshold)."
                        ),
                    },
                })
    return {"groups": [
        {"name": "hivemesh-slo-recording", "rules": record},
        {"name": "hivemesh-slo-alerts", "rules": alerts},
    ]}

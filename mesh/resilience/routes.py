"""Routes: which instances of a capability a call may go to (canary splits by version or label, pins,
metadata matches), plus where it goes when the capability cannot serve it (fallback, cached answer).

Rules are tried in order; the first whose `match` holds decides (a rule without `match` always holds); with
no rule holding, every live instance is eligible. A split picks its subset by smooth weighted round robin
(nginx's algorithm), so 90/10 means exactly 9 of every 10 calls, not 90% on average.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from hivemesh.mesh.resilience.balancer import ROUND_ROBIN


class _Instance(Protocol):
    @property
    def instance_id(self) -> str: ...

    @property
    def labels(self) -> Mapping[str, str]: ...


def instance_version(instance: object) -> str:
    card = getattr(instance, "card", None)
    return str(getattr(card, "version", "")) if card is not None else ""


@dataclass(frozen=True)
class Subset:
    """Instances whose card version matches `version` (a glob) and whose labels include `labels`."""

    version: re.Pattern[str] | None = None
    labels: tuple[tuple[str, str], ...] = ()
    text: str = ""

    def matches(self, instance: _Instance) -> bool:
        if self.version is not None and not self.version.fullmatch(instance_version(instance)):
            return False
        if self.labels:
            have = instance.labels
            card = getattr(instance, "card", None)
            card_labels: Mapping[str, str] = getattr(card, "labels", {}) if card is not None else {}
            for k, v in self.labels:
                if have.get(k, card_labels.get(k)) != v:
                    return False
        return True


@dataclass(frozen=True)
class RouteRule:
    name: str
    metadata: tuple[tuple[str, re.Pattern[str]], ...] = ()
    pin: Subset | None = None
    split: tuple[tuple[int, Subset], ...] = ()

    def holds(self, metadata: Callable[[], Mapping[str, str]]) -> bool:
        if not self.metadata:
            return True
        md = metadata()
        return all(k in md and p.fullmatch(md[k]) is not None for k, p in self.metadata)


@dataclass(frozen=True)
class ShadowRule:
    """Mirror `percent` of a capability's answered calls to the `subset` (the candidate), compare the answers.

    compare is "json" (equal parsed JSON, key order ignored) or "exact" (equal bytes). sandbox: the candidate
    has no real effects, so even a non-idempotent capability may be mirrored to it.
    """

    subset: Subset
    percent: float
    sandbox: bool = False
    timeout_s: float = 2.0
    max_in_flight: int = 8
    compare: str = "json"


@dataclass(frozen=True)
class RoutePolicy:
    """The compiled routes document in force for one capability."""

    name: str
    load_balancer: str = ROUND_ROBIN
    rules: tuple[RouteRule, ...] = ()
    fallback: str | None = None
    cache_ttl_s: float | None = None
    cache_max_entries: int = 1000
    shadow: ShadowRule | None = None

    @property
    def needs_metadata(self) -> bool:
        return any(r.metadata for r in self.rules)


class SplitState:
    """Smooth weighted round robin over a split's entries (mutable, one per rule in force)."""

    __slots__ = ("current",)

    def __init__(self, n: int) -> None:
        self.current = [0] * n

    def pick(self, weights: Sequence[int]) -> int:
        total = 0
        best = -1
        for i, w in enumerate(weights):
            self.current[i] += w
            total += w
            if w > 0 and (best < 0 or self.current[i] > self.current[best]):
                best = i
        if best >= 0:
            self.current[best] -= total
        return best


def select(
    policy: RoutePolicy,
    instances: Sequence[_Instance],
    metadata: Callable[[], Mapping[str, str]],
    state: Callable[[int, int], SplitState],
) -> tuple[list[_Instance], str]:
    """The eligible instances for one call and a label saying why ("rule canary → version 2.*").

    `state(rule_index, n)` returns the SplitState kept for that rule. An empty list means the route allows
    no live instance (a pin whose version is not running): the caller degrades or fails NO_LIVE_INSTANCE.
    A shadow's candidate instances never serve real calls: they are left out before any rule applies.
    """
    if policy.shadow is not None:
        candidate = policy.shadow.subset
        instances = [i for i in instances if not candidate.matches(i)]
    for index, rule in enumerate(policy.rules):
        if not rule.holds(metadata):
            continue
        if rule.pin is not None:
            return [i for i in instances if rule.pin.matches(i)], f"{rule.name}: pin {rule.pin.text}"
        if rule.split:
            groups = [[i for i in instances if subset.matches(i)] for _w, subset in rule.split]
            # Weight only subsets that have a live instance, so a canary with no instance up costs nothing.
            weights = [w if groups[k] else 0 for k, (w, _s) in enumerate(rule.split)]
            k = state(index, len(weights)).pick(weights)
            if k < 0:
                return [], f"{rule.name}: no split has a live instance"
            return groups[k], f"{rule.name}: split {rule.split[k][1].text}"
        return list(instances), rule.name
    return list(instances), ""

"""Rate limits: token buckets per caller identity × capability, under a total per capability (Linkerd-style).

A call must find a token both in its identity's bucket (fairness: one noisy caller cannot take everyone's
share) and in the capability's total bucket. A cluster-wide total is divided by the number of live instances
serving the capability, so the cluster as a whole admits about that rate as membership changes; so are the
per-identity limits unless their scope is "instance" (a caller spreading its calls over 3 replicas must not
get 3 times its limit). A refusal
says when a token will be there, which travels back as RetryInfo and `grpc-retry-pushback-ms`.

What `usage` reports as the limit is the policy in force when it is asked (`RateLimiter.follow`), not the one
the last call was checked against: a policy deleted or changed while no call comes must not show in
`hivemesh status` forever.

`usage` reports the capability's total; `identity_usage` the per-identity limit, which refuses the calls of one
noisy caller while the total shows room (see `IdentityUsage` for what it reports, and why).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hivemesh.mesh.globs import Globs
from hivemesh.mesh.resilience.window import WindowCounter

_MAX_BUCKETS = 10_000


class TokenBucket:
    """`rate` tokens per second up to `capacity`; starts full."""

    __slots__ = ("capacity", "rate", "refused", "stamp", "tokens")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.stamp = now
        self.refused = float("-inf")
        """When this bucket last refused a call (set only on a refusal: status counts the identities at their
        limit from it, off the call path)."""

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait_time(self, now: float, n: float = 1.0) -> float:
        """0.0 if n tokens are there now, else the seconds until they will be (inf if never)."""
        self._refill(now)
        if self.tokens >= n:
            return 0.0
        if self.rate <= 0:
            return float("inf")
        return (n - self.tokens) / self.rate

    def take(self, n: float = 1.0) -> None:
        self.tokens -= n

    def reshape(self, rate: float, capacity: float, now: float) -> None:
        """A changed limit applies from now on, keeping what the bucket holds (capped at the new capacity)."""
        self._refill(now)
        self.rate, self.capacity = rate, capacity
        self.tokens = min(self.tokens, capacity)


@dataclass(frozen=True)
class IdentityOverride:
    """A rate for the identities a list of names and globs matches: a set lookup for names, so an override of
    thousands of identities costs a call no more than one of a few (it is looked up on every call)."""

    identities: Globs
    rps: float


@dataclass(frozen=True)
class RateLimitPolicy:
    """Limits of one capability on the agent that enforces them (rates are calls per second)."""

    total_rps: float | None = None
    """All callers together, on this instance."""
    cluster_total_rps: float | None = None
    """All callers together, across every live instance (each instance enforces its share)."""
    per_identity_rps: float | None = None
    """Each caller identity (SPIFFE id), unless an override names it."""
    overrides: tuple[IdentityOverride, ...] = ()
    identity_scope: str = "cluster"
    """Of per_identity_rps and overrides: "cluster" (divided among live instances) or "instance"."""
    burst_s: float = 0.1
    """Bucket capacity as seconds of rate (at least one call)."""

    def __post_init__(self) -> None:
        if self.total_rps is not None and self.cluster_total_rps is not None:
            raise ValueError("give total_rps or cluster_total_rps, not both")
        for v in (self.total_rps, self.cluster_total_rps, self.per_identity_rps, *(o.rps for o in self.overrides)):
            if v is not None and v < 0:
                raise ValueError("rates must be >= 0")
        if self.burst_s <= 0:
            raise ValueError("burst_s must be positive")
        if self.identity_scope not in ("cluster", "instance"):
            raise ValueError("identity_scope must be 'cluster' or 'instance'")

    @property
    def shared(self) -> bool:
        """True when a limit is divided among the live instances (the enforcer must count them)."""
        per_identity = self.per_identity_rps is not None or bool(self.overrides)
        return self.cluster_total_rps is not None or (per_identity and self.identity_scope == "cluster")

    def identity_rate(self, identity: str, instances: int = 1) -> float | None:
        """This instance's rate for identity: its override or per_identity_rps, divided by the live instances
        when the scope is the cluster."""
        rate = self.per_identity_rps
        for o in self.overrides:
            if o.identities.match(identity):
                rate = o.rps
                break
        if rate is not None and self.identity_scope == "cluster":
            return rate / max(1, instances)
        return rate

    def local_total(self, instances: int) -> float | None:
        if self.cluster_total_rps is not None:
            return self.cluster_total_rps / max(1, instances)
        return self.total_rps

    def capacity(self, rate: float) -> float:
        return max(1.0, rate * self.burst_s)

    def default_identity_rate(self, instances: int = 1) -> float | None:
        """This instance's per_identity_rps (an identity without an override), its cluster share if so scoped."""
        if self.per_identity_rps is None:
            return None
        return self.per_identity_rps / max(1, instances) if self.identity_scope == "cluster" else self.per_identity_rps


@dataclass(frozen=True, slots=True)
class IdentityUsage:
    """The per-identity limit of one capability, as `hivemesh status` shows it.

    An operator who sees calls refused while the total has room needs to know that a per-identity limit did
    it, and whether one caller or many hit theirs: one is a noisy caller (the limit doing its job; give it an
    override if it deserves more), many is a per-identity limit set too low. So this reports the limit, the
    refusals it made and how many identities it refused, rather than the busiest identity's use: that would
    need a rate per identity counted on every call, and a bucket's level alone says little (it refills in
    burst_s).
    """

    rate: float = 0.0
    """This instance's limit for an identity without an override (cluster share included); 0.0: none."""
    overrides: int = 0
    """Identities (patterns) with a limit of their own in the policy."""
    limited: int = 0
    """Calls refused by the caller's own limit over the last 10 s (part of `usage`'s limited)."""
    identities: int = 0
    """Distinct caller identities refused by their own limit over the last 10 s."""


class RateLimiter:
    """Buckets of one serving node. `check` is O(1); idle full buckets are dropped when there are many."""

    _ADMITTED, _LIMITED, _LIMITED_IDENTITY = 0, 1, 2
    """Window kinds: admitted, refused by the total only, refused by the caller's own limit."""
    _WINDOW_S = 10.0

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._total: dict[str, TokenBucket] = {}
        self._ident: dict[tuple[str, str], TokenBucket] = {}
        self._windows: dict[str, WindowCounter] = {}
        self._last: dict[str, tuple[RateLimitPolicy, int]] = {}
        """capability -> (policy, instances) of the last call checked: what usage reports when nothing is
        followed."""
        self._policy_of: Callable[[str], RateLimitPolicy | None] | None = None
        self._instances: Callable[[str], int] | None = None

    def follow(
        self, policy_of: Callable[[str], RateLimitPolicy | None], instances: Callable[[str], int] | None = None
    ) -> None:
        """Make `usage` report the limit of the policy in force: policy_of(capability) (None: no policy), its
        cluster share divided by instances(capability) as `check`'s caller divides it.

        Asked when usage is (off the call path, by the status snapshot): only `check` hears of a policy, and it
        is never called for a capability whose policy was deleted, so what it saw last would stay forever.
        """
        self._policy_of, self._instances = policy_of, instances

    def _bucket(
        self, table: dict[Any, TokenBucket], key: Any, rate: float, capacity: float, now: float
    ) -> TokenBucket:
        b = table.get(key)
        if b is None:
            if len(table) >= _MAX_BUCKETS:
                self._sweep(table, now)
            b = table[key] = TokenBucket(rate, capacity, now)
        elif b.rate != rate or b.capacity != capacity:
            b.reshape(rate, capacity, now)
        return b

    @staticmethod
    def _sweep(table: dict[Any, TokenBucket], now: float) -> None:
        for key in [k for k, b in table.items() if b.wait_time(now, b.capacity) == 0.0]:
            del table[key]  # a full bucket is the same as a fresh one
        if len(table) >= _MAX_BUCKETS:
            table.clear()

    def check(self, policy: RateLimitPolicy, capability: str, identity: str, *, instances: int = 1) -> float:
        """0.0 if the call is admitted (tokens taken), else seconds until it could be."""
        now = self._clock()
        total_rate = policy.local_total(instances)
        ident_rate = policy.identity_rate(identity, instances)
        waits: list[float] = []
        tb = ib = None
        if self._policy_of is None:  # (a node's limiter follows the policies: nothing to keep)
            self._last[capability] = (policy, instances)
        if total_rate is not None:
            tb = self._bucket(self._total, capability, total_rate, policy.capacity(total_rate), now)
            waits.append(tb.wait_time(now))
        ident_wait = 0.0
        if ident_rate is not None:
            ib = self._bucket(self._ident, (capability, identity), ident_rate, policy.capacity(ident_rate), now)
            ident_wait = ib.wait_time(now)
            waits.append(ident_wait)
        window = self._windows.get(capability)
        if window is None:
            window = self._windows[capability] = WindowCounter(self._WINDOW_S, width=3, clock=self._clock)
        wait = max(waits, default=0.0)
        if wait > 0.0:
            if ident_wait > 0.0 and ib is not None:  # the caller's own limit: it would refuse it alone
                ib.refused = now
                window.add(self._LIMITED_IDENTITY)
            else:
                window.add(self._LIMITED)
            return wait
        if tb is not None:
            tb.take()
        if ib is not None:
            ib.take()
        window.add(self._ADMITTED)
        return 0.0

    def _in_force(self, capability: str) -> tuple[RateLimitPolicy | None, int]:
        """The policy of capability and its live instances: what `follow` finds now, else the last call's."""
        if self._policy_of is None:
            return self._last.get(capability, (None, 1))
        policy = self._policy_of(capability)
        if policy is None:
            return None, 1
        return policy, self._instances(capability) if self._instances is not None and policy.shared else 1

    def usage(self, capability: str) -> tuple[int, int, float]:
        """(admitted, limited by any limit) over the last 10 s and the local total rate in force (0.0 if none):
        of the policy `follow` finds now, else of the last call checked."""
        window = self._windows.get(capability)
        admitted, by_total, by_identity = window.totals() if window is not None else (0, 0, 0)
        policy, n = self._in_force(capability)
        total = policy.local_total(n) if policy is not None else None
        return admitted, by_total + by_identity, total if total is not None else 0.0

    def identity_usage(self) -> dict[str, IdentityUsage]:
        """`IdentityUsage` of every capability with a window (as `capabilities`), in one pass over the buckets:
        asked by the status snapshot, never on the call path."""
        since = self._clock() - self._WINDOW_S
        refused: dict[str, int] = {}
        for (cap, _identity), b in self._ident.items():
            if b.refused >= since:
                refused[cap] = refused.get(cap, 0) + 1
        out: dict[str, IdentityUsage] = {}
        for cap, window in self._windows.items():
            policy, n = self._in_force(cap)
            rate = policy.default_identity_rate(n) if policy is not None else None
            out[cap] = IdentityUsage(
                rate=rate if rate is not None else 0.0, overrides=len(policy.overrides) if policy is not None else 0,
                limited=window.total(self._LIMITED_IDENTITY), identities=refused.get(cap, 0),
            )
        return out

    def capabilities(self) -> list[str]:
        return sorted(self._windows)

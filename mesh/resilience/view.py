"""The policies in force on one node, read-only: O(1) lookups in the PolicyCache's compiled view.

Split from the mutable traffic state (`hivemesh.mesh.resilience.traffic`) so what a call reads (which policy
applies) and what it changes (breakers, budgets, counts) are separate objects with separate owners.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from hivemesh.mesh.policy import PolicyCache
from hivemesh.mesh.resilience.concurrency import ConcurrencyPolicy
from hivemesh.mesh.resilience.kinds import (
    BREAKERS,
    CONCURRENCY,
    RATELIMITS,
    RETRIES,
    ROUTES,
    TIMEOUTS,
    BreakerSettings,
    Table,
)
from hivemesh.mesh.resilience.ratelimit import RateLimitPolicy
from hivemesh.mesh.resilience.retry import RetryPolicy
from hivemesh.mesh.resilience.routes import RoutePolicy


class OutboundPolicies(NamedTuple):
    """The policies an outbound call of one capability follows (None: no policy of that kind names it)."""

    timeout: float | None
    routes: RoutePolicy | None
    breakers: BreakerSettings | None
    retries: RetryPolicy | None


NO_OUTBOUND_POLICIES: OutboundPolicies = OutboundPolicies(None, None, None, None)


class PolicyView:
    """What the policies in force say for a capability or agent; without a PolicyCache, nothing applies."""

    def __init__(self, policies: PolicyCache | None = None) -> None:
        self.policies = policies
        self._outbound_view: Mapping[str, Any] | None = None
        self._outbound: dict[str, OutboundPolicies] = {}

    @property
    def revision(self) -> int:
        """The etcd revision of the policies in force (0 without a policy cache)."""
        return self.policies.revision if self.policies is not None else 0

    def _table(self, kind_name: str) -> Table[Any] | None:
        if self.policies is None:
            return None
        table: Table[Any] | None = self.policies.view().get(kind_name)
        return table

    def outbound(self, capability: str) -> OutboundPolicies:
        """The outbound policies of capability: four lookups done once per capability and policy snapshot.

        Keyed on the compiled view's identity (the policy cache swaps in a new view on every change), so a
        changed policy applies to the very next call. All four None: no policy names the capability.
        """
        if self.policies is None:
            return NO_OUTBOUND_POLICIES
        view = self.policies.view()
        if view is not self._outbound_view:
            self._outbound_view, self._outbound = view, {}
        found = self._outbound.get(capability)
        if found is None:
            found = OutboundPolicies(
                self.timeout(capability), self.routes(capability), self.breakers(capability), self.retries(capability)
            )
            if len(self._outbound) > 4096:
                self._outbound.clear()
            self._outbound[capability] = found
        return found

    def routes(self, capability: str) -> RoutePolicy | None:
        t = self._table(ROUTES.name)
        return t.lookup(capability) if t else None

    def retries(self, capability: str) -> RetryPolicy | None:
        t = self._table(RETRIES.name)
        return t.lookup(capability) if t else None

    def timeout(self, capability: str) -> float | None:
        t = self._table(TIMEOUTS.name)
        return t.lookup(capability) if t else None

    def breakers(self, capability: str) -> BreakerSettings | None:
        t = self._table(BREAKERS.name)
        return t.lookup(capability) if t else None

    def ratelimit(self, agent: str, capability: str) -> RateLimitPolicy | None:
        t = self._table(RATELIMITS.name)
        return t.lookup(capability, agent) if t else None

    def concurrency(self, agent: str) -> ConcurrencyPolicy | None:
        t = self._table(CONCURRENCY.name)
        return t.lookup("*", agent) if t else None

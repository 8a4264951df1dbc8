"""A node's traffic state: the policies in force (read from the PolicyCache) and everything they act on.

One `Traffic` per MeshNode holds the mutable runtime state the policies drive (breakers, retry budgets, the
balancer, split positions, the response cache, rate-limit buckets, the in-flight gate) plus the recent
counts `hivemesh status` shows. Policy lookups are O(1) reads of the compiled view; state objects are keyed by
target and adopt a changed policy in place, so a policy change never resets what was learnt about health.
Everything here runs on the event loop thread: no locks.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from hivemesh.mesh.policy import PolicyCache
from hivemesh.mesh.resilience.balancer import Balancer
from hivemesh.mesh.resilience.breaker import BreakerPolicy, CircuitBreaker, State
from hivemesh.mesh.resilience.concurrency import ConcurrencyGate, ConcurrencyPolicy
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
from hivemesh.mesh.resilience.ratelimit import RateLimiter, RateLimitPolicy
from hivemesh.mesh.resilience.retry import RetryBudget, RetryPolicy
from hivemesh.mesh.resilience.routes import RoutePolicy, SplitState
from hivemesh.mesh.resilience.window import WindowCounter
from hivemesh.v1 import policy_pb2

_STATUS_WINDOW_S = 10.0


class _Counts:
    """Recent calls/failures/retries/degraded of one capability or instance, plus calls in flight."""

    __slots__ = ("in_flight", "window")
    CALLS, FAILURES, RETRIES, DEGRADED = 0, 1, 2, 3

    def __init__(self, clock: Callable[[], float]) -> None:
        self.window = WindowCounter(_STATUS_WINDOW_S, width=4, clock=clock)
        self.in_flight = 0


class ResponseCache:
    """Last good responses of cacheable capabilities, by input: bounded (LRU) and expiring (TTL)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[str, OrderedDict[bytes, tuple[float, Any]]] = {}
        self.hits = 0

    @staticmethod
    def key(content_type: str, payload: bytes) -> bytes:
        return hashlib.sha256(content_type.encode() + b"\0" + payload).digest()

    def put(self, capability: str, key: bytes, response: Any, max_entries: int) -> None:
        entries = self._entries.setdefault(capability, OrderedDict())
        entries[key] = (self._clock(), response)
        entries.move_to_end(key)
        while len(entries) > max_entries:
            entries.popitem(last=False)

    def get(self, capability: str, key: bytes, ttl_s: float) -> Any:
        """The response stored for key if it is younger than ttl_s, else None."""
        entries = self._entries.get(capability)
        entry = entries.get(key) if entries is not None else None
        if entry is None or self._clock() - entry[0] > ttl_s:
            return None
        self.hits += 1
        return entry[1]


class OutboundPolicies(NamedTuple):
    """The policies an outbound call of one capability follows (None: no policy of that kind names it)."""

    timeout: float | None
    routes: RoutePolicy | None
    breakers: BreakerSettings | None
    retries: RetryPolicy | None


NO_OUTBOUND_POLICIES: OutboundPolicies = OutboundPolicies(None, None, None, None)


class Traffic:
    """The resilience state of one node; see the module docstring."""

    def __init__(self, policies: PolicyCache | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.policies = policies
        self.clock = clock
        self.balancer = Balancer()
        self.cache = ResponseCache(clock=clock)
        self.limiter = RateLimiter(clock=clock)
        self._cap_breakers: dict[str, CircuitBreaker] = {}
        self._inst_breakers: dict[tuple[str, str], CircuitBreaker] = {}
        self._budgets: dict[str, RetryBudget] = {}
        self._splits: dict[tuple[str, str, int], tuple[RoutePolicy, SplitState]] = {}
        self._out: dict[str, _Counts] = {}
        self._out_inst: dict[tuple[str, str], _Counts] = {}
        self._in: dict[str, _Counts] = {}
        self._gates: dict[str, ConcurrencyGate] = {}
        self._outbound_view: Mapping[str, Any] | None = None
        self._outbound: dict[str, OutboundPolicies] = {}

    # --- policies in force (O(1) reads of the compiled view) ---------------------------------------------------
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

    # --- state --------------------------------------------------------------------------------------------------
    def capability_breaker(self, capability: str, policy: BreakerPolicy) -> CircuitBreaker:
        b = self._cap_breakers.get(capability)
        if b is None:
            b = self._cap_breakers[capability] = CircuitBreaker(policy, clock=self.clock)
        elif b.policy is not policy:
            b.configure(policy)
        return b

    def instance_breaker(self, capability: str, instance_id: str, policy: BreakerPolicy) -> CircuitBreaker:
        key = (capability, instance_id)
        b = self._inst_breakers.get(key)
        if b is None:
            if len(self._inst_breakers) > 10_000:
                self._inst_breakers = {k: v for k, v in self._inst_breakers.items() if v.state is not State.CLOSED}
            b = self._inst_breakers[key] = CircuitBreaker(policy, clock=self.clock)
        elif b.policy is not policy:
            b.configure(policy)
        return b

    def peek_instance_breaker(self, capability: str, instance_id: str) -> CircuitBreaker | None:
        return self._inst_breakers.get((capability, instance_id))

    def ejected_share_allows(self, capability: str, live_ids: Sequence[str], share: float) -> bool:
        """May one more instance of capability be ejected, with live_ids the live instances?"""
        ejected = sum(
            1 for i in live_ids
            if (b := self._inst_breakers.get((capability, i))) is not None and b.state is not State.CLOSED
        )
        total = len(live_ids)
        return ejected + 1 < total and (ejected + 1) <= share * total

    def budget(self, capability: str, policy: RetryPolicy) -> RetryBudget:
        b = self._budgets.get(capability)
        if b is None or b.window_s != policy.budget_window_s:
            b = self._budgets[capability] = RetryBudget(
                policy.budget_ratio, policy.budget_min_per_s, policy.budget_window_s, clock=self.clock
            )
        elif (b.ratio, b.min_per_s) != (policy.budget_ratio, policy.budget_min_per_s):
            b.configure(policy.budget_ratio, policy.budget_min_per_s)
        return b

    def split_state(self, capability: str, policy: RoutePolicy, rule: int, n: int) -> SplitState:
        key = (capability, policy.name, rule)
        entry = self._splits.get(key)
        if entry is None or entry[0] is not policy or len(entry[1].current) != n:
            entry = self._splits[key] = (policy, SplitState(n))
        return entry[1]

    def gate(self, agent: str, policy: ConcurrencyPolicy) -> ConcurrencyGate:
        g = self._gates.get(agent)
        if g is None:
            g = self._gates[agent] = ConcurrencyGate(policy)
        elif g.policy is not policy:
            g.configure(policy)
        return g

    def gate_of(self, agent: str) -> ConcurrencyGate | None:
        """The in-flight gate of agent, if a concurrency policy has applied to it yet."""
        return self._gates.get(agent)

    # --- counts for status ----------------------------------------------------------------------------------
    def _counts(self, table: dict[Any, _Counts], key: Any) -> _Counts:
        c = table.get(key)
        if c is None:
            if len(table) > 4096:
                table.clear()
            c = table[key] = _Counts(self.clock)
        return c

    def out_started(self, capability: str) -> None:
        c = self._counts(self._out, capability)
        c.in_flight += 1
        c.window.add(_Counts.CALLS)

    def out_finished(self, capability: str, *, failed: bool, retries: int, degraded: bool) -> None:
        c = self._counts(self._out, capability)
        c.in_flight = max(0, c.in_flight - 1)
        if failed:
            c.window.add(_Counts.FAILURES)
        if retries:
            c.window.add(_Counts.RETRIES, retries)
        if degraded:
            c.window.add(_Counts.DEGRADED)

    def attempt_started(self, capability: str, instance_id: str) -> None:
        self.balancer.started(instance_id)
        c = self._counts(self._out_inst, (capability, instance_id))
        c.in_flight += 1
        c.window.add(_Counts.CALLS)

    def attempt_finished(self, capability: str, instance_id: str, *, failed: bool) -> None:
        self.balancer.finished(instance_id)
        c = self._counts(self._out_inst, (capability, instance_id))
        c.in_flight = max(0, c.in_flight - 1)
        if failed:
            c.window.add(_Counts.FAILURES)

    def in_started(self, capability: str) -> None:
        c = self._counts(self._in, capability)
        c.in_flight += 1
        c.window.add(_Counts.CALLS)

    def in_finished(self, capability: str, *, failed: bool) -> None:
        c = self._counts(self._in, capability)
        c.in_flight = max(0, c.in_flight - 1)
        if failed:
            c.window.add(_Counts.FAILURES)

    # --- the status report ------------------------------------------------------------------------------------
    def snapshot(self, *, identity: str, instance: str, agent: str = "") -> policy_pb2.NodeTraffic:
        """What `hivemesh status` shows for this node, built off the call path every couple of seconds."""
        node = policy_pb2.NodeTraffic(
            identity=identity,
            instance=instance,
            updated_unix_ms=int(time.time() * 1000),
            policy_revision=self.policies.revision if self.policies is not None else 0,
        )
        by_cap_instances: dict[str, list[str]] = {}
        for cap, inst in list(self._out_inst) + list(self._inst_breakers):
            ids = by_cap_instances.setdefault(cap, [])
            if inst not in ids:
                ids.append(inst)
        for cap in sorted(set(self._out) | set(self._cap_breakers)):
            c = self._out.get(cap)
            calls, failures, retries, degraded = c.window.totals() if c else (0, 0, 0, 0)
            b = self._cap_breakers.get(cap)
            entry = node.capabilities.add(
                capability=cap, direction="outbound", breaker=b.state.value if b else "",
                in_flight=c.in_flight if c else 0, calls=calls, failures=failures,
                error_rate=failures / calls if calls else 0.0, retries=retries, degraded=degraded,
            )
            for inst in sorted(by_cap_instances.get(cap, [])):
                ic = self._out_inst.get((cap, inst))
                icalls, ifail, _r, _d = ic.window.totals() if ic else (0, 0, 0, 0)
                ib = self._inst_breakers.get((cap, inst))
                entry.instances.add(
                    instance=inst, breaker=ib.state.value if ib else "", in_flight=ic.in_flight if ic else 0,
                    calls=icalls, failures=ifail, error_rate=ifail / icalls if icalls else 0.0,
                )
        for cap in sorted(set(self._in) | set(self.limiter.capabilities())):
            c = self._in.get(cap)
            calls, failures, _r, _d = c.window.totals() if c else (0, 0, 0, 0)
            admitted, limited, limit = self.limiter.usage(cap)
            node.capabilities.add(
                capability=cap, direction="inbound", in_flight=c.in_flight if c else 0, calls=calls,
                failures=failures, error_rate=failures / calls if calls else 0.0, rate_limited=limited,
                limit_rps=limit, limiter_use=(admitted / _STATUS_WINDOW_S) / limit if limit else 0.0,
            )
        gate = self._gates.get(agent) if agent else None
        if gate is not None:
            node.concurrency.CopyFrom(policy_pb2.ConcurrencyStatus(
                max_in_flight=gate.policy.max_in_flight, in_flight=gate.in_flight, queued=gate.queued,
                shed=gate.shed,
            ))
        return node


def breaker_states(traffic: Traffic, capability: str) -> Mapping[str, str]:
    """instance id -> breaker state of capability's instances this node has a breaker for (for tests)."""
    return {i: b.state.value for (c, i), b in traffic._inst_breakers.items() if c == capability}

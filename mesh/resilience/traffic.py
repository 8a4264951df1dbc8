"""A node's traffic state: everything the policies act on, and what `hivemesh status` shows of it.

One `TrafficState` per MeshNode holds the mutable runtime state the policies drive (breakers, retry budgets,
the balancer, split positions, the response cache, rate-limit buckets, the in-flight gate) plus the recent
counts `hivemesh status` shows. Which policy applies is read from the read-only `PolicyView`
(`hivemesh.mesh.resilience.view`); `Traffic` pairs the two for the node. State objects are keyed by target and
adopt a changed policy in place, so a policy change never resets what was learnt about health.
Everything here runs on the event loop thread: no locks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hivemesh.mesh.resilience.balancer import Balancer
from hivemesh.mesh.resilience.breaker import BreakerPolicy, CircuitBreaker, State
from hivemesh.mesh.resilience.cache import ResponseCache
from hivemesh.mesh.resilience.concurrency import ConcurrencyGate, ConcurrencyPolicy
from hivemesh.mesh.resilience.ratelimit import IdentityUsage, RateLimiter
from hivemesh.mesh.resilience.retry import RetryBudget, RetryPolicy
from hivemesh.mesh.resilience.routes import RoutePolicy, SplitState
from hivemesh.mesh.resilience.view import PolicyView
from hivemesh.mesh.resilience.window import WindowCounter
from hivemesh.v1 import policy_pb2

_STATUS_WINDOW_S = 10.0


class _Counts:
    """Recent calls/failures/retries/degraded of one capability or instance, plus calls in flight."""

    __slots__ = ("in_flight", "window")
    CALLS, FAILURES, RETRIES, DEGRADED, ENDED, MICROS = 0, 1, 2, 3, 4, 5  # ENDED, MICROS: inbound latency

    def __init__(self, clock: Callable[[], float]) -> None:
        self.window = WindowCounter(_STATUS_WINDOW_S, width=6, clock=clock)
        self.in_flight = 0


class TrafficState:
    """The mutable resilience state of one node; see the module docstring."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
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

    # --- state --------------------------------------------------------------------------------------------------
    def capability_breaker(self, capability: str, policy: BreakerPolicy) -> CircuitBreaker:
        b = self._cap_breakers.get(capability)
        if b is None:
            b = self._cap_breakers[capability] = CircuitBreaker(policy, clock=self.clock)
        elif b.policy is not policy:
            b.configure(policy)
        return b

    def instance_breaker(self, capability: str, instance: str, policy: BreakerPolicy) -> CircuitBreaker:
        """The breaker of one instance (its `instance_key`) for capability."""
        key = (capability, instance)
        b = self._inst_breakers.get(key)
        if b is None:
            if len(self._inst_breakers) > 10_000:
                self._inst_breakers = {k: v for k, v in self._inst_breakers.items() if v.state is not State.CLOSED}
            b = self._inst_breakers[key] = CircuitBreaker(policy, clock=self.clock)
        elif b.policy is not policy:
            b.configure(policy)
        return b

    def peek_instance_breaker(self, capability: str, instance: str) -> CircuitBreaker | None:
        return self._inst_breakers.get((capability, instance))

    def ejected_share_allows(self, capability: str, live: Sequence[str], share: float) -> bool:
        """May one more instance of capability be ejected, with live the live instances' keys?"""
        ejected = sum(
            1 for i in live
            if (b := self._inst_breakers.get((capability, i))) is not None and b.state is not State.CLOSED
        )
        total = len(live)
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

    def breakers(self) -> list[tuple[str, str, CircuitBreaker]]:
        """Every breaker as (capability, instance key or "" for the capability's own, breaker), for metrics."""
        out = [(cap, "", b) for cap, b in self._cap_breakers.items()]
        out.extend((cap, inst, b) for (cap, inst), b in self._inst_breakers.items())
        return out

    def in_flight(self) -> list[tuple[str, str, int]]:
        """(direction, capability, calls in flight) of every capability seen, for metrics."""
        out = [("inbound", cap, c.in_flight) for cap, c in self._in.items()]
        out.extend(("outbound", cap, c.in_flight) for cap, c in self._out.items())
        return out

    def queue_depths(self) -> list[tuple[str, int]]:
        """Calls waiting for an in-flight slot, per agent with a concurrency policy, for metrics."""
        return [(agent, g.queued) for agent, g in self._gates.items()]

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

    def attempt_started(self, capability: str, instance: str) -> None:
        self.balancer.started(instance)
        c = self._counts(self._out_inst, (capability, instance))
        c.in_flight += 1
        c.window.add(_Counts.CALLS)

    def attempt_finished(self, capability: str, instance: str, *, failed: bool) -> None:
        self.balancer.finished(instance)
        c = self._counts(self._out_inst, (capability, instance))
        c.in_flight = max(0, c.in_flight - 1)
        if failed:
            c.window.add(_Counts.FAILURES)

    def in_started(self, capability: str) -> None:
        c = self._counts(self._in, capability)
        c.in_flight += 1
        c.window.add(_Counts.CALLS)

    def in_finished(self, capability: str, *, failed: bool, seconds: float | None = None) -> None:
        c = self._counts(self._in, capability)
        c.in_flight = max(0, c.in_flight - 1)
        if failed:
            c.window.add(_Counts.FAILURES)
        if seconds is not None:  # for the mean latency in status (automatic rollouts compare it)
            c.window.add(_Counts.ENDED)
            c.window.add(_Counts.MICROS, int(seconds * 1_000_000))

    # --- the status report ------------------------------------------------------------------------------------
    def snapshot(
        self, *, identity: str, instance: str, agent: str = "", policy_revision: int = 0
    ) -> policy_pb2.NodeTraffic:
        """What `hivemesh status` shows for this node, built off the call path every couple of seconds."""
        node = policy_pb2.NodeTraffic(
            identity=identity,
            instance=instance,
            updated_unix_ms=int(time.time() * 1000),
            policy_revision=policy_revision,
        )
        by_cap_instances: dict[str, list[str]] = {}
        for cap, inst in list(self._out_inst) + list(self._inst_breakers):
            ids = by_cap_instances.setdefault(cap, [])
            if inst not in ids:
                ids.append(inst)
        for cap in sorted(set(self._out) | set(self._cap_breakers)):
            c = self._out.get(cap)
            calls, failures, retries, degraded, _e, _m = c.window.totals() if c else (0, 0, 0, 0, 0, 0)
            b = self._cap_breakers.get(cap)
            entry = node.capabilities.add(
                capability=cap, direction="outbound", breaker=b.state.value if b else "",
                in_flight=c.in_flight if c else 0, calls=calls, failures=failures,
                error_rate=failures / calls if calls else 0.0, retries=retries, degraded=degraded,
            )
            for inst in sorted(by_cap_instances.get(cap, [])):
                ic = self._out_inst.get((cap, inst))
                icalls, ifail, _r, _d, _e, _m = ic.window.totals() if ic else (0, 0, 0, 0, 0, 0)
                ib = self._inst_breakers.get((cap, inst))
                entry.instances.add(
                    instance=inst, breaker=ib.state.value if ib else "", in_flight=ic.in_flight if ic else 0,
                    calls=icalls, failures=ifail, error_rate=ifail / icalls if icalls else 0.0,
                )
        per_identity = self.limiter.identity_usage()
        for cap in sorted(set(self._in) | set(self.limiter.capabilities())):
            c = self._in.get(cap)
            calls, failures, _r, _d, ended, micros = c.window.totals() if c else (0, 0, 0, 0, 0, 0)
            admitted, limited, limit = self.limiter.usage(cap)
            ident = per_identity.get(cap, IdentityUsage())
            node.capabilities.add(
                capability=cap, direction="inbound", in_flight=c.in_flight if c else 0, calls=calls,
                failures=failures, error_rate=failures / calls if calls else 0.0, rate_limited=limited,
                limit_rps=limit, limiter_use=(admitted / _STATUS_WINDOW_S) / limit if limit else 0.0,
                latency_ms=micros / ended / 1000 if ended else 0.0, identity_limit_rps=ident.rate,
                identity_overrides=ident.overrides, identity_limited=ident.limited,
                identities_limited=ident.identities,
            )
        gate = self._gates.get(agent) if agent else None
        if gate is not None:
            node.concurrency.CopyFrom(policy_pb2.ConcurrencyStatus(
                max_in_flight=gate.policy.max_in_flight, in_flight=gate.in_flight, queued=gate.queued,
                shed=gate.shed,
            ))
        return node


@dataclass(frozen=True, slots=True)
class Traffic:
    """A node's traffic: the policies in force (read-only) and the state they drive (mutable), side by side."""

    policy: PolicyView = field(default_factory=PolicyView)
    state: TrafficState = field(default_factory=TrafficState)


def breaker_states(state: TrafficState, capability: str) -> Mapping[str, str]:
    """instance key -> breaker state of capability's instances this node has a breaker for (for tests)."""
    return {i: b.state.value for (c, i), b in state._inst_breakers.items() if c == capability}

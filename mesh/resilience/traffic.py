"""A node's traffic state: everything the policies act on, and what `hivemesh status` shows of it.

One `TrafficState` per MeshNode holds the mutable runtime state the policies drive (breakers, retry budgets,
the balancer, split positions, the response cache, rate-limit buckets, the in-flight gate) plus the recent
counts `hivemesh status` shows. Which policy applies is read from the read-only `PolicyView`
(`hivemesh.mesh.resilience.view`); `Traffic` pairs the two for the node. State objects are keyed by target and
adopt a changed policy in place, so a policy change never resets what was learnt about health.

What nothing applies to any longer goes, in the upkeep that `snapshot()` runs off the call path (status every
couple of seconds), and that each metrics scrape asks the event loop for: the breakers of a capability its
breakers policy no longer gives one (`follow_breakers`), and the counts and breakers of instances this node
stopped sending to (`_prune_instances`: dead and restarted instances must neither stay in status nor grow
memory). Everything that changes state runs on the event loop thread: no locks. Metrics scrapes run in the
metrics server's threads: they hand the upkeep to the loop and wait for it (bounded), then take copies
(`breakers`, `in_flight`): pruning from two scrapes and the loop at once lost keys mid-iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hivemesh.mesh.resilience.balancer import Balancer
from hivemesh.mesh.resilience.breaker import BreakerPolicy, CircuitBreaker, State
from hivemesh.mesh.resilience.cache import ResponseCache
from hivemesh.mesh.resilience.concurrency import ConcurrencyGate, ConcurrencyPolicy
from hivemesh.mesh.resilience.kinds import BREAKERS, BreakerSettings
from hivemesh.mesh.resilience.ratelimit import IdentityUsage, RateLimiter
from hivemesh.mesh.resilience.retry import RetryBudget, RetryPolicy
from hivemesh.mesh.resilience.routes import RoutePolicy, SplitState
from hivemesh.mesh.resilience.view import PolicyView
from hivemesh.mesh.resilience.window import WindowCounter
from hivemesh.v1 import policy_pb2

_STATUS_WINDOW_S = 10.0
_LEARNT_KEEP_S = 60.0
_UNSEEN = object()
"""No breakers policy version seen yet (a version may be None)."""


def _at_rest(b: CircuitBreaker, now: float, idle_s: float) -> bool:
    """May the breaker of an instance sent no attempt for idle_s go? See `TrafficState._prune_instances`."""
    state = b.state
    if state is State.HALF_OPEN:
        return now - b.open_until >= _STATUS_WINDOW_S
    if state is not State.CLOSED:
        return False
    learnt = b.consecutive_failures > 0 or any(b.window_counts())
    return not learnt or idle_s >= max(_LEARNT_KEEP_S, b.policy.window_s)


class _Counts:
    """Recent calls/failures/retries/degraded of one capability or instance, plus calls in flight."""

    __slots__ = ("in_flight", "window")
    CALLS, FAILURES, RETRIES, DEGRADED, ENDED, MICROS = 0, 1, 2, 3, 4, 5  # ENDED, MICROS: inbound latency

    def __init__(self, clock: Callable[[], float]) -> None:
        self.window = WindowCounter(_STATUS_WINDOW_S, width=6, clock=clock)
        self.in_flight = 0


_SCRAPE_WAIT_S = 1.0
"""How long a metrics scrape's thread waits for the event loop to run the upkeep (`TrafficState.breakers`)."""


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
        self._inst_seen: dict[tuple[str, str], float] = {}
        """When the upkeep last saw an attempt to each instance with a breaker (in its window or in flight)."""
        self._in: dict[str, _Counts] = {}
        self._gates: dict[str, ConcurrencyGate] = {}
        self._breaker_settings: Callable[[str], BreakerSettings | None] | None = None
        self._breaker_version: Callable[[], object] = lambda: None
        self._breakers_seen: object = _UNSEEN
        self._loop: asyncio.AbstractEventLoop | None = None
        """The event loop the state lives on, once known (`snapshot`, `follow_breakers` on it): where a metrics
        scrape's thread sends the upkeep."""

    def follow_breakers(
        self, settings_of: Callable[[str], BreakerSettings | None], version: Callable[[], object]
    ) -> None:
        """Keep the breakers to what the breakers policy in force gives: settings_of(capability) (None: no
        breakers policy names it), version() an object that changes whenever that policy does (the compiled table).

        The call path only reads a breaker a policy gives, so without this one whose policy was deleted kept its
        last state for good: status and `hivemesh_breaker_state` went on showing it open (or half-open) on a
        healthy capability, and a policy applied again later found it still open. On a change, a breaker the
        policy no longer gives (a deleted document, a capability it no longer names, an `instance` or `capability`
        part taken out) is dropped: no breaker is the default, and a policy given again later starts closed. One
        still given adopts the new settings in place (`CircuitBreaker.configure`: what it learnt stays, an open
        one's open time is measured again under the new `open_ms`), as the call path would on its next call.
        """
        self._breaker_settings, self._breaker_version = settings_of, version
        self._breakers_seen = _UNSEEN
        self._know_loop()

    def _upkeep_on_loop(self) -> None:
        """Run the upkeep on the event loop: at once when called on it, else handed to it and waited for, at most
        `_SCRAPE_WAIT_S` (a scrape's thread: the scrape then shows the policy in force, and a loop too busy to run it
        in time delays the scrape no longer, which shows what was there)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self.upkeep()
            return
        done = threading.Event()

        def run() -> None:
            try:
                self.upkeep()
            finally:
                done.set()

        try:
            loop.call_soon_threadsafe(run)
        except RuntimeError:  # closed meanwhile: nothing left to keep up
            return
        done.wait(_SCRAPE_WAIT_S)

    def _know_loop(self) -> None:
        with contextlib.suppress(RuntimeError):  # not on a loop (yet): the next snapshot tells
            self._loop = asyncio.get_running_loop()

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
        """Every breaker in force as (capability, instance key or "" for the capability's own, breaker), for
        metrics, from a scrape's thread: after the upkeep, run on the event loop (`_upkeep_on_loop`), copies taken at
        once (`list(dict.items())` holds the GIL; see the module docstring)."""
        self._upkeep_on_loop()
        out = [(cap, "", b) for cap, b in list(self._cap_breakers.items())]
        out.extend((cap, inst, b) for (cap, inst), b in list(self._inst_breakers.items()))
        return out

    def in_flight(self) -> list[tuple[str, str, int]]:
        """(direction, capability, calls in flight) of every capability seen, for metrics."""
        out = [("inbound", cap, c.in_flight) for cap, c in list(self._in.items())]  # copies: a scrape's thread
        out.extend(("outbound", cap, c.in_flight) for cap, c in list(self._out.items()))
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

    # --- upkeep, off the call path ----------------------------------------------------------------------------
    def upkeep(self) -> None:
        """Drop what no policy or instance needs any longer; see the module docstring. O(breakers + instances)."""
        self._follow_breakers()
        self._prune_instances()

    def _follow_breakers(self) -> None:
        settings_of = self._breaker_settings
        if settings_of is None:
            return
        version = self._breaker_version()
        if version is self._breakers_seen:
            return
        self._breakers_seen = version
        found: dict[str, BreakerSettings | None] = {}

        def given(cap: str, part: str) -> BreakerPolicy | None:
            if cap not in found:
                found[cap] = settings_of(cap)
            s = found[cap]
            policy: BreakerPolicy | None = getattr(s, part) if s is not None else None
            return policy

        for cap, b in list(self._cap_breakers.items()):
            if (policy := given(cap, "capability")) is None:
                del self._cap_breakers[cap]
            elif b.policy is not policy:
                b.configure(policy)
        for key, b in list(self._inst_breakers.items()):
            if (policy := given(key[0], "instance")) is None:
                del self._inst_breakers[key]
            elif b.policy is not policy:
                b.configure(policy)

    def _prune_instances(self) -> None:
        """Drop the counts of each instance this node sent no attempt to for a whole status window (none in
        flight), and its breaker once at rest.

        An instance that left the registry (killed, or restarted under a new instance id) is sent nothing, so its
        row goes one window after its last attempt; kept, such rows stayed in status for good and every restart
        added some. Nothing here knows the registry, so a registered instance not called for a window goes too:
        its row would show only zeros, and it is back on its next call.

        A breaker is at rest, and goes, when it holds nothing a fresh one lacks: closed with no failure run and
        an empty window; closed with some, once no attempt went to the instance for max(60 s, its window_s) (a
        live instance of a capability in use is called long before, so only a departed or idle one forgets);
        half-open for a whole status window (a live instance of a capability in use is probed at once; its
        doubled open time is forgotten). An open breaker stays until its open time ends: it is what keeps calls
        off the instance, and status shows it.
        """
        now = self.clock()
        seen = self._inst_seen
        for key, c in list(self._out_inst.items()):
            if c.in_flight or any(c.window.totals()):
                if key in self._inst_breakers:
                    seen[key] = now
            elif (b := self._inst_breakers.get(key)) is None or b.state is not State.OPEN:
                del self._out_inst[key]
        for key, b in list(self._inst_breakers.items()):
            if key in self._out_inst and seen.get(key) == now:
                continue
            if _at_rest(b, now, now - seen.setdefault(key, now)):
                del self._inst_breakers[key]
        for key in [k for k in seen if k not in self._inst_breakers]:
            del seen[key]

    # --- the status report ------------------------------------------------------------------------------------
    def snapshot(
        self, *, identity: str, instance: str, agent: str = "", policy_revision: int = 0
    ) -> policy_pb2.NodeTraffic:
        """What `hivemesh status` shows for this node, built off the call path every couple of seconds (after the
        upkeep: see the module docstring)."""
        self._know_loop()
        self.upkeep()
        node = policy_pb2.NodeTraffic(
            identity=identity,
            instance=instance,
            updated_unix_ms=int(time.time() * 1000),
            policy_revision=policy_revision,
        )
        by_cap_instances: dict[str, list[str]] = {}
        shown = [k for k, b in self._inst_breakers.items() if b.state is not State.CLOSED]
        for cap, inst in list(self._out_inst) + shown:  # (a closed breaker alone: nothing to show)
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

    def __post_init__(self) -> None:
        policies = self.policy.policies
        if policies is not None:  # (without a policy cache no breaker policy changes: nothing to follow)
            self.state.follow_breakers(self.policy.breakers, lambda: policies.view().get(BREAKERS.name))


def breaker_states(state: TrafficState, capability: str) -> Mapping[str, str]:
    """instance key -> breaker state of capability's instances this node has a breaker for (for tests)."""
    return {i: b.state.value for (c, i), b in state._inst_breakers.items() if c == capability}

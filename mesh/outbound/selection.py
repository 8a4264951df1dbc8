"""Instance selection: which live instance of a capability the next attempt goes to.

`Liveness` reads only the registry's in-memory index (swapped atomically on each watch event; a node's lists only
the instances the providers policy lets serve each capability, so no call is ever sent to another), so selection
never waits on etcd and keeps working on the last-known state while etcd is down, and remembers for a
moment which instances could not be reached or held a call until its deadline. `InstanceSelector` keeps only the
pinned agent's instances (a call's `agent`), applies the route, skips ejected, suspect and unanswering instances,
and lets the balancer pick.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from hivemesh.mesh.errors import CircuitOpenError, NoLiveInstanceError, UnknownCapabilityError
from hivemesh.mesh.instance_ref import instance_key
from hivemesh.mesh.outbound.call import OutboundCall
from hivemesh.mesh.providers import KIND_NAME
from hivemesh.mesh.registry import LeftOut, RegistryView
from hivemesh.mesh.resilience.balancer import ROUND_ROBIN
from hivemesh.mesh.resilience.routes import RoutePolicy, SplitState, select
from hivemesh.mesh.resilience.traffic import TrafficState
from hivemesh.v1 import mesh_pb2

_SUSPECT_S = 2.0
"""How long an instance that could not be reached is skipped at first ..."""
_SUSPECT_MAX_S = 30.0
"""... doubling with each further failure after its suspicion ran out, up to this (a SIGKILLed instance stays
registered until its lease expires: each probe of it costs a failed connection)."""
_SAY_EVERY_S = 60.0
"""An instance's unanswered attempts are logged at most once a while this long (`Liveness.news`): a flaky one that
answers its retries clears its suspicion each time, and would otherwise be reported on every call."""
_POLL_FIRST_S = 0.01
_POLL_MAX_S = 0.25
"""How often `Liveness.wait_until` looks again at a source that cannot say when it changed: from the first, doubling
up to the last."""


class InstanceSource(Protocol):
    """What selection needs from the registry view."""

    def instances(self, capability: str) -> Sequence[mesh_pb2.AgentInstance]: ...

    def knows_capability(self, capability: str) -> bool: ...


class _Suspicions:
    """Instances to avoid for a while, each for a while that doubles with every further strike after the last
    ran out (first_s, 2 x first_s, ... up to max_s); a strike while one is running does not count."""

    def __init__(self, first_s: float, max_s: float, clock: Callable[[], float]) -> None:
        self._first_s = first_s
        self._max_s = max_s
        self._clock = clock
        self._until: dict[str, float] = {}
        self._strikes: dict[str, int] = {}

    def active(self, instance: str) -> bool:
        return bool(self._until) and self._until.get(instance, 0.0) > self._clock()

    def strike(self, instance: str) -> float:
        """The seconds instance is now avoided for (0.0 if it already was)."""
        now = self._clock()
        if self._until.get(instance, 0.0) > now:
            return 0.0
        strikes = self._strikes.get(instance, 0) + 1
        self._strikes[instance] = strikes
        seconds = min(self._first_s * float(1 << min(strikes - 1, 16)), self._max_s)
        self._until[instance] = now + seconds
        if len(self._until) > 1024:
            # Forget instances whose suspicion ran out long ago (gone from the registry, most likely).
            self._until = {k: v for k, v in self._until.items() if v > now - self._max_s}
            self._strikes = {k: v for k, v in self._strikes.items() if k in self._until}
        return seconds

    def clear(self, instance: str) -> None:
        if self._until:
            self._until.pop(instance, None)
            self._strikes.pop(instance, None)


class Liveness:
    """The live instances of each capability, and which of them recently could not be reached or did not answer.

    An instance whose connection just failed is 'suspect' for a couple of seconds and is skipped while any
    other instance is available: a killed instance stops receiving calls at once, not only when its lease
    expires. Each time it fails again when its suspicion ran out, the suspicion doubles (2 s, 4 s, ... 30 s);
    a success clears it. Failures while it is suspect (calls already in flight) do not count, so a burst of
    concurrent calls is one failure, not many. Suspicion is local; the registry stays the source of truth.

    An instance that held a call until its deadline without answering is 'unanswering' for the same whiles: a
    frozen or hung process (SIGSTOP, a stalled event loop) keeps its connection and its lease, so without this
    it would be sent every n-th call, each waiting out its deadline, until its lease expires. Balancing skips it
    while another instance is available; affinity does not (the call it holds may still run there, so a keyed
    re-send must go to the same instance).

    Instances are named by their `instance_key` ("agent/instance id") throughout.
    """

    def __init__(self, source: InstanceSource, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._source = source
        self._unreachable = _Suspicions(_SUSPECT_S, _SUSPECT_MAX_S, clock)
        self._unanswering = _Suspicions(_SUSPECT_S, _SUSPECT_MAX_S, clock)
        self._clock = clock
        self._said: dict[str, float] = {}

    def live(self, capability: str) -> Sequence[mesh_pb2.AgentInstance]:
        """Live instances for capability (registry order); UnknownCapabilityError / NoLiveInstanceError if none."""
        instances = self._source.instances(capability)
        if not instances:
            if self._source.knows_capability(capability):
                left_out = self.left_out(capability)
                metadata = {"capability": capability[:128]}
                if left_out is not None:
                    metadata["policy"] = ",".join(f"{KIND_NAME}/{p}" for p in left_out.restriction.policies)[:128]
                raise NoLiveInstanceError(
                    f"capability {capability!r} has no live instance right now{_left_out_note(left_out)}",
                    metadata=metadata,
                )
            raise UnknownCapabilityError(
                f"no agent in the mesh offers capability {capability!r}",
                metadata={"capability": capability[:128]},
            )
        return instances

    def left_out(self, capability: str) -> LeftOut | None:
        """The instances offering capability that the providers policy leaves out (see `RegistryView.left_out`)."""
        source = self._source
        return source.left_out(capability) if isinstance(source, RegistryView) else None

    def is_suspect(self, instance: str) -> bool:
        """True while instance recently could not be reached (see mark_failed)."""
        return self._unreachable.active(instance)

    def is_unanswering(self, instance: str) -> bool:
        """True while instance recently held a call until its deadline (see mark_unanswered)."""
        return self._unanswering.active(instance)

    def mark_failed(self, instance: str) -> float:
        """Note that instance could not be reached, so selection prefers the others for a while: the
        seconds it is now suspect for (0.0 if it already was: the failure of a call sent before)."""
        return self._unreachable.strike(instance)

    def mark_unanswered(self, instance: str) -> float:
        """Note that instance held a call until its deadline, so balancing prefers the others for a while:
        the seconds it is now avoided for (0.0 if it already was)."""
        return self._unanswering.strike(instance)

    def news(self, instance: str) -> bool:
        """Whether it is time to say again that instance held a call until its deadline: True at most once every
        _SAY_EVERY_S per instance, whatever cleared or renewed its suspicion meanwhile."""
        now = self._clock()
        said = self._said
        last = said.get(instance)
        if last is not None and now - last < _SAY_EVERY_S:
            return False
        if len(said) > 1024:
            self._said = said = {k: t for k, t in said.items() if t > now - _SAY_EVERY_S}
        said[instance] = now
        return True

    def avoided(self, instance: str) -> str:
        """Why balancing skips instance right now (`InstanceSelector.choose`, `hivemesh status`): "unreachable",
        "unanswering" or "" (not skipped)."""
        if self._unreachable.active(instance):
            return "unreachable"
        return "unanswering" if self._unanswering.active(instance) else ""

    def mark_ok(self, instance: str) -> None:
        """instance answered: neither suspicion holds any longer."""
        self._unreachable.clear(instance)
        self._unanswering.clear(instance)

    async def wait_until(self, holds: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until holds() (a look at the registry view through this object) is true: True once it is, False if
        it still is not after timeout_s. A watched registry (`RegistryView`) wakes it on each change of its view, so
        nothing polls; any other source is looked at again with a backoff (10 ms, doubling, up to 250 ms)."""
        source = self._source
        if isinstance(source, RegistryView):
            return await source.cache.wait_for(lambda _snapshot: holds(), timeout_s)
        deadline = time.monotonic() + timeout_s
        step = _POLL_FIRST_S
        while not holds():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(step, left))
            step = min(step * 2, _POLL_MAX_S)
        return True


def _left_out_note(left_out: LeftOut | None, agent: str = "") -> str:
    """"; N instance(s) offering it were left out by the providers policy (...)" for a NO_LIVE_INSTANCE message, so
    an operator sees that instances exist but may not serve it, and which policy says so; "" when none were."""
    if left_out is None:
        return ""
    out = [i for i in left_out.instances if not agent or i.card.name == agent]
    ids = sorted({i.identity or i.card.name for i in out})
    if not ids:
        return ""
    n = len(out)
    return (f"; {n} instance{'s' if n != 1 else ''} offering it {'were' if n != 1 else 'was'} left out by the "
            f"{KIND_NAME} policy ({left_out.restriction.describe()}; left out: {ids[0]}"
            f"{f' and {len(ids) - 1} other agent(s)' if len(ids) > 1 else ''})")


def _dry_split(_rule: int, n: int) -> SplitState:
    """A split position of its own for one look at a rule (`InstanceSelector._set_aside`): whether a split allows
    any instance at all must not move the split's real smooth weighted round robin."""
    return SplitState(n)


def rendezvous(key: str, instance: str) -> int:
    """The weight of instance (its `instance_key`) for key in rendezvous (highest random weight) hashing."""
    return int.from_bytes(hashlib.blake2b(f"{key}\0{instance}".encode(), digest_size=8).digest(), "big")


class InstanceSelector:
    """Agent pin → route → untried → not ejected, suspect or unanswering → balancer, over a node's liveness and
    traffic state."""

    def __init__(
        self, liveness: Liveness, state: TrafficState, *, declared: Callable[[str], RoutePolicy | None] | None = None
    ) -> None:
        """declared gives the routes policy in force that names a capability by its name, with a fallback (None:
        none does); see `live`."""
        self.liveness = liveness
        self.state = state
        self._declared = declared

    def live(self, capability: str) -> Sequence[mesh_pb2.AgentInstance]:
        """`Liveness.live`, except for a capability this process never saw an instance of that a routes policy
        names with a fallback: the operator declared it, so it has no live instance (NO_LIVE_INSTANCE, which
        degrades to the fallback) rather than being unknown, in a caller started after its last instance left as
        in one that saw it go. A name no such policy names (a typo) stays UNKNOWN_CAPABILITY."""
        try:
            return self.liveness.live(capability)
        except UnknownCapabilityError:
            routes = self._declared(capability) if self._declared is not None else None
            if routes is None:
                raise
            raise NoLiveInstanceError(
                f"capability {capability!r} has no live instance right now (routes/{routes.name} names it, with "
                f"fallback {routes.fallback!r}; this caller has seen no instance of it)",
                metadata={"capability": capability[:128], "policy": f"routes/{routes.name}"[:128]},
            ) from None

    def live_for(self, call: OutboundCall) -> Sequence[mesh_pb2.AgentInstance]:
        """The live instances call may use before any policy: those of its pinned agent (`call.agent`), else all.
        NoLiveInstanceError naming the agent when it has none (the capability's own errors as `live`)."""
        live = self.live(call.capability)
        agent = call.agent
        if not agent:
            return live
        mine = [i for i in live if i.card.name == agent]
        if not mine:
            cap = call.capability
            raise NoLiveInstanceError(
                f"agent {agent!r} has no live instance of capability {cap!r} right now (the call is pinned to "
                f"that agent; no other agent is asked){_left_out_note(self.liveness.left_out(cap), agent)}",
                metadata={"capability": cap[:128], "agent": agent[:128]},
            )
        return mine

    def _routed(
        self, call: OutboundCall, routes: RoutePolicy, live: Sequence[mesh_pb2.AgentInstance]
    ) -> tuple[Sequence[mesh_pb2.AgentInstance], str]:
        """The instances routes allows call among live, and the balancing key. A pinned call whose agent the
        deciding rule leaves no instance of may pass it (`_set_aside`)."""
        t, cap, agent = self.state, call.capability, call.agent
        chosen, why = select(routes, live, call.route_metadata, lambda rule, n: t.split_state(cap, routes, rule, n))
        subset: Sequence[mesh_pb2.AgentInstance] = chosen  # type: ignore[assignment]  # select() takes a protocol
        if not subset and agent:
            subset, why = self._set_aside(call, routes, live, why)
        if not subset:
            metadata = {"capability": cap[:128], "route": routes.name}
            if agent:
                metadata["agent"] = agent[:128]
            raise NoLiveInstanceError(f"routes/{routes.name} ({why}) allows no live instance of {cap!r}",
                                      metadata=metadata)
        return subset, f"{cap}\0{why}"

    def _set_aside(
        self, call: OutboundCall, routes: RoutePolicy, mine: Sequence[mesh_pb2.AgentInstance], why: str
    ) -> tuple[Sequence[mesh_pb2.AgentInstance], str]:
        """The instances of a pinned call's agent (mine) it may use past a route rule that allows it none, and why.

        Only a rule that chose other agents' instances is set aside: the rule, evaluated over every agent's live
        instances, allows some. It then says nothing of this agent's instances (a version pin or split names
        versions and labels, which each agent numbers its own way), and the pin, which names the agent, decides.
        Instances the rule's split weighs 0 stay out even then (an operator's explicit "none": a rolled-back
        canary), as do a shadow's candidates (they serve no real call). A rule that allows no instance to anyone
        (a pin to a version not running, a split whose weighted subsets have none up) is not set aside: the
        pinned call fails NO_LIVE_INSTANCE as an unpinned one does, and never reaches what the operator kept out.
        Only pinned calls whose rule left them nothing come here: unpinned selection pays nothing for it.
        """
        agent = call.agent
        everyone, _ = select(routes, self.live(call.capability), call.route_metadata, _dry_split)
        if not everyone:
            return (), why
        rule = next((r for r in routes.rules if r.holds(call.route_metadata)), None)
        zero = [subset for weight, subset in rule.split if weight == 0] if rule is not None else []
        shadow = routes.shadow
        if shadow is not None:
            zero.append(shadow.subset)
        kept = [i for i in mine if not any(s.matches(i) for s in zero)] if zero else mine
        if not kept:
            return (), (f"{why or 'no rule'}; every instance of agent {agent!r} is weighted 0 by its split or a "
                        "shadow candidate")
        return kept, f"{why or 'no rule'}; set aside for agent {agent}"

    def choose(
        self,
        call: OutboundCall,
        routes: RoutePolicy | None,
        tried: set[str],
        *,
        reuse: bool,
        affinity: str | None = None,
        refused: set[str] | frozenset[str] = frozenset(),
    ) -> mesh_pb2.AgentInstance | None:
        """The instance for the next attempt: one of the pinned agent's (`call.agent`, if any), allowed by the
        route, untried if possible (any if reuse), not ejected, suspect or unanswering if possible, then the
        balancer's pick. None when every allowed one was tried.

        With an affinity key (the idempotency key of a non-idempotent call) the healthy instance that key hashes
        to is chosen (rendezvous hashing), tried or not: every attempt and every re-send of the key reaches the
        instance that remembers it, so its effect happens once while membership holds. Instances whose breaker
        refused this call (`refused`) are out; CircuitOpenError when that leaves none. `tried` and `refused` hold
        `instance_key`s.
        """
        t = self.state
        liveness = self.liveness
        cap = call.capability
        live = self.live_for(call)  # the pin first: routes, breakers, affinity and balancing see only its agent
        key = cap
        if routes is not None and (routes.rules or routes.shadow is not None):
            candidates, key = self._routed(call, routes, live)
        else:
            candidates = live
        if call.agent:
            key = f"{key}\0@{call.agent}"  # a round robin of its own: over the agent's instances
        if refused:
            candidates = [i for i in candidates if instance_key(i) not in refused]
            if not candidates:
                pinned = f" (pinned to agent {call.agent!r})" if call.agent else ""
                raise CircuitOpenError(
                    f"every instance of {cap!r} the call may use{pinned} is ejected by its circuit breaker",
                    metadata={"capability": cap[:128], **({"agent": call.agent[:128]} if call.agent else {})},
                )

        def ejected(k: str) -> bool:
            b = t.peek_instance_breaker(cap, k)
            return b is not None and b.ejected

        pool = [i for i in candidates if instance_key(i) not in tried] if tried else list(candidates)
        if not pool:
            if not reuse:
                return None
            pool = list(candidates)

        if affinity is not None:
            keyed = [(instance_key(i), i) for i in candidates]
            usable = [(k, i) for k, i in keyed if not ejected(k) and not liveness.is_suspect(k)]
            if usable:
                return max(usable, key=lambda ki: rendezvous(affinity, ki[0]))[1]
        if len(pool) == 1:
            return pool[0]  # the last resort below would choose it anyway
        keyed = [(instance_key(i), i) for i in pool]
        healthy = [i for k, i in keyed if not ejected(k) and not liveness.avoided(k)]
        pool = healthy or [i for k, i in keyed if not ejected(k)] or pool
        mode = routes.load_balancer if routes is not None else ROUND_ROBIN
        return t.balancer.order(key, pool, mode)[0]

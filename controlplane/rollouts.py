"""Automatic rollouts: step a canary's weight in a routes document while it stays healthy, roll back when not.

A `rollouts` document (`hivemesh.mesh.resilience.kinds.ROLLOUTS`) names a capability, the stable and canary
versions, and the canary's weights in percent (e.g. 5, 25, 50, 100). The rollout owns one rule, `rollout`, of
the routes document `spec.routes` (first rule; the document's other fields and rules are kept): a split of
100-w to the stable version and w to the canary. Every pass it judges the canary against the stable version:

- the canary has had fewer than `min_calls` calls in the status window: wait;
- its error rate is above `max_error_rate`, or above the stable version's by more than
  `max_error_rate_increase`, or (when both latencies are known) its latency is above `max_latency_ratio` times
  the stable version's: roll back (canary weight 0) and stop;
- otherwise, once `interval_s` passed since the last step: the next weight; after the last (100) held healthy
  for an interval: done.

Each start, step, rollback and completion is written to the control plane's audit log (event `rollout`) and
to the rollout's state in etcd (`keyspace.ROLLOUTS` + name, JSON), so a new leader continues where the last
stopped. A changed rollouts document (a new version) starts over.

Writes: the rule, the state and the rollout's `Target` (which document it writes, for which capability) go in
one transaction that holds only while this replica leads (its term's fence), the rollouts document is still the
version judged (a rollout deleted mid-pass writes nothing back), and the routes document is still the version
its rule was put into (a compare-and-swap on the mod revision read: an operator's apply in between is not
overwritten with the older document; the write is read and tried again, at most `ROUTE_ATTEMPTS` times). A
routes document of other capabilities is not written. Deleting a rollout (`delete_rollout`, what `DeletePolicy`
of a rollouts document does) removes the document, its state and its target in one transaction and stops it
where it is: its rule stays.

An edit that moves a rollout (another routes document, or another capability) takes its rule back out of the
document it wrote before, then starts afresh where it now points (`RolloutController._withdraw`); a rule someone
else changed since is left alone. State keys whose rollouts document is gone (left by deletions before
`delete_rollout`) are removed by the leader's passes, a few per pass (`RolloutController._sweep`).

Who runs it: the control-plane leader only. One writer steps the weights (callers would race each other
writing the same routes document), it sees every node's published status (a caller node sees only its own
calls), and the audit log it writes to is the control plane's. Health comes from the traffic status every
serving node publishes (`hivemesh.mesh.status`: calls, failures and latency over the last ~10 s, inbound, per
instance, with the mean latency of the calls that ended), with each instance's version read from the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final

from hivemesh.controlplane import policies as store
from hivemesh.controlplane.leader import leader_duty
from hivemesh.mesh import json_depth
from hivemesh.mesh.errors import FailedPreconditionError, HivemeshError, InvalidInputError, NotFoundError
from hivemesh.mesh.keyspace import AGENTS, ROLLOUTS, STATUS
from hivemesh.mesh.policy import NAME_RE, PolicyDoc, PolicyError, policy_key
from hivemesh.mesh.resilience.kinds import ROLLOUTS as ROLLOUTS_KIND
from hivemesh.mesh.resilience.kinds import ROUTES, RolloutSpec
from hivemesh.mesh.watch import cancel_and_wait
from hivemesh.v1 import agent_pb2, mesh_pb2, policy_pb2

if TYPE_CHECKING:
    from hivemesh.controlplane.server import Core

log = logging.getLogger(__name__)

RULE: Final = "rollout"
"""The name of the routes rule a rollout owns."""
ROUTE_ATTEMPTS: Final = 5
"""Writes of a rollout's rule tried, each from a fresh read, while other writers keep changing its routes document."""
DELETE_ATTEMPTS: Final = 5
"""Deletions of a rollout tried, each from a fresh read, while its document keeps changing."""
ORPHAN_GRACE_S: Final = 5.0
"""How long (the controller's clock) a state key must have stood, unchanged, without its rollouts document before
a pass removes it: see `RolloutController._sweep`."""
ORPHANS_PER_PASS: Final = 16
"""State keys without a rollouts document removed per pass at most (each its own small transaction)."""
ORPHANS_TRACKED: Final = 1024
"""State keys without a rollouts document remembered between passes at most (the rest are seen once these go)."""

Recorder = Callable[[Mapping[str, Any]], Awaitable[object]]


@dataclass(frozen=True)
class VersionStats:
    """Recent calls of one version of a capability (the status window, ~10 s)."""

    calls: int = 0
    failures: int = 0
    latency_ms: float | None = None

    @property
    def error_rate(self) -> float:
        return self.failures / self.calls if self.calls else 0.0


@dataclass
class RolloutState:
    """Where a rollout is: the index of the weight in force, since when, and its phase."""

    version: int
    """The rollouts document's version (etcd mod revision) this state belongs to."""
    step: int = 0
    since: float = 0.0
    phase: str = "stepping"  # "stepping", "done" or "rolled-back"
    reason: str = ""


@dataclass(frozen=True)
class Decision:
    action: str  # "hold", "step", "done", "rollback", or "error" (it could not write; tried again next pass)
    reason: str


def judge(spec: RolloutSpec, stable: VersionStats, canary: VersionStats) -> str | None:
    """Why the canary is unhealthy against the stable version, or None when it is within every bound."""
    if canary.error_rate > spec.max_error_rate:
        return f"canary error rate {canary.error_rate:.1%} > max_error_rate {spec.max_error_rate:.1%}"
    if stable.calls >= spec.min_calls and canary.error_rate - stable.error_rate > spec.max_error_rate_increase:
        return (f"canary error rate {canary.error_rate:.1%} exceeds the stable version's {stable.error_rate:.1%} "
                f"by more than {spec.max_error_rate_increase:.1%}")
    if (canary.latency_ms is not None and stable.latency_ms is not None and stable.calls >= spec.min_calls
            and canary.latency_ms > spec.max_latency_ratio * stable.latency_ms):
        return (f"canary latency {canary.latency_ms:.0f} ms > {spec.max_latency_ratio:g} x the stable version's "
                f"{stable.latency_ms:.0f} ms")
    return None


def decide(spec: RolloutSpec, state: RolloutState, stable: VersionStats, canary: VersionStats,
           now: float) -> Decision:
    """The next move of a rollout in progress (pure: no I/O)."""
    if state.phase != "stepping":
        return Decision("hold", state.phase)
    if canary.calls < spec.min_calls:
        return Decision("hold", f"waiting for {spec.min_calls} canary calls (has {canary.calls})")
    bad = judge(spec, stable, canary)
    if bad is not None:
        return Decision("rollback", bad)
    if now - state.since < spec.interval_s:
        return Decision("hold", "healthy; the step's interval has not passed")
    if state.step >= len(spec.steps) - 1:
        return Decision("done", f"healthy at {spec.steps[-1]}% for {spec.interval_s:g} s")
    return Decision("step", f"healthy at {spec.steps[state.step]}% for {spec.interval_s:g} s")


def _rule(stable: Mapping[str, Any], canary: Mapping[str, Any], canary_weight: int) -> dict[str, Any]:
    split: list[dict[str, Any]] = [{"weight": 100 - canary_weight, **stable}, {"weight": canary_weight, **canary}]
    return {"name": RULE, "split": split}


def rollout_rule(spec: RolloutSpec, canary_weight: int) -> dict[str, Any]:
    """The rule the rollout writes: canary_weight percent to the canary, the rest to the stable version."""
    return _rule(spec.stable, spec.canary, canary_weight)


@dataclass(frozen=True)
class Target:
    """Where a rollout writes its rule and what that rule can be, recorded at `<state key>/target` in the same
    transaction as each of its writes: after an edit points the rollout elsewhere, the pass still knows which
    document holds its rule, and can tell that rule from one another writer changed since.

    A key of its own rather than more fields of the state: a replica of the previous release reads a state with
    fields it does not know as unreadable and starts the rollout over (a finished one back at its first step)."""

    routes: str
    capability: str
    stable: Mapping[str, Any]
    canary: Mapping[str, Any]
    steps: tuple[int, ...]
    created: bool = False
    """The rollout created the routes document (there was none): emptied of its rule, it goes too."""

    @staticmethod
    def of(spec: RolloutSpec, created: bool) -> Target:
        return Target(spec.routes, spec.capability, dict(spec.stable), dict(spec.canary), spec.steps, created)

    def moved(self, spec: RolloutSpec) -> bool:
        """spec writes another document, or for another capability, than this target."""
        return (self.routes, self.capability) != (spec.routes, spec.capability)

    def wrote(self, rule: Mapping[str, Any]) -> bool:
        """rule is one this rollout writes (its rule at one of its weights, or at 0 after a rollback), unchanged."""
        return any(rule == _rule(self.stable, self.canary, w) for w in (0, *self.steps))

    def encode(self) -> bytes:
        return json.dumps({**asdict(self), "steps": list(self.steps)}, sort_keys=True).encode()

    @staticmethod
    def decode(raw: bytes) -> Target | None:
        """The stored target, or None when it cannot be read (as if there were none: nothing is taken back).
        Each field must have the type `encode` writes: a hand-written value is not coerced (a steps entry of
        1e999 made int() raise OverflowError and failed the rollout every pass; "created": "false" read as
        True, which lets a withdrawal delete a routes document the rollout never created)."""
        try:
            d = json_depth.loads(raw)
            routes, capability, stable, canary = d["routes"], d["capability"], d["stable"], d["canary"]
            steps, created = d["steps"], d.get("created", False)
        except (ValueError, TypeError, KeyError, RecursionError):
            return None
        if not (isinstance(routes, str) and isinstance(capability, str) and isinstance(stable, dict)
                and isinstance(canary, dict) and isinstance(steps, list) and isinstance(created, bool)
                and all(type(w) is int for w in steps)):
            return None
        return Target(routes, capability, stable, canary, tuple(steps), created)


def routes_spec(spec: RolloutSpec, current: Mapping[str, Any] | None, canary_weight: int) -> dict[str, Any]:
    """The routes document's spec with the rollout's rule first, at canary_weight percent."""
    rule = rollout_rule(spec, canary_weight)
    out: dict[str, Any] = dict(current) if current is not None else {"capabilities": [spec.capability]}
    others: list[dict[str, Any]] = [r for r in out.get("rules", []) if r.get("name") != RULE]
    out["rules"] = [rule, *others]
    return out


def _state_key(name: str) -> bytes:
    return f"{ROLLOUTS}{name}".encode()


def _target_key(name: str) -> bytes:
    return f"{ROLLOUTS}{name}/target".encode()  # no rollout name has a "/": never another rollout's state


def _doc_key(name: str) -> bytes:
    return policy_key(ROLLOUTS_KIND.name, name).encode()


async def _mod_revision(etcd: Any, key: bytes) -> int:
    """key's mod revision now (0: no such key)."""
    kv = await etcd.get(key)
    return 0 if kv is None else int(kv.mod_revision)


async def delete_rollout(etcd: Any, name: str, *, expected_version: int | None = None) -> int:
    """Delete rollouts/name, its state and its target in one etcd transaction; returns the revision of the deletion.

    The routes document stays as last written: a deleted rollout stops where it is (taking its rule out would
    not send traffic back to the stable version but spread it over both, and a finished rollout's 100% rule
    would be undone). The leader's pass that read the rollout before writes nothing after, because its writes
    compare the document's version. NotFoundError when there is no such rollout, FailedPreconditionError when
    it is not at expected_version (or keeps changing under the deletion)."""
    if not NAME_RE.fullmatch(name):
        msg = "must match [a-z0-9][a-z0-9._-]{0,62}"
        raise InvalidInputError(f"policy name {msg}", field_violations={"name": msg})
    t = etcd.transactions
    doc_key, state_key, target_key = _doc_key(name), _state_key(name), _target_key(name)
    for _attempt in range(DELETE_ATTEMPTS):
        doc_kv = await etcd.get(doc_key)
        if doc_kv is None:
            raise NotFoundError(f"no rollouts policy named {name!r}", metadata={"kind": ROLLOUTS_KIND.name,
                                                                                 "name": name})
        version = int(doc_kv.mod_revision)
        if expected_version is not None and expected_version != version:
            raise FailedPreconditionError(f"rollouts/{name} is at version {version}, not {expected_version}")
        ok, responses = await etcd.transaction(
            compare=[t.mod(doc_key) == version],
            success=[t.delete(doc_key), t.delete(state_key), t.delete(target_key)], failure=[])
        if ok:
            log.info("deleted rollouts/%s and its state (its routes document stays as last written)", name)
            return int(responses[0].response_delete_range.header.revision)
    raise FailedPreconditionError(f"rollouts/{name} changed under each of {DELETE_ATTEMPTS} attempts to delete "
                                  "it; try again")


def _matches(subset: Mapping[str, Any], card: agent_pb2.AgentCard) -> bool:
    version = subset.get("version")
    if version is not None and not fnmatch.fnmatchcase(card.version, version):
        return False
    return all(card.labels.get(k) == v for k, v in subset.get("labels", {}).items())


async def status_stats(etcd: Any, spec: RolloutSpec) -> tuple[VersionStats, VersionStats]:
    """The stable and canary versions' recent inbound calls, from every serving node's published status."""
    cards: dict[tuple[str, str], agent_pb2.AgentCard] = {}  # by (identity, instance id): ids repeat across agents
    for kv in await etcd.get_prefix(AGENTS.encode()):
        with contextlib.suppress(Exception):
            inst = mesh_pb2.AgentInstance.FromString(kv.value)
            cards[inst.identity, inst.instance_id] = inst.card
    totals: dict[str, list[float]] = {"stable": [0, 0, 0.0, 0], "canary": [0, 0, 0.0, 0]}  # calls, failures, ms
    for kv in await etcd.get_prefix(STATUS.encode()):
        try:
            node = policy_pb2.NodeTraffic.FromString(kv.value)
        except Exception:  # noqa: BLE001 - a bad entry must not stop the rollout's judgment of the others
            continue
        card = cards.get((node.identity, node.instance))
        if card is None:
            continue
        which = "canary" if _matches(spec.canary, card) else "stable" if _matches(spec.stable, card) else None
        if which is None:
            continue
        for cap in node.capabilities:
            if cap.direction == "inbound" and cap.capability == spec.capability:
                t = totals[which]
                t[0] += cap.calls
                t[1] += cap.failures
                if cap.latency_ms > 0:  # mean latency, weighted by each instance's calls
                    t[2] += cap.latency_ms * cap.calls
                    t[3] += cap.calls

    def stats(t: list[float]) -> VersionStats:
        return VersionStats(int(t[0]), int(t[1]), t[2] / t[3] if t[3] else None)

    return stats(totals["stable"]), stats(totals["canary"])


StatsSource = Callable[[Any, RolloutSpec], Awaitable[tuple[VersionStats, VersionStats]]]


class RolloutController:
    """Runs every rollouts document; `tick()` is one pass, the loop runs passes while this replica leads."""

    def __init__(self, etcd: Any, recorder: Recorder | None = None, *, stats: StatsSource = status_stats,
                 leading: Callable[[], bool] = lambda: True, clock: Callable[[], float] = time.time,
                 poll_s: float = 1.0, fence: Callable[[], list[Any]] = list) -> None:
        self.etcd = etcd
        self.recorder = recorder
        self.stats = stats
        self.leading = leading
        self.fence = fence
        """etcd compares that hold only while this replica's leadership term lasts (`LeaderElection.fence`): a
        pass that outlives its term (a stall, a partition) writes nothing over its successor's decisions."""
        self._fence: list[Any] = []
        self._owners: dict[str, str] = {}
        """routes document -> the rollout that drives it now (this pass)."""
        self._orphans: dict[bytes, tuple[int, float]] = {}
        """State keys seen without their rollouts document: key -> (mod revision, when first seen so)."""
        self.clock = clock
        self.poll_s = poll_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="hivemesh-rollouts")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)

    async def _loop(self) -> None:
        await leader_duty("rollout", self.leading, self.tick, self.poll_s)

    async def _state(self, name: str) -> RolloutState | None:
        """The rollout's progress, or None (started afresh) when there is none or it cannot be read: a state this
        code cannot read (hand-edited, from another version) must not stop this rollout, nor the others."""
        kv = await self.etcd.get(_state_key(name))
        if kv is None:
            return None
        try:
            doc = json_depth.loads(kv.value)
            return RolloutState(**doc) if isinstance(doc, dict) else None
        except (ValueError, TypeError, RecursionError) as exc:
            log.error("rollout %s: its stored state cannot be read (%r); starting it again from its first step",
                      name, exc)
            return None

    async def _target(self, name: str) -> Target | None:
        kv = await self.etcd.get(_target_key(name))
        return None if kv is None else Target.decode(kv.value)

    async def tick(self) -> dict[str, Decision]:
        """One pass over every rollout; returns what was decided for each (by name). One rollout's failure is
        its own: the others go on (each canary's rollback included). Then state left by deleted rollouts goes."""
        self._fence = self.fence()
        docs = await store.list_policies(self.etcd, ROLLOUTS_KIND.name)
        specs: dict[str, RolloutSpec] = {}
        for doc in docs:
            with contextlib.suppress(Exception):  # reported below, by the rollout it belongs to
                specs[doc.name] = ROLLOUTS_KIND.compile({doc.name: doc})[doc.name]
        self._owners = {spec.routes: name for name, spec in specs.items()}
        out: dict[str, Decision] = {}
        for doc in docs:
            try:
                spec = specs.get(doc.name) or ROLLOUTS_KIND.compile({doc.name: doc})[doc.name]
                out[doc.name] = await self._advance(doc, spec)
            except HivemeshError as err:  # e.g. its routes document conflicts with another: the others go on
                log.warning("rollout %s cannot proceed: %s", doc.name, err.message)
                out[doc.name] = Decision("error", err.message)
            except Exception as exc:  # anything unforeseen stops this rollout's pass only
                log.exception("rollout %s failed this pass", doc.name)
                out[doc.name] = Decision("error", repr(exc)[:200])
        try:
            await self._sweep()
        except Exception as exc:  # noqa: BLE001 - housekeeping: tried again next pass, the rollouts went on
            log.warning("rollout state sweep failed: %r", exc)
        return out

    async def _advance(self, doc: PolicyDoc, spec: RolloutSpec) -> Decision:
        now = self.clock()
        state = await self._state(spec.name)
        target = await self._target(spec.name)
        if target is not None and target.moved(spec):
            await self._withdraw(spec, doc.version, target)
            state, target = None, None
        if state is None or state.version != doc.version:
            state = RolloutState(version=doc.version, step=0, since=now)
            await self._write(spec, state, spec.steps[0], "started", f"canary at {spec.steps[0]}%", prior=target)
            return Decision("step", "started")
        now_target = Target.of(spec, created=target is not None and target.created)
        if target != now_target:
            # Written by a release that kept no target, or that restarted the rollout without updating it: the
            # state is this document version's, so this spec is what wrote the rule.
            await self._guarded(spec, doc.version,
                                [self.etcd.transactions.put(_target_key(spec.name), now_target.encode())])
        stable, canary = await self.stats(self.etcd, spec)
        decision = decide(spec, state, stable, canary, now)
        figures = {"stable_calls": stable.calls, "stable_error_rate": round(stable.error_rate, 4),
                   "canary_calls": canary.calls, "canary_error_rate": round(canary.error_rate, 4)}
        if decision.action == "rollback":
            state.phase, state.reason, state.since = "rolled-back", decision.reason, now
            await self._write(spec, state, 0, "rolled-back", decision.reason, figures, prior=now_target)
        elif decision.action == "step":
            state.step, state.since = state.step + 1, now
            await self._write(spec, state, spec.steps[state.step], "stepped", decision.reason, figures,
                              prior=now_target)
        elif decision.action == "done":
            state.phase, state.reason, state.since = "done", decision.reason, now
            await self._write(spec, state, None, "done", decision.reason, figures, prior=now_target)
        return decision

    async def _guarded(self, spec: RolloutSpec, version: int, ops: list[Any]) -> None:
        """ops in one transaction while this replica leads and rollouts/<name> is still at version."""
        t = self.etcd.transactions
        guard = [*self._fence, t.mod(_doc_key(spec.name)) == version]
        if not (await self.etcd.transaction(compare=guard, success=ops, failure=[]))[0]:
            await self._refused(spec, version)
            raise FailedPreconditionError(f"rollouts/{spec.name}: its state was not written; tried again next pass")

    async def _record(self, spec: RolloutSpec, event: str, canary_weight: int | None, reason: str,
                      figures: Mapping[str, Any] | None = None) -> None:
        log.warning("rollout %s: %s (%s)", spec.name, event, reason)
        if self.recorder is not None:
            try:
                await self.recorder({"event": "rollout", "rollout": spec.name, "capability": spec.capability,
                                     "action": event, "canary_weight": canary_weight, "reason": reason,
                                     **(figures or {})})
            except Exception:  # the step happened; a failed audit write is logged, not undone
                log.exception("could not record rollout %s in the audit log", spec.name)

    async def _write(self, spec: RolloutSpec, state: RolloutState, canary_weight: int | None, event: str,
                     reason: str, figures: Mapping[str, Any] | None = None, *, prior: Target | None) -> None:
        """The state (and the rule, unless canary_weight is None) with the rollout's target, in one transaction.
        prior: the target recorded before (whether the rollout created its routes document is carried over)."""
        t = self.etcd.transactions
        put_state = t.put(_state_key(spec.name), json.dumps(asdict(state)).encode())
        created = prior is not None and not prior.moved(spec) and prior.created
        # Every write holds only while this replica leads and the rollouts document is the version judged here:
        # one deleted (or changed) during the pass gets nothing written back (no state, no rule re-created).
        guard = [*self._fence, t.mod(_doc_key(spec.name)) == state.version]
        if canary_weight is not None:
            await self._write_rule(spec, state.version, canary_weight, guard, put_state, created)
        else:
            await self._guarded(spec, state.version,
                                [put_state, t.put(_target_key(spec.name), Target.of(spec, created).encode())])
        await self._record(spec, event, canary_weight, reason, figures)

    async def _write_rule(self, spec: RolloutSpec, version: int, canary_weight: int, guard: list[Any],
                          put_state: Any, created: bool) -> None:
        """The rule at canary_weight, the state and the target, in one transaction under guard, compared on the
        routes document's mod revision as read: when another writer (an operator's apply) changed the document in
        between, read it again and rebuild the rule on it, not over it (at most ROUTE_ATTEMPTS times). A routes
        document of other capabilities is not written: the rule would steer traffic the rollout does not judge."""
        t = self.etcd.transactions
        key = policy_key(ROUTES.name, spec.routes).encode()
        for _attempt in range(ROUTE_ATTEMPTS):
            kv = await self.etcd.get(key)
            current: Mapping[str, Any] | None = None
            read = 0
            if kv is not None:
                read = int(kv.mod_revision)
                try:
                    current = ROUTES.load(spec.routes, kv.value, read).spec
                except PolicyError:  # an invalid stored document is replaced (still only the version read)
                    current = None
            if current is not None:
                caps = [str(c) for c in current.get("capabilities", ["*"])]
                if not any(fnmatch.fnmatchcase(spec.capability, c) for c in caps):
                    raise FailedPreconditionError(
                        f"rollouts/{spec.name}: routes/{spec.routes} targets {caps}, not capability "
                        f"{spec.capability!r}: its rule would steer other traffic; name a routes document of "
                        f"{spec.capability!r} in spec.routes")
            also = [put_state, t.put(_target_key(spec.name), Target.of(spec, created or kv is None).encode())]
            doc = store.validate_document({"kind": ROUTES.name, "name": spec.routes, "version": read,
                                           "spec": routes_spec(spec, current, canary_weight)})
            refusal: FailedPreconditionError | None = None
            try:
                result = await store.apply_policies(self.etcd, [doc], fence=guard, also=also)
                if result.revision:
                    return
                # The document already says this (apply_policies writes nothing then, `also` included): the state
                # goes alone, still only on the version read.
                ok, _ = await self.etcd.transaction(compare=[*guard, t.mod(key) == read], success=also, failure=[])
                if ok:
                    return
            except FailedPreconditionError as err:
                refusal = err
            await self._refused(spec, version)
            if (await self.etcd.transaction(compare=[t.mod(key) == read], success=[], failure=[]))[0]:
                # Refused for another reason than a newer document: reading it again would change nothing.
                raise refusal or FailedPreconditionError(f"rollouts/{spec.name}: routes/{spec.routes} was not written")
            log.info("rollout %s: routes/%s changed since it was read; reading it again", spec.name, spec.routes)
        raise FailedPreconditionError(
            f"rollouts/{spec.name}: routes/{spec.routes} changed under each of {ROUTE_ATTEMPTS} writes of its rule "
            "(another writer keeps applying it); nothing written, tried again next pass")

    async def _withdraw(self, spec: RolloutSpec, version: int, old: Target) -> None:
        """The rollout now points at another routes document or capability than `old`, where its rule was
        written: take that rule back out, and forget the state and target (the caller then starts it afresh).

        Why take it out rather than leave it (as a deletion does): the rollouts document still exists and says
        where the rollout acts now; a rule left behind keeps splitting the old target's traffic by a rollout that
        no longer judges it, and nothing would ever step or roll it back. Only the rule the rollout wrote comes
        out, and only while it is as written (its split at one of its weights): a rule another writer changed
        since, and every other rule and field, stay (to keep a finished rollout's split where it was, rename its
        rule before the edit); a document another rollout drives now is not touched (the rule there is that
        one's). A document the rollout created is deleted once it holds nothing else, so it does not go on
        targeting the old capability. The removal is a compare-and-swap on the mod revision read
        (read again on a change, at most ROUTE_ATTEMPTS times), fenced and on this rollouts document version like
        every write; the fresh start is the next write, so between the two neither target has the rule."""
        t = self.etcd.transactions
        guard = [*self._fence, t.mod(_doc_key(spec.name)) == version]
        forget = [t.delete(_state_key(spec.name)), t.delete(_target_key(spec.name))]
        key = policy_key(ROUTES.name, old.routes).encode()
        owner = self._owners.get(old.routes, spec.name)
        for _attempt in range(ROUTE_ATTEMPTS):
            kv = await self.etcd.get(key)
            read = 0 if kv is None else int(kv.mod_revision)
            current: Mapping[str, Any] | None = None
            if kv is not None:
                with contextlib.suppress(PolicyError):  # an invalid document is not ours to judge: left as is
                    current = ROUTES.load(old.routes, kv.value, read).spec
            rules = list(current.get("rules", [])) if current is not None else []
            rest = [r for r in rules if not (r.get("name") == RULE and old.wrote(r))]
            ops: list[Any] = []
            if current is None:
                outcome = f"routes/{old.routes} is gone or unreadable: nothing to take back"
            elif owner != spec.name:
                outcome = f"routes/{old.routes} is driven by rollouts/{owner} now: left as it is"
            elif len(rest) == len(rules):
                outcome = f"its rule in routes/{old.routes} was changed or removed by another writer: left as it is"
            else:
                left = {k: v for k, v in current.items() if k != "rules"}
                if rest:
                    left["rules"] = rest
                if old.created and left == {"capabilities": [old.capability]}:
                    ops = [t.delete(key)]
                    outcome = f"its rule taken out of routes/{old.routes}, which it had created: deleted"
                else:
                    item = store.validate_document({"kind": ROUTES.name, "name": old.routes, "spec": left})
                    ops = [t.put(key, item.kind.store(item.doc))]
                    outcome = f"its rule taken out of routes/{old.routes}"
            ok, _ = await self.etcd.transaction(compare=[*guard, t.mod(key) == read], success=[*ops, *forget],
                                                failure=[])
            if ok:
                await self._record(spec, "withdrawn", None,
                                   f"{outcome} (it now targets routes/{spec.routes}, capability {spec.capability})")
                return
            await self._refused(spec, version)
            log.info("rollout %s: routes/%s changed since it was read; reading it again", spec.name, old.routes)
        raise FailedPreconditionError(
            f"rollouts/{spec.name}: routes/{old.routes} changed under each of {ROUTE_ATTEMPTS} attempts to take its "
            "rule back out (another writer keeps applying it); nothing written, tried again next pass")

    async def _sweep(self) -> int:
        """Remove state (and target) keys whose rollouts document is gone, at most ORPHANS_PER_PASS a pass;
        returns how many. They are left by deletions made before `delete_rollout`, which takes them along.

        A key goes only when, in one transaction: this replica still leads, the rollouts document of its name does
        not exist, and the key is at the mod revision seen when it was first found without its document, at least
        ORPHAN_GRACE_S earlier (so on a later pass). The compares alone make it safe against this controller's own
        writes (a state is only written while its document exists, in a transaction that compares it); the grace
        covers a writer that puts a state a moment before its document (a restore, a hand repair): the document's
        arrival, or any rewrite of the key, within the grace keeps the key. A state that old with no document is
        no rollout's progress: a rollouts document created later has a newer mod revision than the one the state
        names, and would start over from its first step anyway."""
        t = self.etcd.transactions
        doc_prefix = _doc_key("")
        docs = {kv.key[len(doc_prefix):] for kv in await self.etcd.get_prefix(doc_prefix, keys_only=True)}
        now = self.clock()
        seen: dict[bytes, tuple[int, float]] = {}
        prefix = ROLLOUTS.encode()
        for kv in await self.etcd.get_prefix(prefix, keys_only=True):
            if kv.key[len(prefix):].split(b"/", 1)[0] in docs:
                continue
            before = self._orphans.get(kv.key)
            mod = int(kv.mod_revision)
            seen[kv.key] = before if before is not None and before[0] == mod else (mod, now)
            if len(seen) >= ORPHANS_TRACKED:
                break
        self._orphans = seen
        removed: list[str] = []
        for key, (mod, since) in list(seen.items()):
            if len(removed) >= ORPHANS_PER_PASS:
                break
            if now - since < ORPHAN_GRACE_S:
                continue
            name = key[len(prefix):].split(b"/", 1)[0].decode("utf-8", "replace")
            ok, _ = await self.etcd.transaction(
                compare=[*self._fence, t.version(_doc_key(name)) == 0, t.mod(key) == mod],
                success=[t.delete(key)], failure=[])
            if ok:
                removed.append(key[len(prefix):].decode("utf-8", "replace"))
                del self._orphans[key]
            elif self._fence and not (await self.etcd.transaction(compare=list(self._fence), success=[],
                                                                  failure=[]))[0]:
                break  # another replica leads now: it sweeps
        if removed:
            log.info("removed rollout state left without a rollouts document: %s", ", ".join(removed))
            if self.recorder is not None:
                try:
                    await self.recorder({"event": "rollout", "action": "state-removed", "keys": removed,
                                         "reason": "no rollouts document of that name"})
                except Exception:
                    log.exception("could not record the removed rollout state in the audit log")
        return len(removed)

    async def _refused(self, spec: RolloutSpec, version: int) -> None:
        """After a refused write: raise why when this replica no longer leads or the rollouts document is no
        longer the version judged (deleted, or changed: the next pass starts it over); return otherwise."""
        if self._fence and not (await self.etcd.transaction(compare=list(self._fence), success=[], failure=[]))[0]:
            raise FailedPreconditionError("this control-plane replica no longer leads: another one decides now")
        now = await _mod_revision(self.etcd, _doc_key(spec.name))
        if now != version:
            raise FailedPreconditionError(
                f"rollouts/{spec.name} was {'deleted' if now == 0 else 'changed'} during this pass: nothing written")


def install(core: Core, server: Any) -> RolloutController:
    """The rollout loop, run by the control-plane leader for the control plane's lifetime (no service)."""
    from hivemesh.controlplane.audit.store import audit_store
    from hivemesh.controlplane.replicas import is_leader, leader_fence

    return RolloutController(core.etcd, audit_store(core).record, leading=lambda: is_leader(core),
                             fence=lambda: leader_fence(core))

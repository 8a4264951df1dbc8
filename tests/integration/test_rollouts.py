"""Automatic rollouts over real etcd: the controller reads the serving nodes' published status and the
registry (written here as serving nodes write them), steps the canary's weight in the routes document through
5 → 25 → 50 → 100 while the canary is healthy, and rolls back by itself when it starts failing mid-rollout;
each step lands in a real control-plane audit log. Steps are driven by pass, on a test clock."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aetcd

from hivemesh.controlplane import policies as store
from hivemesh.controlplane.audit.store import AuditStore
from hivemesh.controlplane.rollouts import RolloutController, VersionStats
from hivemesh.mesh.etcd import EtcdServer, client, wait_connected
from hivemesh.mesh.keyspace import AGENTS, ROLLOUTS
from hivemesh.mesh.status import status_key
from hivemesh.v1 import agent_pb2, mesh_pb2, policy_pb2
from tests.support.meshenv import MeshEnv

ROLLOUT = """
kind: rollouts
name: {cap}-v2
spec:
  capability: {cap}
  stable: {{version: "1.*"}}
  canary: {{version: "2.*"}}
  steps: [5, 25, 50, 100]
  interval_s: 30
  min_calls: 10
  max_error_rate: 0.1
"""


async def _serve(etcd: aetcd.Client, instance: str, version: str, agent: str = "flaky") -> None:
    """A registry entry, as a serving node registers itself."""
    card = agent_pb2.AgentCard(name=agent, version=version,
                               capabilities=[agent_pb2.Capability(name=c, idempotent=True) for c in ("work", "score")])
    entry = mesh_pb2.AgentInstance(instance_id=instance, identity=f"spiffe://hivemesh.test/agent/{agent}",
                                   endpoint="127.0.0.1:1", card=card)
    await etcd.put(f"{AGENTS}{agent}/{instance}".encode(), entry.SerializeToString())


async def _status(etcd: aetcd.Client, instance: str, latency_ms: float = 20.0, **caps: tuple[int, int]) -> None:
    """The status a serving node publishes: inbound (calls, failures) per capability over the last ~10 s."""
    node = policy_pb2.NodeTraffic(identity="spiffe://hivemesh.test/agent/flaky", instance=instance, capabilities=[
        policy_pb2.CapabilityTraffic(capability=c, direction="inbound", calls=n, failures=f, latency_ms=latency_ms,
                                     error_rate=f / n if n else 0.0) for c, (n, f) in caps.items()])
    await etcd.put(status_key("agent", "flaky", instance).encode(), node.SerializeToString())


async def _canary_weight(etcd: aetcd.Client, cap: str) -> int:
    rule = (await store.get_policy(etcd, "routes", f"rollout-{cap}-v2")).spec["rules"][0]
    assert rule["name"] == "rollout" and [s["version"] for s in rule["split"]] == ["1.*", "2.*"]
    stable, canary = (s["weight"] for s in rule["split"])
    assert stable + canary == 100
    return int(canary)


async def test_rollout_steps_a_healthy_canary_and_rolls_back_a_failing_one(etcd: aetcd.Client,
                                                                           tmp_path: Path) -> None:
    await _serve(etcd, "flaky-v1", "1.0.0")
    await _serve(etcd, "flaky-v2", "2.0.0")
    await _serve(etcd, "flaky-v2", "1.0.0", agent="other")  # its id is the canary's: its card is not the canary's
    await _status(etcd, "flaky-v1", work=(100, 1), score=(100, 1))
    await _status(etcd, "flaky-v2", work=(3, 0), score=(3, 0))  # too few canary calls to judge yet
    await store.apply_text(etcd, ROLLOUT.format(cap="work") + "---" + ROLLOUT.format(cap="score"))
    audit = AuditStore(tmp_path / "audit", identity="spiffe://hivemesh.test/controlplane").open()
    now = [1000.0]
    controller = RolloutController(etcd, audit.record, clock=lambda: now[0])

    weights: dict[str, list[int]] = {"work": [], "score": []}

    async def tick(advance: float = 0.0) -> dict[str, str]:
        now[0] += advance
        decided = await controller.tick()
        for cap in weights:
            w = await _canary_weight(etcd, cap)
            if not weights[cap] or weights[cap][-1] != w:
                weights[cap].append(w)
        return {name.removesuffix("-v2"): d.action for name, d in decided.items()}

    try:
        assert await tick() == {"work": "step", "score": "step"}  # started at 5%
        assert await tick(60) == {"work": "hold", "score": "hold"}  # min_calls not reached: no step on time alone
        await _status(etcd, "flaky-v2", work=(20, 0), score=(20, 0))
        assert await tick() == {"work": "step", "score": "step"}  # 25%: enough calls, healthy, interval passed
        assert await tick(10) == {"work": "hold", "score": "hold"}  # healthy, but the interval has not passed
        assert await tick(20) == {"work": "step", "score": "step"}  # 50%
        # score's canary starts failing mid-rollout (5 of 20 > 10%): it is rolled back at once, not at the
        # end of the interval; work's stays healthy and goes on to 100% and done.
        await _status(etcd, "flaky-v2", work=(40, 1), score=(20, 5))
        assert await tick(1) == {"work": "hold", "score": "rollback"}
        assert await tick(30) == {"work": "step", "score": "hold"}  # 100%
        assert await tick(30) == {"work": "done", "score": "hold"}
        assert await tick(30) == {"work": "hold", "score": "hold"}
        assert weights == {"work": [5, 25, 50, 100], "score": [5, 25, 50, 0]}

        state = json.loads((await etcd.get(f"{ROLLOUTS}score-v2".encode())).value)
        assert state["phase"] == "rolled-back" and "25.0% > max_error_rate 10.0%" in state["reason"]
        records = [json.loads(line)["record"] for line in audit.lines()]
        steps = [(r["rollout"], r["action"], r["canary_weight"]) for r in records if r.get("event") == "rollout"]
        assert steps == [
            ("score-v2", "started", 5), ("work-v2", "started", 5),
            ("score-v2", "stepped", 25), ("work-v2", "stepped", 25),
            ("score-v2", "stepped", 50), ("work-v2", "stepped", 50),
            ("score-v2", "rolled-back", 0),
            ("work-v2", "stepped", 100), ("work-v2", "done", None),
        ]
        rollback = next(r for r in records if r.get("action") == "rolled-back")
        assert (rollback["canary_calls"], rollback["canary_error_rate"]) == (20, 0.25)

        # A changed rollouts document starts over; the routes document keeps its other rules and fields.
        await store.apply_text(etcd, "kind: routes\nname: rollout-score-v2\nspec:\n  capabilities: [score]\n"
                               "  fallback: work\n  rules:\n    - {name: rollout, pin: {version: '1.*'}}\n"
                               "    - {name: other, pin: {version: '1.*'}}\n")
        await store.apply_text(etcd, ROLLOUT.format(cap="score").replace("max_error_rate: 0.1", "max_error_rate: 0.3"))
        assert (await tick())["score"] == "step"
        routes = (await store.get_policy(etcd, "routes", "rollout-score-v2")).spec
        assert routes["fallback"] == "work" and [r["name"] for r in routes["rules"]] == ["rollout", "other"]
        assert await _canary_weight(etcd, "score") == 5
        # Now healthy by errors, but four times slower than the stable version (> 1.5x): rolled back.
        await _status(etcd, "flaky-v2", latency_ms=80.0, work=(40, 0), score=(20, 0))
        assert (await tick(30))["score"] == "rollback"
        assert await _canary_weight(etcd, "score") == 0
        state = json.loads((await etcd.get(f"{ROLLOUTS}score-v2".encode())).value)
        assert "canary latency 80 ms > 1.5 x the stable version's 20 ms" in state["reason"]
        # A rollout whose routes document would clash with another one of its capability cannot write it: it
        # says why, writes nothing, and the other rollouts go on.
        await store.apply_text(etcd, "kind: routes\nname: plain\nspec: {capabilities: [extra]}\n---"
                               + ROLLOUT.format(cap="extra"))
        decided = await controller.tick()
        assert decided["extra-v2"].action == "error" and "both target 'extra'" in decided["extra-v2"].reason
        assert decided["work-v2"].action == "hold" and await etcd.get(f"{ROLLOUTS}extra-v2".encode()) is None
    finally:
        await audit.close()


async def test_the_control_plane_leader_runs_rollouts(mesh_env: MeshEnv, etcd: aetcd.Client) -> None:
    """Wiring: the control plane of the mesh (leading, alone) starts a rollout applied through the store."""
    await store.apply_text(etcd, ROLLOUT.format(cap="work"))
    deadline = asyncio.get_running_loop().time() + 10
    while (await etcd.get(f"{ROLLOUTS}work-v2".encode())) is None:
        assert asyncio.get_running_loop().time() < deadline, "the control plane did not start the rollout"
        await asyncio.sleep(0.05)
    assert await _canary_weight(etcd, "work") == 5


TWO = ROLLOUT.format(cap="aaa") + "---" + ROLLOUT.format(cap="bbb")


async def test_a_rollout_whose_state_cannot_be_read_starts_again_and_the_others_go_on(etcd: aetcd.Client) -> None:
    """A stored state this code cannot read (hand-edited, from another version) raised out of the pass, so no
    rollout stepped or rolled back again, a failing canary's included."""
    await store.apply_text(etcd, TWO)
    await etcd.put(f"{ROLLOUTS}aaa-v2".encode(), b'{"version": 1, "step": 0, "extra": 1}')
    decided = await RolloutController(etcd, None).tick()
    assert {name: d.action for name, d in decided.items()} == {"aaa-v2": "step", "bbb-v2": "step"}
    for name in ("aaa-v2", "bbb-v2"):
        kv = await etcd.get(f"{ROLLOUTS}{name}".encode())
        assert kv is not None and json.loads(kv.value)["step"] == 0


async def test_a_pass_that_outlives_its_leadership_writes_nothing(etcd: aetcd.Client) -> None:
    """Replica A began a pass while leading, then stalled past its lease; B took over and stepped the rollout. A's
    stale rollback must not land over B's step (its writes carry A's term, which no longer holds)."""
    from hivemesh.controlplane.leader import LeaderElection
    from tests.support.waiting import until

    doc = ROLLOUT.format(cap="work").replace("interval_s: 30", "interval_s: 0.05").replace("min_calls: 10",
                                                                                           "min_calls: 1")
    await store.apply_text(etcd, doc)
    a, b = LeaderElection(etcd, "replica-a", ttl_s=2), LeaderElection(etcd, "replica-b", ttl_s=2)
    stalled, resume = asyncio.Event(), asyncio.Event()

    async def failing_canary_seen_late(_etcd: object, _spec: object) -> tuple[VersionStats, VersionStats]:
        stalled.set()
        await resume.wait()  # a slow read, a pause, a partition
        return VersionStats(100, 0, 20.0), VersionStats(100, 50, 20.0)

    async def healthy(_etcd: object, _spec: object) -> tuple[VersionStats, VersionStats]:
        return VersionStats(100, 0, 20.0), VersionStats(100, 0, 20.0)

    try:
        await a.start()
        await b.start()
        assert a.is_leader and not b.is_leader
        ca = RolloutController(etcd, None, stats=failing_canary_seen_late, leading=lambda: a.is_leader, fence=a.fence)
        cb = RolloutController(etcd, None, stats=healthy, leading=lambda: b.is_leader, fence=b.fence)
        assert (await ca.tick())["work-v2"].action == "step"  # A starts it
        stale = asyncio.create_task(ca.tick())
        assert await until(stalled.is_set, 10)
        await a.stop()  # A's term ends (its lease revoked); B takes over
        assert await until(lambda: b.is_leader, 15), "B did not take over"
        for _ in range(200):  # B steps once the canary's interval (0.05 s) has passed since A started it
            if (await cb.tick())["work-v2"].action == "step":
                break
            await asyncio.sleep(0.02)
        after_b = json.loads((await etcd.get(f"{ROLLOUTS}work-v2".encode())).value)
        assert after_b["step"] == 1
        resume.set()
        decided = (await asyncio.wait_for(stale, 10))["work-v2"]
        assert decided.action == "error" and "no longer leads" in decided.reason
        assert json.loads((await etcd.get(f"{ROLLOUTS}work-v2".encode())).value) == after_b
        assert await _canary_weight(etcd, "work") == 25
    finally:
        resume.set()
        await a.stop()
        await b.stop()


class PausingEtcd:
    """A real etcd client whose reads of one key hold their answer until the test lets them go, so that another
    writer acts between a reader's read and its write (as a slow pass on a busy machine allows). Nothing is
    replaced: every call goes to etcd."""

    def __init__(self, real: aetcd.Client, key: bytes, pauses: int = 1) -> None:
        self._real, self._key, self.pauses = real, key, pauses
        self.held: asyncio.Queue[asyncio.Event] = asyncio.Queue()
        """One event per held read: set it to let the read's answer go."""

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)

    async def get(self, key: bytes) -> object:
        kv = await self._real.get(key)
        if key == self._key and self.pauses > 0:
            self.pauses -= 1
            go = asyncio.Event()
            await self.held.put(go)
            await go.wait()
        return kv


ROUTES_KEY = "/hivemesh/policies/routes/rollout-work-v2"


async def _healthy(_etcd: object, _spec: object) -> tuple[VersionStats, VersionStats]:
    return VersionStats(100, 0, 20.0), VersionStats(100, 0, 20.0)


async def _operator_edits_routes(etcd: aetcd.Client, n: int) -> None:
    """An operator's read-modify-write of the rollout's routes document (its version given: a compare-and-swap
    itself): a fallback and a rule of its own, numbered n."""
    current = await store.get_policy(etcd, "routes", "rollout-work-v2")
    spec = dict(current.spec)
    spec["fallback"] = f"fallback-{n}"
    spec["rules"] = [*[r for r in spec["rules"] if r["name"] != "ops"],
                     {"name": "ops", "match": {"metadata": {"tenant": f"t{n}"}}, "pin": {"version": "1.*"}}]
    await store.apply_policies(etcd, [store.validate_document(
        {"kind": "routes", "name": "rollout-work-v2", "spec": spec, "version": current.version})])


@contextlib.asynccontextmanager
async def _started_leader(etcd: aetcd.Client,
                          etcd_server: EtcdServer) -> AsyncIterator[tuple[PausingEtcd, RolloutController, list[float]]]:
    """Rollout work-v2 started (5%) by a leader on its own etcd client, whose reads of the routes document the
    test can hold (gate.pauses); yields (gate, controller, now: the controller's clock, to move on)."""
    await store.apply_text(etcd, ROLLOUT.format(cap="work").replace("interval_s: 30", "interval_s: 1"))
    leader = client(etcd_server.access)
    await wait_connected(leader)
    now = [1000.0]
    try:
        gate = PausingEtcd(leader, ROUTES_KEY.encode(), pauses=0)
        controller = RolloutController(gate, None, stats=_healthy, clock=lambda: now[0])
        assert (await controller.tick())["work-v2"].action == "step"  # started: 5%
        yield gate, controller, now
    finally:
        await leader.close()


async def test_a_step_does_not_overwrite_an_apply_made_since_it_read_the_routes(etcd: aetcd.Client,
                                                                              etcd_server: EtcdServer) -> None:
    """Two writers of one routes document over real etcd: the leader's rollout step (its own client) read the
    document, then an operator's apply changed it before the step wrote. The step wrote the rule into the document
    it had read, so the operator's fallback and rule were gone (a lost update); now its write compares the
    version it read, reads again and puts its rule into the operator's document."""
    async with _started_leader(etcd, etcd_server) as (gate, controller, now):
        gate.pauses = 1
        now[0] += 5
        stepping = asyncio.create_task(controller.tick())
        go = await asyncio.wait_for(gate.held.get(), 10)  # the step has read the routes document
        await _operator_edits_routes(etcd, 1)
        go.set()
        assert (await asyncio.wait_for(stepping, 10))["work-v2"].action == "step"
        routes = (await store.get_policy(etcd, "routes", "rollout-work-v2")).spec
        assert routes["fallback"] == "fallback-1", routes  # the operator's change is still there
        assert [r["name"] for r in routes["rules"]] == ["rollout", "ops"], routes
        assert await _canary_weight(etcd, "work") == 25  # and so is the step
        state = json.loads((await etcd.get(f"{ROLLOUTS}work-v2".encode())).value)
        assert state["step"] == 1


async def test_a_step_that_keeps_losing_the_race_gives_up_for_the_pass_and_writes_nothing(
        etcd: aetcd.Client, etcd_server: EtcdServer) -> None:
    """The operator applies the routes document between every read and write of the step: the step tries again
    from a fresh read a bounded number of times, then gives up for this pass with nothing written (no rule over
    the operator's document, no state saying it stepped); the next pass steps."""
    async with _started_leader(etcd, etcd_server) as (gate, controller, now):
        before = (await etcd.get(f"{ROLLOUTS}work-v2".encode())).value
        gate.pauses = 100
        now[0] += 5
        stepping = asyncio.create_task(controller.tick())
        edits = 0
        while not stepping.done():
            held = asyncio.create_task(gate.held.get())
            await asyncio.wait([held, stepping], timeout=10, return_when=asyncio.FIRST_COMPLETED)
            if not held.done():
                held.cancel()
                break
            await _operator_edits_routes(etcd, edits)
            edits += 1
            held.result().set()
        decided = (await asyncio.wait_for(stepping, 10))["work-v2"]
        assert decided.action == "error" and f"changed under each of {edits} writes" in decided.reason, decided
        assert 2 <= edits <= 10, edits  # tried again from a fresh read, a bounded number of times
        routes = (await store.get_policy(etcd, "routes", "rollout-work-v2")).spec
        assert routes["fallback"] == f"fallback-{edits - 1}" and await _canary_weight(etcd, "work") == 5
        assert (await etcd.get(f"{ROLLOUTS}work-v2".encode())).value == before
        gate.pauses = 0
        assert (await controller.tick())["work-v2"].action == "step"  # no one in the way: 25%
        assert await _canary_weight(etcd, "work") == 25
        assert (await store.get_policy(etcd, "routes", "rollout-work-v2")).spec["fallback"] == f"fallback-{edits - 1}"


async def test_a_restart_whose_rule_is_already_in_place_is_recorded_once(etcd: aetcd.Client,
                                                                        tmp_path: Path) -> None:
    """An edited rollouts document starts over at its first step; when the rule already stood at that weight the
    routes document was left as it was, and with it the state (written in the same apply): the rollout was
    started again, and audited as started, on every pass."""
    await store.apply_text(etcd, ROLLOUT.format(cap="work"))
    audit = AuditStore(tmp_path / "audit", identity="spiffe://hivemesh.test/controlplane").open()
    try:
        controller = RolloutController(etcd, audit.record)
        assert (await controller.tick())["work-v2"].action == "step"  # started: 5%
        await store.apply_text(etcd, ROLLOUT.format(cap="work").replace("interval_s: 30", "interval_s: 40"))
        version = (await store.get_policy(etcd, "rollouts", "work-v2")).version
        assert (await controller.tick())["work-v2"].action == "step"  # started again, rule unchanged at 5%
        assert json.loads((await etcd.get(f"{ROLLOUTS}work-v2".encode())).value)["version"] == version
        assert [(await controller.tick())["work-v2"].action for _ in range(3)] == ["hold"] * 3
        started = [json.loads(line)["record"] for line in audit.lines()]
        assert [r["action"] for r in started if r.get("event") == "rollout"] == ["started", "started"]
    finally:
        await audit.close()

"""Deleting a rollout over real etcd: `hivemesh policy delete rollouts NAME` (the Policies service's DeletePolicy,
served by a real control plane) removes the rollouts document and the rollout's state in one transaction and
stops the rollout where it is: the routes document stays as last written (docs/rollouts.md). A leader's pass
that read the rollout before the deletion writes nothing back; a deletion that races a step leaves the rule as
stepped and no state."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import aetcd
import pytest

from hivemesh.controlplane import policies as store
from hivemesh.controlplane.cli.policy_client import PolicyClient
from hivemesh.controlplane.rollouts import RolloutController, VersionStats
from hivemesh.mesh.errors import FailedPreconditionError, NotFoundError
from hivemesh.mesh.etcd import EtcdServer, client, wait_connected
from hivemesh.mesh.keyspace import ROLLOUTS
from tests.integration.test_rollouts import PausingEtcd
from tests.support.meshenv import MeshEnv

ROLLOUT = """
kind: rollouts
name: {cap}-v2
spec:
  capability: {cap}
  {routes}
  stable: {{version: "1.*"}}
  canary: {{version: "2.*"}}
  steps: [5, 25, 50, 100]
  interval_s: 1
  min_calls: 1
"""

OPERATORS_ROUTES = """
kind: routes
name: work-routes
spec:
  capabilities: [work]
  fallback: spare
  rules:
    - {name: ops, match: {metadata: {tenant: t1}}, pin: {version: "1.*"}}
"""


OPERATORS_ROUTES_RULE = {"name": "ops", "match": {"metadata": {"tenant": "t1"}}, "pin": {"version": "1.*"}}


def rollout(cap: str, routes: str = "") -> str:
    return ROLLOUT.format(cap=cap, routes=f"routes: {routes}" if routes else "")


async def eventually(check: Callable[[], Awaitable[bool]], limit_s: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + limit_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.05)


async def state(etcd: aetcd.Client, name: str) -> dict[str, object] | None:
    kv = await etcd.get(f"{ROLLOUTS}{name}".encode())
    return None if kv is None else dict(json.loads(kv.value))


async def routes(etcd: aetcd.Client, name: str) -> dict[str, object] | None:
    try:
        return dict((await store.get_policy(etcd, "routes", name)).spec)
    except NotFoundError:
        return None


def rule(canary: int) -> dict[str, object]:
    return {"name": "rollout", "split": [{"version": "1.*", "weight": 100 - canary},
                                         {"version": "2.*", "weight": canary}]}


async def test_deleting_a_rollout_through_the_control_plane_removes_its_state_and_stops_it_where_it_is(
        mesh_env: MeshEnv, etcd: aetcd.Client) -> None:
    await store.apply_text(etcd, OPERATORS_ROUTES)
    await store.apply_text(etcd, rollout("work", "work-routes") + "---" + rollout("score"))
    started = {"work-v2", "score-v2"}

    async def all_started() -> bool:
        return all([await state(etcd, n) is not None for n in started])

    await eventually(all_started, 15, "the control plane's leader did not start the rollouts")
    operator = PolicyClient(mesh_env.operator)

    with pytest.raises(NotFoundError, match="no rollouts policy named 'nosuch'"):
        await operator.delete("rollouts", "nosuch")
    version = (await operator.get("rollouts", "work-v2")).version
    with pytest.raises(FailedPreconditionError, match=f"rollouts/work-v2 is at version {version}, not 1"):
        await operator.delete("rollouts", "work-v2", version=1)
    assert await state(etcd, "work-v2") is not None, "a refused deletion removed nothing"

    await operator.delete("rollouts", "work-v2", version=version)
    await operator.delete("rollouts", "score-v2")
    for name in started:
        assert await state(etcd, name) is None, name
        with pytest.raises(NotFoundError):
            await operator.get("rollouts", name)
    # Stopped where they were: the operator's document keeps the rollout's rule and the rest of it, and the
    # document the rollout created stays.
    assert await routes(etcd, "work-routes") == {"capabilities": ["work"], "fallback": "spare",
                                                 "rules": [rule(5), OPERATORS_ROUTES_RULE]}
    assert (await routes(etcd, "rollout-score-v2") or {})["rules"] == [rule(5)]

    # The leader's later passes bring no state back: one has run once a new rollout is started.
    await store.apply_text(etcd, rollout("extra"))

    async def extra_started() -> bool:
        return await state(etcd, "extra-v2") is not None

    await eventually(extra_started, 15, "the control plane's leader did not start the new rollout")
    assert [await state(etcd, name) for name in started] == [None, None]
    assert (await routes(etcd, "work-routes") or {})["rules"] == [rule(5), OPERATORS_ROUTES_RULE]


async def test_a_pass_that_read_the_rollout_before_its_deletion_writes_nothing_back(
        mesh_env: MeshEnv, etcd: aetcd.Client, etcd_server: EtcdServer) -> None:
    """The leader's pass judged the canary (a slow status read), the operator deleted the rollout meanwhile, and
    the pass then rolled it back: its state and its rule (at 0%) were written again, for a rollout that no longer
    exists."""
    await store.apply_text(etcd, rollout("work"))

    async def started() -> bool:
        return await state(etcd, "work-v2") is not None

    await eventually(started, 15, "the control plane's leader did not start the rollout")
    judging, resume = asyncio.Event(), asyncio.Event()

    async def failing_canary_seen_late(_etcd: object, _spec: object) -> tuple[VersionStats, VersionStats]:
        judging.set()
        await resume.wait()
        return VersionStats(100, 0, 20.0), VersionStats(100, 50, 20.0)

    leader = client(etcd_server.access)
    await wait_connected(leader)
    try:
        late = RolloutController(leader, None, stats=failing_canary_seen_late)
        pass_ = asyncio.create_task(late.tick())
        await asyncio.wait_for(judging.wait(), 10)
        await PolicyClient(mesh_env.operator).delete("rollouts", "work-v2")
        resume.set()
        decided = (await asyncio.wait_for(pass_, 10))["work-v2"]
        assert decided.action == "error" and "rollouts/work-v2 was deleted during this pass" in decided.reason
        assert await state(etcd, "work-v2") is None
        assert (await routes(etcd, "rollout-work-v2") or {})["rules"] == [rule(5)], "the late rollback wrote its rule"
    finally:
        resume.set()
        await leader.close()


async def test_a_deletion_that_races_a_step_leaves_no_state_and_the_rule_as_stepped(
        etcd: aetcd.Client, etcd_server: EtcdServer) -> None:
    """The deletion read the rollout, then the leader stepped (new state, new rule) before the deletion's
    transaction: the step's state goes with the document, and the rule stays as stepped."""
    from hivemesh.controlplane.rollouts import delete_rollout  # (what DeletePolicy runs for a rollout)

    await store.apply_text(etcd, OPERATORS_ROUTES + "---" + rollout("work", "work-routes"))
    now = [1000.0]

    async def healthy(_etcd: object, _spec: object) -> tuple[VersionStats, VersionStats]:
        return VersionStats(100, 0, 20.0), VersionStats(100, 0, 20.0)

    controller = RolloutController(etcd, None, stats=healthy, clock=lambda: now[0])
    assert (await controller.tick())["work-v2"].action == "step"  # started: 5%
    deleter = client(etcd_server.access)
    await wait_connected(deleter)
    try:
        gate = PausingEtcd(deleter, b"/hivemesh/policies/rollouts/work-v2")
        deleting = asyncio.create_task(delete_rollout(gate, "work-v2"))
        go = await asyncio.wait_for(gate.held.get(), 10)  # it has read the rollout
        now[0] += 5
        assert (await controller.tick())["work-v2"].action == "step"  # 25%
        go.set()
        await asyncio.wait_for(deleting, 10)
        assert await state(etcd, "work-v2") is None
        assert (await routes(etcd, "work-routes") or {})["rules"] == [rule(25), OPERATORS_ROUTES_RULE]
        now[0] += 5
        assert "work-v2" not in await controller.tick()
        assert await state(etcd, "work-v2") is None
    finally:
        await deleter.close()

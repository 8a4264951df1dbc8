"""Rollouts that move, and state left behind, over real etcd (docs/rollouts.md).

An edit that points a rollout at another routes document or capability takes the rule it wrote back out of the
document it wrote before (only that rule, only while it is as written, with the same compare-and-swap as its
other writes) and starts afresh where it now points; before, the old rule kept splitting traffic that no rollout
judged any more. State keys whose rollouts document is gone (deletions before `delete_rollout`) are removed by
the leader's passes, bounded, fenced, and not while a state may be one written just before its document."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aetcd

from hivemesh.controlplane import policies as store
from hivemesh.controlplane.audit.store import AuditStore
from hivemesh.controlplane.leader import LeaderElection
from hivemesh.controlplane.rollouts import ORPHAN_GRACE_S, ORPHANS_PER_PASS, RolloutController, VersionStats
from hivemesh.mesh.etcd import EtcdServer, client, wait_connected
from hivemesh.mesh.keyspace import ROLLOUTS
from tests.integration.test_rollout_delete import (
    OPERATORS_ROUTES,
    OPERATORS_ROUTES_RULE,
    eventually,
    rollout,
    rule,
    state,
)
from tests.integration.test_rollout_delete import routes as routes_of
from tests.integration.test_rollouts import PausingEtcd
from tests.support.meshenv import MeshEnv
from tests.support.waiting import until

SCORE_RULE = {"name": "ops-score", "match": {"metadata": {"tenant": "t2"}}, "pin": {"version": "1.*"}}
OPERATORS_SCORE_ROUTES = """
kind: routes
name: score-routes
spec:
  capabilities: [score]
  rules:
    - {name: ops-score, match: {metadata: {tenant: t2}}, pin: {version: "1.*"}}
"""


def moved(cap: str, to_cap: str, routes: str = "") -> str:
    """rollouts/<cap>-v2 edited to drive capability to_cap (through routes, or its own default document)."""
    return rollout(cap, routes).replace(f"capability: {cap}", f"capability: {to_cap}")


async def version_of(etcd: aetcd.Client, kind: str, name: str) -> int:
    return (await store.get_policy(etcd, kind, name)).version


async def test_the_leader_takes_a_moved_rollouts_rule_out_of_the_document_it_left(
        mesh_env: MeshEnv, etcd: aetcd.Client) -> None:
    """A rollout edited to drive score through score-routes left its rule in work-routes, splitting work's traffic
    with nothing judging it; one whose capability changed kept writing its own document, which still targeted the
    old capability. The control plane's leader now takes the rule out (the operator's rules and fields stay),
    deletes the document the rollout had created once it is empty, and starts afresh on the new target."""
    await store.apply_text(etcd, "---".join([OPERATORS_ROUTES, OPERATORS_SCORE_ROUTES, rollout("work", "work-routes"),
                                             rollout("extract")]))

    async def started() -> bool:
        return await state(etcd, "work-v2") is not None and await state(etcd, "extract-v2") is not None

    await eventually(started, 15, "the control plane's leader did not start the rollouts")
    assert (await routes_of(etcd, "work-routes") or {})["rules"] == [rule(5), OPERATORS_ROUTES_RULE]
    assert await routes_of(etcd, "rollout-extract-v2") == {"capabilities": ["extract"], "rules": [rule(5)]}

    await store.apply_text(etcd, moved("work", "score", "score-routes") + "---" + moved("extract", "summarize"))
    versions = {n: await version_of(etcd, "rollouts", n) for n in ("work-v2", "extract-v2")}

    async def moved_on() -> bool:
        return all([((await state(etcd, n)) or {}).get("version") == v for n, v in versions.items()])

    await eventually(moved_on, 15, "the leader did not start the moved rollouts afresh")
    assert await routes_of(etcd, "work-routes") == {"capabilities": ["work"], "fallback": "spare",
                                                    "rules": [OPERATORS_ROUTES_RULE]}
    assert await routes_of(etcd, "score-routes") == {"capabilities": ["score"], "rules": [rule(5), SCORE_RULE]}
    assert await routes_of(etcd, "rollout-extract-v2") == {"capabilities": ["summarize"], "rules": [rule(5)]}


async def test_only_the_rule_the_rollout_wrote_comes_out(etcd: aetcd.Client, tmp_path: Path) -> None:
    """Three rollouts move in one edit. bbb-v2's rule comes out of the operator's bare document, which stays (the
    rollout did not create it); work-v2's rule was changed by the operator since (a pin now): it stays; score-v2's
    old document is driven by aaa-v2 now, whose rule there reads exactly as score-v2's did: it stays."""
    await store.apply_text(etcd, "---".join([
        OPERATORS_ROUTES, OPERATORS_SCORE_ROUTES, "\nkind: routes\nname: bbb-routes\nspec: {capabilities: [bbb]}\n",
        rollout("work", "work-routes"), rollout("score", "score-routes"), rollout("bbb", "bbb-routes")]))
    audit = AuditStore(tmp_path / "audit", identity="spiffe://hivemesh.test/controlplane").open()
    try:
        controller = RolloutController(etcd, audit.record)
        assert {d.action for d in (await controller.tick()).values()} == {"step"}
        operators_rule = {"name": "rollout", "pin": {"version": "1.*"}}
        await store.apply_text(etcd, OPERATORS_ROUTES.replace("rules:\n", "rules:\n    - {name: rollout, pin: "
                                                                          "{version: '1.*'}}\n"))
        await store.apply_text(etcd, "---".join([
            moved("work", "work2"), moved("score", "other", "other-routes"), moved("bbb", "bbb2"),
            rollout("aaa", "score-routes").replace("capability: aaa", "capability: score")]))
        decided = await controller.tick()
        assert {n: d.action for n, d in decided.items()} == dict.fromkeys(
            ("aaa-v2", "bbb-v2", "score-v2", "work-v2"), "step"), decided

        assert await routes_of(etcd, "bbb-routes") == {"capabilities": ["bbb"]}
        assert (await routes_of(etcd, "work-routes") or {})["rules"] == [operators_rule, OPERATORS_ROUTES_RULE]
        assert (await routes_of(etcd, "score-routes") or {})["rules"] == [rule(5), SCORE_RULE]
        for name in ("rollout-work-v2", "other-routes", "rollout-bbb-v2"):
            assert (await routes_of(etcd, name) or {})["rules"] == [rule(5)], name
        records = [json.loads(line)["record"] for line in audit.lines()]
        withdrawn = {r["rollout"]: r["reason"] for r in records if r.get("action") == "withdrawn"}
        assert withdrawn.keys() == {"work-v2", "score-v2", "bbb-v2"}, withdrawn
        assert withdrawn["bbb-v2"].startswith("its rule taken out of routes/bbb-routes (it now targets")
        assert "routes/score-routes is driven by rollouts/aaa-v2 now" in withdrawn["score-v2"]
        assert "its rule in routes/work-routes was changed or removed by another writer" in withdrawn["work-v2"]
        again = await controller.tick()
        assert [again[n].action for n in withdrawn] == ["hold"] * 3  # moved once, not again
    finally:
        await audit.close()


async def test_a_rollout_moved_within_its_document_to_a_capability_it_does_not_target_writes_nothing(
        etcd: aetcd.Client) -> None:
    """Edited from work to score but still naming work-routes (of work): its rule comes out, and is not written
    back into a document whose traffic is work's (it would split work's calls by score's judgment)."""
    await store.apply_text(etcd, OPERATORS_ROUTES + "---" + rollout("work", "work-routes"))
    controller = RolloutController(etcd, None)
    assert (await controller.tick())["work-v2"].action == "step"
    await store.apply_text(etcd, moved("work", "score", "work-routes"))
    for _ in range(2):
        decided = (await controller.tick())["work-v2"]
        assert decided.action == "error" and "routes/work-routes targets ['work'], not capability 'score'" in \
            decided.reason, decided
    assert (await routes_of(etcd, "work-routes") or {})["rules"] == [OPERATORS_ROUTES_RULE]
    assert await state(etcd, "work-v2") is None


async def test_taking_the_rule_out_does_not_overwrite_an_apply_made_since_it_read_the_document(
        etcd: aetcd.Client, etcd_server: EtcdServer) -> None:
    """The leader read work-routes to take the moved rollout's rule out; the operator applied work-routes (a new
    fallback) before the leader wrote: the leader reads again and takes the rule out of the operator's version."""
    await store.apply_text(etcd, OPERATORS_ROUTES + "---" + rollout("work", "work-routes"))
    leader = client(etcd_server.access)
    await wait_connected(leader)
    try:
        gate = PausingEtcd(leader, b"/hivemesh/policies/routes/work-routes", pauses=0)
        controller = RolloutController(gate, None)
        assert (await controller.tick())["work-v2"].action == "step"
        await store.apply_text(etcd, moved("work", "score"))
        gate.pauses = 1
        moving = asyncio.create_task(controller.tick())
        go = await asyncio.wait_for(gate.held.get(), 10)  # it has read work-routes
        await store.apply_text(etcd, OPERATORS_ROUTES.replace("fallback: spare", "fallback: spare2")
                               .replace("rules:\n", "rules:\n    - " + json.dumps(rule(5)) + "\n"))
        go.set()
        assert (await asyncio.wait_for(moving, 10))["work-v2"].action == "step"
        assert await routes_of(etcd, "work-routes") == {"capabilities": ["work"], "fallback": "spare2",
                                                        "rules": [OPERATORS_ROUTES_RULE]}
        assert (await routes_of(etcd, "rollout-work-v2") or {})["rules"] == [rule(5)]
    finally:
        await leader.close()


def _legacy_state(version: int) -> bytes:
    return json.dumps({"version": version, "step": 2, "since": 1.0, "phase": "stepping", "reason": ""}).encode()


async def test_the_control_planes_leader_removes_state_left_by_deleted_rollouts(
        mesh_env: MeshEnv, etcd: aetcd.Client) -> None:
    """A rollout deleted as DeletePolicy did before `delete_rollout` (the document alone) left its state for good.
    The leader now removes it, and stray keys of no rollout, while a live rollout's state stays."""
    await store.apply_text(etcd, rollout("work") + "---" + rollout("score"))

    async def started() -> bool:
        return await state(etcd, "work-v2") is not None and await state(etcd, "score-v2") is not None

    await eventually(started, 15, "the control plane's leader did not start the rollouts")
    await store.delete_policy(etcd, "rollouts", "score-v2")
    await etcd.put(f"{ROLLOUTS}gone-v1".encode(), _legacy_state(3))
    await etcd.put(f"{ROLLOUTS}gone-v1/target".encode(), b"{}")

    async def swept() -> bool:
        return all(k.startswith("work-v2") for k in await _keys(etcd))

    await eventually(swept, ORPHAN_GRACE_S + 15, "the leader did not remove the state of deleted rollouts")
    assert await state(etcd, "work-v2") is not None
    assert await etcd.get(f"{ROLLOUTS}work-v2/target".encode()) is not None


async def _keys(etcd: aetcd.Client) -> list[str]:
    """Every key under the rollouts' state prefix, less the prefix."""
    return [kv.key[len(ROLLOUTS):].decode() for kv in await etcd.get_prefix(ROLLOUTS.encode())]


async def test_state_without_its_document_goes_after_a_grace_a_few_at_a_time(etcd: aetcd.Client) -> None:
    """Orphaned state keys go, ORPHANS_PER_PASS a pass, once seen unchanged without their document for
    ORPHAN_GRACE_S. A state put a moment before its document (a restore) is not one: seen without it on one pass,
    its document arrives, and the next pass finds it (etcd's create revision shows the key was never deleted); a
    key rewritten in between starts its grace again."""
    now = [1000.0]
    controller = RolloutController(etcd, None, clock=lambda: now[0])
    orphans = [f"old-{i:02}" for i in range(ORPHANS_PER_PASS + 3)]
    for name in orphans:
        await etcd.put(f"{ROLLOUTS}{name}".encode(), _legacy_state(5))
    await etcd.put(f"{ROLLOUTS}early-v2".encode(), _legacy_state(5))
    early = (await etcd.get(f"{ROLLOUTS}early-v2".encode())).create_revision

    assert await controller.tick() == {}
    assert await _keys(etcd) == ["early-v2", *orphans]  # seen, not removed: within the grace
    await store.apply_text(etcd, rollout("early"))  # the state's document, a moment after it
    now[0] += ORPHAN_GRACE_S - 1
    await etcd.put(f"{ROLLOUTS}old-00".encode(), _legacy_state(6))  # rewritten: its grace starts again
    assert (await controller.tick())["early-v2"].action == "step"
    assert [k for k in await _keys(etcd) if k.startswith("old-")] == orphans  # still within the grace

    now[0] += 1
    await controller.tick()
    remaining = [k for k in await _keys(etcd) if k.startswith("old-")]
    assert len(remaining) == len(orphans) - ORPHANS_PER_PASS, remaining  # bounded per pass
    assert "old-00" in remaining
    assert (await etcd.get(f"{ROLLOUTS}early-v2".encode())).create_revision == early
    await controller.tick()
    assert [k for k in await _keys(etcd) if k.startswith("old-")] == ["old-00"]
    now[0] += ORPHAN_GRACE_S
    await controller.tick()
    assert [k for k in await _keys(etcd) if not k.startswith("early-v2")] == []
    assert (await etcd.get(f"{ROLLOUTS}early-v2".encode())).create_revision == early


async def test_a_pass_that_outlives_its_leadership_removes_no_state(etcd: aetcd.Client) -> None:
    """The removal is fenced like every leader write: a pass begun while this replica led, which went on after
    its term ended (a slow status read, a stall), removes nothing; the replica that leads now does."""
    await etcd.put(f"{ROLLOUTS}old-v1".encode(), _legacy_state(5))
    await store.apply_text(etcd, rollout("work"))
    now = [1000.0]
    stalled, resume = asyncio.Event(), asyncio.Event()

    async def seen_late(_etcd: object, _spec: object) -> tuple[VersionStats, VersionStats]:
        stalled.set()
        await resume.wait()
        return VersionStats(100, 0, 20.0), VersionStats(100, 0, 20.0)

    a, b = LeaderElection(etcd, "replica-a", ttl_s=2), LeaderElection(etcd, "replica-b", ttl_s=2)
    try:
        await a.start()
        assert a.is_leader
        stale = RolloutController(etcd, None, stats=seen_late, clock=lambda: now[0], leading=lambda: a.is_leader,
                                  fence=a.fence)
        assert (await stale.tick())["work-v2"].action == "step"  # started; old-v1 seen without its document
        now[0] += ORPHAN_GRACE_S
        late = asyncio.create_task(stale.tick())
        await asyncio.wait_for(stalled.wait(), 10)
        await a.stop()  # its term ends while the pass waits
        resume.set()
        assert "no longer leads" in (await asyncio.wait_for(late, 10))["work-v2"].reason
        assert await state(etcd, "old-v1") is not None
        await b.start()
        assert await until(lambda: b.is_leader, 15), "B did not take over"
        current = RolloutController(etcd, None, stats=seen_late, clock=lambda: now[0], fence=b.fence)
        await current.tick()
        now[0] += ORPHAN_GRACE_S
        await current.tick()
        assert await state(etcd, "old-v1") is None
    finally:
        resume.set()
        await a.stop()
        await b.stop()

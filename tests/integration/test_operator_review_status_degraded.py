"""What an operator reviewing a running mesh found, fixed and checked on the real mesh (real etcd, control plane,
mutual TLS and tokens; agents fail on purpose):

- `hivemesh status` shows the rate limit of the policies in force: a deleted one, or one that lost its total,
  stops showing at the next published status, calls or not (it used to show forever);
- a fallback or cached (degraded) answer says so to a Python caller (`CallResult.degraded`) and to
  `hivemesh call` (stderr, and `--detailed`), while a real answer says it is not;
- a shadow call's audit record names its caller (the node that mirrored it), in the record and in
  `hivemesh audit query --kind shadow`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import aetcd
import pytest

from hivemesh.controlplane import policies as store
from hivemesh.sdk import AgentServer, AgentServerConfig, MeshClient
from hivemesh.v1 import policy_pb2
from tests.support.meshenv import MeshEnv, run_cli
from tests.support.resilience_rig import BackupAgent, FlakyAgent, FlakyV2, apply, fleet
from tests.support.traffic_status import traffic_status, wait_traffic_status


def _inbound_work(nodes: list[policy_pb2.NodeTraffic]) -> policy_pb2.CapabilityTraffic | None:
    """The serving agent's inbound `work` entry in the published status, as `hivemesh status` reads it."""
    for n in nodes:
        if n.identity.endswith("/agent/flaky"):
            for c in n.capabilities:
                if c.direction == "inbound" and c.capability == "work":
                    return c
    return None


def _published(limit: float, revision: int) -> Callable[[list[policy_pb2.NodeTraffic]], bool]:
    """The agent published a status of policy revision `revision` or later whose `work` limit is `limit`."""
    def done(nodes: list[policy_pb2.NodeTraffic]) -> bool:
        node = next((n for n in nodes if n.identity.endswith("/agent/flaky")), None)
        work = _inbound_work(nodes)
        return node is not None and node.policy_revision >= revision and work is not None \
            and work.limit_rps == limit
    return done


async def test_status_shows_the_rate_limit_of_the_policy_in_force_not_the_last_one_checked(
    mesh_env: MeshEnv, etcd: aetcd.Client
) -> None:
    async with fleet(mesh_env, ("a",)) as f:
        tight = "kind: ratelimits\nname: tight\nspec: {agents: [flaky], capabilities: [work], %s}"
        revision = await apply(etcd, tight % "total_rps: 1", f.nodes())
        assert await f.client.call("work", {}, timeout=5) == {"served_by": "a"}
        assert await wait_traffic_status(mesh_env, _published(1.0, revision), 15), await traffic_status(mesh_env)

        # The same policy without a total (a per-identity limit only), with a call checked against it: no limit.
        revision = await apply(etcd, tight % "per_identity_rps: 1000", f.nodes())
        assert await f.client.call("work", {}, timeout=5) == {"served_by": "a"}
        assert await wait_traffic_status(mesh_env, _published(0.0, revision), 15), await traffic_status(mesh_env)

        # A cluster-wide total, with no call since: this instance's share (the whole of it, alone) at once.
        revision = await apply(etcd, tight % "cluster_total_rps: 40", f.nodes())
        assert await wait_traffic_status(mesh_env, _published(40.0, revision), 15), await traffic_status(mesh_env)

        # Deleted (`hivemesh policy delete ratelimits tight`), no call since: no limit shows any more.
        revision = await store.delete_policy(etcd, "ratelimits", "tight")
        for node in f.nodes():
            assert await node.policies.wait_for_revision(revision, 5)
        assert await wait_traffic_status(mesh_env, _published(0.0, revision), 15), await traffic_status(mesh_env)
        for _ in range(5):  # and none is enforced: more than 1/s all answered
            assert await f.client.call("work", {}, timeout=5) == {"served_by": "a"}
        code, out, err = await run_cli(mesh_env, "status", "--json")
        assert code == 0, err
        served = next(n for n in json.loads(out) if n["identity"].endswith("/agent/flaky"))
        work = next(c for c in served["capabilities"] if c["direction"] == "inbound" and c["capability"] == "work")
        assert work.get("limit_rps", 0) == 0 and served["policy_revision"] >= revision, served


async def test_a_fallback_or_cached_answer_says_it_is_degraded_and_a_real_one_says_it_is_not(
    mesh_env: MeshEnv, etcd: aetcd.Client
) -> None:
    backup = BackupAgent()
    async with fleet(mesh_env, ("solo",)) as f, AgentServer(backup, await mesh_env.settings_for("backup")) as lite:
        assert await f.client.node.registry.wait_for_capability("work-lite", 1, timeout=10)
        nodes = [*f.nodes(), lite.node]
        await apply(etcd, "kind: routes\nname: work\nspec: {capabilities: [work], fallback: work-lite}", nodes)
        real = await f.client.call_detailed("work", {"text": "x"}, timeout=5)
        assert (real.output, real.degraded) == ({"served_by": "solo"}, "")

        f.agents[0].mode = "UNAVAILABLE"
        fell_back = await f.client.call_detailed("work", {"text": "x"}, timeout=5)
        assert (fell_back.output, fell_back.degraded) == ({"served_by": "backup"}, "fallback:work-lite")
        assert await f.client.call("work", {"text": "x"}, timeout=5) == {"served_by": "backup"}  # plain: unchanged

        # The operator's `hivemesh call` (its own node, the same route): said on stderr, a field with --detailed,
        # and --json stays the output alone.
        code, out, err = await run_cli(mesh_env, "call", "work", "--data", '{"text": "x"}', "--detailed")
        assert code == 0, err
        detailed = json.loads(out)
        assert (detailed["output"], detailed["degraded"], detailed["agent"]) == (
            {"served_by": "backup"}, "fallback:work-lite", "backup")
        assert "degraded: work failed; answered by its fallback work-lite" in " ".join(err.split()), err
        code, out, err = await run_cli(mesh_env, "call", "work", "--data", '{"text": "x"}', "--json")
        assert code == 0 and json.loads(out) == {"served_by": "backup"}, err
        assert "degraded: work failed; answered by its fallback work-lite" in " ".join(err.split()), err

        # A cached last good answer (the cache is the caller's own, so the SDK client's).
        await apply(etcd, "kind: routes\nname: work\nspec: {capabilities: [work], cache: {ttl_s: 60}}", nodes)
        f.agents[0].mode = "ok"
        kept = await f.client.call_detailed("work", {"text": "kept"}, timeout=5)
        assert (kept.output, kept.degraded) == ({"served_by": "solo"}, "")
        f.agents[0].mode = "UNAVAILABLE"
        cached = await f.client.call_detailed("work", {"text": "kept"}, timeout=5)
        assert (cached.output, cached.degraded) == ({"served_by": "solo"}, "cache")

        f.agents[0].mode = "ok"  # healthy again: a real answer, from the CLI too
        again = await f.client.call_detailed("work", {"text": "kept"}, timeout=5)
        assert (again.output, again.degraded) == ({"served_by": "solo"}, "")
        code, out, err = await run_cli(mesh_env, "call", "work", "--data", '{"text": "x"}', "--detailed")
        assert code == 0, err
        assert (json.loads(out)["output"], json.loads(out)["degraded"]) == ({"served_by": "solo"}, "")
        assert "degraded" not in err, err


async def test_a_shadow_audit_record_names_the_node_that_mirrored_the_call_as_its_caller(
    mesh_env: MeshEnv, etcd: aetcd.Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # the table's rows whole, one line each (the CLI folds to the width)
    # The candidate (2.0.0) answers with its own tag: every mirrored answer differs, so each is audited.
    stable, candidate = FlakyAgent("stable"), FlakyV2("candidate")
    async with contextlib.AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(AgentServer(a, await mesh_env.settings_for("flaky"),
                                                               AgentServerConfig(instance_id=f"flaky-{a.tag}")))
                   for a in (stable, candidate)]
        client = await stack.enter_async_context(MeshClient.connect(
            name="tester", settings=await mesh_env.settings_for("tester", "client"), audit_dir=tmp_path / "audit"))
        assert await client.node.registry.wait_for_capability("work", 2, timeout=10)
        await apply(etcd, "kind: routes\nname: work\nspec: {capabilities: [work], shadow: {version: \"2.*\", "
                    "percent: 100}}", [client.node, *(s.node for s in servers)])
        assert await client.call("work", {}, timeout=5) == {"served_by": "stable"}
        await client.node.outbound.shadow.drain()
        assert client.node.outbound.shadow.counts["different"] == 1

        me = client.node.workload.spiffe_id
        assert client.audit is not None and client.audit.shipper is not None
        shadows = [json.loads(line) for line in client.audit.spool.lines()]
        shadows = [r for r in shadows if r.get("kind") == "shadow"]
        assert [(r["caller"], r["node"], r["decision"]) for r in shadows] == [(me, me, "different")]
        assert await client.audit.shipper.wait_shipped(timeout=10)

    code, out, err = await run_cli(mesh_env, "audit", "query", "--kind", "shadow", "--json")
    assert code == 0, err
    assert [json.loads(line)["record"]["caller"] for line in out.splitlines()] == [me]
    code, out, err = await run_cli(mesh_env, "audit", "query", "--kind", "shadow")
    assert code == 0, err
    row = next(line for line in out.splitlines() if "different" in line)
    assert me in row and " ? " not in f" {row} ", out  # the caller column: the node's full id, not "?"

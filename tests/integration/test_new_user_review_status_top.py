"""What a new user found in `hivemesh status` and `hivemesh top`, fixed and checked on the real mesh (real etcd,
control plane, mutual TLS and tokens; the real CLI in a child process):

- a per-identity rate limit refused 18 of 20 calls while status showed no limit at all (or `0% of 50/s` beside a
  total): status now shows the per-identity limit and how many callers it refused, in the table and in --json;
- `hivemesh top` showed only the nodes `hivemesh up` started, never an agent started by hand, though it served
  metrics: nodes publish their metrics address in their status entry, and top scrapes what they publish.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import aetcd
import pytest

from hivemesh.mesh.errors import HivemeshError
from hivemesh.v1 import policy_pb2
from tests.support.meshenv import MeshEnv, run_cli
from tests.support.resilience_rig import apply, fleet
from tests.support.traffic_status import traffic_status, wait_traffic_status


def _work(nodes: list[policy_pb2.NodeTraffic]) -> policy_pb2.CapabilityTraffic | None:
    for n in nodes:
        if n.identity.endswith("/agent/flaky"):
            for c in n.capabilities:
                if c.direction == "inbound" and c.capability == "work":
                    return c
    return None


def _refused_by_identity(limit: float, refused: int, total: float) -> Callable[[list[policy_pb2.NodeTraffic]], bool]:
    def done(nodes: list[policy_pb2.NodeTraffic]) -> bool:
        work = _work(nodes)
        return work is not None and (work.identity_limit_rps, work.identities_limited, work.identity_limited,
                                     work.rate_limited, work.limit_rps) == (limit, 1, refused, refused, total)
    return done


async def test_status_shows_a_per_identity_limit_and_the_callers_it_refused(
    mesh_env: MeshEnv, etcd: aetcd.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # the CLI's table, one line a row (a narrow terminal wraps the cells)
    async with fleet(mesh_env, ("a",)) as f:
        await apply(etcd, "kind: ratelimits\nname: fair\nspec: {agents: [flaky], capabilities: [work], "
                          "per_identity_rps: 2, burst_s: 1, total_rps: 50}", f.nodes())
        refused = 0
        for _ in range(20):
            try:
                await f.client.call("work", {}, timeout=5)
            except HivemeshError as err:
                assert err.reason == "RATE_LIMITED", err
                refused += 1
        assert refused >= 15  # 2 in the bucket, a few more as it refills
        assert await wait_traffic_status(mesh_env, _refused_by_identity(2.0, refused, 50.0), 15), \
            await traffic_status(mesh_env)

        code, out, err = await run_cli(mesh_env, "status")
        assert code == 0, err
        rows = [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if line.startswith("│")]
        row = next((r for r in rows if r[0].startswith("agent/flaky") and r[1] == "inb"), None)
        assert row is not None, out
        # The limiter: the total's use, then the per-identity limit and the callers it refused; limited: them all.
        assert row[8:] == ["0% of 50/s; per identity 2/s, 1 at limit", str(refused)], out

        code, out, err = await run_cli(mesh_env, "status", "--json")
        assert code == 0, err
        served = next(n for n in json.loads(out) if n["identity"].endswith("/agent/flaky"))
        work = next(c for c in served["capabilities"] if c["direction"] == "inbound" and c["capability"] == "work")
        assert (work["identity_limit_rps"], work["identities_limited"], work["identity_limited"]) == (2.0, 1, refused)
        assert (work["limit_rps"], work["rate_limited"], work["identity_overrides"]) == (50.0, refused, 0)


async def test_top_finds_an_agent_started_by_hand_from_its_published_status(mesh_env: MeshEnv) -> None:
    async with fleet(mesh_env, ("a",)) as f:
        address = f.servers[0].metrics_address
        assert address is not None and address.startswith("127.0.0.1:")
        await f.client.call("work", {}, timeout=5)

        def published(nodes: list[policy_pb2.NodeTraffic]) -> bool:
            return any(n.identity.endswith("/agent/flaky") and n.metrics_address == address for n in nodes)
        assert await wait_traffic_status(mesh_env, published, 15), await traffic_status(mesh_env)

        # The CLI's home has no file_sd files (no `hivemesh up`): what top scrapes is what the nodes published.
        code, out, err = await run_cli(mesh_env, "top", "--once", "--json", "--interval", "0.3")
        assert code == 0, err
        targets = json.loads(out)["targets"]
        assert (address, True) in [(t["address"], t["up"]) for t in targets], targets

        # Told what to scrape, top scrapes only that, unless asked to discover too.
        code, out, err = await run_cli(mesh_env, "top", "--once", "--json", "--interval", "0.3",
                                       "--endpoint", "127.0.0.1:9")
        assert code == 1 and [t["address"] for t in json.loads(out)["targets"]] == ["127.0.0.1:9"], (out, err)
        code, out, err = await run_cli(mesh_env, "top", "--once", "--json", "--interval", "0.3",
                                       "--endpoint", "127.0.0.1:9", "--discover")
        assert code == 0, err
        assert [t["address"] for t in json.loads(out)["targets"]][:2] == ["127.0.0.1:9", address], out

"""Per-identity rate limits hold cluster-wide by default (issue 11, "Faults that cross the network" bullet 2), on
the real mesh: three in-process replicas, real etcd, real TLS and tokens.

One caller offers three times its limit, spread round robin over three replicas. With the default scope
("cluster") each replica enforces a third of the limit, so the mesh admits about the limit; with
`scope: instance` each replica enforces all of it, so the mesh admits about three times the limit (the
behaviour before: 50/s became 164/s). Assertions are on counts over the window, with slack for bursts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aetcd
import pytest

from hivemesh.mesh.errors import RateLimitedError
from hivemesh.sdk import MeshClient
from tests.support.meshenv import MeshEnv
from tests.support.resilience_rig import apply, fleet

pytestmark = pytest.mark.timeout(60)

LIMIT = 25.0  # per caller identity, per second
SECONDS = 2.0
BURST_S = 0.5  # half a second of rate: absorbs arrival jitter on a busy 2-core machine
OFFERED = 3 * 2 * LIMIT  # twice what even three separate per-instance limits admit


async def _open_loop(rate: float, seconds: float, call: Callable[[], Awaitable[Any]]) -> tuple[list[Any], float]:
    """Start call() `rate` times a second for `seconds` whatever the answers: the results and the time taken."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks: list[asyncio.Task[Any]] = []
    for i in range(int(rate * seconds)):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(call()))
    results = list(await asyncio.gather(*tasks))
    return results, loop.time() - start


async def _admitted(client: MeshClient) -> tuple[int, int, float]:
    async def one() -> bool:
        try:
            await client.call("work", {}, timeout=5)
            return True
        except RateLimitedError:
            return False

    results, took = await _open_loop(OFFERED, SECONDS, one)
    return sum(results), len(results), took


async def test_a_per_identity_limit_is_divided_among_replicas_unless_its_scope_is_instance(
    mesh_env: MeshEnv, etcd: aetcd.Client
) -> None:
    async with fleet(mesh_env, ("a", "b", "c")) as f:
        figures = {}
        for scope, replicas_share in (("cluster", 1), ("instance", 3)):
            text = f"""
kind: ratelimits
name: per-caller
spec: {{agents: [flaky], capabilities: [work], per_identity_rps: {LIMIT:g}, burst_s: {BURST_S:g}{
                ', scope: instance' if scope == 'instance' else ''}}}
"""
            await apply(etcd, text, f.nodes())
            before = sum(a.calls["work"] for a in f.agents)
            admitted, offered, took = await _admitted(f.client)
            reached = sum(a.calls["work"] for a in f.agents) - before
            figures[scope] = admitted
            print(f"\nscope {scope}: {admitted} of {offered} calls admitted in {took:.2f} s "
                  f"({admitted / took:.1f}/s; limit {LIMIT:g}/s per identity, 3 replicas)")
            assert reached == admitted  # a refused call never reached an agent
            per_replica = LIMIT * replicas_share / 3
            bursts = 3 * max(1.0, per_replica * BURST_S)  # each replica's bucket starts full (at least 1 call)
            ceiling = replicas_share * LIMIT * took
            assert admitted <= ceiling * 1.2 + bursts, (scope, admitted, ceiling)
            assert admitted >= ceiling * 0.7, (scope, admitted, ceiling)
    assert figures["instance"] > 2 * figures["cluster"]  # the two scopes are really different

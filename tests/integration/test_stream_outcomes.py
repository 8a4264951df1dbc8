"""A stream's outcome reaches the caller's breakers, balancer and counts when the caller stops at its final chunk.

`MeshClient.stream` returns as soon as the final chunk arrives, without waiting for the stream's end. The outbound
pipeline's attempt was then closed at that chunk, and before the fix counted as neither a success nor a failure:
a capability breaker never saw a stream succeed (successes did not reset its count of consecutive failures, so
failures spread out between successful streams opened it), and the attempt's bookkeeping ran only once the
garbage collector closed the abandoned generator, after the caller's loop had already ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aetcd
import grpc
import pytest

from hivemesh.mesh.errors import AgentError, HivemeshError
from hivemesh.sdk import Agent, AgentServer, AgentServerConfig, MeshClient, capability
from tests.support.meshenv import MeshEnv
from tests.support.resilience_rig import apply

pytestmark = pytest.mark.timeout(90)

BREAKER = """
kind: breakers
name: ticks
spec:
  capabilities: [ticks]
  capability: {consecutive_failures: 2, open_ms: 60000}
"""


class Ticker(Agent):
    """Streams n ticks, or fails before the first one while `failing` is set, or holds every stream before its
    first tick until `release` is set (a hung replica)."""

    name = "ticker"

    def __init__(self, release: asyncio.Event | None = None) -> None:
        super().__init__()
        self.failing = False
        self.release = release
        self.streams = 0

    @capability(description="n ticks, one chunk each")
    async def ticks(self, req: dict[str, int]) -> AsyncIterator[dict[str, int]]:
        self.streams += 1
        if self.failing:
            raise AgentError("failing on purpose")
        if self.release is not None:
            await self.release.wait()
        for i in range(req.get("n", 3)):
            yield {"tick": i}


async def _ticks(client: MeshClient, n: int = 3, timeout: float = 10) -> list[Any]:
    return [item async for item in client.stream("ticks", {"n": n}, timeout=timeout)]


async def test_streams_read_to_their_final_chunk_count_as_successes(
    mesh_env: MeshEnv, etcd: aetcd.Client, tmp_path: Path
) -> None:
    agent = Ticker()
    async with AgentServer(agent, await mesh_env.settings_for("ticker"),
                           AgentServerConfig(audit_dir=tmp_path / "audit")) as server, \
            MeshClient.connect(name="watcher", settings=await mesh_env.settings_for("watcher", "client")) as client:
        assert await client.node.registry.wait_for_capability("ticks", 1, timeout=10)
        await apply(etcd, BREAKER, [client.node])
        state = client.node.outbound.traffic.state
        instance = server.instance_key

        assert await _ticks(client) == [{"tick": 0}, {"tick": 1}, {"tick": 2}]
        # Right after the loop, with nothing awaited since: the attempt is over and counted.
        assert ("outbound", "ticks", 0) in state.in_flight()
        assert state.balancer.outstanding(instance) == 0

        # fail, succeed, fail: never two failures in a row, so the breaker (2 consecutive) must stay closed.
        for failing in (True, False, True):
            agent.failing = failing
            if failing:
                with pytest.raises(HivemeshError) as failed:
                    await _ticks(client)
                assert "failing on purpose" in failed.value.message
            else:
                assert len(await _ticks(client)) == 3
        agent.failing = False
        assert await _ticks(client, 2) == [{"tick": 0}, {"tick": 1}], "a success between failures was not counted"


async def test_a_stream_held_before_its_first_chunk_until_its_deadline_steers_the_next_ones_elsewhere(
    mesh_env: MeshEnv, tmp_path: Path
) -> None:
    """A replica that holds streams without a chunk (hung) costs one stream its deadline; the next go to the
    replica that answers (without that, round robin sends it every other one)."""
    release = asyncio.Event()
    hung, healthy = Ticker(release), Ticker()
    try:
        async with AgentServer(hung, await mesh_env.settings_for("ticker"),
                               AgentServerConfig(audit_dir=tmp_path / "hung")) as held, \
                AgentServer(healthy, await mesh_env.settings_for("ticker"),
                            AgentServerConfig(audit_dir=tmp_path / "healthy")), \
                MeshClient.connect(name="watcher", settings=await mesh_env.settings_for("watcher", "client"),
                                   metrics_listen="127.0.0.1:0") as client:
            assert await client.node.registry.wait_for_capability("ticks", 2, timeout=10)
            timed_out = 0
            for _ in range(8):
                try:
                    assert await _ticks(client, timeout=0.5) == [{"tick": 0}, {"tick": 1}, {"tick": 2}]
                except HivemeshError as err:
                    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED, err
                    timed_out += 1
            assert (timed_out, hung.streams, healthy.streams) == (1, 1, 7)
            assert client.node.liveness.is_unanswering(held.instance_key)
            # What `hivemesh status` publishes for this node says so, per instance.
            snap = client.node._status_snapshot()
            avoided = {i.instance: i.avoided for c in snap.capabilities if c.capability == "ticks"
                       and c.direction == "outbound" for i in c.instances}
            assert avoided[held.instance_key] == "unanswering" and set(avoided.values()) == {"unanswering", ""}
            metrics = client.node.metrics
            assert metrics is not None
            labels = {"capability": "ticks", "peer": "spiffe://hivemesh.local/agent/ticker"}
            assert metrics.metrics.registry.get_sample_value("hivemesh_peer_unanswered_total", labels) == 1.0
            release.set()
    finally:
        release.set()

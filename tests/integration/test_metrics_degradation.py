"""Degraded answers show on the caller's `/metrics`: a capability whose replica fails is answered by its
fallback, then (with a cache route) by its last good answer, and the caller node's Prometheus port, scraped
over HTTP, counts each kind exactly, under the capability that was called; then a breakers policy comes in,
and the state of the capability's breaker and of its instance's show too. Real etcd, control plane, mutual TLS
and tokens; the failing agent fails on purpose."""

from __future__ import annotations

import asyncio

import aetcd
import grpc
import pytest

from hivemesh.mesh.errors import HivemeshError
from hivemesh.mesh.outbound import DEGRADED_KEY
from hivemesh.mesh.resilience.traffic import breaker_states
from hivemesh.sdk import AgentServer, MeshClient
from hivemesh.v1 import agent_pb2
from tests.integration.test_metrics_mesh import promtool_clean, sample, scrape
from tests.support.meshenv import MeshEnv
from tests.support.resilience_rig import BackupAgent, FlakyAgent, apply

FALLBACKS = 2
CACHED = 3


async def _degraded_how(client: MeshClient, text: str) -> str:
    """Call `work` below the SDK (the same bytes the SDK sends), for the marker saying how it was degraded."""
    raw, _ = await client.node.outbound.invoke(
        agent_pb2.InvokeRequest(capability="work", input=f'{{"text":"{text}"}}'.encode(),
                                content_type="application/json").SerializeToString(),
        capability="work", idempotency_key="", timeout=5,
    )
    return agent_pb2.InvokeResponse.FromString(raw).metadata.get(DEGRADED_KEY, "")


async def test_the_caller_counts_each_fallback_and_each_cached_answer(
    mesh_env: MeshEnv, etcd: aetcd.Client
) -> None:
    solo, backup = FlakyAgent("solo"), BackupAgent()
    async with (AgentServer(solo, await mesh_env.settings_for("flaky")) as server,
                AgentServer(backup, await mesh_env.settings_for("backup")) as lite):
        client = MeshClient.connect(name="tester", settings=await mesh_env.settings_for("tester", "client"),
                                    metrics_listen="127.0.0.1:0")
        async with client:
            nodes = [client.node, server.node, lite.node]
            solo_id = server.instance_key
            assert await client.node.registry.wait_for_capability("work", 1, timeout=10)
            assert await client.node.registry.wait_for_capability("work-lite", 1, timeout=10)

            # A route with a fallback: every failed call of `work` is answered by `work-lite`.
            await apply(etcd, "kind: routes\nname: work\nspec: {capabilities: [work], fallback: work-lite}", nodes)
            solo.mode = "UNAVAILABLE"
            for _ in range(FALLBACKS - 1):
                assert await client.call("work", {"text": "x"}, timeout=5) == {"served_by": "backup"}
            assert await _degraded_how(client, "x") == "fallback:work-lite"
            assert backup.calls == FALLBACKS

            # A route with a cache: a good answer is kept, and failed calls with the same input get it back.
            await apply(etcd, "kind: routes\nname: work\nspec: {capabilities: [work], cache: {ttl_s: 60}}", nodes)
            solo.mode = "ok"
            assert await client.call("work", {"text": "kept"}, timeout=5) == {"served_by": "solo"}
            solo.mode = "UNAVAILABLE"
            for _ in range(CACHED - 1):
                assert await client.call("work", {"text": "kept"}, timeout=5) == {"served_by": "solo"}
            assert await _degraded_how(client, "kept") == "cache"
            with pytest.raises(HivemeshError) as miss:  # nothing cached for this input: not a cached answer
                await client.call("work", {"text": "never seen"}, timeout=5)
            assert miss.value.code == grpc.StatusCode.UNAVAILABLE

            # Breakers on the instance and on the capability: one more failure opens the capability's (2 = open,
            # under peer_instance=""); the instance's stays closed (0), as the last live instance is never ejected.
            await apply(etcd, "kind: breakers\nname: work\nspec: {capabilities: [work], instance: "
                        "{consecutive_failures: 1, open_ms: 600000, max_ejected_share: 1.0}, "
                        "capability: {consecutive_failures: 1, open_ms: 600000}}", nodes)
            with pytest.raises(HivemeshError):
                await client.call("work", {"text": "breaks"}, timeout=5)

            assert breaker_states(client.node.traffic.state, "work") == {server.instance_key: "closed"}
            assert client.node.metrics is not None
            text = await asyncio.to_thread(scrape, client.node.metrics.address)

    assert sample(text, "hivemesh_fallbacks_total", capability="work") == FALLBACKS
    assert sample(text, "hivemesh_cached_answers_total", capability="work") == CACHED
    # Counted under the capability called, not under the one that answered.
    assert "hivemesh_fallbacks_total{capability=\"work-lite\"}" not in text
    assert "hivemesh_cached_answers_total{capability=\"work-lite\"}" not in text
    assert sample(text, "hivemesh_breaker_state", capability="work", peer_instance="") == 2
    assert sample(text, "hivemesh_breaker_state", capability="work", peer_instance=solo_id) == 0
    promtool_clean(text)

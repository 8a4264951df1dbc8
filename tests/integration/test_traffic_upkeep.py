"""A caller's traffic state follows the breakers policy and the instances it calls (real etcd, control plane,
mutual TLS, agents failing on purpose): a deleted or changed breakers policy changes the breakers `hivemesh
status` and `hivemesh_breaker_state` show at once (they stayed open on a healthy capability for good), and the
rows of an instance that left the mesh go once its counting window is empty (they stayed for good)."""

from __future__ import annotations

import asyncio
import time

import aetcd

from hivemesh.controlplane import policies as store
from hivemesh.mesh.errors import CircuitOpenError, HivemeshError
from hivemesh.mesh.resilience.traffic import breaker_states
from hivemesh.sdk import AgentServer, AgentServerConfig, MeshClient
from hivemesh.v1 import policy_pb2
from tests.integration.test_metrics_mesh import sample, scrape
from tests.support.meshenv import MeshEnv
from tests.support.resilience_rig import FlakyAgent, apply, wait_until

BREAKERS = """
kind: breakers
name: br-work
spec:
  capabilities: [work]
  capability: {consecutive_failures: 3, open_ms: 600000}
  instance: {consecutive_failures: 1, open_ms: 600000, max_ejected_share: 0.5}
"""


def _status(client: MeshClient) -> policy_pb2.NodeTraffic:
    return client.node.traffic.state.snapshot(identity="caller", instance="i")


def _work(snap: policy_pb2.NodeTraffic) -> policy_pb2.CapabilityTraffic:
    (row,) = [c for c in snap.capabilities if c.capability == "work" and c.direction == "outbound"]
    return row


async def _open_the_capability_breaker(client: MeshClient, agents: list[FlakyAgent]) -> None:
    """Every replica fails until the capability breaker refuses calls (each call is one attempt: no retries)."""
    for a in agents:
        a.mode = "INTERNAL"
    for _ in range(50):
        try:
            await client.call("work", {}, timeout=5)
        except CircuitOpenError:
            return
        except HivemeshError:
            continue
    raise AssertionError("the capability breaker never opened")


async def _metrics(client: MeshClient) -> str:
    assert client.node.metrics is not None
    return await asyncio.to_thread(scrape, client.node.metrics.address)


def _breaker_series(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith('hivemesh_breaker_state{capability="work"')]


async def _two_replicas_and_a_caller(mesh_env: MeshEnv) -> tuple[list[FlakyAgent], list[AgentServer], MeshClient]:
    agents = [FlakyAgent("a"), FlakyAgent("b")]
    servers = [AgentServer(a, await mesh_env.settings_for("flaky"), AgentServerConfig(instance_id=f"flaky-{a.tag}"))
               for a in agents]
    for s in servers:
        await s.start()
    client = MeshClient.connect(name="tester", settings=await mesh_env.settings_for("tester", "client"),
                                metrics_listen="127.0.0.1:0")
    return agents, servers, client


async def test_deleting_the_breakers_policy_drops_its_breakers_from_status_and_metrics(
    mesh_env: MeshEnv, etcd: aetcd.Client
) -> None:
    agents, servers, client = await _two_replicas_and_a_caller(mesh_env)
    try:
        async with client:
            assert await client.node.registry.wait_for_capability("work", 2, timeout=10)
            await apply(etcd, BREAKERS, [client.node])
            await _open_the_capability_breaker(client, agents)
            assert _work(_status(client)).breaker == "open"
            text = await _metrics(client)
            assert sample(text, "hivemesh_breaker_state", capability="work", peer_instance="") == 2
            assert "open" in breaker_states(client.node.traffic.state, "work").values()  # one replica ejected

            for a in agents:
                a.mode = "ok"
            revision = await store.delete_policy(etcd, "breakers", "br-work")
            assert await client.node.policies.wait_for_revision(revision, 5)
            assert (await client.call("work", {}, timeout=5))["served_by"] in {"a", "b"}

            # No breakers policy: no breaker at all (there is no default one), in metrics and in status.
            assert _breaker_series(await _metrics(client)) == []
            row = _work(_status(client))
            assert row.breaker == "" and {i.breaker for i in row.instances} == {""}
            assert breaker_states(client.node.traffic.state, "work") == {}

            # The same policy applied again starts closed: the breaker it had is not back, open.
            await apply(etcd, BREAKERS, [client.node])
            assert (await client.call("work", {}, timeout=5))["served_by"] in {"a", "b"}
            assert _work(_status(client)).breaker == "closed"
            assert sample(await _metrics(client), "hivemesh_breaker_state", capability="work", peer_instance="") == 0
    finally:
        for s in servers:
            await s.stop()


async def test_a_changed_breakers_policy_applies_to_the_breaker_it_finds_open(
    mesh_env: MeshEnv, etcd: aetcd.Client
) -> None:
    agents, servers, client = await _two_replicas_and_a_caller(mesh_env)
    try:
        async with client:
            assert await client.node.registry.wait_for_capability("work", 2, timeout=10)
            await apply(etcd, BREAKERS, [client.node])
            await _open_the_capability_breaker(client, agents)
            for a in agents:
                a.mode = "ok"

            # A shorter open_ms: the breaker opened long enough ago under it is half-open at once, and the next call
            # (its probe) closes it. Before, the 10 minutes it opened for held until its next opening.
            await apply(etcd, BREAKERS.replace("open_ms: 600000}", "open_ms: 1}", 1), [client.node])
            assert _work(_status(client)).breaker == "half-open"
            assert sample(await _metrics(client), "hivemesh_breaker_state", capability="work", peer_instance="") == 1
            assert (await client.call("work", {}, timeout=5))["served_by"] in {"a", "b"}
            assert _work(_status(client)).breaker == "closed"

            # The capability part taken out: the capability has no breaker any longer; the instances keep theirs.
            await _open_the_capability_breaker(client, agents)
            await apply(etcd, BREAKERS.replace("  capability: {consecutive_failures: 3, open_ms: 600000}\n", ""),
                        [client.node])
            text = await _metrics(client)
            assert 'peer_instance=""' not in "".join(_breaker_series(text))
            assert _work(_status(client)).breaker == ""
            assert "open" in breaker_states(client.node.traffic.state, "work").values()
    finally:
        for s in servers:
            await s.stop()


async def test_status_drops_the_rows_of_an_instance_that_left_once_its_window_is_empty(
    mesh_env: MeshEnv, etcd: aetcd.Client
) -> None:
    _agents, servers, client = await _two_replicas_and_a_caller(mesh_env)
    gone, stays = servers
    try:
        async with client:
            assert await client.node.registry.wait_for_capability("work", 2, timeout=10)
            for _ in range(4):
                await client.call("work", {}, timeout=5)
            rows = {i.instance for i in _work(_status(client)).instances}
            assert rows == {gone.instance_key, stays.instance_key}

            await gone.stop()
            await wait_until(lambda: len(client.node.registry.instances("work")) == 1, 10, "the instance to leave")
            left_at = time.monotonic()

            async def gone_from_status() -> bool:
                await client.call("work", {}, timeout=5)  # the caller goes on calling the one that stays
                rows = {i.instance for i in _work(_status(client)).instances}
                assert stays.instance_key in rows
                return gone.instance_key not in rows

            while not await gone_from_status():
                assert time.monotonic() - left_at < 30, "the row of the instance that left is still in status"
                await asyncio.sleep(0.2)
    finally:
        await stays.stop()


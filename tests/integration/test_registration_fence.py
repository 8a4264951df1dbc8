"""Registration fencing with real agents, a real etcd and real mTLS calls (E2's "rejects work fenced by the old
revision"): an instance whose lease was lost registers again under a new revision, and a caller whose registry
view still holds the old entry (its watch cut off) has its calls refused there unrun (STALE_REGISTRATION), so
they go to an instance it still knows, or fail with that reason when there is none; a caller that sees the new
registration is served by the instance again."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import aetcd
import pytest

from hivemesh.mesh.errors import StaleRegistrationError
from hivemesh.mesh.etcd import EtcdServer
from hivemesh.mesh.registry import RegistryView, agent_key
from hivemesh.sdk import AgentServer, AgentServerConfig, MeshClient
from hivemesh.v1.mesh_pb2 import AgentInstance
from tests.support.agents_for_tests import EchoAgent
from tests.support.meshenv import MeshEnv
from tests.support.waiting import until


def _config(instance_id: str) -> AgentServerConfig:
    return AgentServerConfig(instance_id=instance_id, lease_ttl_s=3)


@pytest.fixture
async def watcher(etcd_server: EtcdServer) -> AsyncIterator[RegistryView]:
    """A registry view that keeps watching: it tells when an instance registered again."""
    async with RegistryView(etcd_server.access) as view:
        yield view


async def _lose_lease_and_reregister(etcd: aetcd.Client, watcher: RegistryView, instance_id: str) -> tuple[int, int]:
    """Revoke instance_id's lease (as a pause past the TTL would let it expire); wait until its agent registered
    again. The old and new registration revisions."""
    kv = await etcd.get(agent_key("echo", instance_id).encode())
    assert kv is not None
    old = int(kv.create_revision)
    await etcd.revoke_lease(kv.lease)

    def again(snap: Mapping[str, AgentInstance]) -> bool:
        return any(i.instance_id == instance_id and i.registration_revision > old for i in snap.values())

    assert await watcher.cache.wait_for(again, timeout=15), f"{instance_id} did not register again"
    (new,) = [i.registration_revision for i in watcher.all_instances() if i.instance_id == instance_id]
    return old, new


async def test_calls_routed_by_a_lost_registration_are_refused_unrun_and_go_to_the_other_replica(
    mesh_env: MeshEnv, etcd: aetcd.Client, watcher: RegistryView
) -> None:
    a_agent, b_agent = EchoAgent("a"), EchoAgent("b")
    async with (
        AgentServer(a_agent, await mesh_env.settings_for("echo"), _config("echo-a")),
        AgentServer(b_agent, await mesh_env.settings_for("echo"), _config("echo-b")),
        MeshClient.connect(name="tester", settings=await mesh_env.settings_for("tester", "client")) as stale,
    ):
        assert await stale.node.registry.wait_for_capability("echo", 2, timeout=10)
        served = {(await stale.call("echo", {"text": "x"}, timeout=10))["served_by"] for _ in range(4)}
        assert served == {"a", "b"}  # round robin over both, each call fenced by what the caller saw
        await stale.node.registry.stop()  # this caller's view freezes here: its watch is cut off
        old, new = await _lose_lease_and_reregister(etcd, watcher, "echo-a")
        assert {i.instance_id: i.registration_revision for i in stale.instances("echo")}["echo-a"] == old
        ran_on_a = a_agent.calls
        outs = [await stale.call("echo", {"text": str(n)}, timeout=10) for n in range(8)]
        assert [o["served_by"] for o in outs] == ["b"] * 8
        assert a_agent.calls == ran_on_a, "a call routed by the lost registration ran"
        # Streams too: refused before any chunk, so they go to b as well.
        for _ in range(4):
            words = [w async for w in stale.stream("shout", {"text": "fenced streams"}, timeout=10)]
            assert words == ["FENCED", "STREAMS"]
        # A caller that sees the new registration is served by a again.
        async with MeshClient.connect(name="tester", settings=await mesh_env.settings_for("tester", "client")) as fresh:
            assert await fresh.node.registry.wait_for_capability("echo", 2, timeout=10)
            assert {i.instance_id: i.registration_revision for i in fresh.instances("echo")}["echo-a"] == new
            served = {(await fresh.call("echo", {"text": "y"}, timeout=10))["served_by"] for _ in range(4)}
            assert served == {"a", "b"} and a_agent.calls > ran_on_a


async def test_with_no_other_instance_the_caller_hears_why_and_nothing_ran(
    mesh_env: MeshEnv, etcd: aetcd.Client, watcher: RegistryView
) -> None:
    agent = EchoAgent("a")
    async with (
        AgentServer(agent, await mesh_env.settings_for("echo"), _config("echo-a")) as server,
        MeshClient.connect(name="tester", settings=await mesh_env.settings_for("tester", "client")) as stale,
    ):
        assert await stale.node.registry.wait_for_capability("echo", 1, timeout=10)
        assert (await stale.call("echo", {"text": "x"}, timeout=10))["served_by"] == "a"
        await stale.node.registry.stop()
        old, new = await _lose_lease_and_reregister(etcd, watcher, "echo-a")
        # The watcher can see the new entry before the agent has read its own put's answer; until then the agent
        # says only that the old registration lost its lease (a refusal all the same). Wait for it to know.
        reg = server.registration
        assert reg is not None and await until(lambda: reg.registered and reg.revision == new, 10)
        ran = agent.calls
        with pytest.raises(StaleRegistrationError) as info:  # its view stopped: it waits the deadline out
            await stale.call("echo", {"text": "x"}, timeout=3)
        assert f"revision {old}" in info.value.message and f"revision {new}" in info.value.message
        assert info.value.metadata.get("fence") == str(old)
        assert agent.calls == ran

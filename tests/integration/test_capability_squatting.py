"""Capability squatting on the real mesh (real etcd, TLS, agents): an agent that joined with its own identity
(`agent/mallory`) registers a capability another agent is meant to serve. With no providers policy it is balanced
with the genuine agent and receives its share of the calls (the behaviour this guards against, so the test can
fail). With a `providers` document naming only the genuine agent, no caller (a MeshClient, an SDK agent calling
onward) sends it a single call, its instance is not listed to callers (fan-out lists), a pin to it says why, and
with only it left the call fails NO_LIVE_INSTANCE naming the providers policy and the agent it left out. Deleting
the document opens the capability again: the policy is opt-in and followed live."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from hivemesh.controlplane import policies as store
from hivemesh.mesh.errors import NoLiveInstanceError
from hivemesh.mesh.node import MeshNode
from hivemesh.sdk import Agent, AgentServer, Context, MeshClient, capability
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, run_cli
from tests.support.resilience_rig import apply

pytestmark = pytest.mark.timeout(120)

GENUINE_ID = f"spiffe://{TRUST_DOMAIN}/agent/genuine"
MALLORY_ID = f"spiffe://{TRUST_DOMAIN}/agent/mallory"
PROVIDERS = f"""
kind: providers
name: squat
spec:
  rules:
    - capabilities: ["echo"]
      agents: ["{GENUINE_ID}"]
"""
N = 12


class Provider(Agent):
    """Offers `echo` and counts the calls it receives (what a squatter would see: the callers' data)."""

    name = ""
    version = "1.0.0"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    @capability(description="Echo, saying who served it", idempotent=True)
    async def echo(self, req: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        return {"text": req.get("text"), "agent": self.name}


class Genuine(Provider):
    name = "genuine"


class Mallory(Provider):
    name = "mallory"


class Relay(Agent):
    """An SDK agent whose own outbound calls `echo`: agents route through the same filtered view."""

    name = "relay"
    version = "1.0.0"

    @capability(description="Call echo onward")
    async def relay(self, req: dict[str, Any], ctx: Context) -> dict[str, Any]:
        out: dict[str, Any] = await ctx.call_capability("echo", {"text": req.get("text")})
        return out


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's tables unwrapped (run_cli hands the child this process's environment)."""
    monkeypatch.setenv("COLUMNS", "200")


@dataclass
class Rig:
    client: MeshClient
    genuine: Genuine
    mallory: Mallory
    genuine_server: AgentServer
    nodes: list[MeshNode]
    env: MeshEnv


@pytest.fixture
async def rig(mesh_env: MeshEnv) -> AsyncIterator[Rig]:
    genuine, mallory = Genuine(), Mallory()
    async with contextlib.AsyncExitStack() as stack:
        servers = [AgentServer(agent, await mesh_env.settings_for(agent.name)) for agent in (genuine, mallory, Relay())]
        for server in servers:
            await stack.enter_async_context(server)
        client = await stack.enter_async_context(
            MeshClient.connect(name="caller", settings=await mesh_env.settings_for("caller", "client")))
        assert await client.node.registry.wait_for_capability("echo", 2, timeout=10)
        assert await client.node.registry.wait_for_capability("relay", 1, timeout=10)
        relay_node = servers[2].node
        assert await relay_node.registry.wait_for_capability("echo", 2, timeout=10)
        yield Rig(client, genuine, mallory, servers[0], [client.node, relay_node], mesh_env)


async def _left_out_listed(rig: Rig) -> dict[str, Any]:
    """`hivemesh agents --json`: each agent's offers a providers policy leaves out (agents with none omitted)."""
    code, out, err = await run_cli(rig.env, "agents", "--json")
    assert code == 0, err
    return {r["agent"]: r["left_out"] for r in json.loads(out) if r["left_out"]}


async def _calls(rig: Rig) -> None:
    """N calls from the client, and N through the relay agent's own outbound path."""
    for i in range(N):
        assert (await rig.client.call("echo", {"text": str(i)}, timeout=5))["text"] == str(i)
        assert (await rig.client.call("relay", {"text": str(i)}, timeout=5))["text"] == str(i)


async def test_a_squatter_gets_no_call_once_a_providers_policy_names_the_genuine_agent(rig: Rig, etcd: Any) -> None:
    client = rig.client
    # No providers policy: the squatter is balanced with the genuine agent (the hole this closes).
    await _calls(rig)
    assert rig.mallory.calls > 0 and rig.genuine.calls > 0, (rig.mallory.calls, rig.genuine.calls)
    assert {i.card.name for i in client.instances("echo")} == {"genuine", "mallory"}
    assert await _left_out_listed(rig) == {}

    await apply(etcd, PROVIDERS, rig.nodes)  # every caller has it before the next call
    rig.genuine.calls = rig.mallory.calls = 0
    await _calls(rig)
    assert (rig.mallory.calls, rig.genuine.calls) == (0, 2 * N)
    # Fan-out lists (`MeshClient.instances`, what FanOut's all_instances_of and call_on read) leave it out too;
    # the registry still shows what registered.
    assert [i.card.name for i in client.instances("echo")] == ["genuine"]
    assert {i.card.name for i in client.node.registry.offering("echo")} == {"genuine", "mallory"}
    # The operator's listing marks the squatter's offer (it still shows what registered).
    assert await _left_out_listed(rig) == {"mallory": {"echo": ["providers/squat"]}}
    code, out, err = await run_cli(rig.env, "agents")
    assert code == 0, err
    assert "echo (left out by providers/squat)" in " ".join(out.split()), out

    # A call pinned to the squatter is refused before anything is sent, saying why.
    with pytest.raises(NoLiveInstanceError) as pinned:
        await client.call("echo", {"text": "x"}, timeout=5, agent="mallory")
    assert "left out by the providers policy" in pinned.value.message, pinned.value.message
    assert MALLORY_ID in pinned.value.message and rig.mallory.calls == 0

    # Only the squatter left: the call fails, naming the policy and the agent it left out.
    await rig.genuine_server.stop()
    assert await client.node.registry.cache.wait_for(
        lambda _snap: [i.card.name for i in client.node.registry.offering("echo")] == ["mallory"], 10)
    with pytest.raises(NoLiveInstanceError) as only:
        await client.call("echo", {"text": "x"}, timeout=5)
    message = only.value.message
    assert only.value.reason == "NO_LIVE_INSTANCE", only.value
    assert "capability 'echo' has no live instance right now" in message, message
    assert "1 instance offering it was left out by the providers policy" in message, message
    assert f"providers/squat lets only {GENUINE_ID} serve 'echo'" in message and MALLORY_ID in message, message
    assert only.value.metadata["policy"] == "providers/squat"
    assert rig.mallory.calls == 0

    # Opt-in, followed live: without the document the capability is open again.
    deleted = await store.delete_policy(etcd, "providers", "squat")
    assert await client.node.policies.wait_for_revision(deleted, 5)
    assert (await client.call("echo", {"text": "y"}, timeout=5))["agent"] == "mallory"
    assert rig.mallory.calls == 1

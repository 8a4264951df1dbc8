"""A call pinned to one agent (`CallOptions(agent=...)`) reaches that agent's instances only, on the real mesh
(real etcd, real TLS, real agents): unary, batch and stream calls, with the full attempt loop among the
agent's instances (a SIGKILLed one is failed over to its sibling, never to the other agent serving the
capability), operator routes applied among the agent's instances (never past a rule that allows no instance to
anyone, nor to an instance a split weighs 0), and a clear error naming an agent that has no instance. Pinned
calls stay outside the capability's breaker: a pin to a down or failing agent never fails the capability for
the node's other callers."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aetcd
import grpc
import pytest

from hivemesh.mesh.errors import AgentError, CircuitOpenError, HivemeshError, NoLiveInstanceError
from hivemesh.mesh.registry import agent_key
from hivemesh.mesh.resilience.traffic import breaker_states
from hivemesh.sdk import AgentServer, AgentServerConfig, CallOptions, MeshClient, capability
from tests.support.agents_for_tests import EchoAgent, TaggedTwin
from tests.support.meshenv import MeshEnv
from tests.support.resilience_rig import apply
from tests.support.spawn import start_replica, stop

pytestmark = pytest.mark.timeout(120)


class Alpha(TaggedTwin):
    name = "alpha"


class Beta(TaggedTwin):
    name = "beta"
    version = "2.0.0"


@dataclass
class Rig:
    client: MeshClient
    servers: list[AgentServer]


@pytest.fixture
async def rig(mesh_env: MeshEnv) -> AsyncIterator[Rig]:
    # alpha has two instances (labelled for the route test), beta one: unpinned round robin sends every third
    # call to beta.
    specs = [(Alpha("alpha-1"), "stable"), (Alpha("alpha-2"), "canary"), (Beta("beta-1"), "stable")]
    servers = [AgentServer(a, await mesh_env.settings_for(a.name),
                           AgentServerConfig(instance_id=a.tag, labels={"track": track})) for a, track in specs]
    async with contextlib.AsyncExitStack() as stack:
        await asyncio.gather(*(stack.enter_async_context(s) for s in servers))
        client = await stack.enter_async_context(
            MeshClient.connect(name="pinner", settings=await mesh_env.settings_for("pinner", "client")))
        for cap in ("echo", "tally"):
            assert await client.node.registry.wait_for_capability(cap, 3, timeout=10), cap
        yield Rig(client, servers)


async def _served(client: MeshClient, n: int, **options: Any) -> Counter[str]:
    """Who served n echo calls, one at a time: Counter of "agent/instance"."""
    out: Counter[str] = Counter()
    for i in range(n):
        res = await client.call("echo", {"text": str(i)}, timeout=5, **options)
        out[f"{res['agent']}/{res['served_by']}"] += 1
    return out


async def test_pinned_unary_and_batch_calls_reach_only_that_agent_and_all_its_instances(rig: Rig) -> None:
    client = rig.client
    assert set(await _served(client, 6)) == {"alpha/alpha-1", "alpha/alpha-2", "beta/beta-1"}  # unpinned: all
    assert await _served(client, 8, agent="alpha") == Counter({"alpha/alpha-1": 4, "alpha/alpha-2": 4})
    assert await _served(client, 3, agent="beta") == Counter({"beta/beta-1": 3})
    # The same pin as a reusable set of options, through call_detailed: the instance it reports is alpha's.
    pinned = CallOptions(agent="alpha", timeout=5)
    for _ in range(4):
        res = await client.call_detailed("echo", {"text": "d"}, options=pinned)
        assert res.instance.card.name == "alpha" and res.output["agent"] == "alpha", res
    items = await client.call_batch("echo", [{"text": str(i)} for i in range(9)], concurrency=3, options=pinned)
    assert all(item.ok for item in items), [item.error for item in items]
    assert {item.output["agent"] for item in items} == {"alpha"}, [item.output for item in items]


async def test_a_pinned_stream_is_served_by_that_agent_while_another_also_serves_it(rig: Rig) -> None:
    client = rig.client
    unpinned = {item["agent"] for _ in range(6) async for item in client.stream("tally", {}, timeout=5)}
    assert unpinned == {"alpha", "beta"}, unpinned
    served: Counter[str] = Counter()
    for _ in range(6):
        items = [item async for item in client.stream("tally", {}, timeout=5, agent="alpha")]
        assert [i["n"] for i in items] == [0, 1, 2] and {i["agent"] for i in items} == {"alpha"}, items
        served[items[0]["served_by"]] += 1
    assert served == Counter({"alpha-1": 3, "alpha-2": 3}), served


async def test_a_pin_to_an_agent_without_an_instance_fails_naming_it(rig: Rig) -> None:
    client = rig.client
    with pytest.raises(NoLiveInstanceError) as unary:
        await client.call("echo", {"text": "x"}, timeout=5, agent="gamma")
    assert unary.value.code == grpc.StatusCode.UNAVAILABLE and unary.value.reason == "NO_LIVE_INSTANCE"
    assert "agent 'gamma'" in unary.value.message and "'echo'" in unary.value.message, unary.value.message
    assert unary.value.metadata["agent"] == "gamma"
    with pytest.raises(NoLiveInstanceError) as streamed:
        async for _ in client.stream("tally", {}, timeout=5, agent="gamma"):
            pass
    assert "agent 'gamma'" in streamed.value.message, streamed.value.message
    # Invalid pins are refused before anything is sent.
    for bad in ("Alpha", "", "a..b", "x" * 64, "alpha/1"):
        with pytest.raises(ValueError, match="bad agent"):
            CallOptions(agent=bad)
        with pytest.raises(ValueError, match="bad agent"):
            await client.call("echo", {"text": "x"}, agent=bad)
    with pytest.raises(ValueError, match="queue_for"):
        CallOptions(agent="alpha", queue_for=5)
    with pytest.raises(ValueError, match="queue_for"):
        await client.call("echo", {"text": "x"}, agent="alpha", queue_for=5)


async def test_routes_choose_among_the_pinned_agents_instances_and_never_leave_it_none(
    rig: Rig, etcd: aetcd.Client
) -> None:
    client = rig.client
    nodes = [client.node, *(s.node for s in rig.servers)]
    # A split by label: 3 of every 4 calls to track=stable (alpha-1 and beta-1), 1 to canary (alpha-2).
    await apply(etcd, """
kind: routes
name: tracks
spec:
  capabilities: [echo]
  rules:
    - name: tracks
      split:
        - {weight: 3, labels: {track: stable}}
        - {weight: 1, labels: {track: canary}}
""", nodes)
    # Pinned, the split weighs alpha's instances only: exactly 3:1 between alpha-1 and alpha-2, none to beta.
    assert await _served(client, 8, agent="alpha") == Counter({"alpha/alpha-1": 6, "alpha/alpha-2": 2})
    # A route pin to version 2.* (beta's) leaves alpha nothing: a call pinned to alpha still goes to alpha.
    await apply(etcd, """
kind: routes
name: tracks
spec:
  capabilities: [echo]
  rules:
    - name: v2-only
      pin: {version: "2.*"}
""", nodes)
    assert await _served(client, 6) == Counter({"beta/beta-1": 6})  # the route holds for unpinned calls
    assert await _served(client, 6, agent="alpha") == Counter({"alpha/alpha-1": 3, "alpha/alpha-2": 3})


async def test_a_pinned_call_fails_over_to_a_sibling_instance_never_to_another_agent(
    mesh_env: MeshEnv, etcd: aetcd.Client, tmp_path: Path
) -> None:
    # The pinned agent is `echo` (two replicas, each its own process, SIGKILLed below); `beta` serves `echo` too.
    class BetaEcho(EchoAgent):
        name = "beta"

    procs = []
    async with contextlib.AsyncExitStack() as stack:
        for tag in ("echo-a", "echo-b"):  # a lease long enough to outlive the test: the killed one stays listed
            proc, _endpoint = await start_replica(mesh_env, tag, tmp_path / tag, tmp_path / f"{tag}.log",
                                                  HIVEMESH_LEASE_TTL_S="60")
            procs.append(proc)
            stack.push_async_callback(stop, proc, kill=True)
        await stack.enter_async_context(AgentServer(BetaEcho("beta-1"), await mesh_env.settings_for("beta")))
        client = await stack.enter_async_context(
            MeshClient.connect(name="pinner", settings=await mesh_env.settings_for("pinner", "client")))
        assert await client.node.registry.wait_for_capability("echo", 3, timeout=20)
        liveness = client.node.outbound.liveness

        async def served(n: int) -> Counter[str]:
            out: Counter[str] = Counter()
            for i in range(n):
                out[(await client.call("echo", {"text": str(i)}, timeout=10, agent="echo"))["served_by"]] += 1
            return out

        assert await served(4) == Counter({"echo-a": 2, "echo-b": 2})
        await stop(procs[0], kill=True)  # echo-a dies; its registration stays until its lease expires
        assert sum(1 for i in client.instances("echo") if i.card.name == "echo") == 2
        # Every call succeeds on echo-b; the ones that tried echo-a first met its dead connection and failed over
        # (which makes echo-a suspect: skipped for a while, then probed again).
        assert not liveness.is_suspect("echo/echo-a")
        assert await served(6) == Counter({"echo-b": 6})
        assert liveness.is_suspect("echo/echo-a")
        assert sum(1 for i in client.instances("echo") if i.card.name == "echo") == 2  # still listed throughout
        await etcd.delete(agent_key("echo", "echo-a").encode())


def _capability_breaker(client: MeshClient, capability: str) -> str:
    """The state of the client node's own breaker of capability ("" while it has none)."""
    states = [b.state.value for cap, inst, b in client.node.outbound.traffic.state.breakers()
              if cap == capability and not inst]
    return states[0] if states else ""


_BREAKERS = """
kind: breakers
name: pins
spec:
  capabilities: [echo, tally]
  instance: {consecutive_failures: 2, open_ms: 60000, max_ejected_share: 0.5}
  capability: {consecutive_failures: 3, open_ms: 60000}
"""


async def test_pins_to_an_agent_without_an_instance_never_open_the_capability_breaker(
    rig: Rig, etcd: aetcd.Client
) -> None:
    client = rig.client
    await apply(etcd, _BREAKERS, [client.node])
    # Three times the capability breaker's threshold of calls pinned to an agent with no instance (down, or a
    # mistyped name), unary and streamed: each fails NO_LIVE_INSTANCE, none CIRCUIT_OPEN.
    for _ in range(9):
        with pytest.raises(NoLiveInstanceError) as unary:
            await client.call("echo", {"text": "x"}, timeout=5, agent="gamma")
        assert unary.value.reason == "NO_LIVE_INSTANCE" and "agent 'gamma'" in unary.value.message, unary.value
        with pytest.raises(NoLiveInstanceError) as streamed:
            async for _ in client.stream("tally", {}, timeout=5, agent="gamma"):
                pass
        assert streamed.value.reason == "NO_LIVE_INSTANCE", streamed.value
    # Every other caller of the node is served as before: unpinned, and pinned to an agent that is up.
    assert set(await _served(client, 6)) == {"alpha/alpha-1", "alpha/alpha-2", "beta/beta-1"}
    assert await _served(client, 2, agent="beta") == Counter({"beta/beta-1": 2})
    assert {item["agent"] async for item in client.stream("tally", {}, timeout=5)} <= {"alpha", "beta"}
    assert (_capability_breaker(client, "echo"), _capability_breaker(client, "tally")) == ("closed", "closed")


class Broken(TaggedTwin):
    """Serves echo, and fails every call of it (INTERNAL): a breaker failure."""

    name = "broken"

    @capability(description="Echo that always fails", idempotent=True)
    async def echo(self, req: dict[str, Any]) -> dict[str, Any]:
        raise AgentError(f"{self.tag} is broken")


async def test_a_failing_pinned_agent_is_ejected_by_its_instance_breaker_not_the_capabilitys(
    rig: Rig, mesh_env: MeshEnv, etcd: aetcd.Client
) -> None:
    client = rig.client
    await apply(etcd, _BREAKERS, [client.node])
    server = AgentServer(Broken("broken-1"), await mesh_env.settings_for("broken"),
                         AgentServerConfig(instance_id="broken-1"))
    async with server:
        assert await client.node.registry.wait_for_capability("echo", 4, timeout=10)
        # Calls pinned to the broken agent: its instance fails them until its own breaker ejects it (2 failures;
        # one of the capability's 4 instances is within max_ejected_share), then they fail fast naming the agent.
        errors: list[HivemeshError] = []
        for _ in range(6):
            with pytest.raises(HivemeshError) as failed:
                await client.call("echo", {"text": "x"}, timeout=5, agent="broken")
            errors.append(failed.value)
        assert [e.reason for e in errors] == ["AGENT_ERROR"] * 2 + ["CIRCUIT_OPEN"] * 4, errors
        assert isinstance(errors[-1], CircuitOpenError) and errors[-1].metadata["agent"] == "broken", errors[-1]
        assert "pinned to agent 'broken'" in errors[-1].message, errors[-1].message
        assert breaker_states(client.node.outbound.traffic.state, "echo") == {"broken/broken-1": "open"}
        # The capability's breaker counted none of it: unpinned calls are served (the ejected instance skipped),
        # and so are calls pinned to a healthy agent.
        assert await _served(client, 6) == Counter({"alpha/alpha-1": 2, "alpha/alpha-2": 2, "beta/beta-1": 2})
        assert await _served(client, 2, agent="alpha") == Counter({"alpha/alpha-1": 1, "alpha/alpha-2": 1})
        assert _capability_breaker(client, "echo") == "closed"


async def test_a_route_that_allows_no_instance_to_anyone_fails_a_pinned_call_too(
    rig: Rig, etcd: aetcd.Client
) -> None:
    client = rig.client
    # A route pin to a version nobody runs, then a rolled-back canary (weight 0) whose stable subset has nothing
    # up: the operator keeps every instance out, and a pin to an agent does not get past it.
    for rule in ('{name: v3-only, pin: {version: "3.*"}}',
                 '{name: rollout, split: [{weight: 100, version: "3.*"}, {weight: 0, labels: {track: canary}}]}'):
        await apply(etcd, f"""
kind: routes
name: tracks
spec:
  capabilities: [echo, tally]
  rules: [{rule}]
""", [client.node])
        for agent in ("", "alpha", "beta"):
            with pytest.raises(NoLiveInstanceError) as unary:
                await client.call("echo", {"text": "x"}, timeout=5, agent=agent or None)
            assert "routes/tracks" in unary.value.message, (rule, agent, unary.value.message)
            assert unary.value.metadata.get("agent", "") == agent, unary.value.metadata
        with pytest.raises(NoLiveInstanceError) as streamed:
            async for _ in client.stream("tally", {}, timeout=5, agent="alpha"):
                pass
        assert "routes/tracks" in streamed.value.message, streamed.value.message


async def test_a_route_set_aside_for_a_pinned_call_still_keeps_it_off_what_a_split_weighs_zero(
    rig: Rig, etcd: aetcd.Client
) -> None:
    client = rig.client
    # Every call to beta's version 2.*, none to the canary track (alpha-2): the rule chose another agent's
    # instances, so a call pinned to alpha sets it aside, but only for alpha-1; the weight 0 holds.
    await apply(etcd, """
kind: routes
name: tracks
spec:
  capabilities: [echo]
  rules:
    - name: rollout
      split: [{weight: 100, version: "2.*"}, {weight: 0, labels: {track: canary}}]
""", [client.node])
    assert await _served(client, 4) == Counter({"beta/beta-1": 4})
    assert await _served(client, 6, agent="alpha") == Counter({"alpha/alpha-1": 6})
    # Weight 0 for all of alpha's version: a pinned call has nowhere to go.
    await apply(etcd, """
kind: routes
name: tracks
spec:
  capabilities: [echo]
  rules:
    - name: rollout
      split: [{weight: 100, version: "2.*"}, {weight: 0, version: "1.*"}]
""", [client.node])
    with pytest.raises(NoLiveInstanceError) as pinned:
        await client.call("echo", {"text": "x"}, timeout=5, agent="alpha")
    assert "weighted 0" in pinned.value.message and pinned.value.metadata["agent"] == "alpha", pinned.value
    assert await _served(client, 2, agent="beta") == Counter({"beta/beta-1": 2})

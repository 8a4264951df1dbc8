"""A new user's review of the caller's side, on the real mesh (real etcd, TLS, agents): a routes policy's fallback
answers a caller started after the capability's last agent left (not only one that saw it go), a deadline that
passes says which capability, agent, instance and deadline (seconds, and whose), and a slow instance is reported at
most once a while, in words that fit a per-try timeout."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import aetcd
import grpc
import pytest

from hivemesh.mesh.errors import DeadlineExceededError, NoLiveInstanceError, UnknownCapabilityError
from hivemesh.sdk import Agent, AgentServer, AgentServerConfig, MeshClient, capability
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv
from tests.support.resilience_rig import BackupAgent, apply, fleet, wait_until

ATTEMPTS_LOG = "hivemesh.mesh.outbound.attempts"


async def test_a_caller_started_after_the_last_instance_left_takes_the_routes_fallback(
    mesh_env: MeshEnv, etcd: aetcd.Client
) -> None:
    backup = BackupAgent()
    async with AgentServer(backup, await mesh_env.settings_for("backup")) as backup_server:
        watcher = backup_server.node.registry
        async with fleet(mesh_env, ("solo",)) as f:
            await apply(etcd, """
kind: routes
name: work-fallback
spec: {capabilities: [work], fallback: work-lite}
---
kind: routes
name: wr-anything
spec: {capabilities: ["wr*"], fallback: work-lite}
""", f.nodes())
            assert await f.client.call("work", {}, timeout=5) == {"served_by": "solo"}
        await wait_until(lambda: not watcher.instances("work"), 10, "the last work instance to leave the registry")
        # A caller that never saw an instance of work: the policy names it, so it takes the fallback, degraded.
        async with MeshClient.connect(name="late", settings=await mesh_env.settings_for("late", "client")) as late:
            assert await late.node.registry.wait_for_capability("work-lite", 1, timeout=10)
            answer = await late.call_detailed("work", {"text": "down"}, timeout=5)
            assert (answer.output, answer.degraded) == ({"served_by": "backup"}, "fallback:work-lite")
            # A stream does not degrade, but says the same as in a caller that saw work go: no live instance.
            with pytest.raises(NoLiveInstanceError) as none:
                async for _ in late.stream("work", {}, timeout=5):
                    pass
            assert none.value.message == (
                "capability 'work' has no live instance right now (routes/work-fallback names it, with fallback "
                "'work-lite'; this caller has seen no instance of it)")
            assert none.value.metadata["policy"] == "routes/work-fallback"
            # A typo is still unknown, even where a policy's pattern ("wr*") matches it: only a name declares.
            with pytest.raises(UnknownCapabilityError) as typo:
                await late.call("wrok", {}, timeout=5)
            assert typo.value.code == grpc.StatusCode.NOT_FOUND
            assert typo.value.message == "no agent in the mesh offers capability 'wrok'"
    assert backup.calls == 1


class Slow(Agent):
    """Answers after `delay` s; `stall` streams one chunk and then stalls; `alternate` is slow on every other call
    (a flaky instance whose retries answer)."""

    name = "slowpoke"

    def __init__(self) -> None:
        super().__init__()
        self.delay = 30.0
        self.calls = 0

    @capability(idempotent=True)
    async def work(self, req: dict[str, Any]) -> dict[str, str]:
        """Slow."""
        await asyncio.sleep(self.delay)
        return {"served_by": "slowpoke"}

    @capability(idempotent=True)
    async def alternate(self, req: dict[str, Any]) -> dict[str, int]:
        """Slow on odd calls, at once on even ones."""
        self.calls += 1
        if self.calls % 2:
            await asyncio.sleep(30)
        return {"call": self.calls}

    @capability
    async def stall(self, req: dict[str, Any]) -> AsyncIterator[str]:
        """One chunk, then nothing."""
        yield "first"
        await asyncio.sleep(30)
        yield "never"


@contextlib.asynccontextmanager
async def _slow(env: MeshEnv) -> AsyncIterator[tuple[Slow, AgentServer, MeshClient]]:
    agent = Slow()
    async with (AgentServer(agent, await env.settings_for("slowpoke"), AgentServerConfig(instance_id="slow-1"))
                as server,
                MeshClient.connect(name="tester", settings=await env.settings_for("tester", "client")) as client):
        assert await client.node.registry.wait_for_capability("work", 1, timeout=10)
        yield agent, server, client


async def test_a_deadline_that_passes_names_capability_agent_instance_and_whose_deadline(
    mesh_env: MeshEnv, etcd: aetcd.Client
) -> None:
    async with _slow(mesh_env) as (_agent, server, client):
        held = "agent slowpoke (instance slow-1) did not answer 'work' within"
        with pytest.raises(DeadlineExceededError) as caller:
            await client.call("work", {}, timeout=0.5)
        err = caller.value
        assert err.message == f"{held} the caller's timeout of 0.5 s (gRPC: Deadline Exceeded)"
        assert (err.code, err.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED")
        assert err.metadata["instance"] == "slow-1"
        # Without the caller's timeout, the capability's timeouts policy, by name.
        await apply(etcd, "kind: timeouts\nname: slow-work\nspec: {capabilities: [work], default_ms: 300}",
                    [client.node, server.node])
        with pytest.raises(DeadlineExceededError) as policy:
            await client.call("work", {})
        assert policy.value.message == f"{held} the 0.3 s default deadline of timeouts/slow-work (gRPC: Deadline " \
                                       "Exceeded)"
        # A stream: after how many chunks.
        with pytest.raises(DeadlineExceededError) as stream:
            async for _ in client.stream("stall", {}, timeout=0.5):
                pass
        assert stream.value.message.startswith(
            "agent slowpoke (instance slow-1) did not finish the stream of 'stall' (after 1 chunk) within the caller's "
            "timeout of 0.5 s (gRPC: ")  # then gRPC's words for a stream: "Stream removed (Deadline Exceeded)"
        # A call to one given instance (call_on, and the batches built on it).
        instance = client.instances("work")[0]
        with pytest.raises(DeadlineExceededError) as on:
            await client.call_on(instance, "work", {}, timeout=0.5)
        assert on.value.message == f"{held} the call's timeout of 0.5 s (gRPC: Deadline Exceeded)"
        # A deadline spent before the call could be sent says whose it was as well.
        with pytest.raises(DeadlineExceededError) as spent:
            await client.call("work", {}, timeout=0)
        assert spent.value.message == "deadline passed before 'work' could be sent (the caller's timeout of 0 s)"


async def test_a_slow_instance_is_reported_once_a_while_and_its_per_try_timeout_named(
    mesh_env: MeshEnv, etcd: aetcd.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=ATTEMPTS_LOG)
    async with _slow(mesh_env) as (agent, server, client):
        await apply(etcd, """
kind: retries
name: patient
spec: {capabilities: [alternate, work], attempts: 2, per_try_timeout_ms: 300, retryable_codes: [DEADLINE_EXCEEDED],
       backoff: {base_ms: 1}}
""", [client.node, server.node])
        # Every call's first attempt is held past its per-try timeout, its retry answers (which clears the
        # instance's suspicion): five strikes, each the first of a new while.
        for _ in range(5):
            assert (await client.call("alternate", {}, timeout=10))["call"] % 2 == 0
        assert agent.calls == 10
        said = [r for r in caplog.records if r.name == ATTEMPTS_LOG and "did not answer" in r.getMessage()]
        assert len(said) == 5
        assert [r.levelno for r in said] == [logging.WARNING] + [logging.DEBUG] * 4
        assert said[0].getMessage() == (
            f"instance slow-1 (spiffe://{TRUST_DOMAIN}/agent/slowpoke) of alternate did not answer within the 0.3 s "
            "per-try timeout (per_try_timeout_ms) of retries/patient; no other instance is live, so calls still go "
            "to it")
        # When every attempt timed out, the error names the per-try timeout that ended the last one.
        with pytest.raises(DeadlineExceededError) as caught:
            await client.call("work", {}, timeout=10)
        assert caught.value.message == (
            "agent slowpoke (instance slow-1) did not answer 'work' within the 0.3 s per-try timeout "
            "(per_try_timeout_ms) of retries/patient (gRPC: Deadline Exceeded)")

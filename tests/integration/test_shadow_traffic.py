"""Shadow traffic on the real mesh (real etcd, control plane, mutual TLS, tokens): a routes `shadow` mirrors
calls to a candidate version that never serves real traffic; the caller has every answer while the shadow is
still blocked (count-based: the shadow waits on an event); answers are compared and counted by result on the
caller's metrics, differences audited; the in-flight bound drops the excess; a non-idempotent capability is
refused at apply time unless the shadow is a sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import aetcd
import pytest

from hivemesh.controlplane import policies as store
from hivemesh.mesh.errors import AgentError, InvalidInputError
from hivemesh.sdk import Agent, AgentServer, AgentServerConfig, MeshClient, capability
from tests.support.meshenv import MeshEnv
from tests.support.resilience_rig import apply, wait_until


class Versioned(Agent):
    """`work` echoes its input; as a candidate it can block on a gate, answer differently, or fail."""

    name = "flaky"
    version = "1.0.0"

    def __init__(self) -> None:
        super().__init__()
        self.started = 0
        self.gate: asyncio.Event | None = None
        self.mode = "same"  # "same", "different" or "fail"
        self.effects = 0

    @capability(idempotent=True)
    async def work(self, req: dict[str, Any]) -> dict[str, Any]:
        """Echo the input (the candidate as told)."""
        self.started += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.mode == "fail":
            raise AgentError("the candidate fails on purpose")
        return {"n": req.get("n"), **({"extra": True} if self.mode == "different" else {})}

    @capability
    async def charge(self, req: dict[str, Any]) -> dict[str, int]:
        """A non-idempotent effect."""
        self.effects += 1
        return {"effects": self.effects}


class Candidate(Versioned):
    version = "2.0.0"


SHADOW = """
kind: routes
name: work
spec:
  capabilities: [work]
  shadow: {version: "2.*", percent: 100, max_in_flight: 3, timeout_ms: 20000}
"""


def _sample(client: MeshClient, result: str) -> float:
    assert client.node.metrics is not None
    for line in client.node.metrics.metrics.exposition().decode().splitlines():
        if line.startswith(f'hivemesh_shadow_calls_total{{capability="work",result="{result}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_shadow_mirrors_compares_and_never_delays_the_caller(
    mesh_env: MeshEnv, etcd: aetcd.Client, tmp_path: Any
) -> None:
    stable, candidate = Versioned(), Candidate()
    async with contextlib.AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(AgentServer(a, await mesh_env.settings_for("flaky"),
                                                               AgentServerConfig(instance_id=f"flaky-{a.version}")))
                   for a in (stable, candidate)]
        client = await stack.enter_async_context(MeshClient.connect(
            name="tester", settings=await mesh_env.settings_for("tester", "client"), metrics_listen="127.0.0.1:0",
            audit_dir=tmp_path / "audit"))
        assert await client.node.registry.wait_for_capability("work", 2, timeout=10)
        await apply(etcd, SHADOW, [client.node, *(s.node for s in servers)])
        shadow = client.node.outbound.shadow

        # The candidate blocks on a gate that stays shut: every caller still gets its answer from the stable
        # version (the candidate never serves real calls), while three mirrored calls wait on the candidate.
        candidate.gate = asyncio.Event()
        for n in range(3):
            assert await client.call("work", {"n": n}, timeout=5) == {"n": n}
        await wait_until(lambda: candidate.started == 3, 10, "three mirrored calls reaching the candidate")
        assert stable.started == 3 and shadow.in_flight == 3
        assert sum(shadow.counts.values()) == 0  # nothing compared yet: the caller never waited for it
        # The bound is full: the next call is answered and its mirror dropped, not queued.
        assert await client.call("work", {"n": 3}, timeout=5) == {"n": 3}
        assert shadow.counts["dropped"] == 1 and candidate.started == 3
        candidate.gate.set()
        await shadow.drain()
        assert shadow.counts["same"] == 3

        # Differences and failures of the candidate are counted (and audited); the caller sees neither.
        candidate.gate = None
        candidate.mode = "different"
        for n in range(2):
            assert await client.call("work", {"n": n}, timeout=5) == {"n": n}
            await shadow.drain()
        candidate.mode = "fail"
        assert await client.call("work", {"n": 9}, timeout=5) == {"n": 9}
        await shadow.drain()
        assert (shadow.counts["same"], shadow.counts["different"], shadow.counts["error"]) == (3, 2, 1)
        assert (_sample(client, "same"), _sample(client, "different"), _sample(client, "error"),
                _sample(client, "dropped")) == (3.0, 2.0, 1.0, 1.0)
        assert client.audit is not None
        records = [json.loads(line) for line in client.audit.spool.lines()]
        shadows = [r for r in records if r.get("kind") == "shadow"]
        assert [r["decision"] for r in shadows] == ["different", "different", "error"]
        assert all(r["version"] == "2.0.0" and r["capability"] == "work" for r in shadows)
        assert "fails on purpose" in shadows[-1]["message"]
        # The candidate's status reports the latency of the calls it answered (what rollouts compare).
        served = servers[1].node.traffic.state.snapshot(identity="x", instance="y")
        work = next(c for c in served.capabilities if c.direction == "inbound" and c.capability == "work")
        assert work.calls == 6 and work.latency_ms > 0

        # A non-idempotent capability may not be mirrored: refused at apply, naming the field; as a sandbox, it may.
        unsafe = SHADOW.replace("name: work", "name: charge").replace("[work]", "[charge]")
        with pytest.raises(InvalidInputError) as refused:
            await store.apply_text(etcd, unsafe)
        assert "spec.shadow" in refused.value.message and "'charge' is not idempotent" in refused.value.message
        assert (await store.apply_text(etcd, unsafe.replace("percent: 100", "percent: 100, sandbox: true"))).applied

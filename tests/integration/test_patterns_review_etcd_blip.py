"""A durable fan-out whose journal write meets an etcd pause, against a real control plane, a real agent and a
private etcd (mutual TLS and auth) that is stopped (SIGSTOP) while one branch's call is in flight."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from hivemesh.mesh.etcd import EtcdServer
from hivemesh.sdk import AgentServer, AgentServerConfig, MeshClient
from hivemesh.sdk.patterns import Branch, FanOut, PatternResult, Runner
from hivemesh.sdk.workflow import WorkflowEngine
from tests.support.meshenv import start_mesh_env, stop_mesh_env
from tests.support.orch_agents import WorkerAgent
from tests.support.spawn import freeze

pytestmark = pytest.mark.timeout(120)

PAUSE_S = 10.0
"""Longer than the nap (3 s) and the etcd client's 5 s request timeout together, so the nap's step_completed write
fails however late in the nap the pause began; far shorter than the owner lease, so the run is still this
process's when etcd is back."""

BLIP = FanOut([Branch("upper", input=lambda r: {"text": r["text"]}),
               Branch("nap", input=lambda r: {"seconds": 3.0, "tag": "blip"})], name="blip", branch_timeout=30)


async def blip_flow(run: Runner, inp: Any) -> PatternResult:
    return await BLIP.run(run, inp)


async def test_an_etcd_pause_during_a_branch_is_replayed_not_recorded_as_that_branch_failing(
    own_etcd: EtcdServer, tmp_path: Path
) -> None:
    """The branch's call succeeded but its result could not be journaled (etcd did not answer). FanOut turned that
    ConnectionTimeoutError into the branch's AgentError, so the durable run completed "partial" with a branch that
    had answered named as failed, and the engine never replayed it. The etcd error now leaves the fan-out, and the
    engine owns the run again and replays it: the finished branch is answered from the journal, the other is sent
    again with its idempotency key, and the run completes with both."""
    env = await start_mesh_env(tmp_path, own_etcd.endpoint)
    pid = own_etcd.pid
    assert pid is not None
    stopped = False
    try:
        worker = WorkerAgent()
        # A lease that outlives the pause: one expired meanwhile re-registers the agent, and the replayed call,
        # routed by the old registration, is refused as stale (another test's matter).
        served = AgentServer(worker, await env.settings_for(worker.name), AgentServerConfig(lease_ttl_s=60))
        client = MeshClient.connect(name="orch", settings=await env.settings_for("orch", "client"))
        async with served, client as mesh, WorkflowEngine(mesh, lock_ttl_s=60) as engine:
            assert await mesh.node.registry.wait_for_capability("nap", 1, timeout=10)
            handle = await engine.submit(blip_flow, {"text": "x"}, workflow_id="blip")
            deadline = time.monotonic() + 20
            while "blip" not in worker.started:  # the nap branch's call is at the agent (its step is journaled)
                assert time.monotonic() < deadline, "the nap branch never reached the agent"
                await asyncio.sleep(0.02)
            while not any(e["type"] == "step_completed" and e["data"].get("step") == "branch-upper"
                          for e in await engine.store.events(handle.id)):  # upper's answer is journaled: only
                assert time.monotonic() < deadline, "the upper branch's answer was never journaled"  # nap's fails
                await asyncio.sleep(0.05)
            freeze(pid)
            stopped = True
            await asyncio.sleep(PAUSE_S)  # the fault itself: the nap answers at 3 s; its journal write fails
            os.kill(pid, signal.SIGCONT)
            stopped = False
            state = await handle.result(timeout=60)
            assert state.state == "COMPLETED", state.to_json()
            details = state.output["details"]
            assert details["failed"] == {}, details["failed"]
            assert state.output["output"] == {"upper": {"text": "X"}, "nap": {"seconds": 3.0, "tag": "blip"}}
            assert worker.started.count("blip") == 2  # sent again after the replay (nap is idempotent)
            events = await engine.store.events(handle.id)
            assert [e["data"]["step"] for e in events if e["type"] == "step_started"].count("branch-upper") == 1
    finally:
        if stopped:
            os.kill(pid, signal.SIGCONT)
        await stop_mesh_env(env)

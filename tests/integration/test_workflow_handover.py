"""An owner that lost its lease to another process hands the run over cleanly (issue 11, "Faults that cross the
network" bullet 1), against a real control plane and etcd with mutual TLS and auth.

While the run waits for a person, another process takes the owner key (done here as etcd root, in one
transaction, as a resumer that found the key free would), and the first owner's lease is then revoked. The first
owner notices, sees the key held by someone else and stops at once: its handle answers LockLostError naming the
holder, nothing is left as an unretrieved task exception, and it writes nothing more. Once that holder goes
away, an engine resumes the run and the person's approval completes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import aetcd
import pytest

from hivemesh.sdk import MeshClient
from hivemesh.sdk.escalation import EscalationClient
from hivemesh.sdk.workflow import LockLostError, WorkflowEngine, escalation_id_for
from hivemesh.sdk.workflow.store import owner_key
from tests.integration.test_workflow_etcd_pause import approval_flow
from tests.support.meshenv import MeshEnv

pytestmark = pytest.mark.timeout(60)


async def _state(engine: WorkflowEngine, wid: str, wanted: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (await engine.get(wid)).state != wanted:
        assert time.monotonic() < deadline, f"{wid} never became {wanted}"
        await asyncio.sleep(0.05)


async def test_an_owner_whose_run_was_taken_over_stops_cleanly_and_the_new_owner_finishes_it(
    mesh_env: MeshEnv, etcd: aetcd.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hivemesh.sdk.workflow")
    loop = asyncio.get_running_loop()
    unhandled: list[Mapping[str, Any]] = []
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    try:
        settings = await mesh_env.settings_for("orch", "client")
        async with MeshClient.connect(name="orch", settings=settings) as mesh:
            async with WorkflowEngine(mesh, lock_ttl_s=2) as first:
                handle = await first.submit(approval_flow, {"change": "c-2"}, workflow_id="taken")
                wid = handle.id
                await _state(first, wid, "INPUT_REQUIRED", 20)
                before = (await first.get(wid)).seq
                key = owner_key(wid)
                held = await etcd.get(key)
                assert held is not None
                # Another process takes the run: the key gets its value, bound to its own lease ...
                theirs = json.dumps({"owner": "spiffe://elsewhere", "pid": 4242, "host": "other-host"}).encode()
                lease = await etcd.lease(30)
                tx = etcd.transactions
                ok, _ = await etcd.transaction(compare=[tx.value(key) == held.value],
                                               success=[tx.put(key, theirs, lease=lease)], failure=[])
                assert ok
                # ... and the first owner's lease ends (expired, as in a long pause).
                await etcd.revoke_lease(held.lease)
                with pytest.raises(LockLostError, match=r"handed over.*spiffe://elsewhere \(pid 4242"):
                    await handle.result(timeout=10)
                assert (await first.get(wid)).seq == before  # it wrote nothing after losing the run
            await lease.revoke()  # the other process goes away: its lease ends, the key with it
            async with WorkflowEngine(mesh, lock_ttl_s=2) as second:
                resumed = await second.resume(wid, wait_s=5)
                await _state(second, wid, "INPUT_REQUIRED", 20)
                await EscalationClient(mesh_env.operator).resolve(escalation_id_for(wid, "approve"), approve=True)
                state = await resumed.result(timeout=20)
        assert state.state == "COMPLETED" and state.output == {"approved": True, "answer": None}
        assert [r["owner"] for r in state.runs] == [mesh.node.workload.spiffe_id] * 2
    finally:
        gc.collect()
        await asyncio.sleep(0)
        loop.set_exception_handler(previous_handler)
    assert not unhandled, [c.get("message") for c in unhandled]
    assert any("handed over" in r.getMessage() for r in caplog.records)  # said once, by the engine
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_a_run_stopped_in_this_process_stops_its_body(mesh_env: MeshEnv) -> None:
    """Cancelling a run's task, or closing its engine, stops the run's body too: before, the body went on alone
    (its next step calling agents for a run nobody drove) and its end surfaced as an unretrieved task exception."""
    entered: dict[str, asyncio.Event] = {}
    stopped: dict[str, asyncio.Event] = {}
    gate = asyncio.Event()  # never set: a body only leaves it by being cancelled

    async def body(run: Any, value: Any) -> Any:
        name = value["name"]
        entered[name].set()
        try:
            await gate.wait()
        except asyncio.CancelledError:
            stopped[name].set()
            raise
        return "went on"

    for name in ("cancelled", "closed"):
        entered[name], stopped[name] = asyncio.Event(), asyncio.Event()
    settings = await mesh_env.settings_for("orch", "client")
    async with MeshClient.connect(name="orch", settings=settings) as mesh:
        async with WorkflowEngine(mesh) as engine:
            handle = await engine.submit(body, {"name": "cancelled"}, workflow_id="stopped-by-cancel")
            await asyncio.wait_for(entered["cancelled"].wait(), 20)
            handle.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await handle.task
            await asyncio.wait_for(stopped["cancelled"].wait(), 10)

            await engine.submit(body, {"name": "closed"}, workflow_id="stopped-by-close")
            await asyncio.wait_for(entered["closed"].wait(), 20)
        # the engine is closed: its runs' tasks were cancelled, and so must their bodies be
        await asyncio.wait_for(stopped["closed"].wait(), 10)

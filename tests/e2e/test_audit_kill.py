"""SIGKILL a sidecar mid-load: every call that got an answer has its audit record, and the records the dead
sidecar had not shipped yet reach the control plane when a new sidecar picks its spool up."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from hivemesh.mesh.audit import verify_chain
from hivemesh.mesh.errors import HivemeshError
from hivemesh.sdk import MeshClient
from hivemesh.v1 import agent_pb2, audit_pb2
from tests.support.meshenv import MeshEnv
from tests.support.plain_agent import PlainAgent
from tests.support.spawn import start_sidecar, stop


@pytest.mark.slow
async def test_sigkilled_sidecar_loses_no_audit_record(mesh_env: MeshEnv, tmp_path: Path) -> None:
    home = tmp_path / "sidecar-home"
    plain = PlainAgent("plain")
    procs: list[asyncio.subprocess.Process] = []
    async with plain:
        try:
            proc, _ = await start_sidecar(mesh_env, plain.endpoint, home, tmp_path / "sidecar1.log", "--lease-ttl", "2")
            procs.append(proc)
            answered: list[str] = []
            failed = 0
            settings = await mesh_env.settings_for("loader", "client")
            async with MeshClient.connect(name="loader", settings=settings) as mesh:
                assert await mesh.node.registry.wait_for_capability("echo", 1, timeout=15)
                stop_at = time.monotonic() + 30
                killed = asyncio.Event()

                async def load() -> None:
                    nonlocal failed
                    while time.monotonic() < stop_at and not (killed.is_set() and failed > 0):
                        call_id = uuid.uuid4().hex
                        try:
                            await mesh.call("echo", {"text": "x"}, timeout=5,
                                            context=agent_pb2.CallContext(call_id=call_id))
                        except HivemeshError:
                            failed += 1
                            if killed.is_set():
                                return
                            continue
                        answered.append(call_id)

                workers = [asyncio.ensure_future(load()) for _ in range(8)]
                while len(answered) < 400:  # noqa: ASYNC110 - polling a counter the workers bump
                    await asyncio.sleep(0.01)
                os.kill(procs[0].pid, signal.SIGKILL)  # mid-load: 8 calls in flight
                killed.set()
                await asyncio.wait_for(asyncio.gather(*workers), 30)
            await procs[0].wait()
            spool_dir = home / "audit" / "agent-plain"
            lines = [raw for seg in sorted(spool_dir.glob("audit-*.log")) for raw in seg.read_bytes().splitlines()]
            count, problem = verify_chain(lines)
            assert problem is None, problem
            recorded_ok = {json.loads(x).get("call_id") for x in lines if json.loads(x)["status"] == "OK"}
            missing = [c for c in answered if c not in recorded_ok]
            print(f"\nFIGURE audit SIGKILL: {len(answered)} answered calls, {count} records in the dead sidecar's "
                  f"spool, {len(missing)} answered calls without a record, {failed} calls failed at the kill")
            assert not missing, f"{len(missing)} answered calls have no audit record"

            # A new sidecar for the same agent picks the spool up and ships what the dead one had not.
            proc, _ = await start_sidecar(mesh_env, plain.endpoint, home, tmp_path / "sidecar2.log", "--lease-ttl", "2")
            procs.append(proc)
            deadline = time.monotonic() + 30
            while True:
                state = await mesh_env.operator.call(
                    mesh_env.operator.audit.SourceState,
                    audit_pb2.SourceStateRequest(source=(spool_dir / "source").read_text().strip()),
                )
                if state.last_seq >= count or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert state.last_seq >= count
            verified = await mesh_env.operator.call(mesh_env.operator.audit.Verify, audit_pb2.AuditVerifyRequest())
            assert verified.ok, verified.problem
        finally:
            for p in procs:
                await stop(p, kill=True)

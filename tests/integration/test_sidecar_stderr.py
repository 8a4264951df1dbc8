"""No line of gRPC's handshaker trace reaches a mesh process's own standard error.

The processes hivemesh owns run with gRPC's `handshaker` tracer on, so the TLS handshakes their ports refuse are
audited (`hivemesh.mesh.audit.handshake`), and their stderr goes through a tee that keeps the tracer's lines out
of the log. Every line gRPC writes before the tee is in place goes straight to the log: an agent sidecar asking
its agent for its card, a control plane connecting to etcd, a caller-only sidecar (which has no TLS port to
audit, so no tracer was wanted) at every connection it made. Each process here runs as the operator would start
it, with stderr captured to a file, makes real calls, and is stopped; its stderr must hold none of the trace,
while the refusals on an agent sidecar's port are still on record.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from hivemesh.mesh.audit.handshake.switch import ENV, child_environment
from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.etcd import EtcdServer
from hivemesh.v1 import agent_pb2, audit_pb2, mesh_pb2, mesh_pb2_grpc
from tests.e2e.test_handshake_audit import _handshake_records
from tests.support.controlplane_process import controlplane_process
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, copy_session_ca
from tests.support.plain_agent import PlainAgent
from tests.support.spawn import start_client_sidecar, start_sidecar_ready, stop
from tests.support.tls_attacks import H2_PREFACE, raw_attempt

_TRACE = re.compile(rb"\] (handshake manager |CallNextHandshakerLocked|gRPC Tracers: )|handshaker\.cc")
"""A line of the handshaker tracer (each entry's header names handshaker.cc or is the channel trace's "handshake
manager" line), or gRPC's note at import that the tracer is on."""


def _trace_lines(log: Path) -> list[str]:
    return [line.decode(errors="replace")[:200] for line in log.read_bytes().splitlines() if _TRACE.search(line)]


def _fd2(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/fd/2")


def _launched_env(launcher: str) -> dict[str, str]:
    """extra environment of a child process: nothing (started by hand) or what `hivemesh up` sets."""
    base = {k: v for k, v in os.environ.items() if k not in ("GRPC_TRACE", ENV)}
    return {} if launcher == "by hand" else child_environment({}, inherit=base)


async def _polled(check: Callable[[], Awaitable[bool]], limit_s: float, step_s: float = 0.1) -> bool:
    """True once check() does, False if it still does not after limit_s (a check that needs a call of its own)."""
    deadline = time.monotonic() + limit_s
    while True:
        if await check():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(step_s)


async def _echo(mesh: str, text: str) -> dict[str, Any]:
    """Mesh.Call `echo` on a sidecar's local Mesh service, once the agent is in its registry (bounded)."""
    async with grpc.aio.insecure_channel(mesh) as channel:
        stub = mesh_pb2_grpc.MeshStub(channel)

        async def resolved() -> bool:
            resp = await stub.Resolve(mesh_pb2.ResolveRequest(capability="echo"), timeout=5)
            return len(resp.instances) > 0

        assert await _polled(resolved, 30), f"echo never showed in the registry of the sidecar at {mesh}"
        req = agent_pb2.InvokeRequest(capability="echo", input=json.dumps({"text": text}).encode(),
                                      content_type="application/json")
        resp = await stub.Call(req, timeout=20)
        return dict(json.loads(resp.output))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["by hand", "hivemesh up"])
async def test_no_handshake_trace_reaches_a_sidecars_stderr(
    mesh_env: MeshEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, launcher: str
) -> None:
    """An agent sidecar and a caller-only sidecar, each started by hand (nothing set) and as `hivemesh up` starts
    it (GRPC_TRACE=handshaker, the consent): a call from the caller-only one through the agent's sidecar, a
    refused handshake on the agent sidecar's port (still audited), and not one trace line in either's stderr."""
    monkeypatch.delenv("GRPC_TRACE", raising=False)
    monkeypatch.delenv(ENV, raising=False)
    extra = _launched_env(launcher)
    agent_log, caller_log = tmp_path / "agent-sidecar.err", tmp_path / "caller-sidecar.err"
    procs: list[asyncio.subprocess.Process] = []
    async with PlainAgent("plain") as plain:
        try:
            agent_proc, agent = await start_sidecar_ready(mesh_env, plain.endpoint, tmp_path / "agent-home",
                                                          agent_log, **extra)
            procs.append(agent_proc)
            caller_proc, caller = await start_client_sidecar(mesh_env, "pc2", tmp_path / "caller-home", caller_log,
                                                             **extra)
            procs.append(caller_proc)

            # Only a process with a TLS port to audit turns the tracer on itself; one that runs it all the same
            # (a launcher's GRPC_TRACE) routes its stderr through the tee, as the agent sidecar always does.
            assert _fd2(agent_proc.pid).startswith("pipe:")
            caller_fd2 = _fd2(caller_proc.pid)
            assert (caller_fd2 == str(caller_log)) if launcher == "by hand" else caller_fd2.startswith("pipe:")

            out = await _echo(caller["mesh"], "through both")
            assert out == {"text": "through both", "caller": f"spiffe://{TRUST_DOMAIN}/client/pc2"}, out
            assert plain.calls == 1

            # The agent sidecar still audits the handshakes its port refuses (its tracer and tee are live).
            port = int(agent["inbound"].rsplit(":", 1)[1])
            attacker = await asyncio.to_thread(raw_attempt, port, H2_PREFACE)
            mine: list[dict[str, Any]] = []

            async def on_record() -> bool:
                mine[:] = [r for r in await _handshake_records(mesh_env) if r["remote"].endswith(f":{attacker}")]
                return bool(mine)

            await _polled(on_record, 30, 0.2)
            assert [r["reason"] for r in mine] == ["TLS_PLAINTEXT"], (mine, agent_log.read_text()[-3000:])
        finally:
            for proc in procs:
                await stop(proc)

    assert all(p.returncode is not None for p in procs)
    assert _trace_lines(agent_log) == [], agent_log.read_text()[-3000:]
    assert _trace_lines(caller_log) == [], caller_log.read_text()[-3000:]


@pytest.mark.slow
async def test_no_handshake_trace_reaches_the_control_planes_stderr(
    etcd: Any, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    """`hivemesh controlplane` as `hivemesh up` starts it: it connects to etcd before it serves, and that
    connection's handshake is traced too; an operator's call later. Its stderr holds none of the trace."""
    certs = copy_session_ca(tmp_path / "certs").certs_dir  # the CA etcd trusts
    async with controlplane_process(tmp_path, certs, etcd_server.endpoint) as cp:
        async with ControlPlaneClient.from_certs_dir(cp.controlplane, certs) as operator:
            await operator.call(operator.audit.Query, audit_pb2.AuditQueryRequest(limit=10))
    proc, log = cp.proc, cp.log
    assert proc.returncode is not None
    assert _trace_lines(log) == [], log.read_text()[-3000:]


@pytest.mark.parametrize(("argv", "audits"), [
    (["sidecar", "--agent", "127.0.0.1:1"], True),
    (["--home", "h", "sidecar", "--client", "pc2", "--mesh-socket", "/tmp/x/mesh.sock"], False),
    (["sidecar", "--client=pc2"], False),
    (["controlplane", "--etcd", "e"], True),
    (["call", "--client", "x"], False),  # not a server hivemesh owns
])
def test_only_a_server_with_a_tls_port_turns_the_tracer_on(argv: list[str], audits: bool) -> None:
    from hivemesh.controlplane.cli import audits_handshakes

    assert audits_handshakes(argv) is audits

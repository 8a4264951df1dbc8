"""Who turns the TLS-handshake audit on, and how, on real processes.

- The pinned grpcio reads GRPC_TRACE once, when `import grpc` loads its core: set before, the tracer is on;
  set after, it is not. This is why `enable()` must run before gRPC is imported, and why the CLI (which loads
  gRPC before a command runs) needs the launcher to set the variable.
- A process hivemesh owns (`python -m hivemesh.agents.run`) audits a refused handshake with nothing set in its
  environment, without restarting itself: same pid, same command line, and its initial environment (what an
  exec would have replaced) still has no GRPC_TRACE.
- An SDK agent embedded in a program leaves that program's fd 2 alone unless the program opts in, even with
  GRPC_TRACE=handshaker in its environment; with HIVEMESH_AUDIT_HANDSHAKES=1 its fd 2 goes through the tee.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hivemesh.controlplane.ca import init_ca
from hivemesh.mesh.audit.handshake.switch import ENV
from hivemesh.mesh.ports import free_port
from tests.e2e.test_handshake_audit import _handshake_records
from tests.support.meshenv import MeshEnv, run_cli
from tests.support.plain_agent import PlainAgent
from tests.support.spawn import REPO, child_env, start_replica, start_sidecar, stop
from tests.support.tls_attacks import H2_PREFACE, raw_attempt
from tests.support.traffic_status import wait_traffic_status

_BARE_SERVER = """
import os, sys
if sys.argv[1] == "before": os.environ["GRPC_TRACE"] = "handshaker"
import grpc
if sys.argv[1] == "after": os.environ["GRPC_TRACE"] = "handshaker"
from concurrent import futures
from pathlib import Path
from hivemesh.controlplane.ca import load_ca
from hivemesh.mesh.tls import server_credentials
ca = load_ca(Path(sys.argv[2]))
cert, key = ca.issue_with_new_key("spiffe://hivemesh.local/agent/bare", common_name="bare",
                                  dns_names=["bare.agent.hivemesh.local"], ttl_s=600)
server = grpc.server(futures.ThreadPoolExecutor(1))
port = server.add_secure_port("127.0.0.1:0", server_credentials(cert, key, ca.bundle_pem()))
server.start()
print("port", port, flush=True)
sys.stdin.read()
server.stop(None).wait(5)
"""


def _tracer_lines(tmp_path: Path, when: str) -> int:
    """Refuse one plaintext connection on a bare gRPC server that set GRPC_TRACE `when`; the tracer's lines."""
    err_path = tmp_path / f"{when}.log"
    env = {k: v for k, v in os.environ.items() if k != "GRPC_TRACE"}
    with err_path.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", _BARE_SERVER, when, str(tmp_path / "ca")], cwd=REPO, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("port "), f"server said {line!r}: {err_path.read_text()[-2000:]}"
        raw_attempt(int(line.split()[1]), H2_PREFACE)
        # gRPC's own default log line about the failed handshake is written either way: wait for it.
        deadline = time.monotonic() + 20
        while b"Handshake failed" not in err_path.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(20)
        assert proc.stdout is not None
        proc.stdout.close()
    text = err_path.read_bytes()
    assert b"Handshake failed" in text, text[-2000:]
    return text.count(b"handshaker.cc")


def test_grpc_reads_grpc_trace_when_it_is_imported(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca", "hivemesh.local")
    assert _tracer_lines(tmp_path, "before") > 0
    assert _tracer_lines(tmp_path, "after") == 0


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def _proc_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


async def _node_status(env: MeshEnv, name: str) -> dict[str, Any] | None:
    code, out, err = await run_cli(env, "status", "--json")
    assert code == 0, err
    mine = [n for n in json.loads(out) if n["identity"].endswith(f"/agent/{name}")]
    return mine[0] if mine else None


@pytest.mark.slow
async def test_an_owned_agent_process_audits_refused_handshakes_without_a_restart(
    mesh_env: MeshEnv, tmp_path: Path
) -> None:
    env = await child_env(mesh_env, "ocr", tmp_path / "home")
    env = {k: v for k, v in env.items() if k not in ("GRPC_TRACE", ENV)}  # nothing set by a launcher
    port = free_port()
    argv = [sys.executable, "-m", "hivemesh.agents.run", "ocr", "--port", str(port)]
    with (tmp_path / "ocr.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(*argv, cwd=REPO, env=env, stdout=log, stderr=log,
                                                    start_new_session=True)
    try:
        node = await _wait_status(mesh_env, "ocr", "live")
        assert node is not None and node["handshake_audit"] == "live", (node, (tmp_path / "ocr.log").read_text())

        attacker = await asyncio.to_thread(raw_attempt, port, H2_PREFACE)
        deadline = time.monotonic() + 30
        mine: list[dict[str, Any]] = []
        while not mine and time.monotonic() < deadline:
            mine = [r for r in await _handshake_records(mesh_env) if r["remote"].endswith(f":{attacker}")]
            await asyncio.sleep(0.2)
        assert [(r["reason"], r["listener"]) for r in mine] == [("TLS_PLAINTEXT", f"127.0.0.1:{port}")], mine

        # The process that serves is the one started, with its command line and start-up environment.
        assert proc.returncode is None
        assert _cmdline(proc.pid) == argv
        started_with = _proc_environ(proc.pid)
        assert "GRPC_TRACE" not in started_with and "HIVEMESH_TRACER_REEXEC" not in started_with
    finally:
        await stop(proc)


@pytest.mark.slow
async def test_an_owned_sidecar_audits_refused_handshakes_with_nothing_set_by_its_launcher(
    mesh_env: MeshEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hivemesh sidecar` started by hand (no GRPC_TRACE, no opt-in): the CLI's entry point turns the tracer on
    before gRPC loads, so the audit is live, with no restart of the process."""
    monkeypatch.delenv("GRPC_TRACE", raising=False)
    monkeypatch.delenv(ENV, raising=False)
    async with PlainAgent("plain") as plain:
        proc, endpoint = await start_sidecar(mesh_env, plain.endpoint, tmp_path / "home", tmp_path / "sidecar.log")
        try:
            started_with = _proc_environ(proc.pid)
            assert "GRPC_TRACE" not in started_with and ENV not in started_with
            node = await _wait_status(mesh_env, "plain", "live")
            log = (tmp_path / "sidecar.log").read_text()
            assert node is not None and node["handshake_audit"] == "live", (node, log)
            port = int(endpoint.rsplit(":", 1)[1])
            attacker = await asyncio.to_thread(raw_attempt, port, H2_PREFACE)
            deadline = time.monotonic() + 30
            mine: list[dict[str, Any]] = []
            while not mine and time.monotonic() < deadline:
                mine = [r for r in await _handshake_records(mesh_env) if r["remote"].endswith(f":{attacker}")]
                await asyncio.sleep(0.2)
            assert [r["reason"] for r in mine] == ["TLS_PLAINTEXT"], mine
            assert proc.returncode is None
        finally:
            await stop(proc)


def _fd2(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/fd/2")


def _children(pid: int) -> list[str]:
    """The command lines of pid's child processes."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
            if ppid == pid:
                out.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ValueError, IndexError):
            continue
    return out


async def _wait_status(env: MeshEnv, name: str, state: str) -> dict[str, Any] | None:
    """The node's `hivemesh status` entry once its handshake audit state starts with state and no port of it is
    still starting (or the last seen): waited for in-process, then read through the CLI once. A node audits its
    gRPC port and its direct-link port, each proven by its own probe, so "live" alone can be followed by the other
    port's "; port N: starting" for a moment (seen once in a full run)."""
    await wait_traffic_status(env, lambda nodes: any(
        n.identity.endswith(f"/agent/{name}") and n.handshake_audit.startswith(state)
        and "starting" not in n.handshake_audit for n in nodes))
    return await _node_status(env, name)


@pytest.mark.slow
async def test_an_embedded_agent_leaves_stderr_alone_unless_its_program_opts_in(
    mesh_env: MeshEnv, tmp_path: Path
) -> None:
    """tests.support.replica_main embeds an SDK agent in a program. With GRPC_TRACE=handshaker (a user debugging
    gRPC, say) but no consent, its fd 2 stays the file it was given and no tee runs; HIVEMESH_AUDIT_HANDSHAKES=1
    is the consent, and then fd 2 is the tee's pipe."""
    log = tmp_path / "plain.log"
    proc, _ = await start_replica(mesh_env, "echo-1", tmp_path / "home1", log, GRPC_TRACE="handshaker")
    try:
        assert _fd2(proc.pid) == str(log)
        assert not any("hivemesh.mesh.audit.handshake.tee" in c for c in _children(proc.pid))
        node = await _wait_status(mesh_env, "echo", "off: not enabled in this process")
        assert node is not None and node["handshake_audit"].startswith("off: not enabled in this process"), node
    finally:
        await stop(proc)

    log = tmp_path / "opted-in.log"
    proc, _ = await start_replica(mesh_env, "echo-2", tmp_path / "home2", log, GRPC_TRACE="handshaker", **{ENV: "1"})
    try:
        assert _fd2(proc.pid).startswith("pipe:")
        assert any("hivemesh.mesh.audit.handshake.tee" in c for c in _children(proc.pid))
    finally:
        await stop(proc)

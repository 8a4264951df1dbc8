"""The sidecar's plaintext `Mesh` service is not an open door on a shared host: a real `hivemesh sidecar` process
serves it on a Unix socket (0600, folder 0700, this user's) and opens no TCP port for it; a plain gRPC caller
(generated stubs only, as an agent in any language) calls through the socket; a process of another user (the test
drops a child to uid 65534) cannot connect, even with the folder opened; loopback TCP only with --mesh-listen."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from hivemesh.sdk import AgentServer, AgentServerConfig
from hivemesh.v1 import agent_pb2, mesh_pb2_grpc
from tests.support.agents_for_tests import EchoAgent
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv
from tests.support.plain_agent import PlainAgent
from tests.support.spawn import start_sidecar_ready, stop

NOBODY = 65534
PLAIN = f"spiffe://{TRUST_DOMAIN}/agent/plain"


def _listening_tcp_ports(pid: int) -> set[int]:
    """The TCP ports process pid listens on: LISTEN rows of /proc/<pid>/net/tcp{,6} whose socket it holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: TCP_LISTEN
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def _connect_as_nobody(address: str) -> str:
    """Connect to address (a socket path, or host:port) from a child that dropped to uid/gid 65534 after its
    interpreter started (so it can run at all); returns 'connected' or the OS error's name."""
    code = (
        "import os, socket, sys\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "a = sys.argv[1]\n"
        "s = socket.socket(socket.AF_UNIX) if a.startswith('/') else socket.socket()\n"
        "try:\n"
        "    s.connect(a if a.startswith('/') else (a.rsplit(':', 1)[0], int(a.rsplit(':', 1)[1])))\n"
        "    print('connected')\n"
        "except OSError as e:\n"
        "    print(type(e).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=30,
                         check=True)
    return out.stdout.strip()


async def _call_echo(address: str) -> dict[str, object]:
    """A plain gRPC client of the sidecar's Mesh service: generated stubs only, as any language would."""
    async with grpc.aio.insecure_channel(address) as channel:
        resp = await mesh_pb2_grpc.MeshStub(channel).Call(
            agent_pb2.InvokeRequest(capability="echo", input=b'{"text": "via the sidecar"}',
                                    content_type="application/json"), timeout=15)
    out: dict[str, object] = json.loads(resp.output)
    return out


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder other users may traverse (pytest's own tmp folders are 0700), so only hivemesh's bits keep them
    out of what it makes inside."""
    folder = Path(tempfile.mkdtemp(prefix="hivemesh-socket-test-"))
    folder.chmod(0o711)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def plain_and_echo(mesh_env: MeshEnv, tmp_path: Path) -> AsyncIterator[PlainAgent]:
    """The plain agent the sidecar fronts, and an SDK agent serving `echo` for its outbound calls."""
    async with PlainAgent("plain", prefix="plain-") as plain, AgentServer(
        EchoAgent("sdk"), await mesh_env.settings_for("echo"), AgentServerConfig(audit_dir=tmp_path / "echo-audit")
    ):
        yield plain


async def test_mesh_is_served_on_a_private_unix_socket_and_no_tcp_port(
    mesh_env: MeshEnv, plain_and_echo: PlainAgent, tmp_path: Path, shared: Path
) -> None:
    sock = shared / "run" / "mesh.sock"
    proc, ready = await start_sidecar_ready(mesh_env, plain_and_echo.endpoint, tmp_path / "home",
                                            tmp_path / "sidecar.log", "--mesh-socket", str(sock))
    try:
        assert ready["mesh"] == f"unix:{sock}"
        for path, mode in ((sock, 0o600), (sock.parent, 0o700)):
            st = path.stat()
            assert (stat.S_IMODE(st.st_mode), st.st_uid) == (mode, os.geteuid()), path
        assert stat.S_ISSOCK(sock.stat().st_mode)
        # The sidecar's TCP ports are its mutual-TLS ones (gRPC, direct links) and its plaintext /metrics one; Mesh
        # is not among them.
        mtls_port = int(ready["inbound"].rsplit(":", 1)[1])
        metrics_port = int(ready["metrics"].rsplit(":", 1)[1])
        link_port = int(ready["link"].rsplit(":", 1)[1])  # its direct links (mesh/link_direct.py)
        assert _listening_tcp_ports(proc.pid) == {mtls_port, metrics_port, link_port}

        out = await _call_echo(ready["mesh"])
        assert (out["text"], out["caller"]) == ("via the sidecar", PLAIN)

        # Another user: refused by the folder (0700), and by the socket itself (0600) once the folder is open.
        assert _connect_as_nobody(str(sock)) == "PermissionError"
        sock.parent.chmod(0o711)
        assert _connect_as_nobody(str(sock)) == "PermissionError"
        sock.chmod(0o666)  # the control: with the socket's bits open, the same child gets in
        assert _connect_as_nobody(str(sock)) == "connected"
    finally:
        await stop(proc)
    assert not sock.exists()  # removed on a graceful stop


async def test_a_live_sidecars_socket_is_not_taken_over(
    mesh_env: MeshEnv, plain_and_echo: PlainAgent, tmp_path: Path
) -> None:
    sock = tmp_path / "run" / "mesh.sock"
    proc, ready = await start_sidecar_ready(mesh_env, plain_and_echo.endpoint, tmp_path / "home",
                                            tmp_path / "first.log", "--mesh-socket", str(sock))
    try:
        with pytest.raises(AssertionError, match="sidecar said"):
            second, _ = await start_sidecar_ready(mesh_env, plain_and_echo.endpoint, tmp_path / "home2",
                                                  tmp_path / "second.log", "--mesh-socket", str(sock), timeout=20)
            await stop(second)
        said = " ".join((tmp_path / "second.log").read_text().split())  # the CLI wraps its error line
        assert f"error: another process serves {sock}; give this sidecar its own --mesh-socket" in said
        out = await _call_echo(ready["mesh"])  # the first one still answers on it
        assert out["caller"] == PLAIN
    finally:
        await stop(proc)


async def test_loopback_tcp_only_when_asked(mesh_env: MeshEnv, plain_and_echo: PlainAgent, tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc, ready = await start_sidecar_ready(mesh_env, plain_and_echo.endpoint, home, tmp_path / "sidecar.log",
                                            "--mesh-listen", "127.0.0.1:0")
    try:
        host, port = ready["mesh"].rsplit(":", 1)
        assert host == "127.0.0.1"
        assert _listening_tcp_ports(proc.pid) == {int(ready["inbound"].rsplit(":", 1)[1]), int(port),
                                                  int(ready["metrics"].rsplit(":", 1)[1]),
                                                  int(ready["link"].rsplit(":", 1)[1])}
        out = await _call_echo(ready["mesh"])
        assert out["caller"] == PLAIN
        # Why it is opt-in: any local process, of any user, reaches it.
        assert _connect_as_nobody(ready["mesh"]) == "connected"
        assert not (home / "run").exists()  # and no socket was made
    finally:
        await stop(proc)
    said = " ".join((tmp_path / "sidecar.log").read_text().split())
    assert f"any local process can call the mesh as {PLAIN} through it" in said

"""A port the mesh cannot listen on is named: which listener, host and port, the cause, and where to give another.

Each port here is taken first by a real socket of the test (127.0.0.1, port 0 to pick it), then a real server is
asked for it: the control plane's mTLS, join, health and metrics ports, an SDK agent's health and metrics ports,
and a real `hivemesh sidecar` process's inbound, Mesh, health and metrics ports. gRPC said "RuntimeError: Failed to
bind to address 127.0.0.1:P; set GRPC_VERBOSITY=debug ..." (no listener, no cause, nothing to do), and the metrics
port (prometheus-client's HTTP server) a bare "[Errno 98] Address already in use", with no address at all.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from hivemesh.controlplane.server import ControlPlaneConfig, ControlPlaneServer
from hivemesh.mesh.etcd import EtcdServer
from hivemesh.sdk import AgentServer, AgentServerConfig
from tests.support.agents_for_tests import EchoAgent
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, copy_session_ca
from tests.support.spawn import REPO, child_env, start_plain_agent, stop

pytestmark = pytest.mark.timeout(90)


@contextmanager
def taken_port() -> Iterator[int]:
    """A loopback port held by a listening socket of this test until the block ends."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def in_use(port: int, what: str, choice: str) -> str:
    return (f"cannot listen on 127.0.0.1:{port} ({what}): port {port} is already in use by another process (or "
            f"another server in this one); choose another port ({choice}), or port 0 for any free one")


def assert_named(err: BaseException, code: int, message: str) -> None:
    """err is the mesh's own OSError: the system's errno, the message, nothing of gRPC's or the HTTP server's."""
    assert isinstance(err, OSError) and err.errno == code, repr(err)
    assert err.strerror == message, err.strerror
    assert str(err) == message, str(err)  # what the CLI prints: no "[Errno 98]" before it
    assert err.__cause__ is None and err.__suppress_context__, repr(err.__context__)


# --- the control plane -------------------------------------------------------------------------------------------
CONTROLPLANE_PORTS = {
    "port": ("the control plane's mTLS port", "hivemesh controlplane --port, ControlPlaneConfig(port=...)"),
    "join_port": ("the control plane's join port",
                  "hivemesh controlplane --join-port, ControlPlaneConfig(join_port=...)"),
    "health_listen": ("the control plane's health port", "hivemesh controlplane --health-listen HOST:PORT, "
                      "ControlPlaneConfig(health_listen=...), $HIVEMESH_HEALTH_LISTEN"),
    "metrics_listen": ("the control plane's metrics port", "hivemesh controlplane --metrics-listen HOST:PORT, "
                       "ControlPlaneConfig(metrics_listen=...), $HIVEMESH_METRICS_LISTEN"),
}


@pytest.mark.parametrize("field", list(CONTROLPLANE_PORTS))
async def test_a_control_plane_port_in_use_is_named_with_its_flag(
    field: str, etcd: Any, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    copy_session_ca(tmp_path / "certs")
    base = {"etcd_endpoints": etcd_server.endpoint, "certs_dir": tmp_path / "certs", "state_dir": tmp_path / "state",
            "trust_domain": TRUST_DOMAIN}
    what, choice = CONTROLPLANE_PORTS[field]
    with taken_port() as port:
        value: int | str = port if field.endswith("port") else f"127.0.0.1:{port}"
        cp = ControlPlaneServer(ControlPlaneConfig(**base, **{field: value}))
        try:
            with pytest.raises(OSError) as caught:
                await cp.start()
        finally:
            await cp.stop(0)
    assert_named(caught.value, errno.EADDRINUSE, in_use(port, what, choice))
    # Nothing of the failed start holds on: a control plane serves on that very port once it is free.
    again = ControlPlaneServer(ControlPlaneConfig(**base, **{field: value}))
    try:
        await again.start()
        bound = {"port": again.port, "join_port": again.join_port, "health_listen": again.health_address,
                 "metrics_listen": again.metrics.address if again.metrics is not None else None}[field]
        assert bound == value, bound
    finally:
        await again.stop(0)


# --- an SDK agent --------------------------------------------------------------------------------------------------
AGENT_PORTS = {
    "health_listen": ("the health port", "hivemesh sidecar --health-listen HOST:PORT, "
                      "AgentServerConfig(health_listen=...) of an SDK agent, $HIVEMESH_HEALTH_LISTEN"),
    "metrics_listen": ("the agent's metrics port", "AgentServerConfig(metrics_listen=...), $HIVEMESH_METRICS_LISTEN"),
}


@pytest.mark.parametrize("field", list(AGENT_PORTS))
async def test_an_agent_health_or_metrics_port_in_use_is_named_with_its_field(field: str, mesh_env: MeshEnv) -> None:
    what, choice = AGENT_PORTS[field]
    with taken_port() as port:
        server = AgentServer(EchoAgent(), await mesh_env.settings_for("echo"),
                             AgentServerConfig(**{field: f"127.0.0.1:{port}"}))
        with pytest.raises(OSError) as caught:
            await server.start()
    assert_named(caught.value, errno.EADDRINUSE, in_use(port, what, choice))
    assert server.registration is None  # deregistered: no caller is routed to an agent that never served
    # The same agent serves once the port is free (the failed start left nothing bound).
    async with AgentServer(EchoAgent(), await mesh_env.settings_for("echo"),
                           AgentServerConfig(**{field: f"127.0.0.1:{port}"})) as again:
        assert (again.health_address if field == "health_listen" else again.metrics_address) == f"127.0.0.1:{port}"


async def test_a_health_port_taken_by_another_agents_is_in_use(mesh_env: MeshEnv) -> None:
    """gRPC binds with SO_REUSEPORT unless told not to: a second health port on the same address bound as well,
    and the kernel split the probes between the two agents (one's probe answered by the other)."""
    what, choice = AGENT_PORTS["health_listen"]
    async with AgentServer(EchoAgent(), await mesh_env.settings_for("echo"),
                           AgentServerConfig(health_listen="127.0.0.1:0")) as first:
        assert first.health_address is not None
        port = int(first.health_address.rpartition(":")[2])
        second = AgentServer(EchoAgent(), await mesh_env.settings_for("echo"),
                             AgentServerConfig(health_listen=first.health_address))
        with pytest.raises(OSError) as caught:
            await second.start()
        assert_named(caught.value, errno.EADDRINUSE, in_use(port, what, choice))
        assert first.health_address == f"127.0.0.1:{port}"  # the first one serves on


@pytest.mark.parametrize("field", list(AGENT_PORTS))
async def test_an_address_not_of_this_machine_is_named_as_such(field: str, mesh_env: MeshEnv) -> None:
    """192.0.2.1 (TEST-NET-1, documentation only) is on no interface here: bind() refuses it, and no packet is
    sent anywhere."""
    what, choice = AGENT_PORTS[field]
    server = AgentServer(EchoAgent(), await mesh_env.settings_for("echo"),
                         AgentServerConfig(**{field: "192.0.2.1:0"}))
    with pytest.raises(OSError) as caught:
        await server.start()
    assert_named(caught.value, errno.EADDRNOTAVAIL,
                 f"cannot listen on 192.0.2.1:0 ({what}): 192.0.2.1 is not an address of this machine; give one of "
                 f"its addresses ({choice})")


# --- a sidecar, as its operator starts it ---------------------------------------------------------------------------
SIDECAR_PORTS = {
    "--listen": ("the sidecar's inbound port", "hivemesh sidecar --listen HOST:PORT"),
    "--mesh-listen": ("the sidecar's Mesh port", "hivemesh sidecar --mesh-listen HOST:PORT"),
    "--health-listen": AGENT_PORTS["health_listen"],
    "--metrics-listen": ("the sidecar's metrics port",
                         "hivemesh sidecar --metrics-listen HOST:PORT, $HIVEMESH_METRICS_LISTEN"),
}


@pytest.mark.parametrize("flag", list(SIDECAR_PORTS))
async def test_a_sidecar_port_in_use_is_named_with_its_flag(flag: str, mesh_env: MeshEnv, tmp_path: Path) -> None:
    what, choice = SIDECAR_PORTS[flag]
    agent, address = await start_plain_agent(tmp_path / "plain.log")
    sidecar: asyncio.subprocess.Process | None = None
    log = tmp_path / "sidecar.log"
    try:
        with taken_port() as port, log.open("wb") as err:
            sidecar = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "hivemesh.controlplane.cli", "sidecar", "--agent", address,
                flag, f"127.0.0.1:{port}", cwd=REPO, env=await child_env(mesh_env, "plain", tmp_path / "home"),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=err, start_new_session=True,
            )
            out, _ = await asyncio.wait_for(sidecar.communicate(), 60)
        stderr = log.read_text(errors="replace")
        assert sidecar.returncode == 1, (sidecar.returncode, stderr)
        assert b"sidecar ready" not in out, out
        assert f"error: {in_use(port, what, choice)}\n" in stderr, stderr
        assert "GRPC_VERBOSITY" not in stderr and "[Errno" not in stderr, stderr
    finally:
        if sidecar is not None:
            await stop(sidecar, kill=True)
        await stop(agent)

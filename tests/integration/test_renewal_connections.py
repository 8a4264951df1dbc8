"""A node that renews its certificate opens new connections to its peers with it, and closes the old ones once
their calls had time to end. The 30-minute soak of 4 Dec found a client holding one more connection to each peer
after every renewal (a certificate of 1 h renews every ~30 min: a slow leak of sockets and memory)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hivemesh.mesh.etcd import EtcdServer
from hivemesh.mesh.outbound import channels
from hivemesh.mesh.outbound.link import LinkedInvoke
from hivemesh.sdk import AgentServer, AgentServerConfig, MeshClient
from tests.support.agents_for_tests import EchoAgent
from tests.support.meshenv import MeshEnv, start_mesh_env, stop_mesh_env
from tests.support.sockets import connections_to
from tests.support.waiting import until

RENEWALS = 3


@pytest.fixture
async def env(etcd: Any, etcd_server: EtcdServer, tmp_path: Path) -> AsyncIterator[MeshEnv]:
    env = await start_mesh_env(tmp_path, etcd_server.endpoint)
    try:
        yield env
    finally:
        await stop_mesh_env(env)


@contextlib.asynccontextmanager
async def _echo_and_renewer(
    env: MeshEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, link: bool
) -> AsyncIterator[tuple[AgentServer, MeshClient]]:
    """An echo agent and a client that called it once, links on or off; the retired channels' grace shortened."""
    monkeypatch.setattr(channels, "_CLOSE_GRACE_S", 0.2)  # the grace in-flight calls get, shortened for the test
    monkeypatch.setenv("HIVEMESH_LINK", "1" if link else "0")
    async with AgentServer(EchoAgent(), await env.settings_for("echo"),
                           AgentServerConfig(audit_dir=tmp_path / "a")) as server, \
            MeshClient.connect(name="renewer", settings=await env.settings_for("renewer", "client")) as mesh:
        assert await mesh.node.registry.wait_for_capability("echo", 1, timeout=20)
        assert (await mesh.call("echo", {"text": "first"}))["text"] == "first"
        yield server, mesh


async def _renew(mesh: MeshClient) -> None:
    """Renew the client's certificate now (what a CA rotation does; the schedule does it at half-life)."""
    renewed, thumbprint = mesh.node.renewals, mesh.node.workload.thumbprint
    mesh.node._renew_now.set()
    assert await until(lambda: mesh.node.renewals > renewed, 30), "the client did not renew"
    assert mesh.node.workload.thumbprint != thumbprint


@pytest.mark.parametrize("link", [True, False], ids=["link", "unary"])
async def test_a_renewed_client_closes_its_old_connections_to_a_peer(
    env: MeshEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, link: bool
) -> None:
    async with _echo_and_renewer(env, tmp_path, monkeypatch, link=link) as (server, mesh):
        port = int(server.endpoint.rsplit(":", 1)[1])
        assert len(connections_to(port)) == 1
        for i in range(RENEWALS):
            await _renew(mesh)
            assert (await mesh.call("echo", {"text": f"after {i}"}))["text"] == f"after {i}"  # on the new certificate
        # Each renewal opened a connection with the new certificate; the old ones are closed after the grace.
        held = await until(lambda: len(connections_to(port)) == 1, 30)
        assert held, f"{len(connections_to(port))} connections to the peer after {RENEWALS} renewals, not 1"


def _links(mesh: MeshClient) -> list[Any]:
    """The open links of the client's channel pool (one per peer it called over a link)."""
    pool = mesh.node.outbound.channels
    return [ep.invoke._link for ep in pool._endpoints.values()
            if isinstance(ep.invoke, LinkedInvoke) and ep.invoke._link is not None]


def _ended(link: Any) -> bool:
    return bool(link._writer.done() and link._reader.done())


async def test_a_link_whose_channel_is_retired_or_closed_ends_its_tasks(
    env: MeshEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link's writer waits on its queue: a channel closed under it (renewal, a peer gone, the pool closed) must
    end it too, or the task lives on until the garbage collector destroys it pending (asyncio's "Task was
    destroyed but it is pending!", and its frames' generator closed while running)."""
    async with _echo_and_renewer(env, tmp_path, monkeypatch, link=True) as (_server, mesh):
        [renewed_away] = _links(mesh)
        await _renew(mesh)
        assert (await mesh.call("echo", {"text": "second"}))["text"] == "second"
        [current] = _links(mesh)
        assert current is not renewed_away
        assert await until(lambda: _ended(renewed_away), 30), "the retired channel's link kept its tasks"
        assert not _ended(current)
        # forget: the instance is gone
        pool = mesh.node.outbound.channels
        address = next(iter(pool._endpoints))[0]
        pool.forget(address)
        assert await until(lambda: _ended(current), 30), "a forgotten peer's link kept its tasks"
        assert (await mesh.call("echo", {"text": "third"}))["text"] == "third"
        [last] = _links(mesh)
        await pool.close()
        assert _ended(last) or await until(lambda: _ended(last), 30), "a closed pool's link kept its tasks"

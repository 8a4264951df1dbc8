"""Restart real processes with their join token consumed: a `hivemesh sidecar` and an SDK agent come back as the
same SPIFFE identity from the key and certificate kept in their state folder (renewed at start), register and
serve; no operator step, no new join token."""

from __future__ import annotations

import asyncio
import hashlib
import stat
import time
from pathlib import Path

import aetcd

from hivemesh.controlplane import joins
from hivemesh.mesh.pki import spiffe_id_of
from hivemesh.sdk import MeshClient
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv
from tests.support.plain_agent import PlainAgent
from tests.support.spawn import start_replica, start_sidecar, stop


async def _registered(env: MeshEnv, agent: str) -> list[tuple[str, str]]:
    return sorted((i.instance_id, i.identity) for i in await env.operator.list_agents() if i.card.name == agent)


async def test_a_sidecar_and_an_sdk_agent_restart_as_themselves_without_a_new_join_token(
    mesh_env: MeshEnv, etcd: aetcd.Client, tmp_path: Path
) -> None:
    sidecar_token = (await mesh_env.operator.create_join_token("plain", "agent", 120)).token
    agent_token = (await mesh_env.operator.create_join_token("echo", "agent", 120)).token
    sidecar_home, agent_home = tmp_path / "sidecar-home", tmp_path / "agent-home"
    caller = await mesh_env.settings_for("tester", "client")
    async with PlainAgent("plain", prefix="plain-") as plain, MeshClient.connect(name="tester",
                                                                                  settings=caller) as mesh:
        certs: dict[str, bytes] = {}
        for run in ("first", "restarted"):
            # The same environment both times: the join tokens above, consumed by the first run.
            sidecar, _ = await start_sidecar(mesh_env, plain.endpoint, sidecar_home, tmp_path / f"sidecar-{run}.log",
                                             "--lease-ttl", "2", HIVEMESH_JOIN_TOKEN=sidecar_token)
            try:
                agent, _ = await start_replica(mesh_env, run, agent_home, tmp_path / f"agent-{run}.log",
                                               HIVEMESH_JOIN_TOKEN=agent_token)
                try:
                    for name, home in (("plain", sidecar_home), ("echo", agent_home)):
                        folder = home / "identity" / f"agent-{name}"
                        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
                        assert stat.S_IMODE((folder / "key.pem").stat().st_mode) == 0o600
                        cert = (folder / "cert.pem").read_bytes()
                        assert spiffe_id_of(cert) == f"spiffe://{TRUST_DOMAIN}/agent/{name}"
                        assert cert != certs.get(name)  # a restart renews at once
                        certs[name] = cert
                    deadline = time.monotonic() + 15  # the restarted replica registered (the old lease may linger)
                    while not any(i.instance_id == run for i in mesh.instances("echo")):
                        assert time.monotonic() < deadline, f"replica {run} did not register"
                        await asyncio.sleep(0.1)
                    assert await mesh.node.registry.wait_for_capability("plain-echo", 1, timeout=15)
                    out = await mesh.call("echo", {"text": run}, timeout=10)
                    assert out["served_by"] == run
                    via_sidecar = await mesh.call("plain-echo", {"text": run}, timeout=10)
                    assert via_sidecar["caller"] == f"spiffe://{TRUST_DOMAIN}/client/tester"
                    for name in ("plain", "echo"):
                        assert {i for _, i in await _registered(mesh_env, name)} == {
                            f"spiffe://{TRUST_DOMAIN}/agent/{name}"}
                finally:
                    await stop(agent)
            finally:
                await stop(sidecar)
            if run == "first":  # both tokens consumed: the restart below cannot join with them
                for token in (sidecar_token, agent_token):
                    key = joins.JOIN_PREFIX + hashlib.sha256(token.encode()).hexdigest().encode()
                    assert await etcd.get(key) is None

"""A real mesh for the orchestration tests: control plane, agents served in-process, a client, helpers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hivemesh.mesh.etcd import EtcdServer
from hivemesh.sdk import Agent, AgentServer, AgentServerConfig, MeshClient
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, start_mesh_env, stop_mesh_env

REPO = Path(__file__).resolve().parents[2]
ORCH_GRANTS = {
    "grants": [
        {"name": "everyone", "subjects": [f"spiffe://{TRUST_DOMAIN}/client/*", f"spiffe://{TRUST_DOMAIN}/operator/*",
                                          f"spiffe://{TRUST_DOMAIN}/agent/*"],
         "capabilities": ["*"]},
    ]
}


@dataclass
class Orch:
    env: MeshEnv
    mesh: MeshClient
    stack: contextlib.AsyncExitStack
    tmp: Path

    async def serve(self, agent: Agent, config: AgentServerConfig | None = None) -> AgentServer:
        server = AgentServer(agent, await self.env.settings_for(agent.name), config)
        await self.stack.enter_async_context(server)
        for cap in agent.capabilities:
            assert await self.mesh.node.registry.wait_for_capability(cap, 1, timeout=10), cap
        return server

    async def client(self, name: str) -> MeshClient:
        client = MeshClient.connect(name=name, settings=await self.env.settings_for(name, "client"))
        return await self.stack.enter_async_context(client)

    def cli_env(self) -> dict[str, str]:
        s = self.env.base_settings()
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("HIVEMESH_")},
            "HIVEMESH_ETCD": s.etcd, "HIVEMESH_CONTROLPLANE": s.controlplane, "HIVEMESH_JOIN": s.join,
            "HIVEMESH_CA": str(s.ca_bundle), "HIVEMESH_TRUST_DOMAIN": s.trust_domain,
            "HIVEMESH_HOME": str(self.tmp / "cli-home"), "PYTHONPATH": str(REPO),
        }

    async def hivemesh(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run the real CLI (`python -m hivemesh.controlplane.cli`) as the operator, in a child process."""
        cmd = [sys.executable, "-m", "hivemesh.controlplane.cli", "--certs-dir", str(self.tmp / "certs"),
               "--home", str(self.tmp / "cli-home"), *args]
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                    env=self.cli_env(), cwd=str(REPO))
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        return subprocess.CompletedProcess(cmd, proc.returncode or 0, out.decode(), err.decode())


async def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll an (async or sync) predicate until it is truthy; fail the test naming `what` on timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


@pytest.fixture
async def orch(etcd: Any, etcd_server: EtcdServer, tmp_path: Path) -> AsyncIterator[Orch]:
    env = await start_mesh_env(tmp_path, etcd_server.endpoint, grants=ORCH_GRANTS)
    try:
        async with contextlib.AsyncExitStack() as stack:
            settings = await env.settings_for("orchestrator", "client")
            mesh = await stack.enter_async_context(MeshClient.connect(name="orchestrator", settings=settings))
            yield Orch(env, mesh, stack, tmp_path)
    finally:
        await stop_mesh_env(env)


async def serve_all(orch: Orch, agents: Sequence[Agent]) -> None:
    for agent in agents:
        await orch.serve(agent)

"""`hivemesh a2a register URL` and `hivemesh a2a serve` as real processes: an a2a-sdk client calls, through the
gateway process and the mesh, an external a2a-sdk agent served on the mesh by the bridge process (A2A → mesh →
A2A), and `hivemesh call` reaches the same agent by capability."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from a2a.client import ClientConfig, create_client
from a2a.client.card_resolver import parse_agent_card
from a2a.helpers import get_text_parts
from a2a.types import TaskState

from hivemesh.sdk import MeshClient
from tests.support.a2a_rig import ToolsExecutor, https_client, send_request, serve_a2a, tools_card
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, run_cli, start_mesh_env, stop_mesh_env
from tests.support.spawn import _first_line, _spawn, _tail, child_env, stop

pytestmark = pytest.mark.slow

GRANTS = {"grants": [
    {"name": "people", "subjects": [f"spiffe://{TRUST_DOMAIN}/client/*", f"spiffe://{TRUST_DOMAIN}/operator/*"],
     "capabilities": ["*"]},
    {"name": "gateway", "subjects": [f"spiffe://{TRUST_DOMAIN}/agent/a2a-gateway"], "capabilities": ["*"]},
]}


@pytest.fixture
async def env(etcd: Any, etcd_server: Any, tmp_path: Path) -> AsyncIterator[MeshEnv]:
    mesh = await start_mesh_env(tmp_path, etcd_server.endpoint, GRANTS)
    try:
        yield mesh
    finally:
        await stop_mesh_env(mesh)


async def _ready(env: MeshEnv, name: str, tmp: Path, *args: str) -> tuple[Any, dict[str, str]]:
    log = tmp / f"{name}.log"
    proc = await _spawn(["-m", "hivemesh.controlplane.cli", "a2a", *args, "--json"],
                        await child_env(env, name, tmp / name), log)
    line = await _first_line(proc, log, 60)
    try:
        return proc, json.loads(line)
    except json.JSONDecodeError:
        await stop(proc)
        raise AssertionError(f"{name} said {line!r}; log:\n{_tail(log)}") from None


async def test_register_and_serve_processes(env: MeshEnv, tmp_path: Path) -> None:
    async with serve_a2a(ToolsExecutor(), tools_card()) as url:
        bridge, ready = await _ready(env, "text-tools", tmp_path, "register", url)
        gateway = None
        try:
            assert ready == {"ready": "a2a-bridge", "agent": "text-tools", "a2a": "Text Tools",
                             "capabilities": "refuse,reverse,sum"}
            code, out, err = await run_cli(env, "call", "sum", "--data", '{"a": 20, "b": 22}', "--json")
            assert code == 0, err
            assert json.loads(out) == {"sum": 42}

            gateway, gw = await _ready(env, "a2a-gateway", tmp_path, "serve")
            assert gw["audience"] == f"spiffe://{TRUST_DOMAIN}/agent/a2a-gateway"
            async with MeshClient.connect(name="carol", settings=await env.settings_for("carol", "client")) as carol:
                token = (await carol.node.controlplane.issue_token(gw["audience"], ["reverse"])).token
                async with https_client(carol.node.workload, carol.node.workload.bundle_pem, tmp_path / "carol",
                                        token) as http:
                    card = parse_agent_card((await http.get(gw["card"])).json())
                    assert {"reverse", "sum", "refuse"} <= {s.id for s in card.skills}
                    client = await create_client(card, ClientConfig(httpx_client=http, streaming=False))
                    task = [e async for e in client.send_message(send_request("stressed", skill="reverse"))][-1].task
                    assert task.status.state == TaskState.TASK_STATE_COMPLETED
                    assert get_text_parts(task.artifacts[0].parts) == ["desserts"]
        finally:
            if gateway is not None:
                await stop(gateway)
            await stop(bridge)
        assert bridge.returncode == 0 and (gateway is None or gateway.returncode == 0)

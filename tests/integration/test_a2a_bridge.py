"""An external A2A agent (a real a2a-sdk server on 127.0.0.1) registered by its card URL and called through
the mesh: from a MeshClient and from `hivemesh call`, with the mesh's policies applied on the way in."""

from __future__ import annotations

import json

import httpx
import pytest

from hivemesh.mesh.errors import InvalidInputError
from hivemesh.sdk import AgentError, AgentServer, MeshClient
from hivemesh.sdk.a2a.bridge import A2ABridgeAgent, fetch_card
from tests.support.a2a_rig import ToolsExecutor, serve_a2a, tools_card
from tests.support.meshenv import MeshEnv, run_cli


async def test_an_a2a_agent_becomes_a_capability_provider(mesh_env: MeshEnv) -> None:
    async with serve_a2a(ToolsExecutor(), tools_card()) as url, httpx.AsyncClient(timeout=30) as http:
        card = await fetch_card(url, http)
        bridge = await A2ABridgeAgent.from_card(card, http)
        assert bridge.name == "text-tools"
        async with AgentServer(bridge, await mesh_env.settings_for("text-tools")), \
                MeshClient.connect(name="tester", settings=await mesh_env.settings_for("tester", "client")) as mesh:
            assert await mesh.node.registry.wait_for_capability("reverse", 1, timeout=10)
            listed = {c.capability.name: c for c in mesh.capability_infos()}
            assert {"reverse", "sum", "refuse"} <= set(listed)
            assert listed["sum"].capability.description == "Add a and b" and listed["sum"].agents == ("text-tools",)
            assert await mesh.call("reverse", "stressed", timeout=10) == "desserts"
            assert await mesh.call("reverse", {"text": "drawer"}, timeout=10) == "reward"
            assert await mesh.call("sum", {"a": 2, "b": 40}, timeout=10) == {"sum": 42}
            with pytest.raises(AgentError) as refused:
                await mesh.call("refuse", "please", timeout=10)
            assert "TASK_STATE_REJECTED" in refused.value.message and "I do not do 'refuse'" in refused.value.message
            code, out, err = await run_cli(mesh_env, "call", "sum", "--data", '{"a": 1, "b": 2}', "--json")
            assert code == 0, err
            assert json.loads(out) == {"sum": 3}


async def test_a_url_without_a_card_is_refused_clearly() -> None:
    async with serve_a2a(ToolsExecutor(), tools_card()) as url, httpx.AsyncClient(timeout=30) as http:
        with pytest.raises(InvalidInputError) as bad:
            await fetch_card(url + "nothing-here.json", http)
        assert "could not read an A2A agent card" in bad.value.message

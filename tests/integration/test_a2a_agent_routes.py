"""The A2A gateway's per-agent routes (`POST /agents/<agent>/`) reach that agent only, even when other agents
offer the same capability (unary and streaming skills alike), and a task keeps its agent when a restarted
gateway resumes its run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from a2a.client import Client, ClientConfig, create_client
from a2a.client.card_resolver import parse_agent_card
from a2a.helpers import get_data_parts
from a2a.types import SendMessageRequest, TaskState

from hivemesh.sdk import AgentServer, MeshClient, capability
from hivemesh.sdk.a2a.gateway import A2AGateway
from hivemesh.sdk.escalation import InputRequired
from tests.support.a2a_rig import https_client, message, send_request
from tests.support.agents_for_tests import TaggedTwin
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, start_mesh_env, stop_mesh_env

pytestmark = pytest.mark.timeout(180)

GRANTS = {"grants": [
    {"name": "alice", "subjects": [f"spiffe://{TRUST_DOMAIN}/client/alice"], "capabilities": ["*"]},
    {"name": "gateway", "subjects": [f"spiffe://{TRUST_DOMAIN}/agent/a2a-gateway"], "capabilities": ["*"]},
]}
SCOPES = ("echo", "refund", "tally", "only-beta")


class _Twin(TaggedTwin):
    """What alpha and beta both offer here: the shared echo and tally, and a refund that asks a person first."""

    @capability(name="refund", description="Asks a person, then says who served the answer", idempotent=True)
    async def refund(self, req: dict[str, Any]) -> dict[str, Any]:
        human = req.get("human")
        if not human:
            raise InputRequired(f"{self.name} needs a person", {"order": req.get("order")})
        return {"agent": self.name, "served_by": self.tag, "approved": human.get("approved")}


class Alpha(_Twin):
    name = "alpha"


class Beta(_Twin):
    name = "beta"

    @capability(name="only-beta", description="What alpha does not offer", idempotent=True)
    async def only_beta(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"agent": self.name}


@dataclass
class Rig:
    gateway: A2AGateway
    alice: MeshClient
    env: MeshEnv
    tmp: Path

    async def http(self) -> httpx.AsyncClient:
        tok = (await self.alice.node.controlplane.issue_token(self.gateway.spiffe_id, SCOPES)).token
        return https_client(self.alice.node.workload, self.gateway.mesh.node.workload.bundle_pem,
                            self.tmp / "alice", tok)

    async def client(self, http: httpx.AsyncClient, agent: str | None) -> Client:
        base = f"{self.gateway.url}/agents/{agent}" if agent else self.gateway.url
        card = parse_agent_card((await http.get(f"{base}/.well-known/agent-card.json")).json())
        return await create_client(card, ClientConfig(httpx_client=http, streaming=False))


@pytest.fixture
async def rig(etcd: Any, etcd_server: Any, tmp_path: Path) -> AsyncIterator[Rig]:
    env = await start_mesh_env(tmp_path, etcd_server.endpoint, GRANTS)
    try:
        # Two instances of alpha, one of beta: an unpinned round robin over the three sends every third call
        # to beta.
        async with AgentServer(Alpha("alpha-1"), await env.settings_for("alpha")), \
                AgentServer(Alpha("alpha-2"), await env.settings_for("alpha")), \
                AgentServer(Beta("beta-1"), await env.settings_for("beta")), \
                A2AGateway(await env.settings_for("a2a-gateway")) as gateway, \
                MeshClient.connect(name="alice", settings=await env.settings_for("alice", "client")) as alice:
            for cap in ("echo", "refund", "tally"):
                assert await gateway.mesh.node.registry.wait_for_capability(cap, 3, timeout=10), cap
            yield Rig(gateway, alice, env, tmp_path)
    finally:
        await stop_mesh_env(env)


async def _send(client: Client, request: SendMessageRequest) -> Any:
    return [e async for e in client.send_message(request)][-1].task


async def _rpc(http: httpx.AsyncClient, url: str, skill: str) -> dict[str, Any]:
    body = {"jsonrpc": "2.0", "id": 1, "method": "message/send", "params": {"message": {
        "role": "user", "messageId": "m1", "kind": "message", "parts": [{"kind": "data", "data": {"text": "x"}}],
        "metadata": {"skill": skill}}}}
    r = await http.post(url, json=body, headers={"A2A-Version": "0.3"})
    assert r.status_code == 200, r.text[:300]
    return r.json()  # type: ignore[no-any-return]


async def test_a_per_agent_route_reaches_that_agent_only(rig: Rig) -> None:
    async with await rig.http() as http:
        for agent, tags in (("alpha", {"alpha-1", "alpha-2"}), ("beta", {"beta-1"})):
            client = await rig.client(http, agent)
            for n in range(6):
                task = await _send(client, send_request({"text": f"{agent}-{n}"}, skill="echo"))
                assert task.status.state == TaskState.TASK_STATE_COMPLETED, task.status
                out = get_data_parts(task.artifacts[0].parts)[0]
                assert out["agent"] == agent and out["served_by"] in tags, (agent, out)
        # The gateway's own route still spreads a capability over every agent offering it.
        client = await rig.client(http, None)
        served = set()
        for n in range(6):
            task = await _send(client, send_request({"text": f"any-{n}"}, skill="echo"))
            served.add(get_data_parts(task.artifacts[0].parts)[0]["agent"])
        assert served == {"alpha", "beta"}, served
        # A capability alpha does not offer is refused on alpha's route, with the skills it does offer.
        before = len(await rig.gateway.executor.engine.list())
        err = (await _rpc(http, f"{rig.gateway.url}/agents/alpha/", "only-beta"))["error"]
        assert err["code"] == -32602 and "no skill 'only-beta'" in err["message"], err
        assert "offered: echo, refund, tally" in err["message"], err
        assert len(await rig.gateway.executor.engine.list()) == before  # no run was started


async def test_a_pinned_task_keeps_its_agent_when_a_restarted_gateway_resumes_it(rig: Rig) -> None:
    async with await rig.http() as http:
        client = await rig.client(http, "alpha")
        asked = [await _send(client, send_request({"order": n}, skill="refund")) for n in range(3)]
    for task in asked:
        assert task.status.state == TaskState.TASK_STATE_INPUT_REQUIRED, task.status
        run = await rig.gateway.executor.engine.get(task.id)
        assert run.input["agent"] == "alpha"  # the pin is part of the run's recorded input
        assert run.steps["call-0"].result is not None and run.steps["call-0"].result["agent"] == "alpha"
    await rig.gateway.stop()
    async with A2AGateway(await rig.env.settings_for("a2a-gateway")) as second:
        rig.gateway = second
        assert await second.mesh.node.registry.wait_for_capability("refund", 3, timeout=10)
        async with await rig.http() as http:
            client = await rig.client(http, "alpha")
            # Three answers in a row: unpinned, round robin over the three instances would send one to beta.
            for task in asked:
                answer = SendMessageRequest(message=message({"approved": True}, task_id=task.id,
                                                            context_id=task.context_id))
                done = await _send(client, answer)
                assert done.status.state == TaskState.TASK_STATE_COMPLETED, done.status
                out = get_data_parts(done.artifacts[-1].parts)[0]
                assert out["agent"] == "alpha" and out["approved"] is True, out
                run = await second.executor.engine.get(task.id)
                assert len(run.runs) == 2 and run.steps["call-1"].result is not None
                assert run.steps["call-1"].result["agent"] == "alpha"


def _items(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The items a completed streaming task's artifact holds (one data part per streamed item)."""
    return [part["data"] for artifact in result.get("artifacts", []) for part in artifact["parts"]]


async def test_a_stream_on_a_per_agent_route_is_served_by_that_agent_while_another_serves_it_too(rig: Rig) -> None:
    async with await rig.http() as http:
        for agent, tags in (("alpha", {"alpha-1", "alpha-2"}), ("beta", {"beta-1"})):
            served = set()
            for _ in range(4):  # unpinned, round robin over the three instances would send one of four to beta
                ok = (await _rpc(http, f"{rig.gateway.url}/agents/{agent}/", "tally"))["result"]
                assert ok["status"]["state"] == "completed", ok
                items = _items(ok)
                assert [i["n"] for i in items] == [0, 1, 2] and {i["agent"] for i in items} == {agent}, items
                served.add(items[0]["served_by"])
            assert served <= tags, (agent, served)
            run = await rig.gateway.executor.engine.get(ok["id"])
            assert run.input["agent"] == agent  # the pin is part of the stream run's recorded input too
        # On the gateway's own route (any agent) it streams from every agent serving it.
        agents = set()
        for _ in range(4):
            ok = (await _rpc(http, f"{rig.gateway.url}/", "tally"))["result"]
            assert ok["status"]["state"] == "completed", ok
            agents |= {i["agent"] for i in _items(ok)}
        assert agents == {"alpha", "beta"}, agents

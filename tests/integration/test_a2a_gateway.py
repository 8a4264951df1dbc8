"""The A2A gateway on a real mesh: a2a-sdk's own client calls mesh SDK agents over real HTTPS (127.0.0.1)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from a2a.client import Client, ClientConfig, create_client
from a2a.client.card_resolver import parse_agent_card
from a2a.helpers import get_data_parts, get_text_parts
from a2a.types import CancelTaskRequest, GetTaskRequest, SendMessageRequest, TaskState
from a2a.utils.errors import TaskNotFoundError
from google.protobuf.json_format import MessageToDict

from hivemesh.mesh.errors import NotFoundError, PermissionDeniedError
from hivemesh.sdk import AgentServer, MeshClient
from hivemesh.sdk.a2a.gateway import A2AGateway
from hivemesh.sdk.escalation import EscalationClient
from tests.support.a2a_rig import WhoAgent, https_client, message, send_request
from tests.support.agents_for_tests import EchoAgent
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, start_mesh_env, stop_mesh_env
from tests.support.orch_agents import DeskAgent

GRANTS = {"grants": [
    # alice may call echo, shout and the desk through the gateway; bob only echo; the gateway may act for them.
    {"name": "alice", "subjects": [f"spiffe://{TRUST_DOMAIN}/client/alice"], "capabilities": ["*"]},
    {"name": "bob", "subjects": [f"spiffe://{TRUST_DOMAIN}/client/bob"], "capabilities": ["echo"]},
    {"name": "gateway", "subjects": [f"spiffe://{TRUST_DOMAIN}/agent/a2a-gateway"], "capabilities": ["*"]},
]}

ALICE = f"spiffe://{TRUST_DOMAIN}/client/alice"
GATEWAY = f"spiffe://{TRUST_DOMAIN}/agent/a2a-gateway"


@dataclass
class Rig:
    gateway: A2AGateway
    alice: MeshClient
    bob: MeshClient
    tmp: Path
    env: MeshEnv

    async def http_for(self, who: MeshClient | None, *, token: bool = True,
                       scopes: tuple[str, ...] = ("echo", "shout", "approve-refund", "whoami")) -> httpx.AsyncClient:
        """An HTTPS client as who (None: no certificate), with a token for the gateway asking for scopes (the
        control plane grants what who's grants allow of them)."""
        tok = None
        if who is not None and token:
            tok = (await who.node.controlplane.issue_token(self.gateway.spiffe_id, scopes)).token
        ca = self.gateway.mesh.node.workload.bundle_pem
        return https_client(who.node.workload if who else None, ca, self.tmp / (who.node.name if who else "anon"),
                            tok)


async def client_for(http: httpx.AsyncClient, card_url: str, *, streaming: bool = False) -> Client:
    """a2a-sdk's client for the card at card_url, over http (which carries the caller's certificate and token)."""
    card = parse_agent_card((await http.get(card_url)).json())
    return await create_client(card, ClientConfig(httpx_client=http, streaming=streaming))


@pytest.fixture
async def rig(etcd: Any, etcd_server: Any, tmp_path: Path) -> AsyncIterator[Rig]:
    env: MeshEnv = await start_mesh_env(tmp_path, etcd_server.endpoint, GRANTS)
    try:
        async with AgentServer(EchoAgent("a1"), await env.settings_for("echo")), \
                AgentServer(DeskAgent(), await env.settings_for("desk")), \
                AgentServer(WhoAgent(), await env.settings_for("who")), \
                A2AGateway(await env.settings_for("a2a-gateway")) as gateway, \
                MeshClient.connect(name="alice", settings=await env.settings_for("alice", "client")) as alice, \
                MeshClient.connect(name="bob", settings=await env.settings_for("bob", "client")) as bob:
            for cap in ("echo", "shout", "approve-refund", "whoami"):
                assert await gateway.mesh.node.registry.wait_for_capability(cap, 1, timeout=10)
            yield Rig(gateway, alice, bob, tmp_path, env)
    finally:
        await stop_mesh_env(env)


async def test_cards_come_from_the_registry(rig: Rig) -> None:
    async with await rig.http_for(None) as http:
        card = (await http.get(f"{rig.gateway.url}/.well-known/agent-card.json")).json()
        skills = {s["id"] for s in card["skills"]}
        assert {"echo", "shout", "approve-refund"} <= skills
        assert set(card["securitySchemes"]) == {"meshMtls", "meshBearer"}
        schemas = card["capabilities"]["extensions"][0]["params"]["skills"]
        assert schemas["echo"]["input_schema"]["required"] == ["text"]
        echo_card = (await http.get(f"{rig.gateway.url}/agents/echo/.well-known/agent-card.json")).json()
        assert echo_card["supportedInterfaces"][0]["url"] == f"{rig.gateway.url}/agents/echo/"
        assert {s["id"] for s in echo_card["skills"]} == {"echo", "shout", "restricted", "slow", "boom"}
        assert (await http.get(f"{rig.gateway.url}/agents/nobody/.well-known/agent-card.json")).status_code == 404


async def test_send_stream_and_get_a_task_with_the_a2a_client(rig: Rig) -> None:
    async with await rig.http_for(rig.alice) as http:
        echo_card = f"{rig.gateway.url}/agents/echo/.well-known/agent-card.json"
        client = await client_for(http, echo_card)
        events = [e async for e in client.send_message(send_request({"text": "hi"}, skill="echo"))]
        task = events[-1].task
        assert task.status.state == TaskState.TASK_STATE_COMPLETED
        out = get_data_parts(task.artifacts[0].parts)[0]
        assert out == {"text": "hi", "caller": GATEWAY, "served_by": "a1"}
        got = await client.get_task(GetTaskRequest(id=task.id))
        assert got.status.state == TaskState.TASK_STATE_COMPLETED and got.id == task.id
        # The callee sees alice (the A2A caller) as the principal, the gateway as the actor acting for her.
        who = await client_for(http, f"{rig.gateway.url}/agents/who/.well-known/agent-card.json")
        told = [e async for e in who.send_message(send_request({}))][-1]
        assert get_data_parts(told.task.artifacts[0].parts)[0] == {
            "principal": ALICE, "chain": [ALICE, GATEWAY], "caller": GATEWAY}

        streaming = await client_for(http, echo_card, streaming=True)
        updates = [e async for e in streaming.send_message(send_request({"text": "a b c"}, skill="shout"))]
        chunks = [e.artifact_update.artifact.parts for e in updates if e.HasField("artifact_update")]
        words = [t for parts in chunks for t in get_text_parts(parts)]
        assert words == ["A", "B", "C"]
        assert updates[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED


async def test_input_required_is_answered_on_the_same_task(rig: Rig) -> None:
    async with await rig.http_for(rig.alice) as http:
        client = await client_for(http, f"{rig.gateway.url}/agents/desk/.well-known/agent-card.json")
        first = [e async for e in client.send_message(
            send_request({"question": "refund order 7?"}, skill="approve-refund"))][-1].task
        assert first.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
        ask = get_data_parts(first.status.message.parts)[0]
        assert ask["reason"] == "a refund needs a person's approval" and ask["options"] == ["approve", "reject"]
        answer = SendMessageRequest(message=message("approve", task_id=first.id, context_id=first.context_id))
        done = [e async for e in client.send_message(answer)][-1].task
        assert done.id == first.id
        assert done.status.state == TaskState.TASK_STATE_COMPLETED
        assert get_data_parts(done.artifacts[-1].parts)[0] == {"refunded": True, "answer": {"text": "approve"},
                                                                "note": ""}


async def test_an_ask_is_a_control_plane_escalation_that_an_operator_or_only_its_caller_answers(rig: Rig) -> None:
    operator = EscalationClient(rig.env.operator)
    async with await rig.http_for(rig.alice) as http:
        client = await client_for(http, f"{rig.gateway.url}/agents/desk/.well-known/agent-card.json")
        asked = [e async for e in client.send_message(
            send_request({"question": "refund order 8?"}, skill="approve-refund"))][-1].task
        assert asked.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
        escalation_id = MessageToDict(asked.status.message.metadata)["hivemesh"]["escalation_id"]
        # The ask is queued where operators look (`hivemesh escalations list`), naming alice as its answerer.
        esc = await operator.get(escalation_id)
        assert esc.pending and esc.answerer == ALICE and esc.requested_by == GATEWAY
        assert esc.workflow_id == f"agent-a2a-gateway/{asked.id}"
        assert esc.reason == "a refund needs a person's approval"
        # Only alice's own token, relayed by the gateway that asked, answers it: bob's is refused, and to anyone
        # relaying who did not ask, the escalation does not exist (NOT_FOUND, as for an id nobody holds).
        bobs = (await rig.bob.node.controlplane.issue_token(rig.gateway.spiffe_id, ["echo"])).token
        with pytest.raises(PermissionDeniedError, match=re.escape(f"only {ALICE}")):
            await rig.gateway.executor.engine.escalations.resolve(escalation_id, approve=True, subject_token=bobs)
        alices = (await rig.alice.node.controlplane.issue_token(rig.gateway.spiffe_id, ["echo"])).token
        with pytest.raises(NotFoundError, match=re.escape(f"no escalation {escalation_id!r}")):
            await EscalationClient(rig.bob.node.controlplane).resolve(escalation_id, approve=True,
                                                                      subject_token=alices)
        assert (await operator.get(escalation_id)).pending
        # An operator answers instead; the run goes on at once, and tasks/get shows where it ended.
        await operator.resolve(escalation_id, approve=True, answer="ok by ops", note="checked")
        for _ in range(100):  # bounded: 100 polls of at most 30 s each, normally one or two
            got = await client.get_task(GetTaskRequest(id=asked.id))
            if got.status.state == TaskState.TASK_STATE_COMPLETED:
                break
        assert got.status.state == TaskState.TASK_STATE_COMPLETED
        assert get_data_parts(got.artifacts[-1].parts)[0] == {"refunded": True, "answer": "ok by ops",
                                                               "note": "checked"}
    # Another caller cannot see alice's task at all.
    async with await rig.http_for(rig.bob) as http:
        bob_client = await client_for(http, f"{rig.gateway.url}/agents/desk/.well-known/agent-card.json")
        with pytest.raises(TaskNotFoundError):
            await bob_client.get_task(GetTaskRequest(id=asked.id))


async def test_tasks_and_their_asks_outlive_a_gateway_restart(rig: Rig) -> None:
    async with await rig.http_for(rig.alice) as http:
        client = await client_for(http, f"{rig.gateway.url}/agents/desk/.well-known/agent-card.json")
        asked = [e async for e in client.send_message(
            send_request({"question": "refund order 9?"}, skill="approve-refund"))][-1].task
        echo = await client_for(http, f"{rig.gateway.url}/agents/echo/.well-known/agent-card.json")
        done = [e async for e in echo.send_message(send_request({"text": "x"}, skill="echo"))][-1].task
    assert asked.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
    await rig.gateway.stop()
    # Stopping drains a2a-sdk's workers of open tasks (they would otherwise be destroyed mid-await later).
    left = [t for t in asyncio.all_tasks() if "ActiveTask" in getattr(t.get_coro(), "__qualname__", "")]
    assert left == [], left
    async with A2AGateway(await rig.env.settings_for("a2a-gateway")) as second:
        rig.gateway = second
        async with await rig.http_for(rig.alice) as http:
            client = await client_for(http, f"{second.url}/agents/desk/.well-known/agent-card.json")
            # Both tasks are still there, as they were: the one done, the one waiting for alice.
            echo = await client_for(http, f"{second.url}/agents/echo/.well-known/agent-card.json")  # its own route
            assert (await echo.get_task(GetTaskRequest(id=done.id))).status.state == TaskState.TASK_STATE_COMPLETED
            waiting = await client.get_task(GetTaskRequest(id=asked.id))
            assert waiting.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
            # alice answers on the same task, through the new gateway: it picks the run up and finishes it.
            answer = SendMessageRequest(message=message({"approved": False, "note": "not this one"},
                                                        task_id=asked.id, context_id=asked.context_id))
            final = [e async for e in client.send_message(answer)][-1].task
            assert final.status.state == TaskState.TASK_STATE_COMPLETED
            assert get_data_parts(final.artifacts[-1].parts)[0] == {"refunded": True, "answer": None,
                                                                     "note": "not this one"}
            run = await second.executor.engine.get(asked.id)
            assert run.state == "COMPLETED" and len(run.runs) == 2  # driven by the first gateway, then the second
            esc = run.escalations["ask-0"]["resolution"]
            # The control plane verified the gateway; alice is who the gateway says answered, on her token.
            assert esc["status"] == "REJECTED" and esc["resolved_by"] == GATEWAY
            assert esc["on_behalf_of"] == ALICE and esc["on_behalf_of_claimed"] is True


async def test_a_running_task_is_canceled_with_its_mesh_call(rig: Rig) -> None:
    async with await rig.http_for(rig.alice, scopes=("slow",)) as http:
        client = await client_for(http, f"{rig.gateway.url}/agents/echo/.well-known/agent-card.json")
        request = send_request({"seconds": 30}, skill="slow")
        request.configuration.return_immediately = True  # answer with the task while it works
        task = [e async for e in client.send_message(request)][-1].task
        assert task.status.state in (TaskState.TASK_STATE_SUBMITTED, TaskState.TASK_STATE_WORKING)
        canceled = await client.cancel_task(CancelTaskRequest(id=task.id))
        assert canceled.status.state == TaskState.TASK_STATE_CANCELED
        got = await client.get_task(GetTaskRequest(id=task.id))
        assert got.status.state == TaskState.TASK_STATE_CANCELED


async def test_the_callers_grants_apply_and_unauthenticated_calls_are_refused(rig: Rig) -> None:
    body = {"jsonrpc": "2.0", "id": 7, "method": "message/send", "params": {"message": {
        "role": "user", "messageId": "m1", "kind": "message", "parts": [{"kind": "data", "data": {"text": "x"}}],
        "metadata": {"skill": "echo"}}}}
    async with await rig.http_for(None) as anon:
        r = await anon.post(f"{rig.gateway.url}/", json=body)
        # Refused before its body is read (`test_a2a_hostile`): so without the request's id.
        assert r.status_code == 401 and r.json()["id"] is None and r.json()["error"]["code"] == -32600
        assert "present a client certificate" in r.json()["error"]["message"]
        # A body nested past what json reads: refused all the same, without an id (it was a 500 before).
        r = await anon.post(f"{rig.gateway.url}/", content=b"[" * 1500 + b"]" * 1500,
                            headers={"content-type": "application/json"})
        assert r.status_code == 401 and r.json()["id"] is None and r.json()["error"]["code"] == -32600
    # alice's token without alice's certificate (a stolen token) is refused: it is bound to her certificate.
    stolen = (await rig.alice.node.controlplane.issue_token(rig.gateway.spiffe_id, ["echo"])).token
    async with https_client(None, rig.gateway.mesh.node.workload.bundle_pem, rig.tmp / "thief", stolen) as thief:
        r = await thief.post(f"{rig.gateway.url}/", json=body)
        assert r.status_code == 401 and r.json()["error"]["data"]["reason"] == "UNAUTHENTICATED"
    async with https_client(rig.bob.node.workload, rig.gateway.mesh.node.workload.bundle_pem, rig.tmp / "bob2",
                            stolen) as bob_with_alices_token:
        r = await bob_with_alices_token.post(f"{rig.gateway.url}/", json=body)
        assert r.status_code == 401 and "another certificate" in r.json()["error"]["message"]
    async with await rig.http_for(rig.alice, token=False) as no_token:
        r = await no_token.post(f"{rig.gateway.url}/", json=body)
        assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
    async with await rig.http_for(rig.bob) as bob:
        ok = (await bob.post(f"{rig.gateway.url}/", json=body)).json()
        assert ok["result"]["status"]["state"] == "completed", ok
        shout = {**body, "params": {"message": {**body["params"]["message"], "metadata": {"skill": "shout"}}}}
        refused = (await bob.post(f"{rig.gateway.url}/", json=shout)).json()
        assert refused["result"]["status"]["state"] == "rejected", refused
        # bob's token (scopes from his grants) allows echo only: the refusal names the mesh's reason.
        assert refused["result"]["status"]["message"]["metadata"]["hivemesh"]["reason"] == "SCOPE_MISSING"


async def test_bad_requests_get_a2a_error_codes(rig: Rig) -> None:
    async with await rig.http_for(rig.alice) as http:
        async def rpc(method: str, params: dict[str, Any]) -> dict[str, Any]:
            version = "0.3" if "/" in method else "1.0"  # A2A 1.0 method names need its version header
            r = await http.post(f"{rig.gateway.url}/", json={"jsonrpc": "2.0", "id": 1, "method": method,
                                                             "params": params}, headers={"A2A-Version": version})
            return r.json()["error"]  # type: ignore[no-any-return]

        assert (await rpc("message/fly", {}))["code"] == -32601
        deep = await http.post(f"{rig.gateway.url}/", content=b"[" * 1500 + b"]" * 1500,
                               headers={"content-type": "application/json"})
        assert deep.json()["error"]["code"] == -32700 and "nested too deeply" in deep.json()["error"]["message"]
        assert (await rpc("tasks/get", {"id": "no-such-task"}))["code"] == -32001
        msg = {"role": "user", "messageId": "m2", "kind": "message", "parts": [{"kind": "data", "data": {}}],
               "metadata": {"skill": "no-such-skill"}}
        bad = await rpc("message/send", {"message": msg})
        assert bad["code"] == -32602 and "no skill 'no-such-skill'" in bad["message"]
        # Params that do not parse: -32602 under A2A 1.0's method names (a2a-sdk's 0.3 adapter says -32600).
        assert (await rpc("SendMessage", {"message": "not a message"}))["code"] == -32602
        assert (await rpc("message/send", {"message": "not a message"}))["code"] == -32600
        # A task that cannot be canceled any more (completed): -32002.
        done = (await http.post(f"{rig.gateway.url}/", json={"jsonrpc": "2.0", "id": 2, "method": "message/send",
                                "params": {"message": {**msg, "metadata": {"skill": "echo"},
                                                       "parts": [{"kind": "data", "data": {"text": "x"}}]}}})).json()
        assert (await rpc("tasks/cancel", {"id": done["result"]["id"]}))["code"] == -32002

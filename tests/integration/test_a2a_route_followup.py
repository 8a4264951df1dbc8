"""A task sent on one agent's A2A route (`POST /agents/<agent>/`) is that route's only: addressed through another
agent's route or through the gateway's general route, every task-addressed operation (a follow-up message,
tasks/get, tasks/cancel, a resubscribe, ListTasks) answers A2A's "task not found" (-32001) exactly as for a task
that does not exist, and leaves the task as it was; on its own route each still works. A2A 0.3 method names are
sent as raw JSON-RPC, A2A 1.0's through a2a-sdk's own client."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from a2a.client import Client, ClientConfig, create_client
from a2a.client.card_resolver import parse_agent_card
from a2a.helpers import get_data_parts
from a2a.types import (
    CancelTaskRequest,
    GetTaskRequest,
    ListTasksRequest,
    SendMessageRequest,
    SubscribeToTaskRequest,
    Task,
    TaskState,
)
from a2a.utils.errors import TaskNotFoundError

from hivemesh.sdk import AgentServer, MeshClient, capability
from hivemesh.sdk.a2a.gateway import A2AGateway
from hivemesh.sdk.a2a.tasks import open_ask
from hivemesh.sdk.escalation import InputRequired
from tests.support.a2a_rig import https_client, message, send_request
from tests.support.agents_for_tests import TaggedTwin
from tests.support.meshenv import TRUST_DOMAIN, start_mesh_env, stop_mesh_env

pytestmark = pytest.mark.timeout(180)

GRANTS = {"grants": [
    {"name": "alice", "subjects": [f"spiffe://{TRUST_DOMAIN}/client/alice"], "capabilities": ["*"]},
    {"name": "gateway", "subjects": [f"spiffe://{TRUST_DOMAIN}/agent/a2a-gateway"], "capabilities": ["*"]},
]}
SCOPES = ("echo", "refund", "hold")
ALPHA = "/agents/alpha/"
ELSEWHERE = ("/agents/beta/", "/")
"""Where alpha's tasks must not be found: another agent's route (beta serves the same skills) and the general one."""
TASK_NOT_FOUND = -32001
"""A2A's TaskNotFoundError, as a2a-sdk 1.3 (a2a.utils.errors) answers it in JSON-RPC."""


class _Twin(TaggedTwin):
    """alpha and beta alike: a refund that asks a person first, and a hold that answers when the test says so."""

    def __init__(self, tag: str) -> None:
        super().__init__(tag)
        self.release = asyncio.Event()

    @capability(name="refund", description="Asks a person, then says who served the answer", idempotent=True)
    async def refund(self, req: dict[str, Any]) -> dict[str, Any]:
        human = req.get("human")
        if not human:
            raise InputRequired(f"{self.name} needs a person", {"order": req.get("order")})
        return {"agent": self.name, "approved": human.get("approved")}

    @capability(name="hold", description="Answers once the test releases it (bounded)", idempotent=True)
    async def hold(self, req: dict[str, Any]) -> dict[str, Any]:
        await asyncio.wait_for(self.release.wait(), 60)
        return {"agent": self.name}


class Alpha(_Twin):
    name = "alpha"


class Beta(_Twin):
    name = "beta"


@dataclass
class Rig:
    gateway: A2AGateway
    alice: MeshClient
    alpha: Alpha
    tmp: Path

    async def http(self) -> httpx.AsyncClient:
        tok = (await self.alice.node.controlplane.issue_token(self.gateway.spiffe_id, SCOPES)).token
        return https_client(self.alice.node.workload, self.gateway.mesh.node.workload.bundle_pem,
                            self.tmp / "alice", tok)

    async def client(self, http: httpx.AsyncClient, route: str, *, streaming: bool = False) -> Client:
        """a2a-sdk's client (A2A 1.0) for the card of route ("/" or "/agents/<agent>/")."""
        card = parse_agent_card((await http.get(f"{self.gateway.url}{route}.well-known/agent-card.json")).json())
        return await create_client(card, ClientConfig(httpx_client=http, streaming=streaming))

    async def rpc(self, http: httpx.AsyncClient, route: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """One A2A 0.3 JSON-RPC call on route; its whole answer."""
        r = await http.post(f"{self.gateway.url}{route}", json={"jsonrpc": "2.0", "id": 1, "method": method,
                                                                "params": params}, headers={"A2A-Version": "0.3"})
        assert r.status_code == 200, r.text[:300]
        return r.json()  # type: ignore[no-any-return]

    async def first_event(self, http: httpx.AsyncClient, route: str, task_id: str) -> dict[str, Any]:
        """The first SSE event of an A2A 0.3 `tasks/resubscribe` on route (the stream is then left)."""
        body = {"jsonrpc": "2.0", "id": 1, "method": "tasks/resubscribe", "params": {"id": task_id}}
        async with http.stream("POST", f"{self.gateway.url}{route}", json=body,
                               headers={"A2A-Version": "0.3"}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    return json.loads(line[5:])  # type: ignore[no-any-return]
        raise AssertionError("the resubscribe stream ended without an event")


@pytest.fixture
async def rig(etcd: Any, etcd_server: Any, tmp_path: Path) -> AsyncIterator[Rig]:
    env = await start_mesh_env(tmp_path, etcd_server.endpoint, GRANTS)
    alpha, beta = Alpha("alpha-1"), Beta("beta-1")
    try:
        async with AgentServer(alpha, await env.settings_for("alpha")), \
                AgentServer(beta, await env.settings_for("beta")), \
                A2AGateway(await env.settings_for("a2a-gateway")) as gateway, \
                MeshClient.connect(name="alice", settings=await env.settings_for("alice", "client")) as alice:
            for cap in SCOPES:
                assert await gateway.mesh.node.registry.wait_for_capability(cap, 2, timeout=10), cap
            try:
                yield Rig(gateway, alice, alpha, tmp_path)
            finally:
                alpha.release.set()  # no held call outlives its test
                beta.release.set()
    finally:
        await stop_mesh_env(env)


def _msg03(data: Any, *, skill: str, task: dict[str, Any] | None = None) -> dict[str, Any]:
    """A2A 0.3 message/send params; with task, a follow-up on that task (its taskId and contextId)."""
    ids = {"taskId": task["id"], "contextId": task["contextId"]} if task else {}
    return {"message": {"role": "user", "messageId": uuid.uuid4().hex, "kind": "message",
                        "parts": [{"kind": "data", "data": data}], "metadata": {"skill": skill}, **ids}}


def _refused(answer: dict[str, Any]) -> dict[str, Any]:
    """The JSON-RPC error of an answer that must be one (failing, with what was answered instead, if not)."""
    assert "error" in answer, f"accepted, answered {json.dumps(answer.get('result'))[:300]}"
    return answer["error"]  # type: ignore[no-any-return]


def _as_unknown(error: dict[str, Any], task_id: str, unknown: str) -> dict[str, Any]:
    """error with the task id it may name replaced by unknown: to compare with a never-existing task's error."""
    return json.loads(json.dumps(error).replace(task_id, unknown))  # type: ignore[no-any-return]


async def _asked(rig: Rig, http: httpx.AsyncClient) -> dict[str, Any]:
    """A refund task on alpha's route, waiting for alice's answer (A2A 0.3 JSON)."""
    task = (await rig.rpc(http, ALPHA, "message/send", _msg03({"order": 7}, skill="refund")))["result"]
    assert task["status"]["state"] == "input-required", task
    return task  # type: ignore[no-any-return]


async def _held(rig: Rig, http: httpx.AsyncClient) -> Task:
    """A hold task on alpha's route, returned at once while alpha works on it (A2A 1.0, a2a-sdk's client)."""
    request = send_request({}, skill="hold")
    request.configuration.return_immediately = True
    task: Task = [e async for e in (await rig.client(http, ALPHA)).send_message(request)][-1].task
    assert task.status.state in (TaskState.TASK_STATE_SUBMITTED, TaskState.TASK_STATE_WORKING), task.status
    return task


async def _still_asking(rig: Rig, task_id: str) -> str:
    """The task's run still waits for its first answer (not answered, called again, canceled nor ended) on an
    escalation still pending; its id."""
    engine = rig.gateway.executor.engine
    run = await engine.get(task_id)
    ask = open_ask(run)
    assert not run.terminal and ask is not None and "call-1" not in run.steps, run.state
    assert (await engine.escalations.get(ask[0])).pending
    return ask[0]


async def test_a_follow_up_message_is_task_not_found_on_another_route(rig: Rig) -> None:
    async with await rig.http() as http:
        task = await _asked(rig, http)
        unknown = str(uuid.uuid4())
        never = _refused(await rig.rpc(http, ALPHA, "message/send", _msg03(
            {"approved": True}, skill="refund", task={"id": unknown, "contextId": task["contextId"]})))
        assert never["code"] == TASK_NOT_FOUND, never
        for route in ELSEWHERE:
            err = _refused(await rig.rpc(http, route, "message/send",
                                         _msg03({"approved": True}, skill="refund", task=task)))
            assert _as_unknown(err, task["id"], unknown) == never, (route, err)  # nothing tells it exists
            answer = SendMessageRequest(message=message({"approved": True}, skill="refund", task_id=task["id"],
                                                        context_id=task["contextId"]))
            with pytest.raises(TaskNotFoundError):
                [e async for e in (await rig.client(http, route)).send_message(answer)]
            await _still_asking(rig, task["id"])
        # On alpha's own route the answer is taken, and alpha serves the call it allows.
        answer = SendMessageRequest(message=message({"approved": True}, skill="refund", task_id=task["id"],
                                                    context_id=task["contextId"]))
        done = [e async for e in (await rig.client(http, ALPHA)).send_message(answer)][-1].task
        assert done.status.state == TaskState.TASK_STATE_COMPLETED, done.status
        assert get_data_parts(done.artifacts[-1].parts)[0] == {"agent": "alpha", "approved": True}


async def test_get_and_list_are_task_not_found_on_another_route(rig: Rig) -> None:
    async with await rig.http() as http:
        task = await _asked(rig, http)
        never = _refused(await rig.rpc(http, ALPHA, "tasks/get", {"id": str(uuid.uuid4())}))
        assert never["code"] == TASK_NOT_FOUND, never
        for route in ELSEWHERE:
            assert _refused(await rig.rpc(http, route, "tasks/get", {"id": task["id"]})) == never, route
            client = await rig.client(http, route)
            with pytest.raises(TaskNotFoundError):
                await client.get_task(GetTaskRequest(id=task["id"]))
            listed = await client.list_tasks(ListTasksRequest())
            assert task["id"] not in {t.id for t in listed.tasks}, route
            await _still_asking(rig, task["id"])
        # On alpha's route it is there, and listed.
        alpha = await rig.client(http, ALPHA)
        got = await alpha.get_task(GetTaskRequest(id=task["id"]))
        assert got.status.state == TaskState.TASK_STATE_INPUT_REQUIRED, got.status
        assert (await rig.rpc(http, ALPHA, "tasks/get", {"id": task["id"]}))["result"]["id"] == task["id"]
        assert task["id"] in {t.id for t in (await alpha.list_tasks(ListTasksRequest())).tasks}
        # The other way round: a task of the general route (any agent) is not alpha's route's either.
        general = (await rig.rpc(http, "/", "message/send", _msg03({"text": "x"}, skill="echo")))["result"]
        assert general["status"]["state"] == "completed", general
        assert _refused(await rig.rpc(http, ALPHA, "tasks/get", {"id": general["id"]})) == never
        assert (await rig.rpc(http, "/", "tasks/get", {"id": general["id"]}))["result"]["id"] == general["id"]


async def test_cancel_is_task_not_found_on_another_route(rig: Rig) -> None:
    async with await rig.http() as http:
        asked, later = await _asked(rig, http), await _asked(rig, http)
        asks = [await _still_asking(rig, task["id"]) for task in (asked, later)]
        never = _refused(await rig.rpc(http, ALPHA, "tasks/cancel", {"id": str(uuid.uuid4())}))
        assert never["code"] == TASK_NOT_FOUND, never
        for route in ELSEWHERE:
            assert _refused(await rig.rpc(http, route, "tasks/cancel", {"id": asked["id"]})) == never, route
            with pytest.raises(TaskNotFoundError):
                await (await rig.client(http, route)).cancel_task(CancelTaskRequest(id=later["id"]))
            for task in (asked, later):
                await _still_asking(rig, task["id"])  # its run and its escalation go on
        # On alpha's route both cancel: the task, its run and the escalation it waited on.
        canceled = (await rig.rpc(http, ALPHA, "tasks/cancel", {"id": asked["id"]}))["result"]
        assert canceled["status"]["state"] == "canceled", canceled
        by_client = await (await rig.client(http, ALPHA)).cancel_task(CancelTaskRequest(id=later["id"]))
        assert by_client.status.state == TaskState.TASK_STATE_CANCELED, by_client.status
        for task, ask in zip((asked, later), asks, strict=True):
            assert (await rig.gateway.executor.engine.get(task["id"])).state == "CANCELED"
            assert (await rig.gateway.executor.engine.escalations.get(ask)).status == "CANCELED"


async def test_a_resubscribe_is_task_not_found_on_another_route(rig: Rig) -> None:
    async with await rig.http() as http:
        task = await _held(rig, http)
        never = _refused(await rig.first_event(http, ALPHA, str(uuid.uuid4())))
        assert never["code"] == TASK_NOT_FOUND, never
        for route in ELSEWHERE:
            assert _refused(await rig.first_event(http, route, task.id)) == never, route
            with pytest.raises(TaskNotFoundError):
                [e async for e in (await rig.client(http, route, streaming=True)).subscribe(
                    SubscribeToTaskRequest(id=task.id))]
        assert not (await rig.gateway.executor.engine.get(task.id)).terminal
        # On alpha's route the subscription is live: the task first, then its end once alpha answers.
        first = await rig.first_event(http, ALPHA, task.id)
        assert first["result"]["id"] == task.id and first["result"]["status"]["state"] == "working", first
        events = (await rig.client(http, ALPHA, streaming=True)).subscribe(SubscribeToTaskRequest(id=task.id))
        seen = await anext(events)
        assert seen.task.id == task.id and seen.task.status.state == TaskState.TASK_STATE_WORKING, seen
        rig.alpha.release.set()
        async for event in events:
            seen = event
        assert seen.status_update.status.state == TaskState.TASK_STATE_COMPLETED, seen
        done = await (await rig.client(http, ALPHA)).get_task(GetTaskRequest(id=task.id))
        assert get_data_parts(done.artifacts[-1].parts)[0] == {"agent": "alpha"}

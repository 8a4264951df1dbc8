"""What the A2A tests share: an HTTPS client holding a mesh identity, as any A2A caller with one would."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from a2a.helpers import get_data_parts, get_text_parts, new_data_part, new_task_from_user_message, new_text_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import AgentCapabilities, AgentCard, AgentSkill, Message, Role, SendMessageRequest
from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict, ParseDict
from starlette.applications import Starlette

from hivemesh.mesh.tls import Workload
from hivemesh.sdk import Agent, Context, capability


def https_client(workload: Workload | None, ca_pem: bytes, folder: Path, token: str | None) -> httpx.AsyncClient:
    """httpx over TLS trusting the mesh CA (the gateway's certificate names a SPIFFE id, not a host name),
    presenting workload's certificate (None: none) and a bearer token (None: none)."""
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    ctx.check_hostname = False
    if workload is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cert.pem").write_bytes(workload.cert_pem)
        (folder / "key.pem").write_bytes(workload.key_pem)
        ctx.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(verify=ctx, headers=headers, timeout=30)


def message(payload: Any, *, skill: str | None = None, task_id: str = "", context_id: str = "") -> Message:
    part = new_text_part(payload) if isinstance(payload, str) else new_data_part(payload)
    msg = Message(role=Role.ROLE_USER, message_id=str(uuid.uuid4()), parts=[part], task_id=task_id,
                  context_id=context_id)
    if skill is not None:
        msg.metadata.CopyFrom(ParseDict({"skill": skill}, struct_pb2.Struct()))
    return msg


def send_request(payload: Any, **kw: Any) -> SendMessageRequest:
    return SendMessageRequest(message=message(payload, **kw))


class WhoAgent(Agent):
    """Tells whom a call was made for and through whom (the delegation chain a gateway call carries)."""

    name = "who"

    @capability(description="Whom this call is for", idempotent=True)
    async def whoami(self, req: dict[str, Any], ctx: Context) -> dict[str, Any]:
        return {"principal": ctx.principal, "chain": list(ctx.chain), "caller": ctx.caller}


@contextlib.asynccontextmanager
async def serve_a2a(executor: AgentExecutor, card: AgentCard) -> AsyncIterator[str]:
    """A real A2A agent built with a2a-sdk (its handler, routes and task store) on 127.0.0.1:<free port>, plain
    HTTP; yields its base URL (the card's interface URL is set to it)."""
    sock = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    card.supported_interfaces.add(url=url, protocol_binding="JSONRPC", protocol_version="1.0")
    handler = DefaultRequestHandler(agent_executor=executor, task_store=InMemoryTaskStore(), agent_card=card)
    app = Starlette(routes=[*create_agent_card_routes(card), *create_jsonrpc_routes(handler, "/")])
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False))
    serving = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            assert not serving.done(), "the A2A test agent did not start"
            await asyncio.sleep(0.01)
        yield url
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
        sock.close()


class ToolsExecutor(AgentExecutor):
    """An external A2A agent's logic: `reverse` (text), `sum` (data) and `refuse` (always rejected)."""

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.message is not None
        task = context.current_task or new_task_from_user_message(context.message)
        if context.current_task is None:
            await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        skill = context.metadata.get("skill") or MessageToDict(context.message.metadata).get("skill", "")
        if skill == "reverse":
            await updater.add_artifact([new_text_part(get_text_parts(context.message.parts)[0][::-1])])
            await updater.complete()
        elif skill == "sum":
            data = get_data_parts(context.message.parts)[0]
            await updater.add_artifact([new_data_part({"sum": data["a"] + data["b"]})])
            await updater.complete()
        else:
            await updater.reject(updater.new_agent_message([new_text_part(f"I do not do {skill!r}")]))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        raise NotImplementedError


def tools_card() -> AgentCard:
    return AgentCard(
        name="Text Tools", description="Reverses text and adds numbers", version="2.1.0",
        capabilities=AgentCapabilities(streaming=False),
        default_input_modes=["text/plain"], default_output_modes=["text/plain"],
        skills=[AgentSkill(id="reverse", name="Reverse", description="Reverse a text", tags=["text"]),
                AgentSkill(id="sum", name="Sum", description="Add a and b", tags=["math"]),
                AgentSkill(id="refuse", name="Refuse", description="Always says no", tags=["test"])],
    )

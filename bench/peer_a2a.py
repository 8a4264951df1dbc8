"""An A2A echo agent built with a2a-sdk, and a2a-sdk's own client calling it, for bench/peers.py.

    agent   a2a-sdk's DefaultRequestHandler + JSON-RPC routes on Starlette/uvicorn, plain HTTP on 127.0.0.1
            (prints {"ready": true, "url": ...}); its executor answers each message with a data message echoing it
    caller  fetches the agent card, builds the client with a2a-sdk's create_client (non-streaming, one pooled
            httpx client) and sends one message per call, driven by bench/peer_load.py

A2A leaves transport security and authorization to the deployment; as set up here, like its samples, it has none.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import uuid
from typing import Any

import httpx
import uvicorn
from a2a.client import ClientConfig, create_client
from a2a.client.card_resolver import parse_agent_card
from a2a.helpers import get_data_parts, new_data_message, new_data_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore
from a2a.types import AgentCapabilities, AgentCard, AgentSkill, Message, Role, SendMessageRequest
from starlette.applications import Starlette

from hivemesh.mesh.lifeline import die_with_parent_if_asked

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_load


class EchoExecutor(AgentExecutor):
    """Answers a message with a message carrying the same data: the A2A twin of the echo agent."""

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.message is not None
        data = get_data_parts(context.message.parts)[0]
        await event_queue.enqueue_event(new_data_message({"text": data["text"]}, context_id=context.context_id))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        raise NotImplementedError


def echo_card(url: str) -> AgentCard:
    card = AgentCard(
        name="Echo", description="Echoes the text", version="1.0.0",
        capabilities=AgentCapabilities(streaming=False),
        default_input_modes=["application/json"], default_output_modes=["application/json"],
        skills=[AgentSkill(id="echo", name="Echo", description="Echo the text", tags=["bench"])],
    )
    card.supported_interfaces.add(url=url, protocol_binding="JSONRPC", protocol_version="1.0")
    return card


async def agent(args: argparse.Namespace) -> None:
    with socket.socket() as s:  # a free port; uvicorn binds it itself, as `uvicorn.run(app, port=...)` would
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    card = echo_card(url)
    handler = DefaultRequestHandler(agent_executor=EchoExecutor(), task_store=InMemoryTaskStore(), agent_card=card)
    app = Starlette(routes=[*create_agent_card_routes(card), *create_jsonrpc_routes(handler, "/")])
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning", access_log=False)
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    serving = loop.create_task(server.serve())
    while not server.started:
        if serving.done():
            await serving  # raises what stopped it
            return
        await asyncio.sleep(0.01)
    peer_load.emit({"ready": True, "url": url})
    await serving


async def caller(args: argparse.Namespace) -> None:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as http:
        card = parse_agent_card((await http.get(f"{args.url}.well-known/agent-card.json")).json())
        client = await create_client(card, ClientConfig(httpx_client=http, streaming=False))

        async def call(payload: dict[str, str]) -> dict[str, Any]:
            msg = Message(role=Role.ROLE_USER, message_id=str(uuid.uuid4()), parts=[new_data_part(payload)])
            last = None
            async for event in client.send_message(SendMessageRequest(message=msg)):
                last = event
            if last is None or not last.HasField("message"):
                raise RuntimeError(f"the A2A agent answered {last!r:.200}")
            out: dict[str, Any] = get_data_parts(last.message.parts)[0]
            return out

        await peer_load.serve_commands(call)


def main() -> None:
    die_with_parent_if_asked()
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["agent", "caller"])
    p.add_argument("--url", default="")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run({"agent": agent, "caller": caller}[args.role](args))


if __name__ == "__main__":
    main()

"""`A2AGateway`: every mesh agent served as an A2A agent over HTTPS, on a2a-sdk's JSON-RPC dispatcher.

Routes (bind 127.0.0.1 by default; the advertised URL is separate, "bind is not advertise"):
- `GET /.well-known/agent-card.json`: the gateway's card, every capability of the mesh as a skill;
- `GET /agents/<agent>/.well-known/agent-card.json`: one agent's card (its capabilities);
- `POST /` and `POST /agents/<agent>/`: JSON-RPC, A2A 1.0 method names (`SendMessage`, `SendStreamingMessage`,
  `GetTask`, `CancelTask`) and 0.3's (`message/send`, `message/stream`, `tasks/get`, `tasks/cancel`). A task
  sent to `/` goes to any agent serving its skill; one sent to `/agents/<agent>/` to that agent only (`executor`).

Cards are built from the registry on each request, so they follow agents coming and going. JSON-RPC calls
are authenticated first (client certificate + bearer token, see `auth`); unauthenticated ones get HTTP 401 with
a JSON-RPC error (-32600, `data.reason` UNAUTHENTICATED, id null: their body is never read) and never reach a
task; a body over `MAX_BODY_BYTES` gets HTTP 413, JSON nested past `MAX_JSON_DEPTH` or holding what a part
cannot carry (a lone surrogate, NaN, Infinity: `_check_json`) -32602. Each task is a durable workflow run of the
gateway's identity (`executor`, `tasks`) and its A2A document is kept in etcd beside the run (`taskstore`), so
tasks, their escalations and their answers outlive a gateway restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass
from typing import Any, Final

import orjson
import uvicorn
from a2a.server.context import ServerCallContext
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.server.routes.jsonrpc_dispatcher import JsonRpcDispatcher
from a2a.types import AgentCard, CancelTaskRequest, GetTaskRequest, Task
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hivemesh.mesh import json_depth
from hivemesh.mesh.errors import HivemeshError
from hivemesh.mesh.settings import MeshSettings
from hivemesh.mesh.tls import Workload
from hivemesh.sdk.a2a.auth import (
    CALLER_STATE_KEY,
    PEER_CERT_SCOPE_KEY,
    MeshCallContextBuilder,
    PeerCertH11Protocol,
    authenticate,
    refusal,
)
from hivemesh.sdk.a2a.cards import build_card, offered_by
from hivemesh.sdk.a2a.executor import MeshAgentExecutor, text_input, uncarried
from hivemesh.sdk.a2a.taskstore import EtcdTaskStore
from hivemesh.sdk.a2a.tlsfiles import GatewayTls
from hivemesh.sdk.client import MeshClient

log = logging.getLogger(__name__)
CARD_PATH = "/.well-known/agent-card.json"
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
PARSE_ERROR = -32700
MAX_BODY_BYTES: Final = 2 * 1024 * 1024
"""Largest JSON-RPC body read: no task document over 512 KiB is ever kept (`taskstore`), so a larger request
could never be served, and reading one whole first would let any caller spend the gateway's memory."""
MAX_JSON_DEPTH: Final = 40
"""Deepest nesting of a request's JSON: protobuf parses at most 100 levels, about 2 per JSON level past the
request's own envelope (params, message, parts, data: 5 levels)."""


@dataclass(frozen=True)
class GatewayConfig:
    name: str = "a2a-gateway"
    """The gateway's workload name: it joins as agent `<name>` (the audience A2A callers get tokens for)."""
    host: str = "127.0.0.1"
    port: int = 0
    """0: a free port (`A2AGateway.port` tells which)."""
    public_url: str | None = None
    """The base URL cards advertise; default https://<host>:<port>."""
    call_timeout_s: float = 60.0
    version: str = "1.0.0"


class A2AGateway:
    """The A2A front of the mesh: its own workload identity, its own MeshClient, an HTTPS server."""

    def __init__(self, settings: MeshSettings, config: GatewayConfig | None = None) -> None:
        self.config = config or GatewayConfig()
        self.mesh = MeshClient.connect(name=self.config.name, kind="agent", settings=settings, verify_inbound=True)
        self._tls: GatewayTls | None = None
        self._server: uvicorn.Server | None = None
        self._serving: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self._handler: _Handler | None = None
        self.port = 0
        self._cards: dict[str | None, tuple[tuple[Any, ...], dict[str, Any] | None]] = {}
        self.executor = MeshAgentExecutor(self.mesh, timeout_s=self.config.call_timeout_s, offered=self._offered)

    @property
    def url(self) -> str:
        return (self.config.public_url or f"https://{self.config.host}:{self.port}").rstrip("/")

    @property
    def spiffe_id(self) -> str:
        return self.mesh.node.workload.spiffe_id

    # --- cards ------------------------------------------------------------------------------------------------
    def card(self, agent: str | None) -> AgentCard | None:
        """The card of agent (None: the gateway's), or None when no such agent is live."""
        offered = offered_by(self.mesh.node.registry.all_instances(), agent)
        if agent is not None and not offered:
            return None
        return build_card(
            name=agent or self.config.name,
            description=(f"The mesh agent {agent}, through the hivemesh A2A gateway" if agent else
                         "Every capability of the hivemesh mesh, as A2A skills"),
            url=f"{self.url}/agents/{agent}/" if agent else f"{self.url}/",
            version=self.config.version,
            offered=offered,
            gateway_audience=self.spiffe_id,
        )

    def _offered(self, agent: str | None) -> dict[str, bool]:
        return {c.name: c.streaming for c, _ in offered_by(self.mesh.node.registry.all_instances(), agent)}

    async def _card_route(self, request: Request) -> Response:
        agent = request.path_params.get("agent")
        # Rendering a card costs ~10 ms (a2a-sdk adds its 0.3 fields): render again only when the registry's
        # index (an immutable tuple, swapped on each change) is another one.
        instances = self.mesh.node.registry.all_instances()
        cached = self._cards.get(agent)
        if cached is None or cached[0] is not instances:
            card = self.card(agent)
            cached = (instances, None if card is None else agent_card_to_dict(card))
            if len(self._cards) > 1024:
                self._cards.clear()
            self._cards[agent] = cached
        if cached[1] is None:
            return JSONResponse({"error": f"no live agent {agent!r} in the mesh"}, 404)
        return JSONResponse(cached[1])

    # --- JSON-RPC -----------------------------------------------------------------------------------------------
    def _app(self) -> Starlette:
        executor, engine = self.executor, self.executor.engine
        store = EtcdTaskStore(engine.store.etcd, engine.owner_segment, list_runs=engine.list, sync=executor.sync)
        handler = self._handler = _Handler(agent_executor=executor, task_store=store,
                                           agent_card=self.card(None) or AgentCard())
        dispatcher = JsonRpcDispatcher(handler, context_builder=MeshCallContextBuilder(), enable_v0_3_compat=True)
        verifier = self.mesh.node.verifier()

        async def rpc(request: Request) -> Response:
            try:
                caller = authenticate(verifier, request.scope.get(PEER_CERT_SCOPE_KEY),
                                      request.headers.get("authorization"))
            except HivemeshError as exc:  # answered before the body is read: a stranger costs no memory
                return _refuse(401, INVALID_REQUEST, f"unauthenticated: {exc.message}", refusal(exc),
                               {"WWW-Authenticate": 'Bearer realm="hivemesh"'})
            request.scope[CALLER_STATE_KEY] = caller
            body = await _bounded_body(request)
            if body is None:
                return _refuse(413, INVALID_REQUEST, f"request body over {MAX_BODY_BYTES} bytes: not read")
            checked = _check_json(body)
            if checked is not None:
                return checked
            return await dispatcher.handle_requests(request)

        return Starlette(routes=[
            Route(CARD_PATH, self._card_route, methods=["GET"]),
            Route("/agents/{agent}" + CARD_PATH, self._card_route, methods=["GET"]),
            Route("/", rpc, methods=["POST"]),
            Route("/agents/{agent}/", rpc, methods=["POST"]),
        ])

    # --- lifecycle ------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.mesh.start()
        try:
            await self.executor.engine.start()
            self._tls = GatewayTls(self.mesh.node.workload)
            self.mesh.node.certificate_hooks.append(self._on_certificate)
            self._sock = socket.create_server((self.config.host, self.config.port))
            self.port = self._sock.getsockname()[1]
            tls = self._tls
            config = uvicorn.Config(
                self._app(), http=PeerCertH11Protocol, lifespan="off", log_level="warning", access_log=False,
                ssl_context_factory=lambda _config, _default: tls.context,
            )
            self._server = uvicorn.Server(config)
            self._serving = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self._sock]))
            while not self._server.started:
                if self._serving.done():
                    await self._serving  # raises what stopped it
                    raise RuntimeError("the A2A gateway's HTTPS server stopped at start")
                await asyncio.sleep(0.01)
        except BaseException:
            await self.stop()
            raise

    async def _on_certificate(self, event: str, workload: Workload) -> None:
        if event == "renewed" and self._tls is not None:
            self._tls.load(workload)

    async def stop(self) -> None:
        if self._server is not None and self._serving is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._serving, 10)
        self._server = self._serving = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._handler is not None:  # a2a-sdk's workers of open tasks; their runs live on in etcd
            await self._handler.aclose()
            self._handler = None
        if self._tls is not None:
            self._tls.close()
            self._tls = None
        await self.executor.engine.close()
        await self.mesh.close()

    async def __aenter__(self) -> A2AGateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class _Handler(DefaultRequestHandler):
    """a2a-sdk's handler, with tasks/get first resuming the caller's run if nobody drives it."""

    async def on_get_task(self, params: GetTaskRequest, context: ServerCallContext) -> Task | None:
        executor = self.agent_executor
        if isinstance(executor, MeshAgentExecutor):
            await executor.revive(params.id, context)
        task: Task | None = await super().on_get_task(params, context)
        return task

    async def on_cancel_task(self, params: CancelTaskRequest, context: ServerCallContext) -> Task | None:
        """a2a-sdk calls the executor's cancel only for a task it drives in this process: one left by a gateway
        restart it merely marks CANCELED in the store, its run and escalation going on. The run is canceled
        here once a2a-sdk has agreed (the caller owns the task and it was not final)."""
        task: Task | None = await super().on_cancel_task(params, context)
        executor = self.agent_executor
        if task is not None and isinstance(executor, MeshAgentExecutor):
            await executor.cancel_run(task.id)
        return task


def _refuse(status: int, code: int, message: str, data: dict[str, Any] | None = None,
            headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON-RPC error for a request whose body was not (wholly) read: no id, and the connection closed (the
    rest of the body is never read, nor buffered for a next request)."""
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return JSONResponse({"jsonrpc": "2.0", "id": None, "error": error}, status_code=status,
                        headers={**(headers or {}), "Connection": "close"})


async def _bounded_body(request: Request) -> bytes | None:
    """The request body, or None past MAX_BODY_BYTES: refused on its Content-Length before reading a byte,
    else counted while it streams (chunked) and abandoned at the bound. a2a-sdk reads the body kept here."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette's cache of the body: request.body()/json() answer from it
    return body


def _check_json(body: bytes) -> JSONResponse | None:
    """The error for a body a2a-sdk would read, and then fail on as if the gateway failed (-32603, a traceback in
    the log); None when fine, or malformed (a2a-sdk answers that -32700):
    - JSON nested too deeply: json itself stops near 1,000 levels (RecursionError: -32700 here); protobuf's
      ParseDict, which a2a-sdk parses params with, stops at 100 of its own levels (about 2 per JSON level): past
      MAX_JSON_DEPTH the caller is told its params are invalid;
    - values json reads but JSON, a protobuf string or a Value cannot carry (`executor.uncarried`): a lone surrogate
      (a `\\ud800` escape, or bytes UTF-8 has no place for: a2a-sdk's 0.3 adapter fails on it), NaN and Infinity
      (not JSON; json reads them, and `1e999` as Infinity: a Value holds them, JSON writers then fail), a whole
      number past a double: -32602 naming where;
    - a text part whose JSON holds a lone surrogate (`{"text": "\\ud800"}` as text): payload_of refuses it, but
      from inside a2a-sdk's task, which logs a traceback for it: -32602 naming the part.
    orjson reads strict JSON only and refuses all of the values above, so a body it reads is walked only when it
    has enough brackets to nest too deep; one it refuses is read again as a2a-sdk reads it (json) to say why."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        value = _NOT_STRICT
    found: tuple[str, str] | None = None
    if value is not _NOT_STRICT:
        if b"\\\\u" in body:  # a text holding a backslash-u: its JSON may hold a lone surrogate
            found = _text_flaw(value)
        if found is None and body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
            return None  # not enough brackets to nest that deep: no need to walk it
    else:
        try:
            value = json_depth.loads(body)
        except RecursionError:
            return JSONResponse({"jsonrpc": "2.0", "id": None, "error": {
                "code": PARSE_ERROR, "message": "parse error: the JSON is nested too deeply"}})
        except (ValueError, UnicodeDecodeError):
            return None
        found = uncarried(value) or _text_flaw(value)
    rid = _request_id(value)
    if found is not None:
        return JSONResponse({"jsonrpc": "2.0", "id": rid, "error": {
            "code": INVALID_PARAMS, "message": f"invalid params: {found[0] or 'the request'} holds {found[1]}, which "
                                               "an A2A message cannot carry (JSON has no NaN or Infinity, a part's "
                                               "numbers are doubles and its text is UTF-8)"}})
    depth = _depth(value)
    if depth <= MAX_JSON_DEPTH:
        return None
    return JSONResponse({"jsonrpc": "2.0", "id": rid, "error": {
        "code": INVALID_PARAMS, "message": f"invalid params: the request nests {depth} levels deep; at most "
                                           f"{MAX_JSON_DEPTH} are accepted (flatten the data part)"}})


_NOT_STRICT: Final = object()


def _text_flaw(request: Any) -> tuple[str, str] | None:
    """(where, what) when the request sends a message whose input is its texts (no data part: `payload_of`) and their
    JSON holds what no text can carry (`text_input`)."""
    params = request.get("params") if isinstance(request, dict) else None
    message = params.get("message") if isinstance(params, dict) else None
    parts = message.get("parts") if isinstance(message, dict) else None
    if not isinstance(parts, list):
        return None
    texts: list[tuple[int, str]] = []
    for n, part in enumerate(parts):
        if isinstance(part, dict):
            if "data" in part:
                return None  # the input is the data part (checked with the rest of the request)
            if isinstance(part.get("text"), str):
                texts.append((n, part["text"]))
    if not texts:
        return None
    _, problem = text_input([t for _, t in texts])
    if not problem:
        return None
    where = ", ".join(f"params.message.parts[{n}].text" for n, _ in texts[:4]) + (", ..." if len(texts) > 4 else "")
    return where, f"JSON with {problem}"


def _request_id(request: Any) -> str | int | None:
    """The request's id, to answer with: None when it has none that the answer could carry (a lone surrogate)."""
    rid = request.get("id") if isinstance(request, dict) else None
    if isinstance(rid, bool) or not isinstance(rid, str | int) or uncarried(rid) is not None:
        return None
    return rid


def _depth(value: Any) -> int:
    """How deeply value's lists and objects nest (iterative: no recursion limit to meet)."""
    deepest = 0
    todo: list[tuple[Any, int]] = [(value, 1)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, dict):
            items: Any = item.values()
        elif isinstance(item, list):
            items = item
        else:
            continue
        deepest = max(deepest, level)
        todo.extend((child, level + 1) for child in items)
    return deepest

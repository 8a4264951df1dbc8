"""A plain gRPC agent, as one in any language would be: generated stubs only, no hivemesh code, plaintext on
loopback. It sits behind a `Sidecar` in the integration tests and records what reaches it (calls, metadata,
deadlines, the exact bytes it sent), so the tests can prove what the sidecar did and did not forward."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from hivemesh.v1 import agent_pb2, agent_pb2_grpc
from tests.support.plain_link import PlainLink

_JSON = "application/json"
_TEXT_SCHEMA = json.dumps(
    {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}, sort_keys=True
)
FAIL_TRAILER = ("x-plain-error", "from-the-agent")
FAIL_MESSAGE = "plain agent refuses this input: 'text' must not be 'bad'"


class PlainAgent(agent_pb2_grpc.AgentServicer):
    """Capabilities `<prefix>echo`, `<prefix>shout` (streaming), `<prefix>slow`, `<prefix>fail`,
    `<prefix>restricted`. Every Invoke/InvokeStream counts as a call, whatever the capability."""

    def __init__(
        self, name: str = "plain", *, prefix: str = "", usage: tuple[int, int] | None = None, link: bool = False
    ) -> None:
        """usage: the (input, output) model tokens every answer reports (an echo's response, a stream's final
        chunk), as an agent that runs a model would; None: none. link: also serve Agent.Link (`PlainLink`, the
        frame protocol written from the proto alone); off, Link answers UNIMPLEMENTED as the generated base does."""
        self.name = name
        self.prefix = prefix
        self.usage = agent_pb2.Usage(input_tokens=usage[0], output_tokens=usage[1], model="plain-model") \
            if usage is not None else None
        self.calls = 0
        self.metadata: list[list[tuple[str, str | bytes]]] = []
        self.deadlines: list[float | None] = []
        self.sent: list[bytes] = []
        self.slow_cancelled = asyncio.Event()
        self.slow_cancelled_at: float | None = None
        self._server: grpc.aio.Server | None = None
        self.port = 0
        self.link = PlainLink(self.Invoke) if link else None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def card(self) -> agent_pb2.AgentCard:
        p = self.prefix

        def cap(name: str, description: str, *, streaming: bool = False, tags: tuple[str, ...] = ()) -> Any:
            return agent_pb2.Capability(
                name=p + name, description=description, input_schema=_TEXT_SCHEMA if name != "slow" else "",
                streaming=streaming, tags=list(tags), idempotent=name == "echo",
                input_modes=[_JSON], output_modes=[_JSON],
            )

        return agent_pb2.AgentCard(
            name=self.name,
            version="0.0.1",
            description="a plain gRPC agent behind a sidecar",
            owner="tests",
            capabilities=[
                cap("echo", "echo the text with the caller the sidecar named", tags=("plain",)),
                cap("shout", "stream the words in upper case", streaming=True, tags=("plain",)),
                cap("slow", "sleep for 'seconds', recording the deadline it was given"),
                cap("fail", "refuse with the agent's own INVALID_ARGUMENT"),
                cap("restricted", "a capability no grant gives to agents"),
            ],
        )

    # --- the Agent service --------------------------------------------------------------------------------
    async def Describe(
        self, request: agent_pb2.DescribeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.AgentCard:
        return self.card()

    def _record(self, context: grpc.aio.ServicerContext[Any, Any]) -> list[tuple[str, str | bytes]]:
        self.calls += 1
        md = [(k, v) for k, v in context.invocation_metadata() or ()]
        self.metadata.append(md)
        self.deadlines.append(context.time_remaining())
        return md

    def _capability(self, request: agent_pb2.InvokeRequest) -> str:
        name = request.capability
        return name[len(self.prefix):] if name.startswith(self.prefix) else ""

    async def Invoke(
        self, request: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.InvokeResponse:
        md = self._record(context)
        cap = self._capability(request)
        value = json.loads(request.input) if request.input else {}
        if cap in ("echo", "restricted"):
            callers = [str(v) for k, v in md if k == "x-hivemesh-caller"]
            output: Any = {"text": value["text"], "caller": callers[0] if len(callers) == 1 else callers}
        elif cap == "slow":
            try:
                await asyncio.sleep(float(value.get("seconds", 1.0)))
            except asyncio.CancelledError:
                self.slow_cancelled_at = time.monotonic()
                self.slow_cancelled.set()
                raise
            output = value
        elif cap == "fail":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, FAIL_MESSAGE, (FAIL_TRAILER,))
        else:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no capability {request.capability!r}")
        resp = agent_pb2.InvokeResponse(
            output=json.dumps(output, separators=(",", ":")).encode(),
            content_type=_JSON,
            state=agent_pb2.TASK_STATE_COMPLETED,
            usage=self.usage,
        )
        self.sent.append(resp.SerializeToString())
        return resp

    async def InvokeStream(
        self, request: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[agent_pb2.InvokeChunk]:
        self._record(context)
        if self._capability(request) != "shout":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no streaming capability {request.capability!r}")
        for word in json.loads(request.input)["text"].split():
            chunk = agent_pb2.InvokeChunk(
                data=json.dumps(word.upper()).encode(), content_type=_JSON, state=agent_pb2.TASK_STATE_WORKING
            )
            self.sent.append(chunk.SerializeToString())
            yield chunk
        final = agent_pb2.InvokeChunk(final=True, state=agent_pb2.TASK_STATE_COMPLETED, usage=self.usage)
        self.sent.append(final.SerializeToString())
        yield final

    async def Link(  # type: ignore[override]
        self, request_iterator: AsyncIterator[agent_pb2.LinkFrame], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[agent_pb2.LinkFrame]:
        if self.link is None:  # as the generated base answers: an agent without links
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        async for frame in self.link.serve(request_iterator, context):
            yield frame

    # --- lifecycle ----------------------------------------------------------------------------------------
    async def start(self, port: int = 0) -> None:
        """Serve on 127.0.0.1:port (0: any free one). A test that restarts on the same port passes one from
        `hivemesh.mesh.ports.free_port`, outside the ephemeral range no outgoing connection takes meanwhile."""
        # Messages up to 16 MiB, past the mesh's 8 MiB: what the mesh passes on is then the mesh's own limit.
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 << 20),
                                          ("grpc.max_send_message_length", 16 << 20)])
        agent_pb2_grpc.add_AgentServicer_to_server(self, server)
        self.port = server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        self._server = server

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(0.5)

    async def __aenter__(self) -> PlainAgent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def _main() -> None:
    """One PlainAgent in a process of its own (`python -m tests.support.plain_agent [--link]`), for what one event
    loop shared with the caller hides (the races of a peer that answers at once): prints its port, serves until its
    stdin closes, then prints how many calls reached it."""
    async with PlainAgent(link="--link" in sys.argv[1:]) as agent:
        print(agent.port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        print(agent.calls, flush=True)


if __name__ == "__main__":
    asyncio.run(_main())

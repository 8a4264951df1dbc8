"""`Agent.Link` served by a plain agent, written from agent.proto's comments alone: generated messages, no
hivemesh code, as an agent author in any language would write it.

It is deliberately the simplest correct server: it never announces batches (so it is never sent one, and
answers one frame per message), runs each call frame through the agent's own Invoke with a context that carries
the frame's metadata and deadline, answers in the order calls finish, and stops a call on its cancel frame.
A second, independent implementation of the frame protocol is what proves the protocol, not hivemesh's code.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Never

import grpc

from hivemesh.v1 import agent_pb2

Invoke = Callable[[agent_pb2.InvokeRequest, Any], Awaitable[agent_pb2.InvokeResponse]]


class _Aborted(Exception):  # noqa: N818 - the abort itself
    def __init__(self, code: grpc.StatusCode, message: str, trailing: Sequence[tuple[str, Any]]) -> None:
        super().__init__(message)
        self.code, self.message, self.trailing = code, message, trailing


class _CallContext:
    """What the agent's Invoke uses of a servicer context, for one call frame."""

    def __init__(self, metadata: Sequence[tuple[str, str]], timeout_s: float) -> None:
        self._metadata = tuple(metadata)
        self._deadline = time.monotonic() + timeout_s if timeout_s > 0 else None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> Never:
        raise _Aborted(code, details, tuple(trailing_metadata or ()))


def _answer(call_id: int, code: grpc.StatusCode, message: str, trailing: Sequence[tuple[str, Any]] = ()) -> Any:
    answer = agent_pb2.LinkAnswer(code=code.value[0], message=message)
    for key, value in trailing:
        if isinstance(value, bytes):
            answer.binary_trailers.add(key=key, value=value)
        else:
            answer.trailers.add(key=key, value=value)
    return agent_pb2.LinkFrame(id=call_id, answer=answer)


class PlainLink:
    """Serves Link for one agent's Invoke; counts links and calls so tests can see which way calls came."""

    def __init__(self, invoke: Invoke) -> None:
        self._invoke = invoke
        self.links = 0
        self.calls = 0

    async def _run(self, frame: Any, out: asyncio.Queue[Any]) -> None:
        call = frame.call
        context = _CallContext([(h.key, h.value) for h in call.metadata], call.timeout_s)
        try:
            request = agent_pb2.InvokeRequest.FromString(call.request)
            async with asyncio.timeout(call.timeout_s if call.timeout_s > 0 else None):
                response = await self._invoke(request, context)
            out.put_nowait(agent_pb2.LinkFrame(
                id=frame.id, answer=agent_pb2.LinkAnswer(response=response.SerializeToString())))
        except _Aborted as aborted:
            out.put_nowait(_answer(frame.id, aborted.code, aborted.message, aborted.trailing))
        except TimeoutError:
            out.put_nowait(_answer(frame.id, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))

    async def serve(self, frames: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        self.links += 1
        out: asyncio.Queue[Any] = asyncio.Queue()
        running: dict[int, asyncio.Task[None]] = {}
        done = object()

        async def read() -> None:
            try:
                async for frame in frames:
                    if frame.WhichOneof("body") == "call":
                        self.calls += 1
                        task = asyncio.create_task(self._run(frame, out))
                        running[frame.id] = task
                        task.add_done_callback(lambda _, i=frame.id: running.pop(i, None))
                    elif frame.WhichOneof("body") == "cancel" and frame.id in running:
                        running[frame.id].cancel()
                await asyncio.gather(*running.values(), return_exceptions=True)
            finally:
                out.put_nowait(done)

        reader = asyncio.create_task(read())
        try:
            while (frame := await out.get()) is not done:
                yield frame
        finally:
            reader.cancel()
            for task in list(running.values()):
                task.cancel()

"""Serving `hivemesh.v1.Agent/Link` (and `Mesh/Link`): many unary calls, tagged by id, on one long-lived stream.

Each call frame runs through exactly what a unary Invoke runs: the server's own inbound interceptor wraps the
same Invoke handler (chain, admission, audit record, metrics, tracing), asked through its public
`intercept_service`, so nothing is copied and no layer can be skipped. Only the transport differs: the call's
context is a `FrameContext` (the stream's peer and certificate, the frame's metadata and deadline) and its
status travels back in an answer frame instead of gRPC trailers. Calls run concurrently; answers go back in
the order they finish, matched by id. A cancel frame cancels one call. A caller that does not read its answers
is not buffered for: past `MAX_HELD_BYTES` of answers not yet written (or `MAX_OPEN_CALLS` calls unanswered) the
link stops reading, and HTTP/2 flow control holds the caller back, as for a unary call (`_Open`). An answer frame
larger than one message may carry is answered PAYLOAD_TOO_LARGE instead (gRPC would fail the whole link on it);
a message that does not decode ends the link INVALID_ARGUMENT, recorded by the chain's observers (the audit log)
as an undecodable Invoke is (`record_refusal`).

The caller's token is bound to its certificate, which is the link's, so a caller may send it once: a call
frame without an `authorization` entry carries the last one sent on this link (still verified per call).
Answers that finish together go back as one message to a caller that announced it reads batches
(`mesh/link_frames.py`); a batch the caller sends is read frame by frame, exactly as if each came alone. Frames
travel as wire bytes (`mesh/link_wire.py`) from the stream to the handler and back; served through a generated
servicer instead (`LinkFrame` messages both ways), the messages are turned into frames and back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import grpc

from hivemesh.mesh import answer_size, invoke_wire, link_wire, tracing
from hivemesh.mesh.answer_size import CALL_ID as _CALL_ID
from hivemesh.mesh.answer_size import answer_too_large
from hivemesh.mesh.errors import InvalidInputError, PayloadTooLargeError, to_status
from hivemesh.mesh.inbound import MeshInboundInterceptor
from hivemesh.mesh.link_context import FrameAborted, FrameContext
from hivemesh.mesh.link_frames import BATCH_ANNOUNCE, announced, outgoing
from hivemesh.mesh.link_wire import DecodeError, Frame, Outgoing
from hivemesh.mesh.tls import MAX_MESSAGE_BYTES
from hivemesh.v1 import agent_pb2

log = logging.getLogger(__name__)

INVOKE_PATH = "/hivemesh.v1.Agent/Invoke"
AUTHORIZATION = "authorization"
_END = object()
MAX_TIMEOUT_S = 1e8
"""A frame's timeout_s above this (~3 years; or infinite) is no deadline: gRPC's own deadline overflows near 7.5e9 s
and would fail a forwarded call at once as past its deadline."""
_HEADER_KEY = re.compile(r"[0-9a-z_.\-]+")
_GOOD_KEYS: set[str] = set()
"""Header keys already found legal (a handful: authorization, traceparent, the signature header...)."""
MAX_OPEN_CALLS: Final = 2048
"""Calls a link holds unanswered at most (by default; `LinkServer(max_open_calls=)`), running or answered and not
yet written, before it stops reading call frames (`_Open`): what a caller that sends faster than its calls finish
can make this node hold, each with its request, as HTTP/2's MAX_CONCURRENT_STREAMS bounds unary calls. A node's
link to a peer carries all its callers' calls, slow model calls included (a 30 s call at 50 calls/s is 1,500
open), so it is set far above what a busy node runs at once; past it the next calls wait, on the caller's side,
for one to end. The answers' bytes have a bound of their own (`MAX_HELD_BYTES`), far sooner reached by a caller
that does not read."""
MAX_HELD_BYTES: Final = 4 * 1024 * 1024
"""Bytes of answers waiting to be written on one link from which it stops reading call frames: four HTTP/2 stream
windows (`STREAM_WINDOW_BYTES`). A caller reading its answers leaves this much waiting only when they finish
faster than it takes them, and then pausing paces its calls to its reading. Calls already running when reading
pauses still queue their answers, so a link holds at most this plus `MAX_OPEN_CALLS` answers. Before it, a
caller that sent large calls and never read made the server hold every answer (400 calls of 256 KiB: 96 MiB)."""



def _capability(request: bytes | memoryview) -> str:
    """The capability a call frame's request (an InvokeRequest, for Agent.Invoke and Mesh.Call) names, "" if it
    does not decode as one. Read only to name a refused answer's capability."""
    try:
        return invoke_wire.read_request(request)[0].capability
    except DecodeError:
        return ""


def _read_out(reader: asyncio.Task[None]) -> None:
    """A link's reader ended: its error (the caller's stream broke) is the link's end, read here so it is
    never logged as a task exception nobody retrieved."""
    if not reader.cancelled() and reader.exception() is not None:
        log.debug("link reader ended: %r", reader.exception())


def frame_problem(metadata: Sequence[tuple[str, str]], timeout_s: float) -> str:
    """Why a call frame cannot be served as it is ("" when it can): its headers must be what gRPC metadata can
    carry on a unary call, as the sidecar forwards them so (a lower-case key of letters, digits, `-_.`; a text
    value of printable ASCII; no `-bin` key, since a LinkHeader's value is text), and its timeout a number of
    seconds, 0 for none. Else gRPC raised while forwarding it, and the caller got UNKNOWN."""
    for key, value in metadata:
        if key not in _GOOD_KEYS:
            if not _HEADER_KEY.fullmatch(key) or key.endswith("-bin"):
                return f"link call header {key[:64]!r} is not a gRPC metadata key a text value can go with"
            if len(_GOOD_KEYS) < 256:
                _GOOD_KEYS.add(key)
        if not (value.isascii() and value.isprintable()):
            return f"link call header {key!r} has a value gRPC metadata cannot carry (printable ASCII only)"
    if not timeout_s >= 0:  # negative, or NaN
        return f"link call timeout_s must be 0 (none) or a positive number of seconds, not {timeout_s!r}"
    return ""


@dataclass(slots=True)
class _Details:
    """The handler call details of a unary Invoke (what an interceptor is asked about)."""

    method: str
    invocation_metadata: tuple[tuple[str, str | bytes], ...] = ()


class _Open:
    """One open link on the server: its answers waiting to be sent, its calls running, and why the caller's
    messages stopped being read if one did not decode or carried a frame it cannot use.

    Backpressure: answers are counted from when they are queued until their message is written (gRPC's write
    waits for the caller's HTTP/2 window, so a caller that does not read them leaves them here). Once they reach
    `MAX_HELD_BYTES`, or they and the running calls `MAX_OPEN_CALLS`, the reader stops at the next call frame
    (holding the one message it came in) until the writer, or a call that ends unanswered, makes room: the
    caller's further frames wait in HTTP/2 flow control, on its side, as a unary call's unread response does.
    Frames read before that call frame are taken, cancels included; a cancel sent after it waits its turn, as
    every frame behind it does: a caller over the byte bound is not reading its answers (it has no use for a
    prompt cancel), and one over the count has that many calls unanswered, of which the next answer (a deadline
    included: timers run on) frees room. Under the bounds, reading costs two comparisons per frame, no task nor
    await; answering, two additions per answer and two subtractions per message written."""

    __slots__ = ("bad", "expired", "held", "held_bytes", "max_open", "out", "room", "running")

    def __init__(self, max_open: int = MAX_OPEN_CALLS) -> None:
        self.max_open = max_open
        self.out: asyncio.Queue[Any] = asyncio.Queue()
        self.running: dict[int, asyncio.Task[None]] = {}
        self.expired: set[int] = set()
        """Calls cancelled by their own deadline (answered DEADLINE_EXCEEDED, unlike a caller's cancel)."""
        self.bad = ""
        self.held = 0
        """Answers queued or being written: put on out, not yet written on the stream."""
        self.held_bytes = 0
        """Their frames' bytes."""
        self.room: asyncio.Future[None] | None = None
        """What the reader awaits while it is paused (None while it reads)."""

    def put(self, answer: Outgoing) -> None:
        """Queue an answer to be written, counted as held until it is."""
        self.held += 1
        self.held_bytes += answer.size
        self.out.put_nowait(answer)

    def full(self) -> bool:
        """Whether the link is at a bound: the reader takes no call frame until it is not."""
        return self.held_bytes >= MAX_HELD_BYTES or len(self.running) + self.held >= self.max_open

    def written(self, answers: Sequence[Outgoing]) -> None:
        """These answers' message was written: no longer held; the paused reader resumes if there is room."""
        self.held -= len(answers)
        self.held_bytes -= answers[0].size if len(answers) == 1 else sum(answer.size for answer in answers)
        if self.room is not None:
            self.wake()

    def wake(self) -> None:
        """Resume the paused reader if the link is under its bounds again."""
        room = self.room
        if room is not None and not room.done() and not self.full():
            room.set_result(None)

    async def wait_for_room(self) -> None:
        """Pause until the link is under its bounds (cancelled with the reader when the link ends)."""
        loop = asyncio.get_running_loop()
        try:
            while self.full():
                self.room = loop.create_future()
                await self.room
        finally:
            self.room = None


def _expire(expired: set[int], call_id: int, task: asyncio.Task[None]) -> None:
    """A call's deadline passed: cancel it, marked as its deadline's doing. One timer per call, not an
    `asyncio.timeout` in it: the context manager cost ~2% of a busy agent's CPU (py-spy at 64 KiB)."""
    if not task.done():
        expired.add(call_id)
        task.cancel()


def answer_frame(
    call_id: int, code: grpc.StatusCode, message: str, trailing: Sequence[tuple[str, Any]]
) -> Outgoing:
    """The answer frame of a call that ended with this status (never OK: an OK answer carries its response).
    Frames are built in place: a message given to a constructor is copied in by serializing and parsing it."""
    frame = agent_pb2.LinkFrame(id=call_id)
    answer = frame.answer
    answer.code = code.value[0]
    answer.message = message
    for key, value in trailing:
        if isinstance(value, bytes):
            answer.binary_trailers.add(key=key, value=value)
        else:
            answer.trailers.add(key=key, value=str(value))
    return link_wire.message_frame(frame)


class LinkServer:
    """Serves Link streams for one server: every call frame through the interceptor's wrapped unary handler.

    interceptor is the server's inbound interceptor (`MeshInboundInterceptor`), or None for a server that has
    none (a sidecar's local Mesh service, a plain agent); invoke is the unary method handler behind it (the SDK
    servicer's Invoke, the sidecar's forwarder, the sidecar's Mesh.Call); path is that method's full name, what
    the interceptor is asked about.
    """

    def __init__(
        self, interceptor: grpc.aio.ServerInterceptor | None, invoke: grpc.RpcMethodHandler[Any, Any],
        path: str = INVOKE_PATH, *, max_open_calls: int = MAX_OPEN_CALLS, max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self.max_open_calls = max_open_calls
        """Calls one link holds unanswered at most before it stops reading call frames (`MAX_OPEN_CALLS`)."""
        self.max_message_bytes = max_message_bytes
        """The most one message on the link may carry (the server's `grpc.max_send_message_length`): a larger
        answer frame is answered PAYLOAD_TOO_LARGE instead (a batch is far smaller: a frame this large goes alone,
        `MAX_BATCH_BYTES`)."""
        self._interceptor = interceptor
        self._invoke = invoke
        self._path = path
        self._wrapped: tuple[Callable[[Any, Any], Awaitable[Any]], Callable[[Any], bytes] | None] | None = None
        self._tracer: object = None
        self._streams: set[_Open] = set()
        self._draining = False
        self.links = 0
        """Link streams opened (by every caller, since start)."""
        self.calls = 0
        """Calls served on them."""
        self.messages = 0
        """Messages written on them (fewer than answers when answers were batched)."""
        self.pauses = 0
        """Times a link stopped reading its caller's frames at a bound (`_Open`): its caller did not read its
        answers, or had `MAX_OPEN_CALLS` unanswered."""

    @property
    def open_links(self) -> int:
        """Link streams open now."""
        return len(self._streams)

    def held(self) -> tuple[int, int]:
        """Answers waiting to be written on the open links, and their bytes (what `MAX_HELD_BYTES` bounds per
        link)."""
        return sum(link.held for link in self._streams), sum(link.held_bytes for link in self._streams)

    async def _behaviour(self) -> tuple[Callable[[Any, Any], Awaitable[Any]], Callable[[Any], bytes] | None]:
        """The wrapped Invoke behaviour and its response serializer, as the interceptor builds them for a unary
        Invoke; asked again only when tracing is switched (what the interceptor's wrapper depends on)."""
        invoke = self._invoke

        async def continuation(details: Any) -> grpc.RpcMethodHandler[Any, Any]:
            return invoke

        handler: grpc.RpcMethodHandler[Any, Any] | None = invoke
        if self._interceptor is not None:
            handler = await self._interceptor.intercept_service(continuation, _Details(self._path))
        assert handler is not None and handler.unary_unary is not None
        behaviour: Any = handler.unary_unary
        deserialize = handler.request_deserializer
        if deserialize is not None:  # a handler that takes messages (a plain agent's generated servicer)
            takes_messages = behaviour

            async def behaviour(request: bytes, context: Any) -> Any:
                try:
                    message = deserialize(request)
                except Exception:  # noqa: BLE001 - any decode failure is the caller's bad input
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call frame's request does not decode")
                return await takes_messages(message, context)

        elif handler is invoke or not getattr(self._interceptor, "takes_views", False):  # it takes only bytes
            takes_bytes = behaviour

            async def behaviour(request: bytes | memoryview, context: Any) -> Any:
                return await takes_bytes(request if isinstance(request, bytes) else bytes(request), context)

        self._wrapped, self._tracer = (behaviour, handler.response_serializer), tracing.TRACER
        return self._wrapped

    async def _run(
        self, frame: Frame, stream: grpc.aio.ServicerContext[Any, Any], metadata: Sequence[tuple[str, str]],
        state: _Open, auth: Mapping[str, Iterable[bytes]], received: float,
    ) -> None:
        """Serve one call frame and queue its answer; its deadline (timeout_s from when the frame was received)
        is `take`'s timer, which cancels this task and marks it in the link's expired calls. The context's
        deadline runs from `received` too: a timer cannot fire while the event loop runs other calls' code."""
        call_id = frame.id
        put = state.put
        context = FrameContext(stream, metadata, frame.timeout_s, auth, received)
        _CALL_ID.set(call_id)  # this task's own context: for `answer_refusal`
        try:
            wrapped = self._wrapped
            if wrapped is None or self._tracer is not tracing.TRACER:
                wrapped = await self._behaviour()
            behaviour, serialize = wrapped
            response = await behaviour(frame.request, context)
            answer = link_wire.answer_frame(call_id, serialize(response) if serialize is not None else response)
            if answer.size > self.max_message_bytes:  # gRPC would refuse to write it and end the whole link
                status = to_status(answer_too_large(_capability(frame.request), answer.size, self.max_message_bytes,
                                                    on=" as a Link answer frame"))
                answer = answer_frame(call_id, status.code, status.details, status.trailing_metadata)
            put(answer)
        except FrameAborted as aborted:
            put(answer_frame(call_id, aborted.code, aborted.details, aborted.trailing))
        except TimeoutError:
            put(answer_frame(call_id, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", ()))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if call_id in state.expired:  # its deadline passed: answered as gRPC answers a unary call past its deadline
                if task is not None:
                    task.uncancel()
                put(answer_frame(call_id, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", ()))
            elif task is not None and not task.cancelling():  # raised inside the behaviour, not a cancel of the call
                log.error("link call %d failed: a task it awaited was cancelled", call_id)
                put(answer_frame(call_id, grpc.StatusCode.UNKNOWN, "unexpected error serving the call", ()))
            # else the caller cancelled it (it wants no answer), or the link is closing
        except (KeyboardInterrupt, GeneratorExit):
            raise
        except BaseException:  # a SystemExit from code under the behaviour: this call's failure only
            log.exception("link call %d failed unexpectedly", call_id)
            put(answer_frame(call_id, grpc.StatusCode.UNKNOWN, "unexpected error serving the call", ()))

    def answer_refusal(self, capability: str, response: bytes) -> PayloadTooLargeError | None:
        """For the handler of a call (under the chain, so its audit record says what the caller gets): when the
        call came on a link, the PAYLOAD_TOO_LARGE its answer frame would be refused with; None when the frame
        fits or the call is not a link's. `_run` checks the frame again after the chain, answering the same."""
        if len(response) > self.max_message_bytes:
            return None  # the handler's own check of the answer refuses it
        return answer_size.refusal(capability, response, self.max_message_bytes)

    def record_refusal(self, context: grpc.aio.ServicerContext[Any, Any], problem: str) -> None:
        """One audit record (INVALID_INPUT, method Link, the sender's verified identity) for a link refused for
        problem (a message that does not decode, a frame it cannot use); every call frame is recorded already, as
        the Invoke it carries."""
        if isinstance(self._interceptor, MeshInboundInterceptor):
            try:
                self._interceptor.record_refusal("Link", context, InvalidInputError(problem))
            except Exception:  # the link is refused all the same; its record is what failed
                log.exception("could not record the refusal of a link (%s)", problem)

    def drain(self) -> None:
        """Shutting down: refuse new call frames (UNAVAILABLE), and end each link once its calls are answered,
        instead of holding the server's stop for its whole grace period."""
        self._draining = True
        for open_link in self._streams:
            if not open_link.running:
                open_link.out.put_nowait(_END)

    async def serve(
        self, frames: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any], *, wire: bool = False,
        encode: Callable[[Sequence[Outgoing]], Any] | None = None,
    ) -> AsyncIterator[Any]:
        """The Link method's behaviour: read call and cancel frames, yield answer frames until the caller closes
        its side and every call it sent has been answered (or the stream breaks, or the server drains).

        wire: the stream carries bytes both ways (`link_handler`); otherwise `LinkFrame` messages (a generated
        servicer's Link). encode, if given, makes what is yielded of each message's frames instead (a direct link
        takes their pieces, `link_wire.pieces`). A message that does not decode ends the link INVALID_ARGUMENT once
        the calls it had sent are answered."""
        state = _Open(self.max_open_calls)
        out, running, expired, put = state.out, state.running, state.expired, state.put
        loop = asyncio.get_running_loop()
        authorization = ""
        auth = MappingProxyType(dict(context.auth_context()))  # the connection's: one for every call on the link
        self.links += 1

        def finished(call_id: int, timer: asyncio.TimerHandle | None) -> Callable[[asyncio.Task[None]], None]:
            def done(_: asyncio.Task[None]) -> None:
                running.pop(call_id, None)
                if timer is not None:
                    timer.cancel()
                    expired.discard(call_id)
                if self._draining and not running:
                    out.put_nowait(_END)
                if state.room is not None:  # a call the caller cancelled left no answer: room for the next
                    state.wake()
            return done

        def take(frame: Frame) -> str:
            """Start, refuse or cancel the call the frame is about; what is wrong with the link if the frame is
            none of those (an answer, or a frame with no body: a batch nested in a batch), which ends it."""
            nonlocal authorization
            kind = frame.kind
            if kind == "call":
                metadata: Sequence[tuple[str, str]] = frame.metadata
                problem = frame_problem(metadata, frame.timeout_s)
                if problem:
                    put(answer_frame(frame.id, grpc.StatusCode.INVALID_ARGUMENT, problem, ()))
                    return ""
                if frame.timeout_s > MAX_TIMEOUT_S:
                    frame.timeout_s = 0.0  # beyond any deadline gRPC can keep, infinite included: none
                sent = [v for k, v in metadata if k == AUTHORIZATION]
                if sent:
                    authorization = sent[-1]
                elif authorization:
                    metadata = (*metadata, (AUTHORIZATION, authorization))
                if self._draining:
                    put(answer_frame(frame.id, grpc.StatusCode.UNAVAILABLE,
                                     "this agent is shutting down", ()))
                elif frame.id in running:
                    put(answer_frame(frame.id, grpc.StatusCode.INVALID_ARGUMENT,
                                     f"link call id {frame.id} is already in use", ()))
                else:
                    self.calls += 1
                    task = loop.create_task(self._run(frame, context, metadata, state, auth, time.monotonic()))
                    running[frame.id] = task
                    timeout_s = frame.timeout_s
                    timer = loop.call_later(timeout_s, _expire, expired, frame.id, task) if timeout_s > 0 else None
                    task.add_done_callback(finished(frame.id, timer))
            elif kind == "cancel":
                cancelled = running.get(frame.id)
                if cancelled is not None:
                    cancelled.cancel()
            else:  # its calls (if it nests any) would never be answered: the link ends, answering the open ones
                return (f"link frame {frame.id} is neither a call nor a cancel ({kind or 'no body'}; a batch "
                        "holds frames, not batches)")
            return ""

        async def read() -> None:
            try:
                async for message in frames:
                    try:
                        received = (link_wire.read(message) if isinstance(message, (bytes, bytearray, memoryview))
                                    else link_wire.frames_of(message))
                    except DecodeError as exc:
                        state.bad = f"a Link message does not decode as hivemesh.v1.LinkFrame ({exc})"
                        break
                    for frame in received:
                        if frame.kind == "call" and state.full():
                            self.pauses += 1
                            await state.wait_for_room()
                        state.bad = take(frame)
                        if state.bad:
                            break
                    if state.bad:
                        break
                if state.bad:
                    self.record_refusal(context, state.bad)
                await asyncio.gather(*running.values(), return_exceptions=True)
            finally:
                out.put_nowait(_END)

        batches = announced(context.invocation_metadata())
        await context.send_initial_metadata(BATCH_ANNOUNCE)
        self._streams.add(state)
        reader = loop.create_task(read())
        reader.add_done_callback(_read_out)
        try:
            if encode is None:
                encode = link_wire.pack if wire else _as_message
            async for group in outgoing(out, _END, lambda: batches):
                self.messages += 1
                yield encode(group)
                state.written(group)
            if state.bad:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, state.bad)
        finally:
            self._streams.discard(state)
            reader.cancel()
            for task in list(running.values()):
                task.cancel()


def _as_message(frames: Sequence[Outgoing]) -> Any:
    """frames as the `LinkFrame` message a generated servicer's Link yields."""
    return agent_pb2.LinkFrame.FromString(link_wire.pack(frames))


def link_handler(server: LinkServer) -> grpc.RpcMethodHandler[Any, Any]:
    """The Link method handler for a generic or registered handler (the sidecar's, the SDK's): wire bytes both
    ways, read and written by `mesh/link_wire.py`."""
    return grpc.stream_stream_rpc_method_handler(functools.partial(server.serve, wire=True))

"""Unary calls to one peer as tagged frames on one long-lived `hivemesh.v1.Agent/Link` stream.

A unary mTLS call pays for its own HTTP/2 stream, headers and trailers on both sides; a frame on an open
stream pays for one message (bench/grpc_shapes.py measured 0.58x the CPU per call). `LinkedInvoke` takes a
unary Invoke's place on a channel (`ChannelPool` with `link=True`): same arguments, same answer bytes, the same
`grpc.aio.AioRpcError` (code, message, ErrorInfo trailers) on failure, so the attempt loop cannot tell them
apart. The link opens lazily, on the first call; a broken link fails its open calls (UNAVAILABLE, as a broken
connection fails unary calls) and the next call opens a new one; a call whose frame never left (the writer knows)
goes unary instead, as nothing of it ran. A peer that answers the link UNIMPLEMENTED (an agent in another
language, an older node) gets unary calls from then on. Requests over
`LINK_MAX_REQUEST_BYTES` (256 KiB) go unary too.

The caller's token is sent once per link and again only when it changes (the server keeps the link's last
one; it is bound to this workload's certificate, which is the link's). Frames that queue up while the stream is
busy go as one message (`mesh/link_frames.py`), once the server has said it reads them.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from hivemesh.mesh import link_wire
from hivemesh.mesh.env_switch import env_switch
from hivemesh.mesh.link_context import status_code
from hivemesh.mesh.link_direct import DirectStream, split_address
from hivemesh.mesh.link_frames import BATCH_ANNOUNCE, announced, outgoing
from hivemesh.mesh.link_wire import DecodeError, Outgoing
from hivemesh.v1 import agent_pb2

log = logging.getLogger(__name__)

LINK = "/hivemesh.v1.Agent/Link"
MESH_LINK = "/hivemesh.v1.Mesh/Link"
LINK_MAX_REQUEST_BYTES = 256 * 1024
"""Larger requests go unary: their cost is their bytes, not the per-RPC price a link saves, and one huge message
would hold the link's one HTTP/2 stream (its flow-control window) while the small calls behind it wait. With
batches, 64 KiB calls on a link cost 0.80x unary's CPU and ran at 1.35x its calls/s at 16 in flight
(BENCHMARKS.md); before batches they ran at 0.83x, hence the old 16 KiB cut-off."""
LINGER_S = 0.001
"""With at least `LINGER_AFTER` calls open on the link (its own among them), a lone frame waits this long for others
to share its message. Calls that reach a node one by one (a sidecar's Mesh.Call, each its own unary RPC) never
queue together on their own; at 16 in flight through two sidecars this cut the caller sidecar's messages ~3x and
brought the sidecar path level with two bare forwarding hops (BENCHMARKS.md). A call made alone never waits."""
LINGER_AFTER = 3
_AUTHORIZATION = "authorization"
_CLOSE: Any = object()


class LinkUnsupportedError(Exception):
    """The peer does not serve Link (it answered UNIMPLEMENTED): nothing was run, send the call unary."""


class LinkNotSentError(Exception):
    """The link ended before this call's frame was written: the peer never saw it, so it may go unary.

    gRPC's asyncio stream loses the peer's status when a write races it: a peer that refuses the stream at once
    (UNIMPLEMENTED from a generated servicer) is reported as INTERNAL "Internal error from Core" when the first
    write reaches the core after the status did (grpc/grpc#36066; a CI run saw it on the sidecar's first call to
    its agent). The write that failed is known, so the calls it carried are known never to have left."""


NOT_SENT_LIMIT = 3
"""Links in a row that end INTERNAL before any frame left this node: after this many the peer is called unary (a
peer that refuses every stream at once, whose UNIMPLEMENTED the race keeps hiding)."""
SETTLE_S = 1.0
"""How long a broken link waits for a write in flight to finish or fail, to know whether its frames left; a
write that has not settled by then counts as sent (its calls fail rather than risk running twice)."""


def _rpc_error(code: grpc.StatusCode, message: str, trailing: Sequence[tuple[str, Any]] = ()) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), message)


def stream_failure(exc: grpc.aio.AioRpcError) -> BaseException:
    """What the open calls of a link get when its stream fails.

    The link server answers every call in its own frame and never ends the stream with INTERNAL itself, so an
    INTERNAL stream says nothing about the calls: it is the connection. gRPC's asyncio stream reports a connection
    that died under a write that way ("Internal error from Core"), where a unary call on the same connection gets
    UNAVAILABLE; so it becomes UNAVAILABLE and the attempt loop's retry policy sees the same code either way.
    UNKNOWN is left alone: it is also what a server whose handler crashed sends, and a retry must not run such a
    call twice. Any other code (a refusal of the whole stream) is passed on as it is too."""
    code = exc.code()
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return LinkUnsupportedError()
    if code == grpc.StatusCode.INTERNAL:
        return _rpc_error(grpc.StatusCode.UNAVAILABLE, f"the link to the peer broke ({code.name}: {exc.details()})")
    return exc


def _let_go(exc: BaseException) -> None:
    """Clear the finished frames of exc's traceback. grpc.aio raises from frames whose `self` is the call, and
    the call keeps its HTTP/2 connection open, even once its channel is closed, for as long as it lives: a kept
    traceback (a cancelled task keeps its CancelledError) then held a connection per closed link, which the
    garbage collector never freed (the 4 Dec soak: one more connection to each peer per certificate renewal)."""
    traceback.clear_frames(exc.__traceback__)


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Link:
    """One open Link stream: calls go out through a queue (one writer task keeps their order), answers come back
    to the waiting call by id."""

    def __init__(self, method: Callable[..., Any]) -> None:
        """method opens the stream, given `metadata=`: a gRPC stream-stream multicallable (Agent/Link, Mesh/Link),
        or a function handing over a connected direct link (`DirectStream`)."""
        self._out: asyncio.Queue[Any] = asyncio.Queue()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next = 1
        self._sent_auth = ""
        self._sent_through = 0
        """The highest call id whose frame may have left (written, or being written): ids are queued in order."""
        self.broken = False
        self.hidden_status = False
        """The stream ended INTERNAL: the peer's own status may have been lost to a write (see LinkNotSentError)."""
        self.batches = False
        """The server said it reads batches (in its initial metadata): queued frames go as one message."""
        self.messages = 0
        """Messages written on the stream (fewer than frames when frames were batched)."""
        self.answered = False
        """A frame came back: the peer serves Link."""
        self.linger_s = LINGER_S
        # Written by our own task, not a request iterator: a write that fails says which frames never left.
        self._stream: Any = method(metadata=BATCH_ANNOUNCE)
        self.retiring = False
        """`retire` was called: the link ends once its last call has settled."""
        self.direct = isinstance(self._stream, DirectStream)
        """The link is a direct one (`mesh/link_direct.py`), not an Agent/Link stream on gRPC."""
        """None once the link ended. The call object keeps its connection open, even after its channel was closed,
        until it is freed, and a finished task's exception can hold this link in a reference cycle the garbage
        collector did not free (see `_let_go`): so only this attribute refers to the call, let go at the end."""
        loop = asyncio.get_running_loop()
        self._writer = loop.create_task(self._write())
        self._reader = loop.create_task(self._read())

    async def _write(self) -> None:
        try:
            group: list[Outgoing]
            async for group in outgoing(self._out, _CLOSE, self._batches, self._linger):
                if self.broken or self._stream is None:
                    return
                before = self._sent_through
                self._sent_through = max(before, *(frame.id for frame in group))
                try:
                    if self.direct:
                        await self._stream.write_frames(group)
                    else:
                        await self._stream.write(link_wire.pack(group))
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                    _let_go(exc)
                    self._sent_through = before  # refused by the core: this message never left
                    return
                self.messages += 1
            if not self.broken and self._stream is not None:
                await self._stream.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            _let_go(exc)  # the stream ended: the reader reports how

    def _batches(self) -> bool:
        return self.batches

    def _linger(self) -> float:
        return self.linger_s if len(self._pending) >= LINGER_AFTER else 0.0

    async def _read(self) -> None:
        try:
            await self._read_answers()
        finally:
            self._stream = None  # let the call (and its connection) go: see __init__

    async def _read_answers(self) -> None:
        stream = self._stream  # close() may let go of the attribute while this waits: the stream then ends
        assert stream is not None
        error: BaseException
        try:
            self.batches = announced(await stream.initial_metadata())
            async for raw in stream:
                self.answered = True
                try:
                    frames = link_wire.read(raw)
                except DecodeError as exc:
                    # The calls it carried may have run: UNKNOWN, which no retry policy repeats.
                    error = _rpc_error(grpc.StatusCode.UNKNOWN,
                                       f"the peer answered with a Link message that does not decode ({exc})")
                    stream.cancel()
                    break
                for frame in frames:
                    waiter = self._pending.pop(frame.id, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(frame)
                if self.retiring and not self._pending:
                    self._out.put_nowait(_CLOSE)
            else:
                error = _rpc_error(grpc.StatusCode.UNAVAILABLE, "the link to the peer was closed")
        except grpc.aio.AioRpcError as exc:
            _let_go(exc)
            self.hidden_status = exc.code() == grpc.StatusCode.INTERNAL
            error = stream_failure(exc)
        except asyncio.CancelledError as exc:
            _let_go(exc)
            stream = None  # the task keeps this frame in its CancelledError: it must not keep the call (_let_go)
            error = _rpc_error(grpc.StatusCode.CANCELLED, "the link was closed by this node")
            self._fail(error, settled=False)
            self._writer.cancel()  # its channel was closed under it: the writer would wait on its queue for ever
            raise
        await self._settle()
        self._fail(error, settled=True)

    async def _settle(self) -> None:
        """Stop the writer and let a write in flight finish or fail (bounded), so `_sent_through` is exact."""
        self.broken = True
        self._out.put_nowait(_CLOSE)
        if not self._writer.done():
            await asyncio.wait((self._writer,), timeout=SETTLE_S)

    def _fail(self, error: BaseException, *, settled: bool) -> None:
        self.broken = True
        pending, self._pending = self._pending, {}
        sent_through = self._sent_through
        for call_id, waiter in pending.items():
            if not waiter.done():
                unsent = settled and call_id > sent_through and not isinstance(error, LinkUnsupportedError)
                waiter.set_exception(LinkNotSentError() if unsent else error)

    def retire(self) -> None:
        """Send no more calls on this link: once the calls it holds are answered (or cancelled: their cancel frames
        still go out), it says it sends no more and the peer ends it. A caller moving to another link lets this one
        finish instead of failing its calls."""
        self.retiring = True
        if not self._pending:
            self._out.put_nowait(_CLOSE)

    @property
    def sent_any(self) -> bool:
        """Whether any frame left on this link (the peer saw at least one call)."""
        return self._sent_through > 0

    async def call(self, request: bytes, timeout: float | None, metadata: Sequence[tuple[str, Any]]) -> bytes:
        call_id = self._next
        self._next += 1
        # Built in place (a message given to a constructor is copied in by serializing and parsing it); a large
        # request is left out of the message and goes as it is (link_wire).
        message: Any = None
        if len(request) < link_wire.BY_HAND:
            message = agent_pb2.LinkFrame(id=call_id)
            call = message.call
            call.request = request
        else:
            call = agent_pb2.LinkCall()
        if timeout is not None and timeout > 0:
            call.timeout_s = timeout
        for key, value in metadata:
            if key == _AUTHORIZATION:
                if value == self._sent_auth:
                    continue  # the server still has it for this link
                self._sent_auth = value
            call.metadata.add(key=key, value=value)
        frame = link_wire.call_frame(call_id, request, call) if message is None else link_wire.message_frame(message)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[link_wire.Frame] = loop.create_future()
        self._pending[call_id] = waiter
        self._out.put_nowait(frame)
        # A timer, not asyncio.wait_for: no extra task per call.
        timer = loop.call_later(timeout, _expire, waiter) if timeout is not None else None
        try:
            answer = await waiter
        except TimeoutError:
            self._cancel(call_id)
            raise _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except asyncio.CancelledError:
            self._cancel(call_id)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if answer.code == 0:
            return answer.response
        raise _rpc_error(status_code(answer.code), answer.message, answer.trailing)

    def _cancel(self, call_id: int) -> None:
        if self._pending.pop(call_id, None) is not None and not self.broken:
            self._out.put_nowait(link_wire.message_frame(agent_pb2.LinkFrame(id=call_id, cancel=True)))
            if self.retiring and not self._pending:
                self._out.put_nowait(_CLOSE)

    def close(self) -> None:
        """End the link now: its open calls fail CANCELLED."""
        self._out.put_nowait(_CLOSE)
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None
        self._writer.cancel()


class DirectOpener:
    """Opens direct links (`mesh/link_direct.py`) to one peer."""

    def __init__(self, address: str, server_name: str, context: ssl.SSLContext) -> None:
        self.host, self.port = split_address(address)
        self.address, self._server_name, self._context = address, server_name, context

    def __call__(self) -> DirectStream:
        """A direct link, connecting in the background (`DirectStream.connected` once it has)."""
        return DirectStream(self.host, self.port, self._server_name, self._context)


DIRECT_RETRY_S = 30.0
"""How long a caller whose direct link to a peer did not connect uses the peer's Agent/Link over gRPC before it
tries again (a peer restarting, a port a firewall holds)."""


class LinkedInvoke:
    """A unary Invoke multicallable's stand-in that sends each call as a frame on this channel's link."""

    def __init__(
        self, channel: grpc.aio.Channel, unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes], path: str = LINK,
        *, direct: DirectOpener | None = None,
    ) -> None:
        """path: the Link method (`Agent/Link`; `Mesh/Link` for a local caller of a sidecar's Mesh.Call).
        direct: the peer's direct link. It is opened in the background, while calls go over path; once it has
        connected, the next call goes over it and the link on path finishes the calls it holds. A direct link that
        does not connect is tried again after `DIRECT_RETRY_S`, one that breaks at once: no call waits on one."""
        self._path = path
        self._method: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(path)
        self._direct = direct
        self._direct_after = 0.0
        """time.monotonic() before which no direct link is tried: the last one did not connect."""
        self._opening: DirectStream | None = None
        """A direct link connecting in the background."""
        self._unary = unary
        self._link: _Link | None = None
        self._unsent_links = 0
        """Links in a row that ended INTERNAL before any frame left (see `NOT_SENT_LIMIT`)."""
        self.unsupported = False
        """The peer answered the link UNIMPLEMENTED (or its links ended INTERNAL before a frame left,
        `NOT_SENT_LIMIT` times in a row): every call goes unary."""
        self.proven = False
        """A link of this peer answered a frame. Until then one call at a time tries a link and the others go unary:
        with two frames on a link the peer refuses at once, the first can leave before its UNIMPLEMENTED and the
        second race it, so the stream ends INTERNAL with a frame out, and that call would fail although nothing
        ran (see LinkNotSentError; one frame alone is always told apart)."""
        self._trying = False

    async def __call__(
        self, request: bytes, *, timeout: float | None = None, metadata: Sequence[tuple[str, Any]] = ()
    ) -> bytes:
        if (self.unsupported or len(request) > LINK_MAX_REQUEST_BYTES
                or any(not isinstance(v, str) for _, v in metadata)):
            return await self._unary(request, timeout=timeout, metadata=metadata)
        trying = not self.proven
        if trying:
            if self._trying:
                return await self._unary(request, timeout=timeout, metadata=metadata)
            self._trying = True
        link = self._link
        if self._direct is not None and (link is None or link.broken or not link.direct):
            link = self._towards_direct(link)
        if link is None or link.broken:
            if link is not None:
                self._unsent_links = self._unsent_count(link)
            link = self._link = _Link(self._method)
        started = time.monotonic()
        try:
            return await link.call(request, timeout, metadata)
        except LinkUnsupportedError:
            self._give_up("peer does not serve %s: calling it unary")
        except LinkNotSentError:
            # The link ended before this call's frame left: nothing of it ran anywhere, so it goes unary now.
            if self._unsent_count(link) >= NOT_SENT_LIMIT:
                self._give_up("%s: %d links in a row ended INTERNAL before a frame left (a hidden UNIMPLEMENTED): "
                              "calling the peer unary", NOT_SENT_LIMIT)
        finally:
            if trying:
                self._trying = False
                self.proven = link.answered
        if timeout is not None:
            timeout = max(0.0, timeout - (time.monotonic() - started))
        return await self._unary(request, timeout=timeout, metadata=metadata)

    def _towards_direct(self, link: _Link | None) -> _Link | None:
        """The link to use while not on a direct one: a direct link that has just connected (the current link is
        retired), else the current one, with a direct link opened in the background when it is time to try."""
        opening = self._opening
        if opening is None:
            if time.monotonic() >= self._direct_after and self._direct is not None:
                self._opening = self._direct()
            return link
        if not opening.settled:
            return link
        self._opening = None
        if not opening.connected:
            self._direct_after = time.monotonic() + DIRECT_RETRY_S
            if self._direct is not None:
                log.warning("cannot open a direct link to %s (%s): calling the peer over %s, trying again in "
                            "%.0f s", self._direct.address, opening.failure, self._path, DIRECT_RETRY_S)
            return link
        if link is not None and not link.broken:
            link.retire()
        self._link = _Link(lambda **_: opening)
        return self._link

    def _unsent_count(self, link: _Link) -> int:
        """The count of links in a row that hid the peer's status before any frame left, link included. A link
        that sent a frame starts it again; one that failed otherwise (UNAVAILABLE: the peer is down or
        restarting) leaves it as it is, so a peer's downtime never turns its links off."""
        if link.sent_any:
            return 0
        return self._unsent_links + 1 if link.hidden_status else self._unsent_links

    def _give_up(self, message: str, *args: object) -> None:
        if not self.unsupported:
            log.info(message, self._path, *args)
        self.unsupported = True

    def close(self) -> None:
        if self._opening is not None:
            self._opening.cancel()
            self._opening = None
        if self._link is not None:
            self._link.close()
            self._link = None


LINK_ENV = "HIVEMESH_LINK"


def link_enabled(value: bool | None) -> bool:
    """Whether unary calls go over links (and links are served): value if given, else $HIVEMESH_LINK
    ("1"/"true"/"on" or "0"/"false"/"off"), else on (the default since BENCHMARKS.md's same-run measurement)."""
    return env_switch(LINK_ENV, value)

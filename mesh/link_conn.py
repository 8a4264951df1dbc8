"""The direct link's wire (`mesh/link_direct.py` describes it), and one connection's messages read and written on
its TLS transport.

This is an asyncio buffered protocol rather than a StreamReader. perf of `bench/peers.py`'s agent at 64 KiB and 16
in flight found copying 16% of its CPU, and a StreamReader copies each message three times after TLS has decrypted
it: into a chunk joined for `data_received`, into its buffer, and out of it by `readexactly` (with the rest of the
buffer moved down). Here TLS decrypts into a buffer this class gives it, with room for everything TLS holds (its
TLS layer may not ask again before it shuts down, at a peer's close): the rest of a large message being read,
when it has that room; else a chunk, whose whole large messages are handed over as views of it, the message it
ends inside going on in a buffer of its own (`BODY_MIN` bytes or more: TLS decrypts the rest of it there) or the
scratch buffer (small ones, copied out once). Writing, a message's pieces (`mesh/link_wire.py` writes a large
payload as a piece of its own, not copied into the frame) go to TLS as they are, in one transport write: one
socket write, not one for the length and one for the body.

The preamble (`read_preamble`) and each length are checked as they arrive: a bad preamble, a message over the
limit or a server's end status from a client stop the reading and fail the next `read`."""

from __future__ import annotations

import asyncio
import collections
import struct
from collections.abc import Sequence
from typing import Any, Final

GO: Final = b"\x01"
"""The server's first byte, in plaintext: its TLS layer is in place, the client may begin the handshake."""
PREAMBLE: Final = b"hivemesh-link/1\n"
FLAG_BATCHES: Final = 1
HEADER: Final = struct.Struct(">I")
STATUS_BIT: Final = 0x8000_0000
"""Set in a length: the message is the link's end status, the server's last."""


Message = bytes | bytearray | memoryview
"""A message read: a small one as bytes, a large one in its own buffer or a view of the chunk it was read with."""


class LinkProtocolError(Exception):
    """The peer broke the direct link's wire format (a message over the limit, a bad preamble)."""

SCRATCH_BYTES: Final = 16 * 1024
"""The scratch buffer small messages are decrypted into (a TLS record is at most 16 KiB)."""
BODY_MIN: Final = 4 * 1024
"""Messages of at least this many bytes are decrypted into a buffer of their own; smaller ones wait in the scratch
buffer (which always has room for one: SCRATCH_BYTES > BODY_MIN + the length)."""
BODY_EAGER: Final = 1024 * 1024
"""A message's buffer is allocated whole up to this size; a longer one grows as its bytes arrive, so a length alone
(4 bytes) cannot make the reader hold up to the message limit."""
JOIN_BELOW: Final = 4 * 1024
"""Pieces shorter than this are joined with their neighbours before TLS: each piece written is a TLS record of its
own (22 bytes and a cipher call), where copying a short one costs less."""
HIGH_WATER: Final = 1024 * 1024
"""Bytes of messages read and not yet taken by `read` above which reading pauses (TCP then holds the peer back);
it resumes below half of it. Each message counts MESSAGE_COST more than its bytes."""
MESSAGE_COST: Final = 128
"""What a queued message holds beyond its bytes (its Python objects): a flood of empty messages (4 bytes on the wire
each) pauses reading too, rather than queueing without bound."""

FLUSH_SLACK: Final = 2 * 16 * 1024
"""Room beyond the TLS layer's undecrypted bytes in every buffer it is given (see `get_buffer`): OpenSSL reads one
record at a time (no read-ahead), so what it holds decrypted already is at most one record of up to 16 KiB."""

CHUNK_MIN: Final = 64 * 1024
"""The smallest chunk allocated (kept for the next read while no message handed over is a view of it)."""
SPARE_MAX: Final = 128 * 1024
"""A chunk larger than this is not kept for the next read (each connection may keep one while it lives)."""
VIEW_MIN: Final = 16 * 1024
"""Whole messages of at least this size in a chunk may be handed over as views of it, smaller ones are copied: a
view keeps the whole chunk alive (see `_slice`)."""

_PREAMBLE_SIZE: Final = len(PREAMBLE) + 1


class LinkConnection(asyncio.BufferedProtocol):
    """A direct link's connection once TLS is in place: `read_preamble`, then `read` (messages) and `send`.

    It is the application protocol given to `loop.start_tls`, which does not call `connection_made`: `attach`
    gives it the TLS transport `start_tls` returns (bytes may arrive before that; they are kept)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._transport: Any = None  # uvloop's transports are not asyncio's classes (mesh/loop.py)
        self._tcp: Any = None
        self._scratch = bytearray(SCRATCH_BYTES)
        self._view = memoryview(self._scratch)
        self._start = self._end = 0
        self._body: bytearray | None = None
        self._body_view: memoryview | None = None
        self._got = 0
        self._body_length = 0
        self._body_status = False
        self._preamble: bytes | None = None
        self._messages: collections.deque[tuple[Message, bool]] = collections.deque()
        self._queued = 0
        self._read_paused = False
        self._chunk: bytearray | None = None
        """The chunk `get_buffer` last gave (when the message being read, or the scratch buffer, had no room)."""
        self._spare: bytearray | None = None
        """A chunk nothing handed over refers to, for the next one."""
        self._waiter: asyncio.Future[None] | None = None
        self._failure: BaseException | None = None
        """Why reading stopped (a broken wire format, a lost connection): raised by `read` once the messages
        before it were taken."""
        self._eof = False
        self._write_paused = False
        self._drain_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._lost = False

    # ---- the transport's side ----------------------------------------------------------------------------------
    def attach(self, transport: Any, tcp: Any = None) -> None:
        """transport: the TLS transport `start_tls` returned; tcp: the connection's own, under it (paused and
        resumed for flow control, see `_deliver`)."""
        self._transport = transport
        self._tcp = transport if tcp is None else tcp
        if self._read_paused:
            self._tcp.pause_reading()
        if self._failure is not None:
            transport.pause_reading()

    def connection_made(self, transport: Any) -> None:
        self.attach(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        # The TLS layer may not ask again before it shuts down: at the peer's end (close_notify, then the TCP end at
        # once, as Go's and rustls' TLS close), asyncio's and uvloop's TLS layers read into one more buffer only,
        # then drop what they still hold. So TLS always gets room for all it holds: sizehint (the bytes it has not
        # decrypted; a little more in uvloop) and a record OpenSSL may hold decrypted. When the message being read
        # has that room, TLS decrypts into it; else into a chunk (`_take`).
        if self._chunk is not None:  # given last time and not used (TLS had nothing to decrypt): kept for next time
            if len(self._chunk) <= SPARE_MAX:
                self._spare = self._chunk
            self._chunk = None
        buffer = self._buffer()
        need = sizehint + FLUSH_SLACK
        if need <= len(buffer):
            return buffer
        chunk = self._spare
        if chunk is None or len(chunk) < need:
            chunk = bytearray(max(need, CHUNK_MIN))
        self._spare, self._chunk = None, chunk
        return memoryview(chunk)[:need]

    def _buffer(self) -> memoryview:
        if self._body_view is not None:
            return self._body_view[self._got:]
        return self._view[self._end:]  # never empty: see SCRATCH_BYTES (TLS would take no room for the end)

    def buffer_updated(self, nbytes: int) -> None:
        chunk = self._chunk
        if chunk is None:
            self._updated(nbytes)
            return
        self._chunk = None
        if not self._take(memoryview(chunk)[:nbytes]) and len(chunk) <= SPARE_MAX:
            self._spare = chunk  # nothing handed over refers to it: the next chunk

    def _take(self, data: memoryview) -> bool:
        """data (a chunk TLS decrypted into, `get_buffer`): whole large messages in it are handed over as views of it
        (smaller ones copied), and the rest goes through the buffers `_buffer` gives, as if TLS had decrypted it
        there (the end of the message being read, and the start of one the chunk ends inside). Whether a view of
        the chunk was handed over."""
        pos, end = 0, len(data)
        viewed = False
        while pos < end:
            if self._failure is not None:
                break
            if self._body is None and self._start == self._end and self._preamble is not None:
                pos, sliced = self._slice(data, pos, end)  # at a message's start, with nothing kept
                viewed = viewed or sliced
                if pos == end:
                    break
            buffer = self._buffer()
            count = min(len(buffer), end - pos)
            buffer[:count] = data[pos:pos + count]
            self._updated(count)
            pos += count
        return viewed

    def _slice(self, data: memoryview, pos: int, end: int) -> tuple[int, bool]:
        """Hand over the whole messages in data from pos (a message's start): the position of the first that is not
        whole (or end), and whether one was handed over as a view of data. Views only when messages of VIEW_MIN or
        more make at least half the chunk, so that what a view keeps alive is at most about twice what it holds."""
        whole: list[tuple[int, int, bool]] = []
        large = 0
        while end - pos >= HEADER.size:
            (length,) = HEADER.unpack_from(data, pos)
            status = bool(length & STATUS_BIT)
            length &= ~STATUS_BIT
            if length > self._limit or end - pos - HEADER.size < length:
                break  # (an over-limit length fails in `_parse`, from the scratch buffer)
            pos += HEADER.size
            whole.append((pos, length, status))
            if length >= VIEW_MIN:
                large += length
            pos += length
        views = large > 0 and 2 * large >= len(data.obj)  # type: ignore[arg-type]  # (the chunk, a bytearray)
        for at, length, status in whole:
            message = data[at:at + length]
            self._deliver(message if views and length >= VIEW_MIN else bytes(message), status)
        return pos, views

    def _updated(self, nbytes: int) -> None:
        if self._failure is not None:  # reading stopped: what still arrives is dropped
            self._start = self._end = 0
            return
        if self._body is not None:
            self._got += nbytes
            if self._got == len(self._body):
                if self._got < self._body_length:  # a long message: a buffer twice the size (see BODY_EAGER)
                    # A new one: the buffer TLS was given is still held (exported) while this runs.
                    grown = bytearray(min(2 * self._got, self._body_length))
                    grown[:self._got] = self._body
                    self._body, self._body_view = grown, memoryview(grown)
                    return
                body, status = self._body, self._body_status
                self._body = self._body_view = None
                self._deliver(body, status)
            return
        self._end += nbytes
        self._parse()

    def _parse(self) -> None:
        data, pos, end = self._scratch, self._start, self._end
        if self._preamble is None:
            if end - pos < _PREAMBLE_SIZE:
                return
            got = bytes(data[pos:pos + _PREAMBLE_SIZE])
            pos += _PREAMBLE_SIZE
            if got[:-1] != PREAMBLE:
                self._fail(LinkProtocolError("the peer's first bytes are not a hivemesh direct-link preamble"))
                return
            self._preamble = got
            self._wake()
        while end - pos >= HEADER.size:
            (length,) = HEADER.unpack_from(data, pos)
            status = bool(length & STATUS_BIT)
            length &= ~STATUS_BIT
            if length > self._limit:
                self._fail(LinkProtocolError(
                    f"a direct-link message of {length} bytes is over the {self._limit}-byte limit"))
                return
            have = end - pos - HEADER.size
            if have >= length:
                pos += HEADER.size
                self._deliver(bytes(self._view[pos:pos + length]), status)  # (one copy: a bytearray slice is one)
                pos += length
                continue
            if length >= BODY_MIN:  # the rest of it is decrypted straight into its own buffer
                body = bytearray(min(length, max(BODY_EAGER, have)))
                body[:have] = self._view[pos + HEADER.size:end]
                self._body, self._body_view = body, memoryview(body)
                self._got, self._body_length, self._body_status = have, length, status
                pos = end
            break
        if pos == end:
            self._start = self._end = 0
        elif pos:  # a part of a small message: moved to the front, where the scratch buffer has room for it all
            left = end - pos
            data[:left] = bytes(self._view[pos:end])  # (copied first: the two ranges may overlap)
            self._start, self._end = 0, left
        else:
            self._start = pos

    def _deliver(self, message: Message, status: bool) -> None:
        self._messages.append((message, status))
        self._queued += len(message) + MESSAGE_COST
        if self._queued > HIGH_WATER:
            # The TCP connection's reading is paused, not the TLS layer's: uvloop's TLS layer goes on reading TCP
            # under a paused application, and drops what it holds at the peer's TCP end (a proper close from Go's
            # or rustls' TLS: close_notify, then the end at once). Paused under TLS, the end waits with the bytes
            # before it. Paused again at each message while over: the TLS layer resumes TCP itself at times (while
            # its own writing is paused).
            self._read_paused = True
            if self._tcp is not None:
                self._tcp.pause_reading()
        self._wake()

    def _fail(self, failure: BaseException) -> None:
        if self._failure is None:
            self._failure = failure
        self._body = self._body_view = None
        self._start = self._end = 0
        if self._transport is not None:
            self._transport.pause_reading()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._eof = True
        if exc is not None and self._failure is None:
            self._failure = exc
        self._wake()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("the direct link's connection was lost"))
        self._drain_waiters.clear()
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # ---- the link's side ---------------------------------------------------------------------------------------
    @property
    def reading_paused(self) -> bool:
        """Reading is paused: more than HIGH_WATER bytes of messages wait to be taken by `read`."""
        return self._read_paused

    @property
    def lost(self) -> bool:
        """The connection is gone (closed, or broken)."""
        return self._lost

    async def _wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        await waiter

    async def read_preamble(self, timeout_s: float) -> int:
        """The peer's preamble, within timeout_s: its flags byte. LinkProtocolError for anything else."""
        try:
            async with asyncio.timeout(timeout_s):
                while self._preamble is None:
                    if self._failure is not None or self._eof:
                        break
                    await self._wait()
        except TimeoutError:
            pass
        if self._preamble is None:
            if isinstance(self._failure, LinkProtocolError):
                raise self._failure
            raise LinkProtocolError("the peer did not open the direct link with its preamble")
        return self._preamble[-1]

    async def read(self) -> tuple[Message, bool] | None:
        """The next message and whether it is the end status; None at a clean end of the connection (no bytes of a
        next message). Raises LinkProtocolError for a broken wire format, ConnectionResetError for a connection
        that ended inside a message, or the error it was lost with."""
        while not self._messages:
            if self._failure is not None:
                raise self._failure.with_traceback(None)  # (raised again: its traceback would only grow)
            if self._eof:
                if self._body is not None or self._end > self._start:
                    raise ConnectionResetError("the direct link's connection ended inside a message")
                return None
            await self._wait()
        message, status = self._messages.popleft()
        self._queued -= len(message) + MESSAGE_COST
        if self._read_paused and self._queued <= HIGH_WATER // 2:
            self._read_paused = False
            if self._tcp is not None and self._failure is None:
                self._tcp.resume_reading()
        return message, status

    def send(self, pieces: Sequence[bytes], size: int, *, status: bool = False) -> None:
        """Queue one message of size bytes, made of pieces (sent as they are: not copied into one buffer but where
        they are short)."""
        head = HEADER.pack(size | (STATUS_BIT if status else 0))
        if size < JOIN_BELOW:
            self._transport.write(b"".join((head, *pieces)))
            return
        out: list[bytes] = []
        short: list[bytes] = [head]
        for piece in pieces:
            if len(piece) < JOIN_BELOW:
                short.append(piece)
                continue
            if short:
                out.append(short[0] if len(short) == 1 else b"".join(short))
                short = []
            out.append(piece)
        if short:
            out.append(b"".join(short))
        self._transport.writelines(out)

    def write(self, data: bytes) -> None:
        """Queue raw bytes (the preamble)."""
        self._transport.write(data)

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark. ConnectionResetError once the
        connection is lost."""
        if self.is_closing():
            await asyncio.sleep(0)  # as StreamWriter.drain: a closing transport's loss may be about to arrive
        if self._lost:
            raise ConnectionResetError("the direct link's connection was lost")
        if not self._write_paused:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def is_closing(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default if self._transport is None else self._transport.get_extra_info(name, default)

    def close(self) -> None:
        """Close after what is buffered is sent (TLS closes properly)."""
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

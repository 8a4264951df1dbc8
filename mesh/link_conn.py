"""The direct link's wire (`mesh/link_direct.py` describes it), and one connection's messages read and written on
its TLS transport.

This is an asyncio buffered protocol rather than a StreamReader. perf of `bench/peers.py`'s agent at 64 KiB and 16
in flight found copying 16% of its CPU, and a StreamReader copies each message three times after TLS has decrypted
it: into a chunk joined for `data_received`, into its buffer, and out of it by `readexactly` (with the rest of the
buffer moved down). Here TLS decrypts a large message (`BODY_MIN` bytes or more) straight into a buffer of its
own, which is handed over as it is; smaller ones are decrypted into a scratch buffer and copied out once. Writing,
a message's pieces (`mesh/link_wire.py` writes a large payload as a piece of its own, not copied into the frame)
go to TLS as they are, in one transport write: one socket write, not one for the length and one for the body.

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
"""Room beyond the TLS layer's undecrypted bytes for its first read after a resume (see `get_buffer`): OpenSSL reads
one record at a time (no read-ahead), so what it holds already is at most one record of up to 16 KiB."""

_PREAMBLE_SIZE: Final = len(PREAMBLE) + 1


class LinkConnection(asyncio.BufferedProtocol):
    """A direct link's connection once TLS is in place: `read_preamble`, then `read` (messages) and `send`.

    It is the application protocol given to `loop.start_tls`, which does not call `connection_made`: `attach`
    gives it the TLS transport `start_tls` returns (bytes may arrive before that; they are kept)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._transport: Any = None  # uvloop's transports are not asyncio's classes (mesh/loop.py)
        self._scratch = bytearray(SCRATCH_BYTES)
        self._view = memoryview(self._scratch)
        self._start = self._end = 0
        self._body: bytearray | None = None
        self._body_view: memoryview | None = None
        self._got = 0
        self._body_length = 0
        self._body_status = False
        self._preamble: bytes | None = None
        self._messages: collections.deque[tuple[bytearray | bytes, bool]] = collections.deque()
        self._queued = 0
        self._read_paused = False
        self._resumed = False
        """Reading was resumed and TLS has not asked for a buffer since (see `get_buffer`)."""
        self._overflow: memoryview | None = None
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
    def attach(self, transport: Any) -> None:
        self._transport = transport
        if self._read_paused or self._failure is not None:
            transport.pause_reading()

    def connection_made(self, transport: Any) -> None:
        self.attach(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        buffer = self._buffer()
        if self._resumed:
            # The first read after a resume may be the TLS layer's last: when the peer's end arrived while reading
            # was paused, CPython's sslproto reads into one buffer only, then shuts down (its flush). So that one
            # read gets room for all it holds (sizehint: the bytes it has not decrypted, and OpenSSL may hold
            # a record it has), copied in by `_take`.
            self._resumed = False
            if sizehint + FLUSH_SLACK > len(buffer):
                self._overflow = memoryview(bytearray(sizehint + FLUSH_SLACK))
                return self._overflow
        return buffer

    def _buffer(self) -> memoryview:
        if self._body_view is not None:
            return self._body_view[self._got:]
        return self._view[self._end:]  # never empty: see SCRATCH_BYTES (TLS would take no room for the end)

    def buffer_updated(self, nbytes: int) -> None:
        overflow = self._overflow
        if overflow is not None:
            self._overflow = None
            self._take(overflow[:nbytes])
            return
        self._updated(nbytes)

    def _take(self, data: memoryview) -> None:
        """data, as if TLS had decrypted it into the buffers `_buffer` gives."""
        pos = 0
        while pos < len(data):
            buffer = self._buffer()
            count = min(len(buffer), len(data) - pos)
            buffer[:count] = data[pos:pos + count]
            self._updated(count)
            pos += count

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

    def _deliver(self, message: bytearray | bytes, status: bool) -> None:
        self._messages.append((message, status))
        self._queued += len(message) + MESSAGE_COST
        if self._queued > HIGH_WATER and not self._read_paused:
            self._read_paused = True
            if self._transport is not None:
                self._transport.pause_reading()
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

    async def read(self) -> tuple[bytearray | bytes, bool] | None:
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
            if self._transport is not None and self._failure is None:
                self._resumed = True
                self._transport.resume_reading()
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

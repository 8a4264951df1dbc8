"""The direct link: the Link protocol on its own mutual-TLS connection, without gRPC.

`Agent/Link` carries a caller's unary calls as frames on one gRPC stream (`mesh/link_server.py`,
`mesh/outbound/link.py`). Measured in one run on this 2-core machine (BENCHMARKS.md), gRPC's asyncio stream is
most of a linked call's cost: an echo over it took ~430 µs of CPU per 64 KiB call (both ends) and ~260 µs per
200 B message, where the same echo over asyncio's own TLS connection took ~250 µs and ~22 µs, at 1.6x and 15x the
calls/s. gRPC hands every message between its poller thread and the event loop; a direct link's bytes are read
and written on the event loop itself.

The direct link changes the pipe only. Its messages are the Link messages `mesh/link_wire.py` reads and writes (a
LinkFrame or a batch), served by the same `LinkServer`: every call frame passes the same inbound chain (identity,
token, authorization, limits, audit) as it does on `Agent/Link`. Both ends present their workload certificates:
the server requires one chaining to the trust bundle, and the inbound chain reads the caller's identity from it
as it reads gRPC's; the client checks the server's DNS SAN (`<name>.<kind>.<trust-domain>`), as gRPC's hostname
check does, so a process holding another identity's address cannot answer for it. TLS 1.3 only.

The wire: on a new TCP connection the server first sends one plaintext byte, `GO`, once its TLS layer is in place,
and the client begins TLS only then (uvloop, which runs hivemesh's processes, hands a connection's first bytes to
the protocol that accepted it even when that protocol paused reading at once, so a ClientHello sent at once was
lost before the server's TLS layer took over: `open_tls`). After the TLS handshake the client sends `PREAMBLE` and
one flags byte (`FLAG_BATCHES`: it reads batches), the server answers the same. Then each side sends messages,
each a 4-byte big-endian length and that many bytes: the client call and cancel frames, the server answer frames.
A length with its top bit set is the server's last message: the link's end status (a `google.rpc.Status`: OK when
every call was answered). An empty message from the client says it sends no more calls. A message over the limit,
a bad preamble or a silent peer ends the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import tempfile
from collections.abc import Sequence
from typing import Any, Final

import grpc
from google.rpc import status_pb2

from hivemesh.mesh import link_wire
from hivemesh.mesh.link_conn import FLAG_BATCHES, GO, PREAMBLE, LinkConnection, LinkProtocolError, Message
from hivemesh.mesh.link_context import status_code
from hivemesh.mesh.link_frames import BATCH_ANNOUNCE
from hivemesh.mesh.link_wire import Outgoing
from hivemesh.mesh.tls import MAX_MESSAGE_BYTES, Workload

HANDSHAKE_TIMEOUT_S: Final = 10.0
"""TLS handshake and preamble, each way: a peer silent longer is not a mesh peer."""
KEEPALIVE_IDLE_S: Final = 30
KEEPALIVE_INTERVAL_S: Final = 5
KEEPALIVE_COUNT: Final = 2
USER_TIMEOUT_MS: Final = 40_000
"""TCP keepalive (probes after 30 s idle, 2 more 5 s apart) and TCP_USER_TIMEOUT (data unacknowledged for 40 s):
a peer that vanished without closing the connection is found within ~40 s, as a mesh channel's gRPC keepalive
finds it (`mesh/tls.py`)."""


def _load_identity(context: ssl.SSLContext, workload: Workload) -> None:
    """Load workload's certificate and key into context. Python's ssl reads them only from files: they are written
    to a private temporary folder (mode 0700) and removed at once."""
    with tempfile.TemporaryDirectory(prefix="hivemesh-link-") as folder:
        cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
        for path, data in ((cert, workload.cert_pem), (key, workload.key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        context.load_cert_chain(cert, key)


def _tls13(context: ssl.SSLContext, workload: Workload) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=workload.bundle_pem.decode("ascii"))
    _load_identity(context, workload)
    return context


def server_context(workload: Workload) -> ssl.SSLContext:
    """The server's TLS context for workload: its certificate, and a client certificate chaining to its bundle
    required."""
    return _tls13(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), workload)


def client_context(workload: Workload) -> ssl.SSLContext:
    """The client's TLS context for workload: its certificate, and a server certificate chaining to its bundle that
    names the host name the connection asks for (the peer identity's DNS SAN)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname on
    return _tls13(context, workload)


def tune_socket(transport: Any) -> None:
    """No Nagle delay (calls are small and waited on), and keepalive to find a vanished peer (see USER_TIMEOUT_MS)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)


class _AwaitGo(asyncio.Protocol):
    """A new connection to a direct-link port, before TLS: waits for the server's `GO`."""

    def __init__(self) -> None:
        self.go: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if not self.go.done():
            if data == GO:
                self.go.set_result(None)
            else:
                self.go.set_exception(
                    LinkProtocolError(f"the peer's first bytes are not a direct link's ({data[:8]!r})"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.go.done():
            self.go.set_exception(ConnectionResetError("the peer closed the connection before it was ready for TLS"))


async def open_tls(
    host: str, port: int, context: ssl.SSLContext, server_hostname: str | None, *, limit: int = MAX_MESSAGE_BYTES,
) -> LinkConnection:
    """A direct-link connection, client side: TCP, the server's `GO`, then the TLS handshake (each step within
    HANDSHAKE_TIMEOUT_S). Raises OSError, ssl.SSLError, TimeoutError, or LinkProtocolError for a first byte that
    is not GO (not a direct-link port)."""
    loop = asyncio.get_running_loop()
    transport, waiting = await asyncio.wait_for(loop.create_connection(_AwaitGo, host, port), HANDSHAKE_TIMEOUT_S)
    try:
        await asyncio.wait_for(waiting.go, HANDSHAKE_TIMEOUT_S)
        connection = LinkConnection(limit)
        tls = await loop.start_tls(transport, connection, context, server_hostname=server_hostname,
                                   ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
    except BaseException:
        transport.abort()
        raise
    if tls is None:  # the connection closed during the handshake
        transport.abort()
        raise ConnectionResetError("the peer closed the connection during the TLS handshake")
    connection.attach(tls, transport)
    return connection


def _unavailable(message: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), message)


class DirectStream:
    """The client end of one direct link, with what `mesh/outbound/link.py`'s `_Link` uses of a gRPC stream-stream
    call (write, done_writing, initial_metadata, iteration, cancel) and the same errors (`grpc.aio.AioRpcError`):
    UNAVAILABLE when the connection cannot be made or breaks, the server's end status otherwise. `write_frames`
    sends frames without packing them into one buffer first (`LinkConnection.send`)."""

    def __init__(self, host: str, port: int, server_name: str, context: ssl.SSLContext) -> None:
        self._host, self._port, self._server_name, self._context = host, port, server_name, context
        self.connected = False
        """The TLS handshake and preambles completed: the peer serves direct links."""
        self.failure = ""
        """Why it did not connect (once `settled` and not `connected`)."""
        self._connection: LinkConnection | None = None
        self._batches = False
        self._open = asyncio.get_running_loop().create_task(self._connect())
        self._open.add_done_callback(_retrieve)

    async def _connect(self) -> None:
        try:
            connection = await open_tls(self._host, self._port, self._context, self._server_name)
        except (OSError, ssl.SSLError, TimeoutError, LinkProtocolError) as exc:
            self.failure = str(exc) or type(exc).__name__
            raise _unavailable(f"cannot open a direct link to {self._host}:{self._port}: {self.failure}") from None
        self._connection = connection
        tune_socket(connection)
        connection.write(PREAMBLE + bytes([FLAG_BATCHES]))
        try:
            flags = await connection.read_preamble(HANDSHAKE_TIMEOUT_S)
        except (LinkProtocolError, OSError, ssl.SSLError) as exc:
            connection.abort()
            self.failure = f"refused: {exc}"
            raise _unavailable(f"the direct link to {self._host}:{self._port} was {self.failure}") from None
        self._batches = bool(flags & FLAG_BATCHES)
        self.connected = True

    @property
    def settled(self) -> bool:
        """Connected, or failed to."""
        return self._open.done()

    async def initial_metadata(self) -> Sequence[tuple[str, str]]:
        await self._open
        return BATCH_ANNOUNCE if self._batches else ()

    async def write_frames(self, frames: Sequence[Outgoing]) -> None:
        """Send frames as one message (a batch of several)."""
        await self._open
        connection = self._connection
        assert connection is not None
        if connection.is_closing():
            raise _unavailable("the direct link to the peer is closed")
        pieces, size = link_wire.pieces(frames)
        connection.send(pieces, size)
        try:
            await connection.drain()
        except (OSError, ssl.SSLError) as exc:
            raise _unavailable(f"the direct link to the peer broke: {exc}") from None

    async def done_writing(self) -> None:
        await self.write_frames(())

    def __aiter__(self) -> DirectStream:
        return self

    async def __anext__(self) -> Message:
        await self._open
        connection = self._connection
        assert connection is not None
        try:
            got = await connection.read()
        except (OSError, ssl.SSLError, LinkProtocolError) as exc:
            raise _unavailable(f"the direct link to the peer broke: {exc}") from None
        if got is None:
            raise _unavailable("the peer closed the direct link")
        message, is_status = got
        if not is_status:
            return message
        status = status_pb2.Status.FromString(bytes(message))  # (the end status: a few bytes)
        if status.code == 0:
            raise StopAsyncIteration
        raise grpc.aio.AioRpcError(status_code(status.code), grpc.aio.Metadata(), grpc.aio.Metadata(),
                                   status.message)

    def cancel(self) -> bool:
        self._open.cancel()
        if self._connection is not None:
            self._connection.abort()
        return True


def _retrieve(task: asyncio.Task[Any]) -> None:
    """The connect task's failure is raised to whoever awaits it; when nobody did, it is not logged as lost."""
    if not task.cancelled():
        task.exception()


def split_address(address: str) -> tuple[str, int]:
    """host and port of "host:port" ("[v6]:port" too); ValueError for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"not a host:port address: {address!r}")
    return host.strip("[]"), int(port)

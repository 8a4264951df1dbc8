"""The server end of direct links (`mesh/link_direct.py`): a mutual-TLS listener whose connections are served by
a node's `LinkServer`, as its `Agent/Link` streams are.

The listening context holds no certificate and no trust anchor: OpenSSL's server-name callback, which runs for
every ClientHello (with or without SNI), gives each handshake the node's current context (`update_workload`), so a
renewed certificate or a rotated trust bundle applies to the next handshake without reopening the port, and a
trust anchor taken out of the bundle is no longer trusted by it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Never

import grpc
from google.rpc import status_pb2

from hivemesh.mesh import link_wire
from hivemesh.mesh.audit.handshake.audit import HandshakeAudit
from hivemesh.mesh.audit.handshake.events import HandshakeFailure, Listener
from hivemesh.mesh.env_switch import env_switch
from hivemesh.mesh.link_conn import FLAG_BATCHES, GO, PREAMBLE, LinkConnection, LinkProtocolError, Message
from hivemesh.mesh.link_direct import HANDSHAKE_TIMEOUT_S, server_context, tune_socket
from hivemesh.mesh.link_frames import BATCH_ANNOUNCE
from hivemesh.mesh.link_server import LinkServer
from hivemesh.mesh.tls import Workload

if TYPE_CHECKING:
    from hivemesh.mesh.audit import AuditLog
    from hivemesh.mesh.node import MeshNode

log = logging.getLogger(__name__)

CLOSE_GRACE_S = 5.0
"""How long `close` lets open links finish the calls they hold before it cuts them."""
CLOSE_FLUSH_S = 5.0
"""How long a link that ended has to deliver its last bytes before its connection is cut."""
MAX_HANDSHAKES = 256
"""Connections at once between accept and a finished TLS handshake; one more is closed at once (and audited as a
refused handshake). Anyone who reaches the port can hold one for the handshake timeout without a certificate: this
bounds what they hold, while callers with one are unaffected (a handshake takes milliseconds)."""


class _LinkAbortedError(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _ConnectionContext:
    """What `LinkServer.serve` and the calls' `FrameContext` use of a gRPC servicer context, for one connection."""

    def __init__(self, writer: LinkConnection, batches: bool, auth: Mapping[str, Iterable[bytes]]) -> None:
        self._writer = writer
        self._metadata: tuple[tuple[str, str], ...] = BATCH_ANNOUNCE if batches else ()
        self._auth = auth
        self._peer = _grpc_address(writer.get_extra_info("peername") or ("", 0))
        self.answered_preamble = False

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def auth_context(self) -> Mapping[str, Iterable[bytes]]:
        return self._auth

    def peer(self) -> str:
        return self._peer

    def peer_identities(self) -> Iterable[bytes] | None:
        return None

    def peer_identity_key(self) -> str | None:
        return None

    def cancelled(self) -> bool:
        return self._writer.is_closing()

    def done(self) -> bool:
        return self._writer.is_closing()

    def time_remaining(self) -> float | None:
        return None

    async def send_initial_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        flags = FLAG_BATCHES if any(k == BATCH_ANNOUNCE[0][0] and v == BATCH_ANNOUNCE[0][1] for k, v in metadata) else 0
        self._writer.write(PREAMBLE + bytes([flags]))
        self.answered_preamble = True

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> Never:
        raise _LinkAbortedError(code, details)


class _Frames:
    """The client's messages until it says it sends no more (an empty one); a connection that ends first raises
    (the link's calls are cancelled, as a cancelled Agent/Link stream's are); a break of the wire format ends them
    too, noted as `problem`."""

    def __init__(self, connection: LinkConnection) -> None:
        self._connection = connection
        self.problem = ""

    async def read(self) -> AsyncIterator[Message]:
        while True:
            try:
                got = await self._connection.read()
            except LinkProtocolError as exc:
                self.problem = str(exc)
                return
            if got is None:  # no empty message first: the peer went, not done sending; its calls are cancelled
                raise ConnectionResetError("the peer closed the direct link without ending its calls")
            message, status = got
            if status:
                self.problem = "a client sent a direct-link end status, which only a server sends"
                return
            if not message:
                return
            yield message


def _auth_of(writer: LinkConnection) -> Mapping[str, Iterable[bytes]]:
    """The verified client certificate as gRPC's auth context names it (`x509_pem_cert`), for the inbound chain."""
    sslobj = writer.get_extra_info("ssl_object")
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    if not der:
        return MappingProxyType({})
    return MappingProxyType({"x509_pem_cert": [ssl.DER_cert_to_PEM_cert(der).encode("ascii")],
                             "transport_security_type": [b"ssl"]})


def _grpc_address(sockname: Any) -> str:
    """A socket address as gRPC writes it (`ipv4:127.0.0.1:5000`, `ipv6:[::1]:5000`): what the handshake audit
    reads ports from."""
    host, port = str(sockname[0]), sockname[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


class DirectHandshakeEvents:
    """The direct listener's failed handshakes as a `HandshakeEvents` source: reported by the listener itself, on
    the event loop (nothing to enable, unlike gRPC's, read from its tracer)."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def start(self) -> str:
        return ""

    def listen(self, fn: Listener) -> Callable[[], None]:
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    def report(self, failure: HandshakeFailure) -> None:
        for fn in list(self._listeners):
            try:
                fn(failure)
            except Exception:
                log.exception("a handshake listener failed")


class _Accepting(asyncio.Protocol):
    """A new TCP connection to the listener, until its TLS layer is in place (`_accept`). Reading is paused, but
    uvloop may still hand over what it read with the connection: a client that did not wait for `GO` loses it, and
    its handshake fails."""

    def __init__(self, listener: DirectLinkListener) -> None:
        self._listener = listener

    def connection_made(self, transport: Any) -> None:
        # Any: uvloop's transports (hivemesh's own processes run on uvloop, mesh/loop.py) are not asyncio's classes.
        tune_socket(transport)
        transport.pause_reading()
        self._listener._accepted(transport)


class DirectLinkListener:
    """Serves direct links on host:port (0: any free port) through link, authenticated as workload."""

    def __init__(self, link: LinkServer, workload: Workload, host: str, port: int = 0) -> None:
        self._link = link
        self._host, self._port = host, port
        self._current = server_context(workload)
        self._listening = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no certificate of its own: see the module doc
        self._listening.minimum_version = ssl.TLSVersion.TLSv1_3
        # OpenSSL keeps a connection's verify mode from the context it began with, not the one SNI switches it to:
        # without this the client certificate is never asked for. The trust anchors are the switched context's.
        self._listening.verify_mode = ssl.CERT_REQUIRED
        # No session resumption: a resumed session skips the client-certificate check, so it would outlive a
        # rotated trust bundle or an expired certificate. (Tickets are the listening context's, whatever SNI chose.)
        self._listening.num_tickets = 0
        self._listening.options |= ssl.OP_NO_TICKET
        self._listening.sni_callback = self._choose
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self.port = 0
        """The port listened on, once started."""
        self.refused = 0
        """Connections refused: a failed TLS handshake, or no preamble after it."""
        self.handshake_timeout_s = HANDSHAKE_TIMEOUT_S
        """How long a new connection has for its TLS handshake, and then for its preamble."""
        self._closing = False
        self.max_handshakes = MAX_HANDSHAKES
        self._handshaking: set[asyncio.Transport] = set()
        """Connections accepted whose TLS handshake has not finished (see MAX_HANDSHAKES)."""
        self.handshake_events = DirectHandshakeEvents()
        """The failed handshakes, for a `HandshakeAudit` of this port."""
        self.on_close: Callable[[], Awaitable[None]] | None = None

    def _choose(self, sslobj: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        sslobj.context = self._current

    def update_workload(self, workload: Workload) -> None:
        """Use workload (a renewed certificate, a new trust bundle) for every handshake from now on."""
        self._current = server_context(workload)

    async def start(self) -> None:
        # Plain TCP here, TLS in `_accept`: a handshake the loop made itself would fail where nobody hears it (at
        # best a log line); made here, each refusal is counted and told to `handshake_events` (the audit). The
        # client begins TLS only on `GO`, sent once the TLS protocol is in place (see mesh/link_direct.py).
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Accepting(self), self._host, self._port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def _accepted(self, transport: asyncio.Transport) -> None:
        if self._closing:  # accepted as the port closed: `close` would not see its task
            transport.abort()
            return
        if len(self._handshaking) >= self.max_handshakes:
            self._refused(transport, f"too many handshakes in progress ({self.max_handshakes})")
            transport.abort()
            return
        self._handshaking.add(transport)
        task = asyncio.get_running_loop().create_task(self._accept(transport))
        task.add_done_callback(lambda _: self._handshaking.discard(transport))  # (cancelled before it ran, too)
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _accept(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        connection = LinkConnection(self._link.max_message_bytes)
        tls: asyncio.Transport | None = None
        handshake: asyncio.Task[Any] | None = None
        accepting = transport.get_protocol()
        try:
            try:
                handshake = loop.create_task(loop.start_tls(transport, connection, self._listening, server_side=True,
                                                            ssl_handshake_timeout=self.handshake_timeout_s))
                # start_tls puts its TLS protocol in place at its first step; only then may the client begin (GO).
                for _ in range(100):
                    if transport.get_protocol() is not accepting or handshake.done():
                        break
                    await asyncio.sleep(0)
                if not handshake.done():
                    transport.write(GO)
                tls = await handshake
            except TimeoutError:
                self._refused(transport, "Handshake timed out")
                return
            except (ssl.SSLError, OSError, EOFError) as exc:
                self._refused(transport, str(exc) or type(exc).__name__)
                return
            if tls is None:
                self._refused(transport, "the connection closed during the handshake")
                return
            self._handshaking.discard(transport)
            connection.attach(tls, transport)
            await self._serve(connection)
        finally:
            if handshake is not None and not handshake.done():  # cancelled before it was awaited
                handshake.cancel()
            (tls or transport).abort()

    def _refused(self, transport: asyncio.BaseTransport, error: str) -> None:
        self.refused += 1
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        failure = HandshakeFailure(local=_grpc_address(local), peer=_grpc_address(peer), error=error)
        self.handshake_events.report(failure)

    async def _serve(self, connection: LinkConnection) -> None:
        try:
            flags = await connection.read_preamble(self.handshake_timeout_s)
        except (LinkProtocolError, OSError, ssl.SSLError) as exc:
            self.refused += 1
            log.info("refused a direct link from %s: %s", connection.get_extra_info("peername"), exc)
            auth = _auth_of(connection)
            if auth:  # a verified peer: recorded as a Link message that does not decode is
                self._link.record_refusal(_ConnectionContext(connection, False, auth), str(exc))  # type: ignore[arg-type]
            return
        context = _ConnectionContext(connection, bool(flags & FLAG_BATCHES), _auth_of(connection))
        status = status_pb2.Status(code=0)
        frames = _Frames(connection)
        try:
            # aclosing: a failed write ends the link server's generator now (its calls are cancelled there).
            served: Any = self._link.serve(frames.read(), context, encode=link_wire.pieces)  # type: ignore[arg-type]
            async with contextlib.aclosing(served) as answers:
                async for pieces, size in answers:
                    connection.send(pieces, size)
                    await connection.drain()
        except _LinkAbortedError as aborted:
            status = status_pb2.Status(code=aborted.code.value[0], message=aborted.details)
        except (OSError, ssl.SSLError):
            return  # the connection broke: nobody to tell
        if frames.problem:  # recorded as a Link message that does not decode is (one decision, the sender's id)
            self._link.record_refusal(context, frames.problem)  # type: ignore[arg-type]
            status = status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=frames.problem)
        if not context.answered_preamble:
            await context.send_initial_metadata(())
        with contextlib.suppress(OSError, ssl.SSLError):
            end = status.SerializeToString()
            connection.send((end,), len(end), status=True)
            await connection.drain()
        # Flush what is still buffered (the last answers, the end status) and close TLS properly: the abort in
        # `_accept`, the fallback, drops it, and the caller would count answered calls as failed.
        connection.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(connection.wait_closed(), CLOSE_FLUSH_S)

    async def close(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Stop listening; let open links answer the calls they hold (the link server drains them) for up to
        grace_s, then cut them."""
        self._closing = True
        if self.on_close is not None:
            await self.on_close()
            self.on_close = None
        if self._server is not None:
            self._server.close()
        if self._connections:
            self._link.drain()
            await asyncio.wait(list(self._connections), timeout=grace_s)
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=1.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None


DIRECT_ENV = "HIVEMESH_LINK_DIRECT"
DIRECT_PORT_ENV = "HIVEMESH_LINK_DIRECT_PORT"


def direct_port(environ: Mapping[str, str] | None = None) -> int:
    """The port direct links listen on: $HIVEMESH_LINK_DIRECT_PORT, else 0 (a free one, advertised in the
    registry). A deployment whose network policy admits only named ports gives one (deploy/k8s uses 7445)."""
    raw = (os.environ if environ is None else environ).get(DIRECT_PORT_ENV, "").strip()
    if not raw:
        return 0
    if not raw.isdigit() or int(raw) > 65535:
        raise ValueError(f"{DIRECT_PORT_ENV} must be a port number, 0-65535 (0: a free one): {raw!r}")
    return int(raw)


def direct_enabled(value: bool | None) -> bool:
    """Whether a node that serves Link also serves direct links: value if given, else $HIVEMESH_LINK_DIRECT
    ("1"/"true"/"on" or "0"/"false"/"off"), else on."""
    return env_switch(DIRECT_ENV, value)


async def open_direct_listener(
    link: LinkServer, node: MeshNode, host: str, audit: AuditLog | None,
) -> DirectLinkListener:
    """A started listener for link's direct links on host (`direct_port`), serving as node's current workload
    (`MeshNode.workload_listeners`) until it is closed; with audit, its refused handshakes are audited as the gRPC
    port's are (records, the node's handshake-refusal metrics, `hivemesh status`)."""
    listener = DirectLinkListener(link, node.workload, host, direct_port())
    await listener.start()
    node.workload_listeners.append(listener.update_workload)
    handshakes: HandshakeAudit | None = None
    if audit is not None:
        handshakes = HandshakeAudit(audit, host, listener.port, events=listener.handshake_events)
        try:
            await handshakes.start()
        except BaseException:
            node.workload_listeners.remove(listener.update_workload)
            await listener.close(0)
            raise
        if node.metrics is not None:
            node.metrics.watch_handshakes(handshakes)
        node.status_extras.append(handshakes.add_to_status)  # `hivemesh status`: after the gRPC port's

    async def on_close() -> None:
        with contextlib.suppress(ValueError):
            node.workload_listeners.remove(listener.update_workload)
        if handshakes is not None:
            with contextlib.suppress(ValueError):
                node.status_extras.remove(handshakes.add_to_status)
            await handshakes.close()

    listener.on_close = on_close
    return listener

"""What the pipe alone costs: an echo of N-byte messages with 16 in flight over mutual TLS, server in a child
process, alternated in one run over:
(a) asyncio's own TLS connection with 4-byte length framing, read by a buffered protocol (what a direct link is,
    mesh/link_direct.py; until 6 Dec a plain protocol that copied each message three more times);
(b) a gRPC bidirectional stream (what Agent/Link is);
(c) the same framing with the server's TLS and socket work on a thread of its own (one per connection);
(d) the same framing with the server's TLS on the socket itself (a non-blocking `ssl.SSLSocket` the event loop's
    reader and writer callbacks drive: no memory BIOs, so none of their copies);
(e) the same framing on plain TCP, no TLS at either end: not a pipe the mesh may use, but the floor under (a),
    what any TLS implementation (compiled, on a thread, in the kernel) could at best bring (a) down to.
The servers of (a), (c), (d) and (e) and their client read messages with one reader (`_Framed`): the pipes differ in
where the server's TLS runs, or, for (e), that there is none.

No mesh work at all: this measures how much of a linked call the transport is, the evidence for direct links
(BENCHMARKS.md). `--work-us` gives the server that much Python work per message, holding the GIL as an agent's
per-call code does: what (c), the design a direct link would take to move TLS off the event loop's thread, gains
when the loop also runs the calls, and what (d) does. `--loop uvloop` runs both ends on uvloop, as the mesh does
(mesh/loop.py). Usage: `python bench/transport_echo.py [--size 65536] [--rounds 3] [--seconds 4] [--work-us 0]
[--loop asyncio] [--pipes asyncio grpc thread socket plain]`."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import multiprocessing as mp
import os
import resource
import select
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

INFLIGHT = 16
HEADER = struct.Struct(">I")
PEMS: dict[str, bytes] = {}
"""The certificate's and key's bytes by path, read before the event loop runs."""
OPTS: dict[str, Any] = {"work_us": 0.0, "loop": "asyncio"}
"""--work-us and --loop, handed to each server process as it starts."""
SPAWN = mp.get_context("spawn")
"""Server processes start as fresh interpreters: by the time of a later round this driver has run gRPC's threads,
and a fork() of it may die in gRPC's fork handlers (tests/support/rlimits.py)."""


def _run(main: Coroutine[Any, Any, Any]) -> Any:
    if OPTS["loop"] == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def _work() -> None:
    """The server's Python work per message (--work-us), holding the GIL."""
    end = time.perf_counter() + OPTS["work_us"] / 1e6
    while time.perf_counter() < end:
        pass


def make_cert(folder: Path) -> tuple[str, str]:
    """A self-signed localhost certificate (also its own CA): (cert path, key path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def tls_context(cert: str, key: str, *, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cert)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _Framed:
    """A server's read buffer, the same for every pipe: TLS decrypts into it (`room`), and `take` hands over each
    whole message in it (one copy out of it a message, as the direct link's reader hands a small message over)
    and keeps the rest."""

    def __init__(self) -> None:
        self.buf = bytearray(256 * 1024)
        self.view = memoryview(self.buf)
        self.end = 0

    def room(self) -> memoryview:
        return self.view[self.end:]

    def take(self, got: int) -> list[bytes]:
        """The whole messages (header included) now in the buffer, got more bytes having arrived in its room."""
        self.end += got
        messages: list[bytes] = []
        pos = 0
        while self.end - pos >= HEADER.size:
            (n,) = HEADER.unpack_from(self.buf, pos)
            if self.end - pos - HEADER.size < n:
                break
            messages.append(bytes(self.view[pos:pos + HEADER.size + n]))
            pos += HEADER.size + n
        if pos:
            self.buf[:self.end - pos] = self.view[pos:self.end]
            self.end -= pos
        return messages


def _echo(messages: list[bytes], write: Callable[[bytes], None]) -> None:
    for message in messages:
        _work()
        write(message)


class _Echo(asyncio.BufferedProtocol):
    """(a)'s server: a buffered protocol, as the direct link's reader is (TLS decrypts into its buffer)."""

    def __init__(self) -> None:
        self.framed = _Framed()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.framed.room()

    def buffer_updated(self, nbytes: int) -> None:
        _echo(self.framed.take(nbytes), self.transport.write)


def _serving(serve: Callable[[str, str, Any], None], opts: dict[str, Any], cert: str, key: str, port: Any) -> None:
    """A server process's entry: the driver's options, then the pipe's server."""
    OPTS.update(opts)
    serve(cert, key, port)


def _serve_tls(cert: str, key: str, port: Any) -> None:
    _serve_framed(tls_context(cert, key, server=True), port)


def _serve_plain(cert: str, key: str, port: Any) -> None:
    _serve_framed(None, port)


def _serve_framed(context: ssl.SSLContext | None, port: Any) -> None:
    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_Echo, "127.0.0.1", 0, ssl=context)
        port.put(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()
    _run(main())


class _TlsThread(threading.Thread):
    """One connection's handshake, TLS and socket work on a thread of its own (OpenSSL and the socket calls let go
    of the GIL), the event loop seeing only whole plaintext messages (`on_messages`, one hand-over per read) and
    handing answers back through a queue and a wake-up pipe. One thread does both directions: an SSL object must
    not be used by two threads at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, context: ssl.SSLContext,
                 on_messages: Callable[[_TlsThread, list[bytes]], None]) -> None:
        super().__init__(daemon=True)
        self.loop, self.sock, self.on_messages = loop, sock, on_messages
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.pending: collections.deque[bytes] = collections.deque()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        self.woken = False

    def send(self, message: bytes) -> None:
        """From the event loop's thread."""
        self.pending.append(message)
        if not self.woken:
            self.woken = True
            os.write(self.wake_w, b"w")

    def run(self) -> None:
        sock, tls = self.sock, self.tls
        sock.setblocking(False)
        poller = select.poll()
        poller.register(self.wake_r, select.POLLIN)
        poller.register(sock, select.POLLIN)
        buf = bytearray(256 * 1024)
        view = memoryview(buf)
        framed, out = _Framed(), bytearray()
        handshaken = False
        try:
            while True:
                poller.modify(sock, select.POLLIN | (select.POLLOUT if out else 0))
                poller.poll()
                with contextlib.suppress(BlockingIOError):
                    os.read(self.wake_r, 4096)
                self.woken = False
                while self.pending:
                    tls.write(self.pending.popleft())
                try:
                    got = sock.recv_into(buf)
                except BlockingIOError:
                    got = -1
                if got == 0:
                    return
                if got > 0:
                    self.incoming.write(view[:got])
                if not handshaken:
                    try:
                        tls.do_handshake()
                        handshaken = True
                    except ssl.SSLWantReadError:
                        pass
                if handshaken:
                    messages: list[bytes] = []
                    while True:
                        room = framed.room()
                        try:
                            n: int = tls.read(len(room), room)  # type: ignore[assignment]  # a count, given a buffer
                        except ssl.SSLWantReadError:
                            break
                        if not n:
                            return  # the peer's close_notify
                        messages += framed.take(n)
                    if messages:
                        self.loop.call_soon_threadsafe(self.on_messages, self, messages)
                out += self.outgoing.read()
                if out:
                    with contextlib.suppress(BlockingIOError):
                        del out[:sock.send(out)]
        except (OSError, ssl.SSLError):
            return
        finally:
            sock.close()


def _answer(pump: _TlsThread, messages: list[bytes]) -> None:
    _echo(messages, pump.send)


Accepted = Callable[[asyncio.AbstractEventLoop, socket.socket, ssl.SSLContext], Awaitable[None]]
"""What a server that accepts its own connections does with each (`_serve_sockets`)."""


def _serve_sockets(cert: str, key: str, port: Any, serve: Accepted) -> None:
    """A server that accepts its TCP connections itself and gives each, with the TLS context, to serve."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        context = tls_context(cert, key, server=True)
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        port.put(listener.getsockname()[1])
        while True:
            sock, _ = await loop.sock_accept(listener)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await serve(loop, sock, context)
    _run(main())


def _serve_tls_thread(cert: str, key: str, port: Any) -> None:
    async def serve(loop: asyncio.AbstractEventLoop, sock: socket.socket, context: ssl.SSLContext) -> None:
        _TlsThread(loop, sock, context, _answer).start()
    _serve_sockets(cert, key, port, serve)


class _SocketEcho:
    """(d): one connection's TLS on its socket (OpenSSL reads and writes the file descriptor), driven by the loop's
    reader and writer callbacks. What a memory BIO costs (each direction's extra copy and zero-fill, a bytes object
    per read of the outgoing BIO) is gone; what it buys is gone too: OpenSSL without read-ahead reads each record
    with two system calls (its header, then its body) and writes each record with one."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tls: ssl.SSLSocket) -> None:
        self.loop, self.tls, self.fd = loop, tls, tls.fileno()
        self.framed = _Framed()
        self.out: collections.deque[memoryview] = collections.deque()
        loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        while True:
            try:
                got = self.tls.recv_into(self.framed.room())
            except ssl.SSLWantReadError:
                return
            except (OSError, ssl.SSLError):
                got = 0
            if not got:
                self.loop.remove_reader(self.fd)
                return
            _echo(self.framed.take(got), self._write)

    def _write(self, data: bytes) -> None:
        if self.out:
            self.out.append(memoryview(data))
            return
        try:
            sent = self.tls.send(data)
        except ssl.SSLWantWriteError:
            sent = 0
        if sent < len(data):
            self.out.append(memoryview(data)[sent:])
            self.loop.add_writer(self.fd, self._writable)

    def _writable(self) -> None:
        while self.out:
            try:
                sent = self.tls.send(self.out[0])
            except ssl.SSLWantWriteError:
                return
            if sent < len(self.out[0]):
                self.out[0] = self.out[0][sent:]
                return
            self.out.popleft()
        self.loop.remove_writer(self.fd)


async def _ready(fd: int, add: Callable[..., Any], remove: Callable[[int], Any]) -> None:
    """Until fd is ready (add: the loop's add_reader or add_writer, remove: its counterpart)."""
    ready = asyncio.get_running_loop().create_future()
    add(fd, ready.set_result, None)
    try:
        await ready
    finally:
        remove(fd)


async def _handshake(loop: asyncio.AbstractEventLoop, tls: ssl.SSLSocket) -> None:
    while True:
        try:
            tls.do_handshake()
            return
        except ssl.SSLWantReadError:
            await _ready(tls.fileno(), loop.add_reader, loop.remove_reader)
        except ssl.SSLWantWriteError:
            await _ready(tls.fileno(), loop.add_writer, loop.remove_writer)


def _serve_tls_socket(cert: str, key: str, port: Any) -> None:
    async def serve(loop: asyncio.AbstractEventLoop, sock: socket.socket, context: ssl.SSLContext) -> None:
        tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        await _handshake(loop, tls)
        _SocketEcho(loop, tls)
    _serve_sockets(cert, key, port, serve)


def _serve_grpc(cert: str, key: str, port: Any) -> None:
    pem, key_pem = Path(cert).read_bytes(), Path(key).read_bytes()

    async def main() -> None:
        async def echo(requests: Any, context: Any) -> Any:
            async for message in requests:
                _work()
                yield message
        handler = grpc.method_handlers_generic_handler(
            "bench.Echo", {"Link": grpc.stream_stream_rpc_method_handler(echo)})
        server = grpc.aio.server(options=[("grpc.http2.lookahead_bytes", 1 << 20)])
        server.add_generic_rpc_handlers((handler,))
        bound = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key_pem, pem)], pem, True))
        await server.start()
        port.put(bound)
        await asyncio.Event().wait()
    _run(main())


class _Caller(asyncio.BufferedProtocol):
    """The client of the framed pipes: reads with the servers' reader (`_Framed`), sends the next call per answer."""

    def __init__(self, message: bytes) -> None:
        self.message, self.framed, self.got, self.running = message, _Framed(), 0, True
        self.drained: asyncio.Future[None] | None = None
        self.sent = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.framed.room()

    def buffer_updated(self, nbytes: int) -> None:
        for _ in self.framed.take(nbytes):
            self.got += 1
            if self.running:
                self.transport.write(self.message)
            elif self.drained is not None and self.got >= self.sent and not self.drained.done():
                self.drained.set_result(None)


async def _call_tls(cert: str, key: str, port: int, size: int, seconds: float) -> float:
    return await _call_framed(tls_context(cert, key, server=False), port, size, seconds)


async def _call_plain(cert: str, key: str, port: int, size: int, seconds: float) -> float:
    return await _call_framed(None, port, size, seconds)


async def _call_framed(context: ssl.SSLContext | None, port: int, size: int, seconds: float) -> float:
    loop = asyncio.get_running_loop()
    message = HEADER.pack(size) + os.urandom(size)
    transport, caller = await loop.create_connection(lambda: _Caller(message), "127.0.0.1", port, ssl=context,
                                                     server_hostname="localhost" if context else None)
    for _ in range(INFLIGHT):
        transport.write(message)
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    caller.running, calls = False, caller.got
    elapsed = time.perf_counter() - started
    caller.sent, caller.drained = calls + INFLIGHT, loop.create_future()
    await asyncio.wait_for(caller.drained, 30)
    transport.close()
    return calls / elapsed


async def _call_grpc(cert: str, key: str, port: int, size: int, seconds: float) -> float:
    pem, key_pem = PEMS[cert], PEMS[key]
    creds = grpc.ssl_channel_credentials(pem, key_pem, pem)
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=[
            ("grpc.ssl_target_name_override", "localhost"), ("grpc.http2.lookahead_bytes", 1 << 20)]) as channel:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        message = os.urandom(size)

        async def requests() -> Any:
            while True:
                yield await queue.get()

        call: Any = channel.stream_stream("/bench.Echo/Link")(requests())
        for _ in range(INFLIGHT):
            queue.put_nowait(message)
        started = time.perf_counter()
        end, got = started + seconds, 0
        async for _ in call:
            got += 1
            if time.perf_counter() >= end:
                break
            queue.put_nowait(message)
        rate = got / (time.perf_counter() - started)
        call.cancel()
        return rate


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64 * 1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--work-us", type=float, default=0.0, help="the server's Python work per message")
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    p.add_argument("--pipes", nargs="+", choices=["asyncio", "grpc", "thread", "socket", "plain"],
                   default=["asyncio", "grpc"])
    opts = p.parse_args()
    OPTS.update(work_us=opts.work_us, loop=opts.loop)
    sys.stdout.write(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, grpcio {grpc.__version__}, "
                     f"{opts.size} B, {INFLIGHT} in flight, {opts.seconds:g} s windows, {opts.loop}, "
                     f"{opts.work_us:g} µs of work a message\n")
    with tempfile.TemporaryDirectory() as folder:
        cert, key = make_cert(Path(folder))
        PEMS.update({cert: Path(cert).read_bytes(), key: Path(key).read_bytes()})
        known = {"asyncio": ("TLS in the loop, framed", _serve_tls, _call_tls),
                 "grpc": ("gRPC bidi stream", _serve_grpc, _call_grpc),
                 "thread": ("TLS on its own thread, framed", _serve_tls_thread, _call_tls),
                 "socket": ("TLS on the socket, framed", _serve_tls_socket, _call_tls),
                 "plain": ("plain TCP (no TLS), framed", _serve_plain, _call_plain)}
        pipes = [known[key] for key in opts.pipes]
        for rnd in range(opts.rounds):
            for name, serve, call in pipes[rnd % len(pipes):] + pipes[:rnd % len(pipes)]:
                port: Any = SPAWN.Queue()
                server = SPAWN.Process(target=_serving, args=(serve, dict(OPTS), cert, key, port), daemon=True)
                server.start()
                bound = port.get(timeout=30)
                before_server, before = _cpu_s(server.pid or 0), resource.getrusage(resource.RUSAGE_SELF)
                rate = _run(call(cert, key, bound, opts.size, opts.seconds))
                after = resource.getrusage(resource.RUSAGE_SELF)
                cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
                       + _cpu_s(server.pid or 0) - before_server)
                sys.stdout.write(f"round {rnd + 1}  {name:28s} {rate:9,.0f} calls/s  "
                                 f"{cpu / (rate * opts.seconds) * 1e6:6,.0f} µs CPU a call (both ends)\n")
                sys.stdout.flush()
                server.kill()
                server.join()


if __name__ == "__main__":
    main()

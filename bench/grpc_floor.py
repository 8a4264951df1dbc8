"""What gRPC's transport alone costs for a Link message, between two processes: the floor under a mesh call.

A Link carries calls as frames on one bidirectional stream, and at 16 in flight it sends them eight to a message
(`mesh/link_frames.py`): at 64 KiB a message is ~512 KiB each way. This bench sends messages of a given size on
one grpc.aio stream between two processes (a client and an echo server, each its own child), with a given number
in flight, over mutual TLS or plaintext, and reports per message: the client's CPU (all threads, and its main
thread alone: the thread that also runs every Python layer of the mesh) and the server's. No mesh code runs.

    .venv/bin/python bench/grpc_floor.py                                  # 512 KiB, 64 KiB, 200 B; mTLS and plaintext
    .venv/bin/python bench/grpc_floor.py --sizes 524288 --inflight 2 --rounds 3
    .venv/bin/python bench/grpc_floor.py --experiments secure_endpoint_offload_large_writes   # a gRPC experiment

`--experiments` is passed to both processes as GRPC_EXPERIMENTS (read when gRPC starts). Loopback only.

`--transports grpc tls-stream` adds, beside gRPC, the same messages on a bare TLS 1.3 connection with the same
mutual authentication (Python's ssl module, i.e. OpenSSL, on the mesh's loop: uvloop), each message behind a 4-byte
length: what a link would cost without gRPC under it, the floor of a design that left gRPC for mesh-to-mesh links.
Both processes run on the mesh's own loop (`hivemesh.mesh.loop`: uvloop where installed), whichever the transport.

`--sockets tcp unix` runs every cell over a Unix domain socket too (gRPC's `unix:` address; the bare stream's
`start_unix_server`), the same TLS on top: what a same-host link would save by leaving TCP loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_shapes import _cert, _pem  # the same throwaway CA and leaves as the one-process shapes

_METHOD = "/bench.Floor/Echo"
_OPTIONS = [("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20),
            ("grpc.http2.lookahead_bytes", 1 << 20)]  # the mesh's stream window (mesh/tls.py)
_READY_S = 30.0


def _write_certs(folder: Path) -> None:
    ca = _cert("ca", None)
    leaves = (("ca", _pem(*ca)), ("server", _pem(*_cert("server", ca))), ("client", _pem(*_cert("client", ca))))
    for name, pems in leaves:
        (folder / f"{name}.pem").write_bytes(pems[0])
        (folder / f"{name}.key").write_bytes(pems[1])


def _listen_at(folder: Path) -> str:
    """Where this server listens: a fresh Unix socket in folder (FLOOR_SOCKET=unix), else TCP on loopback."""
    return f"unix:{folder}/floor-{os.getpid()}.sock" if os.environ.get("FLOOR_SOCKET") == "unix" else "127.0.0.1:0"


def _announce(address: str, port: int) -> None:
    """The address the client dials, on stdout for the parent."""
    sys.stdout.write(f"{address if address.startswith('unix:') else f'127.0.0.1:{port}'}\n")
    sys.stdout.flush()


async def _serve(folder: Path, tls: bool) -> None:
    async def echo(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for message in requests:
            yield message

    server = grpc.aio.server(options=_OPTIONS)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Floor", {"Echo": grpc.stream_stream_rpc_method_handler(echo)})])
    if tls:
        pair = ((folder / "server.key").read_bytes(), (folder / "server.pem").read_bytes())
        creds = grpc.ssl_server_credentials([pair], root_certificates=(folder / "ca.pem").read_bytes(),
                                            require_client_auth=True)
        port = server.add_secure_port(address := _listen_at(folder), creds)
    else:
        port = server.add_insecure_port(address := _listen_at(folder))
    await server.start()
    _announce(address, port)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    await server.stop(0)


def _ssl_context(folder: Path, server: bool) -> Any:
    """TLS 1.3 only, a client certificate required and verified against the CA: the mesh's mutual TLS."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    name = "server" if server else "client"
    ctx.load_cert_chain(folder / f"{name}.pem", folder / f"{name}.key")
    ctx.load_verify_locations(folder / "ca.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def _timed(one: Callable[[], Awaitable[None]], messages: int) -> dict[str, float]:
    """messages rounds of one() (read an answer, send the next message): the rate, and the client's CPU per
    message, of the whole process and of this (the event loop's) thread."""
    wall, usage, main = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF), time.thread_time()
    for _ in range(messages):
        await one()
    main = time.thread_time() - main
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    return {"messages_per_s": messages / wall, "client_cpu_us": cpu / messages * 1e6,
            "client_main_us": main / messages * 1e6}


async def _serve_tls_stream(folder: Path, tls: bool) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readexactly(4)
                body = await reader.readexactly(int.from_bytes(head, "big"))
                writer.writelines((head, body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    ctx = _ssl_context(folder, True) if tls else None
    address = _listen_at(folder)
    if address.startswith("unix:"):
        server = await asyncio.start_unix_server(echo, address[5:], ssl=ctx)
        _announce(address, 0)
    else:
        server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=ctx)
        _announce(address, server.sockets[0].getsockname()[1])
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    server.close()


async def _client_tls_stream(folder: Path, tls: bool, address: str, size: int, inflight: int,
                             messages: int) -> dict[str, float]:
    ctx = _ssl_context(folder, False) if tls else None
    name = "server.agent.hivemesh.local" if tls else None
    if address.startswith("unix:"):
        reader, writer = await asyncio.open_unix_connection(address[5:], ssl=ctx, server_hostname=name)
    else:
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx, server_hostname=name)
    payload = os.urandom(size)
    head = len(payload).to_bytes(4, "big")

    async def one() -> None:
        got = await reader.readexactly(4)
        await reader.readexactly(int.from_bytes(got, "big"))
        writer.writelines((head, payload))
        await writer.drain()

    for _ in range(inflight):  # warm, as the gRPC client
        writer.writelines((head, payload))
    await writer.drain()
    for _ in range(inflight):
        await one()
    row = await _timed(one, messages)
    writer.close()
    return row


async def _client(folder: Path, tls: bool, target: str, size: int, inflight: int, messages: int) -> dict[str, float]:
    if tls:
        creds = grpc.ssl_channel_credentials((folder / "ca.pem").read_bytes(), (folder / "client.key").read_bytes(),
                                             (folder / "client.pem").read_bytes())
        channel = grpc.aio.secure_channel(target, creds, options=[
            *_OPTIONS, ("grpc.ssl_target_name_override", "server.agent.hivemesh.local")])
    else:
        channel = grpc.aio.insecure_channel(target, options=_OPTIONS)
    async with channel:
        call = channel.stream_stream(_METHOD)()
        payload = os.urandom(size)
        for _ in range(inflight):  # warm: the window grows, the first answers come back
            await call.write(payload)

        async def one() -> None:  # each answer read lets one more message go: inflight stay in flight
            await call.read()
            await call.write(payload)

        for _ in range(inflight):
            await one()
        row = await _timed(one, messages)
        call.cancel()
    return row


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure(folder: Path, transport: str, sock: str, tls: bool, size: int, inflight: int, messages: int,
             env: dict[str, str]) -> dict[str, float]:
    me = [sys.executable, __file__]
    env = {**env, "FLOOR_TRANSPORT": transport, "FLOOR_SOCKET": sock}
    server = subprocess.Popen([*me, "_serve", str(folder), str(int(tls))], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert server.stdout is not None
        address = server.stdout.readline().strip()
        if not address:
            raise RuntimeError("the echo server did not start")
        before = _cpu_s(server.pid)
        out = subprocess.run([*me, "_client", str(folder), str(int(tls)), address, str(size), str(inflight),
                              str(messages)], env=env, capture_output=True, text=True, timeout=300, check=True)
        row: dict[str, float] = json.loads(out.stdout)
        row["server_cpu_us"] = (_cpu_s(server.pid) - before) / messages * 1e6
        return row
    finally:
        server.kill()
        server.wait(timeout=_READY_S)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[524288, 65536, 200])
    ap.add_argument("--inflight", type=int, default=2, help="messages in flight (a Link at 16 calls: 2 batches)")
    ap.add_argument("--bytes", type=int, default=512 << 20, help="bytes per cell each way, at most")
    ap.add_argument("--max-messages", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--experiments", default="", help="GRPC_EXPERIMENTS for both processes")
    ap.add_argument("--transports", nargs="+", choices=("grpc", "tls-stream"), default=["grpc"],
                    help="grpc: a grpc.aio stream; tls-stream: length-prefixed messages on a bare (m)TLS socket")
    ap.add_argument("--sockets", nargs="+", choices=("tcp", "unix"), default=["tcp"],
                    help="tcp: loopback TCP; unix: a Unix domain socket (same TLS on top)")
    args = ap.parse_args()
    env = {**os.environ, "GRPC_EXPERIMENTS": args.experiments} if args.experiments else dict(os.environ)
    rows: dict[tuple[int, str, str, bool], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="hivemesh-floor-") as tmp:
        folder = Path(tmp)
        _write_certs(folder)
        for _ in range(args.rounds):  # interleaved: the shared machine's mood reaches every cell alike
            for size in args.sizes:
                for transport in args.transports:
                    for sock in args.sockets:
                        for tls in (True, False):
                            n = max(200, min(args.max_messages, args.bytes // max(size, 1)))
                            rows.setdefault((size, transport, sock, tls), []).append(
                                _measure(folder, transport, sock, tls, size, args.inflight, n, env))
    lines = [f"grpcio {grpc.__version__}, {os.cpu_count()} cores, {args.inflight} in flight, {args.rounds} round(s)"
             + (f", GRPC_EXPERIMENTS={args.experiments}" if args.experiments else "") + "; medians over rounds",
             "| size | transport | messages/s | client CPU µs/msg | client main thread µs/msg | server CPU µs/msg |",
             "|---|---|---|---|---|---|"]
    for (size, transport, sock, tls), got in rows.items():
        med = {k: statistics.median(r[k] for r in got) for k in got[0]}
        name = ("mTLS" if tls else "plaintext") + ("" if transport == "grpc" else f", {transport}") + \
            ("" if sock == "tcp" else f", {sock} socket")
        lines.append(f"| {size:,} B | {name} | {med['messages_per_s']:,.0f} | "
                     f"{med['client_cpu_us']:,.0f} | {med['client_main_us']:,.0f} | {med['server_cpu_us']:,.0f} |")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    stream = os.environ.get("FLOOR_TRANSPORT") == "tls-stream"
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        from hivemesh.mesh import loop

        loop.run((_serve_tls_stream if stream else _serve)(Path(sys.argv[2]), sys.argv[3] == "1"))
    elif len(sys.argv) > 1 and sys.argv[1] == "_client":
        from hivemesh.mesh import loop

        a = sys.argv[2:]
        client = _client_tls_stream if stream else _client
        row = loop.run(client(Path(a[0]), a[1] == "1", a[2], int(a[3]), int(a[4]), int(a[5])))
        sys.stdout.write(json.dumps(row) + "\n")
    else:
        main()

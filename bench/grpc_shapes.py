"""What one echo costs in grpc.aio, by the shape of the call: the design options issue 14 names, measured side by side.

    unary, plaintext                   the floor (bench/mesh_cost.py's direct path)
    unary, mTLS                        what every mesh call pays for transport security
    unary, mTLS + 700-byte token       ... plus a credential the size of a mesh capability token
    unary, mTLS + 64-byte token        ... with a credential ten times smaller
    stream, mTLS (multiplexed)         calls as messages on one long-lived bidirectional stream, matched by id
                                       (how AutoGen's runtime carries its messages)

Client and server run in one process (CPU is read with getrusage, so the figure is client + server per call);
16 calls in flight, 200-byte payloads; rounds interleave the shapes; medians over rounds. Loopback only.

    .venv/bin/python bench/grpc_shapes.py                                   # 5 rounds x 4,000 calls per shape
    bench/.venv-autogen/bin/python bench/grpc_shapes.py --plaintext-only    # the same on AutoGen's grpcio
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import resource
import statistics
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

Pems = tuple[bytes, bytes]  # (certificate, key)


def _cert(cn: str, issuer: tuple[Any, Any] | None) -> tuple[Any, Any]:
    """A certificate for cn signed by issuer (None: a self-signed CA). cryptography is imported here, so the
    plaintext shapes also run in an environment without it (AutoGen's, to compare its grpcio)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer[0].subject if issuer else name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(hours=1))
         .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True))
    if issuer is not None:
        b = b.add_extension(x509.SubjectAlternativeName([
            x509.DNSName(f"{cn}.agent.hivemesh.local"),
            x509.UniformResourceIdentifier(f"spiffe://hivemesh.local/agent/{cn}")]), critical=False)
    return b.sign(issuer[1] if issuer else key, hashes.SHA256()), key


def _pem(cert: Any, key: Any) -> Pems:
    from cryptography.hazmat.primitives import serialization

    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


async def _unary(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    context.invocation_metadata()  # a mesh agent reads its credential from the metadata on every call
    return request


async def _stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
    async for frame in requests:  # 4-byte call id + payload; the echo keeps the id
        yield frame


Call = Callable[[bytes], Awaitable[bytes]]


class Rig:
    """A server and a channel to it; `call` sends one echo in the shape the rig was built for."""

    def __init__(self, ca: Pems, server: Pems, client: Pems) -> None:
        self.ca, self.server_pems, self.client_pems = ca, server, client
        self.server: grpc.aio.Server | None = None
        self.channel: grpc.aio.Channel | None = None
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    async def start(self, *, tls: bool) -> None:
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Echo", {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),
            "Stream": grpc.stream_stream_rpc_method_handler(_stream),
        })])
        if tls:
            creds = grpc.ssl_server_credentials([(self.server_pems[1], self.server_pems[0])],
                                                root_certificates=self.ca[0], require_client_auth=True)
            port = self.server.add_secure_port("127.0.0.1:0", creds)
            ccreds = grpc.ssl_channel_credentials(self.ca[0], self.client_pems[1], self.client_pems[0])
            self.channel = grpc.aio.secure_channel(
                f"127.0.0.1:{port}", ccreds, options=[("grpc.ssl_target_name_override", "server.agent.hivemesh.local")])
        else:
            port = self.server.add_insecure_port("127.0.0.1:0")
            self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        await self.server.start()

    def unary(self, token_bytes: int) -> Call:
        assert self.channel is not None
        method = self.channel.unary_unary("/bench.Echo/Unary")
        metadata = (("authorization", "Bearer " + "t" * token_bytes),) if token_bytes else None

        async def call(payload: bytes) -> bytes:
            out: bytes = await method(payload, metadata=metadata, timeout=10)
            return out

        return call

    def stream(self) -> Call:
        """Calls multiplexed on one stream: each call is a frame with an id; a reader task resolves the futures."""
        assert self.channel is not None
        queue, pending = self._queue, self._pending

        async def outgoing() -> AsyncIterator[bytes]:
            while True:
                yield await queue.get()

        rpc = self.channel.stream_stream("/bench.Echo/Stream")(outgoing())

        async def read() -> None:
            async for frame in rpc:
                pending.pop(struct.unpack_from(">I", frame)[0]).set_result(frame[4:])

        self._reader = asyncio.get_running_loop().create_task(read())
        counter = [0]

        async def call(payload: bytes) -> bytes:
            counter[0] += 1
            call_id = counter[0] & 0xFFFFFFFF
            fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            pending[call_id] = fut
            queue.put_nowait(struct.pack(">I", call_id) + payload)
            return await fut

        return call

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self.channel is not None:
            await self.channel.close()
        if self.server is not None:
            await self.server.stop(0)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def measure(call: Call, calls: int, concurrency: int, payload: bytes) -> tuple[float, float]:
    """(CPU µs per call, calls/s) of `calls` calls, `concurrency` in flight, after a warm-up."""
    for _ in range(100):
        assert await call(payload) == payload
    left = [calls]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            await call(payload)

    c0, t0 = _cpu(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (_cpu() - c0) / calls * 1e6, calls / (time.perf_counter() - t0)


SHAPES: dict[str, tuple[bool, str, int]] = {  # name -> (tls, unary|stream, token bytes)
    "unary, plaintext": (False, "unary", 0),
    "unary, mTLS": (True, "unary", 0),
    "unary, mTLS + 700-byte token": (True, "unary", 700),
    "unary, mTLS + 64-byte token": (True, "unary", 64),
    "stream, mTLS (multiplexed)": (True, "stream", 0),
    "stream, plaintext (multiplexed)": (False, "stream", 0),
}


async def main_async(opts: argparse.Namespace) -> None:
    names = [n for n in SHAPES if not opts.plaintext_only or not SHAPES[n][0]]
    ca = server = client = (b"", b"")
    if any(SHAPES[n][0] for n in names):
        ca_cert, ca_key = _cert("bench-ca", None)
        ca = _pem(ca_cert, ca_key)
        server, client = (_pem(*_cert(n, (ca_cert, ca_key))) for n in ("server", "client"))
    payload = b"x" * opts.size
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for rnd in range(opts.rounds):
        for name in names[rnd % len(names):] + names[: rnd % len(names)]:
            tls, kind, token = SHAPES[name]
            rig = Rig(ca, server, client)
            await rig.start(tls=tls)
            try:
                call = rig.unary(token) if kind == "unary" else rig.stream()
                results[name].append(await measure(call, opts.calls, opts.concurrency, payload))
            finally:
                await rig.stop()
    base_cpu = statistics.median(c for c, _ in results[names[0]])
    base_rate = statistics.median(r for _, r in results[names[0]])
    lines = [f"{opts.rounds} rounds x {opts.calls} calls, {opts.concurrency} in flight, {opts.size} B, grpcio "
             f"{grpc.__version__}, load {os.getloadavg()[0]:.1f}\n",
             "| shape | CPU µs/call (client + server) | × plaintext unary | calls/s | × plaintext unary |",
             "|---|---|---|---|---|"]
    for name in names:
        cpu = statistics.median(c for c, _ in results[name])
        rate = statistics.median(r for _, r in results[name])
        lines.append(f"| {name} | {cpu:,.0f} | {cpu / base_cpu:.2f} | {rate:,.0f} | {rate / base_rate:.2f} |")
    sys.stdout.write("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=4000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--size", type=int, default=200)
    p.add_argument("--plaintext-only", action="store_true",
                   help="only the shapes without TLS (runs without cryptography, e.g. in bench/.venv-autogen)")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()

"""A mesh channel pings no more often than the mesh's servers permit, so they never close it for it.

A gRPC server lets a client ping a connection whose calls send no data at most once per
`grpc.http2.min_ping_interval_without_data_ms` (5 min unless set, and no mesh server set it); the third ping
sooner ends the connection with GOAWAY ENHANCE_YOUR_CALM "too_many_pings", failing its calls UNAVAILABLE. Mesh
channels ping every 30 s, so `hivemesh up` logged a GOAWAY for each agent it had called, ~90 s after its demo.
Every mesh server now permits a ping every 20 s (`hivemesh.mesh.server.server_options`).

The real values are minutes apart, so the check on real sockets runs them scaled down by one factor (both sides,
so the one relation that matters is kept): a real TLS server with the servers' ping policy and a real client
channel with the mesh's channel options, a call that answers late and a stream that stays quiet, over several
keepalive intervals, then a call on the same connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from hivemesh.controlplane.ca import load_ca
from hivemesh.mesh.server import server_options
from hivemesh.mesh.tls import channel_credentials, channel_options, server_credentials
from tests.conftest import SessionCa

MIN_PING_OPTION = "grpc.http2.min_ping_interval_without_data_ms"
MAX_PING_STRIKES = 2
"""gRPC's default (grpc core's ping_abuse_policy.cc), which no mesh server changes."""
SCALE = 20
"""Both sides' intervals divided by this: 30 s and 20 s become 1.5 s and 1 s (gRPC sends at most about one ping a
second, so the scaled client interval must stay above that for the check to mean the same)."""
_NAME = "pings.agent.hivemesh.local"


def _option(options: list[tuple[str, Any]], name: str) -> Any:
    """An option's value as gRPC reads it: the first of that name wins."""
    return next(value for key, value in options if key == name)


def test_the_channels_ping_no_sooner_than_the_servers_permit() -> None:
    """As both are configured: the interval of every mesh channel's pings against the servers' minimum, with room
    for a ping that arrives late after one that arrived early."""
    options = channel_options(_NAME)
    interval = _option(options, "grpc.keepalive_time_ms")
    permitted = _option(server_options(), MIN_PING_OPTION)  # every mesh server's, the control plane's included
    assert interval >= permitted * 1.1, (interval, permitted)
    assert interval <= 60_000, "a vanished peer is found within a minute or so"
    assert _option(options, "grpc.http2.max_pings_without_data") == 0  # pings go on while a call is quiet
    # Only while calls are open: a server refuses pings on a connection without calls at any rate short of 2 h.
    assert not any(key == "grpc.keepalive_permit_without_calls" and value for key, value in options)


def _scaled_channel_options() -> list[tuple[str, Any]]:
    """The mesh's channel options, the keepalive interval scaled down; everything else as it is."""
    return [(key, value // SCALE if key == "grpc.keepalive_time_ms" else value)
            for key, value in channel_options(_NAME)]


@pytest.mark.slow
async def test_a_quiet_connection_with_the_mesh_options_survives_keepalive_intervals(session_ca: SessionCa) -> None:
    ca = load_ca(session_ca.files.certs_dir)
    cert, key = ca.issue_with_new_key("spiffe://hivemesh.local/agent/pings", common_name="pings",
                                      dns_names=[_NAME], ttl_s=600)
    peers: list[str] = []
    release = asyncio.Event()
    options = _scaled_channel_options()
    server_min_ms = _option(server_options(), MIN_PING_OPTION) // SCALE
    # Long enough for a client pinging just sooner than the server permits to be cut off: the pinned grpcio lets
    # the first two pings of a quiet call pass and closes the connection at the third strike, the fifth ping
    # (measured): five of the client's keepalive intervals, 8.5 s scaled.
    quiet_s = (MAX_PING_STRIKES + 3) * _option(options, "grpc.keepalive_time_ms") / 1000 + 1

    async def late(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        peers.append(context.peer())
        await asyncio.sleep(float(request.decode()))
        return b"late answer"

    async def quiet(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        peers.append(context.peer())
        yield b"open"
        await release.wait()  # a stream open and silent, as an idle Agent.Link is
        yield b"closing"

    server = grpc.aio.server(options=[
        # The mesh servers' ping policy, scaled as the client is.
        (MIN_PING_OPTION, server_min_ms),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
    ])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("pings.Quiet", {
        "Late": grpc.unary_unary_rpc_method_handler(late),
        "Stream": grpc.unary_stream_rpc_method_handler(quiet),
    })])
    port = server.add_secure_port("127.0.0.1:0", server_credentials(cert, key, ca.bundle_pem()))
    await server.start()
    creds = channel_credentials(ca.bundle_pem(), cert, key)
    try:
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=options) as channel:
            stream = channel.unary_stream("/pings.Quiet/Stream")(b"", timeout=quiet_s + 30)
            assert await stream.read() == b"open"
            # A call whose answer takes that long, beside the silent stream.
            answer = await channel.unary_unary("/pings.Quiet/Late")(str(quiet_s).encode(), timeout=quiet_s + 30)
            assert answer == b"late answer"
            release.set()
            assert await stream.read() == b"closing"
            assert await stream.read() == grpc.aio.EOF
            assert await stream.code() == grpc.StatusCode.OK
            # And the connection is still the one they were made on: the server never closed it.
            assert await channel.unary_unary("/pings.Quiet/Late")(b"0", timeout=10) == b"late answer"
            assert len(peers) == 3 and len(set(peers)) == 1, peers
    finally:
        release.set()
        await server.stop(0)

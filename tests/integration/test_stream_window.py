"""Mesh channels and servers ask gRPC for a 1 MiB HTTP/2 stream window: a Link's calls share one stream, and with
gRPC's 64 KiB default each large message in flight waited a round trip for the window (hivemesh.mesh.tls)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from hivemesh.mesh import server as mesh_server
from hivemesh.mesh.server import ManagedServer
from hivemesh.mesh.tls import STREAM_WINDOW_BYTES, channel_options

WINDOW = ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES)


def test_every_mesh_channel_asks_for_the_window() -> None:
    assert STREAM_WINDOW_BYTES >= 16 * 64 * 1024  # 16 calls of 64 KiB in flight on one stream
    assert WINDOW in channel_options("bench.agent.hivemesh.local")
    assert WINDOW in channel_options(None, extra=(("grpc.primary_user_agent", "x"),))


async def test_mesh_servers_ask_for_it_and_carry_large_messages_on_one_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[Any] = []
    real_server = grpc.aio.server

    def recording_server(*args: Any, **kwargs: Any) -> grpc.aio.Server:
        seen.append(kwargs.get("options"))
        return real_server(*args, **kwargs)

    monkeypatch.setattr(mesh_server.grpc.aio, "server", recording_server)
    managed = ManagedServer(services=[])
    monkeypatch.undo()
    assert WINDOW in seen[0]

    async def echo(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for message in requests:
            yield message

    managed.add_generic(grpc.method_handlers_generic_handler(
        "test.Echo", {"Link": grpc.stream_stream_rpc_method_handler(echo)}))
    port = managed.add_insecure_port("127.0.0.1:0")
    await managed.server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options(None))
    try:
        messages = [bytes([i]) * (64 * 1024) for i in range(16)]

        async def send() -> AsyncIterator[bytes]:
            for message in messages:
                yield message

        call = channel.stream_stream("/test.Echo/Link")(send(), timeout=30)
        answers = await asyncio.wait_for(_all(call), 30)
        assert answers == messages
    finally:
        await channel.close()
        await managed.stop(0)


async def _all(call: Any) -> list[bytes]:
    return [message async for message in call]

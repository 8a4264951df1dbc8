"""The direct-link port while it closes (`DirectLinkListener.close`): a connection the port accepts after closing
began is cut at once, rather than handed a TLS handshake that `close` would not wait for.

`close` stops listening only after its `on_close` step (the node's deregistration), so the port still accepts
while that runs; the test connects from inside that step, over real TCP on loopback, and checks the first byte:
an open port sends GO (its TLS layer is in place), a closing one sends nothing and ends the connection."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc

from hivemesh.mesh.link_conn import GO
from hivemesh.mesh.link_listener import DirectLinkListener
from hivemesh.mesh.link_server import LinkServer
from tests.integration.test_link_conn import _workloads


async def _first_byte(port: int) -> bytes:
    """What the port sends first on a new TCP connection (b"" when it ends the connection instead)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(reader.read(1), 10)
    except ConnectionResetError:
        return b""
    finally:
        writer.transport.abort()


async def test_a_connection_accepted_while_the_port_closes_is_cut_at_once(tmp_path: Path) -> None:
    async def echo(request: Any, context: Any) -> Any:
        return request

    server_workload, _ = _workloads(tmp_path)
    listener = DirectLinkListener(LinkServer(None, grpc.unary_unary_rpc_method_handler(echo)), server_workload,
                                  "127.0.0.1", 0)
    await listener.start()
    closing: list[bytes] = []

    async def on_close() -> None:  # the port is closing but still listening
        closing.append(await _first_byte(listener.port))

    try:
        assert await _first_byte(listener.port) == GO  # open: the TLS layer is in place, the client may begin
        listener.on_close = on_close
    finally:
        await asyncio.wait_for(listener.close(1.0), 30)
    assert closing == [b""], "a connection accepted while the port closed was not cut at once"
    assert not listener._connections, "close left a connection's task behind"

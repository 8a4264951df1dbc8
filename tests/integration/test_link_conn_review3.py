"""Third review of `mesh/link_conn.py` (commit 6920c67): a bug reproduced over real mutual TLS on loopback. Fixed:
flow control pauses the TCP connection's reading, under TLS, so the peer's end waits there with what came before it.

1. On uvloop (hivemesh's processes), messages that reach the client's TLS layer while its reading is paused
   (HIGH_WATER) are lost when the peer then ends properly as Go's tls.Conn.Close and rustls do (close_notify,
   then the FIN at once). `LinkConnection._deliver` pauses the TLS transport (`pause_reading`): uvloop's SSLProtocol
   then leaves the new bytes undecrypted in its incoming BIO, and its TCP transport keeps reading (the BIO is under
   its 256 KiB high-water mark), so it reads the FIN; uvloop takes a TCP EOF in the WRAPPED state as a broken
   connection and shuts down at once, dropping what the BIO holds. Once the reader takes the queued messages and
   resumes, there is nothing left: `read` returns None (a clean end) where the rest and the end status were sent.
   6920c67's room for "all TLS holds" only helps when those bytes arrive before the pause; a client that takes its
   answers slower than they arrive (more than HIGH_WATER of them, then the status, then the server's close) gets the
   last ones after it.
   asyncio's loop keeps them (its sslproto stays FLUSHING while the app's reading is paused, and reads on resume):
   the same scenario with `choice="asyncio"` delivers all 21 (checked by hand).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from pathlib import Path

import pytest

from hivemesh.mesh import loop as mesh_loop
from hivemesh.mesh.link_conn import GO, HEADER, HIGH_WATER, PREAMBLE, LinkConnection
from hivemesh.mesh.link_direct import client_context, open_tls, server_context
from tests.integration.test_link_conn import SERVER_NAME, _message, _read_all, _wire, _workloads
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(120)


def _peer(listening: socket.socket, context: ssl.SSLContext, first: bytes, rest: bytes,
          paused: threading.Event, done: threading.Event) -> None:
    """A direct-link server on blocking sockets: GO, TLS, first; once the client has paused its reading, rest,
    then close_notify and the FIN at once (Go's tls.Conn.Close, rustls), without waiting for the client's."""
    raw, _ = listening.accept()
    tls: ssl.SSLSocket | None = None
    try:
        raw.sendall(GO)
        tls = context.wrap_socket(raw, server_side=True)
        tls.sendall(first)
        if not paused.wait(30):
            return
        tls.sendall(rest)
        tls.setblocking(False)
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.unwrap()  # close_notify; the client's is not waited for
        tls.shutdown(socket.SHUT_WR)  # the FIN
        done.set()
        tls.settimeout(30)
        while tls.recv(65536):
            pass
    except OSError:
        pass
    finally:
        (tls or raw).close()


async def _sent_while_paused_then_closed(tmp: Path) -> tuple[int, int, str]:
    server_workload, client_workload = _workloads(tmp)
    large = HIGH_WATER // (64 * 1024) + 1  # the 16th pauses reading; all arrive before the peer sends more
    messages = [(_message(64 * 1024, i), False) for i in range(large)]
    messages += [(_message(1000, 100 + i), False) for i in range(3)]
    messages.append((b"\x08\x00", True))  # the server's OK end status, last
    data = _wire(messages)
    cut = len(PREAMBLE) + 1 + large * (HEADER.size + 64 * 1024)
    listening = socket.create_server(("127.0.0.1", 0))
    paused, done = threading.Event(), threading.Event()
    peer = threading.Thread(target=_peer, args=(listening, server_context(server_workload), data[:cut], data[cut:],
                                                paused, done), daemon=True)
    peer.start()
    client: LinkConnection | None = None
    try:
        client = await open_tls("127.0.0.1", listening.getsockname()[1], client_context(client_workload),
                                SERVER_NAME)
        assert await until(lambda: client is not None and client.reading_paused, 10), "reading never paused"
        paused.set()
        assert await until(done.is_set, 10), "the peer never closed"
        assert await client.read_preamble(10) == 1
        got, how = await _read_all(client, len(messages))
        assert got == messages[:len(got)], "messages arrived out of order or altered"
        return len(got), len(messages), how
    finally:
        paused.set()
        if client is not None:
            client.abort()
        listening.close()
        await asyncio.to_thread(peer.join, 35)


async def test_on_uvloop_messages_sent_while_reading_is_paused_survive_a_peers_proper_close(tmp_path: Path) -> None:
    got, sent, how = await asyncio.to_thread(mesh_loop.run, _sent_while_paused_then_closed(tmp_path),
                                             choice="uvloop")
    assert got == sent, (
        f"on uvloop only {got} of the {sent} messages sent before the peer's close arrived ({how}): those sent while "
        "reading was paused were dropped with the TLS layer's undecrypted bytes at the FIN")


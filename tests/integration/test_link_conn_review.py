"""Review of `mesh/link_conn.py` (commit c1b9374): two bugs reproduced over real mutual TLS on loopback, with the TLS
pair of `tests/integration/test_link_conn.py` (a LinkConnection client, a peer made of asyncio's own streams). Both
are fixed (`MESSAGE_COST`; TLS given room for all it holds, `FLUSH_SLACK`, and TCP paused under it); these tests
keep them fixed.

1. Read flow control counts only message bytes: empty messages (4 bytes on the wire each) are queued without limit
   and reading never pauses, so a peer that floods them while nobody reads (a direct-link server stops reading after
   the client's empty "done" message, at `max_open_calls`, or after a bad frame) grows the process's memory without
   bound (about 64 bytes held for each 4 sent).
2. On asyncio's loop, a peer that ends its side properly (close_notify, then FIN, as Go's and rustls' TLS do) while
   reading is paused loses every message asyncio's SSL layer had not yet handed over beyond one buffer: sslproto's
   flush after the EOF reads the app protocol's buffer once (`_do_read__buffered`), where StreamReader's
   `data_received` path read everything.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from hivemesh.mesh.link_conn import HEADER, HIGH_WATER, PREAMBLE
from tests.integration.test_link_conn import _drain, _message, _pair, _wire
from tests.support.waiting import until


async def test_a_flood_of_empty_messages_nobody_reads_pauses_reading(tmp_path: Path) -> None:
    count = 600_000  # 2.4 MB on the wire: more than HIGH_WATER even counting only their lengths
    async with _pair(tmp_path) as pair:
        pair.writer.write(PREAMBLE + b"\x01" + HEADER.pack(0) * count)
        settled = await until(
            lambda: pair.client.reading_paused or len(pair.client._messages) >= count, 60)
        assert settled, "the client neither paused nor took the flood in"
        assert pair.client.reading_paused, (
            f"{len(pair.client._messages)} empty messages are queued for nobody and reading never paused "
            "(HIGH_WATER counts message bytes only: memory grows without bound)")


async def test_messages_before_a_peers_close_all_arrive_though_reading_was_paused(tmp_path: Path) -> None:
    messages = [(_message(64 * 1024, i), False) for i in range(HIGH_WATER // (64 * 1024) + 3)]
    messages.append((b"\x08\x00", True))  # the server's OK end status, last
    async with _pair(tmp_path) as pair:
        pair.writer.write(_wire(messages))
        assert await until(lambda: pair.client.reading_paused, 10), "the client never paused reading"
        # The peer ends as Go's and rustls' TLS do: close_notify, then the TCP FIN without waiting for the answer.
        tcp = pair.writer.transport._ssl_protocol._transport  # type: ignore[attr-defined]
        pair.writer.close()
        assert await until(lambda: tcp.get_write_buffer_size() == 0, 10), "the peer never flushed"
        pair.writer.get_extra_info("socket").shutdown(socket.SHUT_WR)
        # (The client's TCP reading is paused now, so the FIN waits under TLS with the bytes before it: c23dc36's
        # TLS-level pause let asyncio's TLS layer see it first, and flush one buffer only on resume.)
        assert await pair.client.read_preamble(10) == 1
        got = await _drain(pair.client, len(messages))  # fails: ConnectionResetError after 17 of the 20
        assert got == messages
        assert await asyncio.wait_for(pair.client.read(), 10) is None

"""A direct link's connection (`mesh/link_conn.py`): messages read as TLS decrypts them, and written as pieces.

The parser is fed a stream of messages cut at every kind of place (through the buffered-protocol calls TLS makes),
then the connection runs over real mutual TLS on loopback against a peer made of asyncio's own streams: messages
of every size arrive whole and in order, a long one grows its buffer, reading pauses while nobody reads and
resumes, pieces arrive as the bytes they join to, and a broken stream fails the read that meets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hivemesh.controlplane.ca import init_ca, load_ca
from hivemesh.mesh.link_conn import (
    BODY_EAGER,
    BODY_MIN,
    GO,
    HEADER,
    HIGH_WATER,
    JOIN_BELOW,
    PREAMBLE,
    SCRATCH_BYTES,
    STATUS_BIT,
    LinkConnection,
    LinkProtocolError,
)
from hivemesh.mesh.link_direct import client_context, open_tls, server_context
from hivemesh.mesh.tls import Workload
from tests.support.meshenv import TRUST_DOMAIN
from tests.support.waiting import until

LIMIT = 8 * 1024 * 1024
SERVER_NAME = f"conn-server.agent.{TRUST_DOMAIN}"


def _wire(messages: list[tuple[bytes, bool]]) -> bytes:
    return PREAMBLE + b"\x01" + b"".join(HEADER.pack(len(m) | (STATUS_BIT if s else 0)) + m for m, s in messages)


def _message(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _feed(connection: LinkConnection, data: bytes, cuts: list[int]) -> None:
    """data given to connection as TLS gives it: up to each cut at a time (what TLS holds, its sizehint), into the
    buffer it asks for, which must have room for it all (TLS may not ask again: see `get_buffer`)."""
    pos = 0
    for cut in [*sorted(c for c in cuts if 0 < c < len(data)), len(data)]:
        buf = connection.get_buffer(cut - pos)
        assert len(buf) >= cut - pos, f"a buffer of {len(buf)} bytes for the {cut - pos} TLS holds"
        buf[:cut - pos] = data[pos:cut]
        connection.buffer_updated(cut - pos)
        pos = cut


async def _drain(connection: LinkConnection, count: int) -> list[tuple[bytes, bool]]:
    out = []
    for _ in range(count):
        got = await asyncio.wait_for(connection.read(), 5)
        assert got is not None
        out.append((bytes(got[0]), got[1]))
    return out


async def _read_all(connection: LinkConnection, count: int) -> tuple[list[tuple[bytes, bool]], str]:
    """Up to count messages, until a clean end or a broken connection: what came, and how it stopped ("all", "a clean
    end", or the error)."""
    got: list[tuple[bytes, bool]] = []
    try:
        for _ in range(count):
            one = await asyncio.wait_for(connection.read(), 10)
            if one is None:
                return got, "a clean end"
            got.append((bytes(one[0]), one[1]))
    except OSError as exc:
        return got, repr(exc)
    return got, "all"


SIZES = [0, 1, 3, 200, BODY_MIN - 5, BODY_MIN - 4, BODY_MIN - 1, BODY_MIN, BODY_MIN + 1, SCRATCH_BYTES - 4,
         SCRATCH_BYTES, 64 * 1024, BODY_EAGER + 17]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.sampled_from(SIZES), min_size=1, max_size=8),
       cuts=st.lists(st.integers(min_value=1, max_value=2_200_000), max_size=12),
       status_last=st.booleans())
async def test_messages_cut_anywhere_arrive_whole_and_in_order(sizes: list[int], cuts: list[int],
                                                               status_last: bool) -> None:
    messages = [(_message(n, i), status_last and i == len(sizes) - 1) for i, n in enumerate(sizes)]
    connection = LinkConnection(LIMIT)
    _feed(connection, _wire(messages), cuts)
    assert await connection.read_preamble(1) == 1
    assert await _drain(connection, len(messages)) == messages
    connection.eof_received()
    assert await connection.read() is None


async def test_cut_at_every_byte_of_small_messages() -> None:
    messages = [(_message(n, n), False) for n in (0, 5, 1, 300, 2)]
    data = _wire(messages)
    for step in (1, 2, 3, 7):
        connection = LinkConnection(LIMIT)
        _feed(connection, data, list(range(step, len(data), step)))
        assert await connection.read_preamble(1) == 1
        assert await _drain(connection, len(messages)) == messages


async def test_a_buffer_asked_for_and_not_used_leaves_no_trace() -> None:
    """TLS asks for a buffer even when it then has nothing to decrypt (uvloop always; asyncio's gets SSLWantRead):
    what it decrypts into the next one is what arrives."""
    connection = LinkConnection(LIMIT)
    _feed(connection, PREAMBLE + b"\x01", [])
    assert await connection.read_preamble(1) == 1
    big = _message(64 * 1024, 9)
    for sizehint in (4 * 1024 * 1024, 10, 0):
        connection.get_buffer(sizehint)  # and no buffer_updated
    _feed(connection, HEADER.pack(5) + b"hello" + HEADER.pack(len(big)) + big, [3, 9, 100])
    assert await _drain(connection, 2) == [(b"hello", False), (big, False)]


async def test_a_bad_preamble_is_refused() -> None:
    connection = LinkConnection(LIMIT)
    _feed(connection, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", [])
    with pytest.raises(LinkProtocolError, match="not a hivemesh direct-link preamble"):
        await connection.read_preamble(1)


async def test_no_preamble_in_time_is_refused() -> None:
    connection = LinkConnection(LIMIT)
    _feed(connection, PREAMBLE[:5], [])
    with pytest.raises(LinkProtocolError, match="did not open the direct link"):
        await connection.read_preamble(0.2)


async def test_a_length_over_the_limit_fails_the_read_after_the_messages_before_it() -> None:
    connection = LinkConnection(1000)
    first = _message(10, 1)
    _feed(connection, _wire([(first, False)]) + HEADER.pack(1001) + b"x" * 50, [])
    await connection.read_preamble(1)
    assert await _drain(connection, 1) == [(first, False)]
    with pytest.raises(LinkProtocolError, match="1001 bytes is over the 1000-byte limit"):
        await connection.read()
    _feed(connection, b"more bytes after the failure are dropped", [])  # and leave room: no empty buffer
    with pytest.raises(LinkProtocolError):
        await connection.read()


@pytest.mark.parametrize("size", [10, 64 * 1024])
async def test_an_end_inside_a_message_fails_the_read(size: int) -> None:
    connection = LinkConnection(LIMIT)
    data = _wire([(_message(size, 3), False)])
    _feed(connection, data[:-1], [])
    await connection.read_preamble(1)
    connection.eof_received()
    with pytest.raises(ConnectionResetError, match="inside a message"):
        await connection.read()


async def test_a_length_alone_does_not_allocate_the_limit() -> None:
    connection = LinkConnection(LIMIT)
    _feed(connection, PREAMBLE + b"\x01" + HEADER.pack(LIMIT), [])
    await connection.read_preamble(1)
    assert len(connection.get_buffer(-1)) <= BODY_EAGER


# ---- over real TLS ------------------------------------------------------------------------------------------------
@dataclass
class Pair:
    client: LinkConnection
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


def _workloads(tmp: Path) -> tuple[Workload, Workload]:
    init_ca(tmp / "ca", TRUST_DOMAIN)
    ca = load_ca(tmp / "ca")
    out = []
    for name in ("conn-server", "conn-client"):
        cert, key = ca.issue_with_new_key(f"spiffe://{TRUST_DOMAIN}/agent/{name}", common_name=name,
                                          dns_names=[f"{name}.agent.{TRUST_DOMAIN}"], ttl_s=3600)
        out.append(Workload.from_pems(cert, key, ca.bundle_pem()))
    return out[0], out[1]


@contextlib.asynccontextmanager
async def _pair(tmp: Path, limit: int = LIMIT) -> AsyncIterator[Pair]:
    """A LinkConnection (client, `open_tls`) to a peer served with asyncio's streams (GO, then TLS)."""
    server_workload, client_workload = _workloads(tmp)
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        asyncio.get_running_loop().create_future())

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(GO)
        await writer.drain()
        await writer.start_tls(server_context(server_workload))
        accepted.set_result((reader, writer))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client: LinkConnection | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        client = await open_tls("127.0.0.1", port, client_context(client_workload), SERVER_NAME, limit=limit)
        reader, writer = await asyncio.wait_for(accepted, 10)
        yield Pair(client, reader, writer)
    finally:
        if client is not None:
            client.abort()
        if writer is not None:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


async def _send_all(writer: asyncio.StreamWriter, messages: list[tuple[bytes, bool]], write_size: int) -> None:
    data = _wire(messages)
    for pos in range(0, len(data), write_size):  # each write a TLS record of its own, each drained
        writer.write(data[pos:pos + write_size])
        await writer.drain()


@pytest.mark.parametrize("write_size", [1, 1000, 16 * 1024, 1 << 30])
async def test_messages_over_tls_arrive_whole_and_in_order(tmp_path: Path, write_size: int) -> None:
    sizes = [0, 200, BODY_MIN, 64 * 1024, 5, 3 * 1024 * 1024 + 1, 100] if write_size > 1 else [0, 200, 5000, 9]
    messages = [(_message(n, i), False) for i, n in enumerate(sizes)]
    messages.append((b"\x08\x00", True))
    async with _pair(tmp_path) as pair:
        sending = asyncio.create_task(_send_all(pair.writer, messages, write_size))
        assert await pair.client.read_preamble(10) == 1
        assert await _drain(pair.client, len(messages)) == messages
        await asyncio.wait_for(sending, 30)
        pair.writer.close()
        assert await asyncio.wait_for(pair.client.read(), 10) is None  # TLS closed properly: a clean end


async def test_reading_pauses_while_nobody_reads_and_resumes(tmp_path: Path) -> None:
    messages = [(_message(64 * 1024, i), False) for i in range(3 * HIGH_WATER // (64 * 1024))]
    async with _pair(tmp_path) as pair:
        sending = asyncio.create_task(_send_all(pair.writer, messages, 1 << 30))
        assert await until(lambda: pair.client.reading_paused, 10), "the client never paused reading"
        assert await pair.client.read_preamble(10) == 1
        assert await _drain(pair.client, len(messages)) == messages
        await asyncio.wait_for(sending, 30)
        assert not pair.client.reading_paused


async def test_pieces_arrive_as_the_bytes_they_join_to(tmp_path: Path) -> None:
    cases = [[b""], [b"abc"], [b"a", b"b" * (JOIN_BELOW - 1)], [b"h", _message(64 * 1024, 1), b"t"],
             [_message(JOIN_BELOW, 2), b"x", b"y", _message(70_000, 3), _message(10, 4)]]
    async with _pair(tmp_path) as pair:
        for pieces in cases:
            joined = b"".join(pieces)
            pair.client.send(pieces, len(joined))
            await pair.client.drain()
            head = await asyncio.wait_for(pair.reader.readexactly(HEADER.size), 10)
            assert HEADER.unpack(head)[0] == len(joined)
            assert await asyncio.wait_for(pair.reader.readexactly(len(joined)), 10) == joined
        pair.client.send((b"\x08\x02",), 2, status=True)
        await pair.client.drain()
        assert await asyncio.wait_for(pair.reader.readexactly(6), 10) == HEADER.pack(2 | STATUS_BIT) + b"\x08\x02"


async def test_a_peer_that_goes_inside_a_message_fails_the_read(tmp_path: Path) -> None:
    async with _pair(tmp_path) as pair:
        data = _wire([(_message(64 * 1024, 5), False)])
        pair.writer.write(data[: len(data) // 2])
        await pair.writer.drain()
        await pair.client.read_preamble(10)
        pair.writer.close()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(pair.client.read(), 10)


async def test_over_the_limit_over_tls(tmp_path: Path) -> None:
    async with _pair(tmp_path, limit=1000) as pair:
        pair.writer.write(_wire([(b"ok", False)]) + HEADER.pack(5000) + b"\0" * 5000)
        await pair.writer.drain()
        await pair.client.read_preamble(10)
        assert await _drain(pair.client, 1) == [(b"ok", False)]
        with pytest.raises(LinkProtocolError, match="over the 1000-byte limit"):
            await asyncio.wait_for(pair.client.read(), 10)


async def test_drain_after_the_connection_is_lost_raises(tmp_path: Path) -> None:
    async with _pair(tmp_path) as pair:
        pair.writer.transport.abort()
        assert await until(lambda: pair.client.lost, 10), "the connection's loss never reached it"
        with pytest.raises(ConnectionResetError):
            await pair.client.drain()
        with contextlib.suppress(OSError):  # no message was open: a clean end (None), or the loss's reset
            assert await asyncio.wait_for(pair.client.read(), 10) is None

"""Backpressure on a served Link (`LinkServer`, `mesh/link_server.py`): a caller that sends calls and does not read
their answers must not make the server hold them all (it held every answer: 400 calls of 256 KiB held 96 MiB). The
link stops reading at `MAX_HELD_BYTES` of answers not yet written, or at its open-call bound (here `OPEN_BOUND`)
of calls unanswered, and HTTP/2 flow control holds the caller back; every call is still answered exactly once, a
deadline still ends a call while reading is paused, the link still ends when its caller goes or the server
stops, and a caller that reads its answers is not held back. Mutual TLS on loopback, raw Link streams (the
hoarding caller) and the SDK's own link client (`LinkedInvoke`, the caller that reads)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from hivemesh.controlplane.ca import load_ca
from hivemesh.mesh import link_wire
from hivemesh.mesh.link_server import MAX_HELD_BYTES, LinkServer, link_handler
from hivemesh.mesh.outbound.link import LinkedInvoke
from hivemesh.mesh.tls import channel_credentials, secure_channel, server_credentials
from hivemesh.v1 import agent_pb2
from tests.conftest import SessionCa
from tests.support.meshenv import TRUST_DOMAIN
from tests.support.waiting import until

OPEN_BOUND = 256
"""The open-call bound the test's link server is given (the default, MAX_OPEN_CALLS, is higher: a test of it
would hold thousands of calls)."""

pytestmark = pytest.mark.timeout(120)

LINK = "/hivemesh.v1.Agent/Link"
INVOKE = "/hivemesh.v1.Agent/Invoke"
SERVER_NAME = f"backpressure.agent.{TRUST_DOMAIN}"
LARGE = 256 * 1024
"""A hoarding caller's request (and so answer) size: the reviewer's repro."""
HOARDED = 160
"""Calls the hoarding caller sends: 40 MiB of answers, ten times the byte bound."""
QUIET_S = 1.0
"""The server's started calls have not moved for this long: it is holding the caller back (or served them all)."""
LIMIT_S = 30.0


def _payload(call_id: int, size: int) -> bytes:
    """A request (echoed back as the answer) that says which call it is in each of its bytes."""
    return call_id.to_bytes(4, "big") * (size // 4)


class Echo:
    """The Invoke a LinkServer serves (bytes in, bytes out); a request starting b"hang" waits for `release`. Unary
    calls are counted: they must stay 0 (every call here goes on a link)."""

    def __init__(self) -> None:
        self.unary = 0
        self.release = asyncio.Event()

    async def __call__(self, request: bytes, context: Any) -> bytes:
        if request.startswith(b"hang"):
            await self.release.wait()
        return request

    async def unary_invoke(self, request: bytes, context: Any) -> bytes:
        self.unary += 1
        return await self(request, context)


class Server:
    """A LinkServer on a mutual-TLS loopback port, and the means to open client channels to it."""

    def __init__(self, session_ca: SessionCa, echo: Echo) -> None:
        self.echo = echo
        self.links = LinkServer(None, grpc.unary_unary_rpc_method_handler(echo), max_open_calls=OPEN_BOUND)
        ca = load_ca(session_ca.files.certs_dir)
        self.bundle = ca.bundle_pem()
        self.cert, self.key = ca.issue_with_new_key(
            f"spiffe://{TRUST_DOMAIN}/agent/backpressure", common_name="backpressure", dns_names=[SERVER_NAME],
            ttl_s=600)
        self.client_cert, self.client_key = ca.issue_with_new_key(
            f"spiffe://{TRUST_DOMAIN}/client/caller", common_name="caller", dns_names=[], ttl_s=600)
        self.grpc = grpc.aio.server()
        self.grpc.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("hivemesh.v1.Agent", {
            "Invoke": grpc.unary_unary_rpc_method_handler(echo.unary_invoke), "Link": link_handler(self.links)})])
        self.port = self.grpc.add_secure_port("127.0.0.1:0", server_credentials(self.cert, self.key, self.bundle))

    def channel(self) -> grpc.aio.Channel:
        creds = channel_credentials(self.bundle, self.client_cert, self.client_key)
        return secure_channel(f"127.0.0.1:{self.port}", creds, server_name=SERVER_NAME)


@contextlib.asynccontextmanager
async def _serving(session_ca: SessionCa) -> AsyncIterator[Server]:
    server = Server(session_ca, Echo())
    await server.grpc.start()
    try:
        yield server
    finally:
        server.echo.release.set()
        await server.grpc.stop(None)


def _hoard(channel: grpc.aio.Channel, calls: int, size: int, *, hang_s: float = 0.0
           ) -> grpc.aio.StreamStreamCall[bytes, bytes]:
    """A raw Link stream that sends calls call frames of size bytes (ids 1..calls), then closes its side; nothing
    reads its answers until the test does. It does not announce batches: each answer comes as its own message.
    With hang_s, each call hangs (see `Echo`) with that deadline."""

    async def frames() -> AsyncIterator[bytes]:
        for call_id in range(1, calls + 1):
            request = b"hang%d" % call_id if hang_s else _payload(call_id, size)
            yield link_wire.pack([link_wire.call_frame(call_id, request, agent_pb2.LinkCall(timeout_s=hang_s))])

    stream: grpc.aio.StreamStreamCall[bytes, bytes] = channel.stream_stream(LINK)(frames())
    return stream


def _quiet(count: Callable[[], int], enough: int) -> Callable[[], bool]:
    """A condition for `until`: count() reached enough, or has not moved for QUIET_S."""
    last = [count(), time.monotonic()]

    def cond() -> bool:
        now, value = time.monotonic(), count()
        if value != last[0]:
            last[:] = [value, now]
        return value >= enough or now - last[1] >= QUIET_S

    return cond


async def _answers(stream: grpc.aio.StreamStreamCall[bytes, bytes]) -> dict[int, list[agent_pb2.LinkAnswer]]:
    """Every answer frame the stream carries until it ends, by call id (a list, to see an answer sent twice)."""
    answers: dict[int, list[agent_pb2.LinkAnswer]] = {}
    async for message in stream:
        frame = agent_pb2.LinkFrame.FromString(message)
        assert frame.WhichOneof("body") == "answer", frame
        answers.setdefault(frame.id, []).append(frame.answer)
    return answers


async def test_a_caller_that_reads_no_answers_is_held_back_then_answered_in_full_and_others_are_not(
    session_ca: SessionCa,
) -> None:
    async with _serving(session_ca) as server:
        links = server.links
        hoarder = server.channel()
        reader = server.channel()
        try:
            stream = _hoard(hoarder, HOARDED, LARGE)
            assert await until(_quiet(lambda: links.calls, HOARDED), LIMIT_S)
            # Held back: the server stopped taking its calls once their unwritten answers reached the byte bound
            # (each call here is answered at once, so no more are running when it stops).
            assert links.calls < HOARDED, f"the server started all {links.calls} calls of a caller that reads none"
            held, held_bytes = links.held()
            assert links.pauses >= 1
            assert MAX_HELD_BYTES <= held_bytes <= MAX_HELD_BYTES + 2 * LARGE, (held, held_bytes)
            # The rest were written into the caller's HTTP/2 windows (gRPC's own flow control bounds those).
            assert links.calls <= HOARDED // 2, f"{links.calls} calls started for a caller that reads no answers"
            started = links.calls

            # A caller that reads its answers, 16 in flight on its own link, meanwhile: served as ever, not held.
            linked = LinkedInvoke(reader, reader.unary_unary(INVOKE))
            try:
                pauses = links.pauses
                assert await linked(b"proves the link", timeout=LIMIT_S) == b"proves the link"  # then 16 at once
                for round_ in range(4):
                    requests = [_payload(round_ * 16 + n, 64 * 1024) for n in range(16)]
                    got = await asyncio.gather(*(linked(request, timeout=LIMIT_S) for request in requests))
                    assert got == requests
                assert links.pauses == pauses, "a caller that reads its answers was held back"
                assert server.echo.unary == 0 and links.links == 2
            finally:
                linked.close()
            assert links.calls == started + 65, "the hoarding caller's calls moved while it read nothing"

            # Once it reads: every call answered exactly once, in full, and the link ends as usual.
            answers = await _answers(stream)
            assert await stream.code() == grpc.StatusCode.OK
            assert sorted(answers) == list(range(1, HOARDED + 1))
            for call_id, got_answers in answers.items():
                assert len(got_answers) == 1, f"call {call_id} answered {len(got_answers)} times"
                assert got_answers[0].code == 0 and got_answers[0].response == _payload(call_id, LARGE), call_id
            assert links.calls == HOARDED + 65 and links.held() == (0, 0)
        finally:
            await hoarder.close()
            await reader.close()


async def test_past_the_open_call_bound_reading_waits_and_deadlines_still_end_the_calls(
    session_ca: SessionCa,
) -> None:
    """Calls that never finish (each with a deadline), more than OPEN_BOUND of them, from a caller that reads:
    the server runs OPEN_BOUND and reads no further; their deadlines answer them while reading is paused, which
    makes room for the rest; every call is answered DEADLINE_EXCEEDED exactly once."""
    calls = OPEN_BOUND + 100
    async with _serving(session_ca) as server:
        links = server.links
        channel = server.channel()
        try:
            stream = _hoard(channel, calls, 0, hang_s=2.0)
            answers: dict[int, list[agent_pb2.LinkAnswer]] = {}
            most_before_an_answer = 0

            async def read() -> None:
                nonlocal most_before_an_answer
                async for message in stream:
                    if not answers:
                        most_before_an_answer = max(most_before_an_answer, links.calls)
                    frame = agent_pb2.LinkFrame.FromString(message)
                    answers.setdefault(frame.id, []).append(frame.answer)

            reading = asyncio.ensure_future(read())
            try:
                assert await until(_quiet(lambda: links.calls, calls), LIMIT_S)
                if not answers:
                    most_before_an_answer = max(most_before_an_answer, links.calls)
                assert most_before_an_answer == OPEN_BOUND, (
                    f"{most_before_an_answer} calls running at once on one link (bound {OPEN_BOUND})")
                await asyncio.wait_for(reading, LIMIT_S)
            finally:
                reading.cancel()
            assert await stream.code() == grpc.StatusCode.OK
            assert sorted(answers) == list(range(1, calls + 1))
            assert all(len(got) == 1 and got[0].code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
                       for got in answers.values()), "a call was not answered exactly once, at its deadline"
            assert links.calls == calls and links.pauses >= 1 and links.held() == (0, 0)
        finally:
            await channel.close()


async def test_a_held_back_link_still_ends_when_its_caller_goes_or_the_server_stops(session_ca: SessionCa) -> None:
    async with _serving(session_ca) as server:
        links = server.links
        channel = server.channel()
        try:
            # Its caller cancels the stream while the server is not reading it: the link ends, nothing held.
            gone = _hoard(channel, HOARDED, LARGE)
            assert await until(_quiet(lambda: links.calls, HOARDED), LIMIT_S)
            assert links.calls < HOARDED and links.pauses >= 1 and links.held()[1] >= MAX_HELD_BYTES
            gone.cancel()
            assert await until(lambda: links.open_links == 0, LIMIT_S), "a cancelled link was kept"
            assert links.held() == (0, 0)

            # The server drains and stops while another such link is held back: the stop is not held up beyond
            # its grace, and the link ends.
            calls, pauses = links.calls, links.pauses
            held_back = _hoard(channel, HOARDED, LARGE)
            assert await until(_quiet(lambda: links.calls, calls + HOARDED), LIMIT_S)
            assert links.calls < calls + HOARDED and links.pauses > pauses
            links.drain()
            started = time.monotonic()
            await server.grpc.stop(1.0)
            assert time.monotonic() - started < 10.0
            assert await until(lambda: links.open_links == 0, LIMIT_S), "a link outlived its server"
            with pytest.raises(grpc.aio.AioRpcError):
                await _answers(held_back)
        finally:
            await channel.close()

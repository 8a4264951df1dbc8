"""A `MeshClient`'s lifecycle: used before start, started twice, used or reused after close. Each misuse is refused
at once with a message saying what to do, opening nothing; a second start is a no-op. Before, a closed client
still called (routed from a registry view no longer kept fresh, on a channel and link nothing closed), a reused
one failed halfway through renewing its identity with "a stopped PrefixCache cannot be restarted", a second
start() opened a second audit log whose files and shipper outlived close(), and a client never started said
"MeshNode.start() has not run".

close() racing what runs: a call it cuts raises the mesh's CancelledError saying so (a unary call raised asyncio's
CancelledError into a task nobody cancelled, a link's frame said "the link was closed by this node"), while a caller
whose own task is cancelled still sees asyncio's; a batch stream yields its calls in flight as their items' errors,
then ends with the closed client's error (its consumer's task ended cancelled); a start() it races fails at once
(it failed with "a stopped PrefixCache cannot be restarted", or waited 15 s for an etcd that was fine); a close()
cut short is finished by the next (its audit log and shipper were left open). A start() that failed part-way says
so on a retry (it said "was stopped", though nobody stopped it). Real agent, real MeshClient, real etcd and mutual
TLS on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path

import pytest

from hivemesh.mesh.errors import CancelledError, FailedPreconditionError, HivemeshError
from hivemesh.mesh.outbound.pipeline import CUT_HERE
from hivemesh.sdk import Agent, AgentServer, MeshClient, capability
from tests.support.agents_for_tests import EchoAgent
from tests.support.orch_env import Orch
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(120)

CLOSED = "this MeshClient is closed; create a new one with MeshClient.connect(...)"
NOT_STARTED = ("this MeshClient is not started: use `async with MeshClient.connect(...) as mesh:` or "
               "`await mesh.start()`")
CUT = "this MeshClient was closed while the call was in flight: the call may have run"


class Holder(Agent):
    """Holds each call until released (at most 30 s): a call in flight when its client closes."""

    name = "holder"

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.entries = 0
        """Calls (and streams) being held now or before."""

    @capability()
    async def hold(self, req: dict[str, str]) -> dict[str, str]:
        self.entries += 1
        self.entered.set()
        await asyncio.wait_for(self.release.wait(), 30)
        return req

    @capability()
    async def hold_stream(self, req: dict[str, str]) -> AsyncIterator[str]:
        """Streams the text, then holds the stream open until released."""
        yield req["text"]
        self.entries += 1
        await asyncio.wait_for(self.release.wait(), 30)


def _tasks(*qualnames: str) -> list[asyncio.Task[object]]:
    """The running tasks whose coroutine is one of qualnames (e.g. "_Link._read")."""
    found = []
    for task in asyncio.all_tasks():
        coro = task.get_coro()
        if not task.done() and getattr(coro, "__qualname__", "") in qualnames:
            found.append(task)
    return found


def _link_tasks() -> list[asyncio.Task[object]]:
    return _tasks("_Link._read", "_Link._write")


def _open_under(folder: Path) -> list[str]:
    """Paths under folder this process holds open (its file descriptors)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(folder)):
                held.append(target)
    return held


def _channels(mesh: MeshClient) -> int:
    """Channels the client's node holds open to agents."""
    pool = mesh.node._channels
    return 0 if pool is None else len(pool._endpoints)


async def _refused(what: str, attempt: Awaitable[object], message: str) -> None:
    """attempt raises FailedPreconditionError with exactly message, at once."""
    with pytest.raises(FailedPreconditionError) as caught:
        await asyncio.wait_for(attempt, 5)
    assert caught.value.message == message, (what, caught.value.message)


async def _every_operation_refused(mesh: MeshClient, message: str) -> None:
    await _refused("call", mesh.call("echo", {"text": "after"}, timeout=5), message)
    await _refused("call_detailed", mesh.call_detailed("echo", {"text": "after"}, timeout=5), message)
    await _refused("stream", anext(aiter(mesh.stream("shout", {"text": "a b"}, timeout=5))), message)
    await _refused("call_batch", mesh.call_batch("echo", [{"text": "a"}, {"text": "b"}], timeout=5), message)
    with pytest.raises(FailedPreconditionError) as streamed:  # at the call, before any item
        mesh.call_batch_stream("echo", [{"text": "a"}], timeout=5)
    assert streamed.value.message == message, streamed.value.message
    await _refused("enqueue", mesh.enqueue("echo", {"text": "held"}, max_wait=5), message)
    await _refused("queued", mesh.queued("some-id"), message)
    await _refused("held_calls", mesh.held_calls(), message)
    await _refused("resume_queued", mesh.resume_queued(), message)


async def test_a_closed_client_refuses_every_operation_at_once_and_opens_nothing(orch: Orch) -> None:
    await orch.serve(EchoAgent())
    holder = Holder()
    await orch.serve(holder)
    settings = await orch.env.settings_for("closed-caller", "client")
    held: asyncio.Task[object]
    async with MeshClient.connect(name="closed-caller", settings=settings, link=True) as mesh:
        assert (await mesh.call("echo", {"text": "before"}, timeout=5))["text"] == "before"
        assert _link_tasks(), "the call opened no link"
        instance = mesh.instances("echo")[0]
        held = asyncio.create_task(mesh.call("hold", {"text": "held"}, timeout=60))
        await asyncio.wait_for(holder.entered.wait(), 10)
    # close() with a call in flight cancels it, at once, as it always did.
    with pytest.raises(HivemeshError) as caught:
        await asyncio.wait_for(held, 10)
    assert isinstance(caught.value, CancelledError) or caught.value.reason == "UNAVAILABLE", caught.value
    holder.release.set()
    assert await until(lambda: not _link_tasks(), 10), f"links left open after close: {_link_tasks()}"

    await _every_operation_refused(mesh, CLOSED)
    await _refused("call_on", mesh.call_on(instance, "echo", {"text": "after"}, timeout=5), CLOSED)
    assert not _link_tasks(), "a refused call opened a link"
    assert _channels(mesh) == 0, "a refused call opened a channel"
    await mesh.close()  # closing again is harmless
    await mesh.close()


async def test_reusing_a_closed_client_is_refused_before_it_does_anything(orch: Orch, tmp_path: Path) -> None:
    await orch.serve(EchoAgent())
    identity = tmp_path / "identity"
    settings = dataclasses.replace(await orch.env.settings_for("reused-caller", "client"), identity_dir=identity)
    mesh = MeshClient.connect(name="reused-caller", settings=settings)
    async with mesh:
        assert (await mesh.call("echo", {"text": "first"}, timeout=5))["text"] == "first"
    kept = {p: p.read_bytes() for p in identity.rglob("*") if p.is_file()}
    assert kept, "the client kept no identity to renew"
    workload = mesh.node.workload

    with pytest.raises(FailedPreconditionError) as caught:
        async with asyncio.timeout(10), mesh:
            pytest.fail("a closed client started again")
    assert caught.value.message == CLOSED, caught.value.message
    # Nothing was done: the stored identity was not renewed, no new control-plane client or channels were made.
    assert {p: p.read_bytes() for p in identity.rglob("*") if p.is_file()} == kept, "the identity was renewed"
    assert mesh.node.workload is workload
    assert mesh.node._channels is None and mesh.node._tokens is None
    await _refused("start", mesh.start(), CLOSED)


async def test_starting_a_started_client_again_opens_nothing_more(orch: Orch, tmp_path: Path) -> None:
    await orch.serve(EchoAgent())
    audit_dir = tmp_path / "client-audit"
    settings = await orch.env.settings_for("twice-started", "client")
    mesh = MeshClient.connect(name="twice-started", settings=settings, audit_dir=audit_dir)
    await mesh.start()
    try:
        first, held = mesh.audit, sorted(_open_under(audit_dir))
        shippers = len(_tasks("Shipper._run"))
        assert first is not None and held, "the client opened no audit spool"
        async with mesh:  # start() again, as `async with` does
            assert mesh.audit is first, "a second start() opened a second audit log"
            assert sorted(_open_under(audit_dir)) == held, "a second start() opened more audit files"
            assert len(_tasks("Shipper._run")) == shippers, "a second start() started a second shipper"
            assert (await mesh.call("echo", {"text": "ok"}, timeout=5))["text"] == "ok"
    finally:
        await mesh.close()
    assert await until(lambda: not _open_under(audit_dir), 10), f"left open: {_open_under(audit_dir)}"
    assert await until(lambda: len(_tasks("Shipper._run")) < shippers, 10), "a shipper still runs after close()"


async def test_a_client_never_started_says_how_to_start_it(orch: Orch) -> None:
    await orch.serve(EchoAgent())
    mesh = MeshClient.connect(name="unstarted", settings=await orch.env.settings_for("unstarted", "client"))
    await _every_operation_refused(mesh, NOT_STARTED)
    # Started as the message says, it calls.
    async with mesh:
        assert (await mesh.call("echo", {"text": "now"}, timeout=5))["text"] == "now"


async def test_an_agents_own_client_refuses_calls_once_its_server_stopped(orch: Orch) -> None:
    """An agent's client shares its server's node: once the server stopped, the node says the agent left."""
    await orch.serve(EchoAgent())
    server = AgentServer(Holder(), await orch.env.settings_for("holder"))
    async with server:
        assert (await server.mesh.call("echo", {"text": "in"}, timeout=5))["text"] == "in"
    left = "agent 'holder' has left the mesh (it was stopped): it makes no more calls"
    await _refused("call", server.mesh.call("echo", {"text": "after"}, timeout=5), left)
    await _refused("stream", anext(aiter(server.mesh.stream("shout", {"text": "a b"}, timeout=5))), left)
    assert not _link_tasks() and server.node._channels is None, "a refused call opened a channel"
    restart = "agent 'holder' was stopped and cannot start again: create a new one"
    await _refused("restart", server.node.start(), restart)


def _cut_by_close(task: asyncio.Task[object], what: str) -> None:
    """task, which nobody cancelled, ended with the mesh's CancelledError saying its client was closed."""
    assert not task.cancelled(), f"{what}: asyncio's CancelledError escaped into a task nobody cancelled"
    err = task.exception()
    assert isinstance(err, CancelledError), (what, err)
    assert err.message == CUT, (what, err.message)


@pytest.mark.parametrize("link", [False, True], ids=["unary", "link"])
async def test_a_call_cut_by_close_says_the_client_was_closed_and_a_cancelled_caller_stays_cancelled(
    orch: Orch, link: bool
) -> None:
    holder = Holder()
    await orch.serve(holder)
    name = f"cut-{'link' if link else 'unary'}"
    mesh = MeshClient.connect(name=name, settings=await orch.env.settings_for(name, "client"), link=link)
    await mesh.start()
    calls: list[asyncio.Task[object]] = []
    for i in range(3):  # with link=True the first goes as a frame on the link, the others unary (link not proven)
        calls.append(asyncio.create_task(mesh.call("hold", {"text": str(i)}, timeout=60)))
        assert await until(lambda n=i: holder.entries > n, 10), f"call {i} never reached the agent"
    assert bool(_link_tasks()) == link, "the link was not (or was) opened"
    words: list[str] = []

    async def read() -> None:
        async for word in mesh.stream("hold-stream", {"text": "first"}, timeout=60):
            words.append(word)

    streamed = asyncio.create_task(read())
    assert await until(lambda: holder.entries == 4 and words == ["first"], 10), words
    cancelled = calls.pop()
    cancelled.cancel()  # the caller's own cancellation, delivered as close() cuts the others
    try:
        await mesh.close()
        _, pending = await asyncio.wait([*calls, cancelled, streamed], timeout=10)
        assert not pending, f"calls outlived close(): {pending}"
        assert cancelled.cancelled(), f"a cancelled caller ended with {cancelled.exception()!r}"
        for i, task in enumerate(calls):
            _cut_by_close(task, f"call {i}")
        _cut_by_close(streamed, "stream")
        assert words == ["first"]
    finally:
        holder.release.set()
    assert await until(lambda: not _link_tasks(), 10), f"links left open after close: {_link_tasks()}"
    await _every_operation_refused(mesh, CLOSED)


async def test_a_call_whose_connection_this_node_closed_says_so(orch: Orch) -> None:
    """The client is not closed: its node closed the call's channel, as it does with a renewal's retired channels
    (after their grace) or when stopping. The pipeline says so (gRPC raised asyncio's CancelledError)."""
    holder = Holder()
    await orch.serve(holder)
    mesh = MeshClient.connect(name="cut-here", settings=await orch.env.settings_for("cut-here", "client"), link=False)
    async with mesh:
        called = asyncio.create_task(mesh.call("hold", {"text": "held"}, timeout=60))
        words: list[str] = []

        async def read() -> None:
            async for word in mesh.stream("hold-stream", {"text": "first"}, timeout=60):
                words.append(word)

        streamed = asyncio.create_task(read())
        assert await until(lambda: holder.entries == 2 and words == ["first"], 10), (holder.entries, words)
        pool = mesh.node._channels
        assert pool is not None
        await pool.close()
        _, pending = await asyncio.wait([called, streamed], timeout=10)
        assert not pending, "a call outlived its channel"
        for what, task in (("call", called), ("stream", streamed)):
            assert not task.cancelled(), f"{what}: asyncio's CancelledError escaped into a task nobody cancelled"
            err = task.exception()
            assert isinstance(err, CancelledError) and err.message == CUT_HERE, (what, err)
        holder.release.set()
        assert (await mesh.call("hold", {"text": "again"}, timeout=10))["text"] == "again"  # a new channel


@pytest.mark.parametrize("link", [False, True], ids=["unary", "link"])
async def test_a_batch_stream_cut_by_close_yields_its_calls_in_flight_then_ends_with_the_closed_error(
    orch: Orch, link: bool
) -> None:
    holder = Holder()
    await orch.serve(holder)
    name = f"batch-cut-{'link' if link else 'unary'}"
    mesh = MeshClient.connect(name=name, settings=await orch.env.settings_for(name, "client"), link=link)
    await mesh.start()
    taken = 0
    closed_input = False

    def inputs() -> Iterator[dict[str, str]]:  # endless: only closing the client ends the stream
        nonlocal taken, closed_input
        try:
            for i in itertools.count():
                taken += 1
                yield {"text": str(i)}
        finally:
            closed_input = True

    items = []

    async def consume() -> None:
        async for item in mesh.call_batch_stream("hold", inputs(), concurrency=2, timeout=60):
            items.append(item)

    consumer = asyncio.create_task(consume())
    try:
        assert await until(lambda: holder.entries == 2, 10), "the batch's calls never reached the agent"
        await mesh.close()
        done, _ = await asyncio.wait([consumer], timeout=10)
        assert done, "the stream went on after close()"
        assert not consumer.cancelled(), "asyncio's CancelledError escaped into the consumer, which nobody cancelled"
        ended = consumer.exception()
        assert isinstance(ended, FailedPreconditionError) and ended.message == CLOSED, ended
        assert sorted(item.index for item in items) == [0, 1], items
        for item in items:
            assert isinstance(item.error, CancelledError) and item.error.message == CUT, item
        assert taken == 2 and closed_input, f"{taken} inputs read; input closed: {closed_input}"
    finally:
        holder.release.set()


def _named_tasks() -> dict[str, int]:
    """Running tasks a started client owns, by what they are: none may outlive a start() that close() cut."""
    counts = {"renew": len(_tasks("MeshNode._renew_loop")), "shipper": len(_tasks("Shipper._run")),
              "status": len(_tasks("StatusPublisher._run")), "opening": len(_tasks("MeshNode._open"))}
    counts["watches"] = sum(1 for t in asyncio.all_tasks()
                            if not t.done() and t.get_name().startswith("hivemesh-watch"))
    return counts


async def test_close_during_start_fails_the_start_at_once_and_leaves_nothing_running(
    orch: Orch, tmp_path: Path
) -> None:
    await orch.serve(EchoAgent())
    baseline = _named_tasks()  # the agent's own
    reference = MeshClient.connect(name="cds-ref", settings=await orch.env.settings_for("cds-ref", "client"),
                                   audit_dir=tmp_path / "audit-ref")
    began = time.monotonic()
    await reference.start()
    took = time.monotonic() - began
    await reference.close()
    assert await until(lambda: _named_tasks() == baseline, 10), (_named_tasks(), baseline)
    cut = 0
    # From before start() ran at all to about when it ends: each part of it (join, watches, audit) is cut somewhere.
    for i, share in enumerate([0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2]):
        name = f"cds-{i}"
        audit_dir = tmp_path / f"audit-{i}"
        mesh = MeshClient.connect(name=name, settings=await orch.env.settings_for(name, "client"), audit_dir=audit_dir)
        start = asyncio.create_task(mesh.start())
        await asyncio.sleep(took * share)
        started_first = start.done()
        closing = time.monotonic()
        await asyncio.wait_for(mesh.close(), 5)
        done, _ = await asyncio.wait([start], timeout=5)
        assert done, f"start() still runs {time.monotonic() - closing:.1f} s after close() (delay {took * share:.3f} s)"
        if started_first:
            assert start.exception() is None, start.exception()
        else:
            cut += 1
            err = start.exception()
            assert isinstance(err, FailedPreconditionError) and err.message == CLOSED, (share, err)
            assert time.monotonic() - closing < 2, f"start() failed only {time.monotonic() - closing:.1f} s later"
        assert await until(lambda: _named_tasks() == baseline, 10), (share, _named_tasks(), baseline)
        assert await until(lambda d=audit_dir: not _open_under(d), 10), (share, _open_under(audit_dir))
        assert mesh.node._channels is None and mesh.audit is None, share
        await _refused("start again", mesh.start(), CLOSED)
    assert cut, "close() cut no start()"


async def test_a_start_that_failed_part_way_says_so_when_tried_again(orch: Orch) -> None:
    await orch.serve(EchoAgent())
    renewing = len(_tasks("MeshNode._renew_loop"))  # the agent's
    with socket.socket() as taken:  # the metrics port, bound last in start(): after the watches were started
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        mesh = MeshClient.connect(name="failed-start", settings=await orch.env.settings_for("failed-start", "client"),
                                  metrics_listen=f"127.0.0.1:{port}")
        with pytest.raises(OSError) as first:
            await asyncio.wait_for(mesh.start(), 20)
    assert f"port {port} is already in use" in str(first.value), first.value
    failed = (f"this MeshClient's earlier start failed ({type(first.value).__name__}: {first.value}): create a "
              "new one with MeshClient.connect(...)")
    await _refused("start again", mesh.start(), failed)
    await _refused("call", mesh.call("echo", {"text": "x"}, timeout=5), failed)
    node_says = (f"client 'failed-start' cannot start again: its earlier start failed "
                 f"({type(first.value).__name__}: {first.value}): create a new one")
    await _refused("node start again", mesh.node.start(), node_says)
    assert mesh.node._channels is None and len(_tasks("MeshNode._renew_loop")) == renewing, "the start left parts open"
    await mesh.close()
    await _refused("start after close", mesh.start(), CLOSED)


async def test_a_close_cut_short_is_finished_by_the_next(orch: Orch, tmp_path: Path) -> None:
    await orch.serve(EchoAgent())
    audit_dir = tmp_path / "client-audit"
    mesh = MeshClient.connect(name="close-twice", settings=await orch.env.settings_for("close-twice", "client"),
                              audit_dir=audit_dir)
    shippers = len(_tasks("Shipper._run"))
    await mesh.start()
    assert mesh.audit is not None and len(_tasks("Shipper._run")) == shippers + 1
    with pytest.raises(HivemeshError):  # refused here, so audited: a record for the shipper to drain at close
        await mesh.call("no-such-capability", {}, timeout=5)
    assert mesh.audit.spool.pending > 0, "nothing left to ship"
    closing = asyncio.create_task(mesh.close())
    await asyncio.sleep(0)  # close() runs to the audit log's drain of that record
    closing.cancel()  # a timeout around `async with`, say
    await asyncio.wait([closing], timeout=10)
    assert closing.cancelled(), "close() was not cut short"
    await asyncio.wait_for(mesh.close(), 10)
    assert await until(lambda: not _open_under(audit_dir), 10), f"left open: {_open_under(audit_dir)}"
    assert await until(lambda: len(_tasks("Shipper._run")) == shippers, 10), "the shipper still runs after close()"
    assert mesh.audit is None

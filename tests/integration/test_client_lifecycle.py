"""A `MeshClient`'s lifecycle: used before start, started twice, used or reused after close. Each misuse is refused
at once with a message saying what to do, opening nothing; a second start is a no-op. Before, a closed client
still called (routed from a registry view no longer kept fresh, on a channel and link nothing closed), a reused
one failed halfway through renewing its identity with "a stopped PrefixCache cannot be restarted", a second
start() opened a second audit log whose files and shipper outlived close(), and a client never started said
"MeshNode.start() has not run". Real agent, real MeshClient, real etcd and mutual TLS on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import Awaitable
from pathlib import Path

import pytest

from hivemesh.mesh.errors import CancelledError, FailedPreconditionError, HivemeshError
from hivemesh.sdk import Agent, AgentServer, MeshClient, capability
from tests.support.agents_for_tests import EchoAgent
from tests.support.orch_env import Orch
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(120)

CLOSED = "this MeshClient is closed; create a new one with MeshClient.connect(...)"
NOT_STARTED = ("this MeshClient is not started: use `async with MeshClient.connect(...) as mesh:` or "
               "`await mesh.start()`")


class Holder(Agent):
    """Holds each call until released (at most 30 s): a call in flight when its client closes."""

    name = "holder"

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    @capability()
    async def hold(self, req: dict[str, str]) -> dict[str, str]:
        self.entered.set()
        await asyncio.wait_for(self.release.wait(), 30)
        return req


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

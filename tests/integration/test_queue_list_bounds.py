"""`Mesh.ListQueued` stays within one message however large the held calls are, on a real mesh (etcd with TLS and
roles, an agent served over mTLS, a sidecar's `Mesh` service through generated stubs).

Before: ListQueued carried every delivered call's full answer (up to ~750 KB each), so a dozen of them made it fail
RESOURCE_EXHAUSTED "Sent message larger than max" for as long as they were kept, and a restarted agent could not
find its held calls. Now it lists each call's metadata without the answer (GetQueued by id returns it) and no more
calls than fit, naming how many it left off (trailing metadata `hivemesh-left-off`).

Found on the way: a call enqueued while the delivery loop was mid-pass stayed held, undelivered, until another
enqueue came along (the pass had read etcd before it was written, and ended with nothing pending).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc

from hivemesh.mesh.queue import DONE, CallQueue
from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
from hivemesh.mesh.tls import MAX_MESSAGE_BYTES
from hivemesh.v1 import agent_pb2, mesh_pb2, mesh_pb2_grpc
from tests.support.orch_env import Orch, wait_until
from tests.support.queue_calls import BIG_RECEIVE, LEFT_OFF_HEADER, Blob, held_request
from tests.support.waiting import until


def _sidecar(orch: Orch, settings: Any) -> Sidecar:
    return Sidecar(SidecarConfig(client="queuer", mesh_listen="127.0.0.1:0", audit=False), settings)


async def test_delivered_answers_are_not_listed_and_get_queued_returns_each(orch: Orch) -> None:
    await orch.serve(Blob())
    answers = 13  # ~700 KB each: together past the 8 MiB message limit
    async with _sidecar(orch, await orch.env.settings_for("queuer", "client")) as sidecar, \
            grpc.aio.insecure_channel(sidecar.mesh_endpoint, options=BIG_RECEIVE) as channel:
        stub = mesh_pb2_grpc.MeshStub(channel)
        ids = [(await stub.Enqueue(held_request(f"job-{i}", capability="blob", payload={"n": 700_000}), timeout=10)).id
               for i in range(answers)]
        assert sidecar.queue is not None and sidecar.queue.queue is not None
        queue = sidecar.queue.queue

        async def delivered() -> bool:
            return [c.state for c in await queue.held()] == ["done"] * answers

        # Bounded: deliveries of ~1 MB entries, one after another, on a shared machine.
        await wait_until(delivered, 90, "every held call delivered", interval=0.2)

        call = stub.ListQueued(mesh_pb2.ListQueuedRequest(), timeout=20)
        listed = await call
        assert LEFT_OFF_HEADER not in dict(await call.trailing_metadata() or ())  # all of them fit
        assert [c.id for c in listed.calls] == ids  # every call, oldest first
        assert all(c.state == "done" and not c.HasField("response") and not c.HasField("error") for c in listed.calls)
        assert [c.call_id for c in listed.calls] == [f"job-{i}" for i in range(answers)]
        assert listed.ByteSize() < 10_000  # metadata only
        for held_id in ids:  # the answer is one GetQueued away
            got = await stub.GetQueued(mesh_pb2.GetQueuedRequest(id=held_id), timeout=10)
            assert got.state == "done" and len(json.loads(got.response.output)["data"]) == 700_000


async def test_a_listing_past_the_message_limit_stops_and_says_how_many_it_left_off(orch: Orch) -> None:
    """Held calls carry the caller's call_id whole (each up to most of an entry): 22 of 400 KB pass the limit."""
    held = 22
    async with _sidecar(orch, await orch.env.settings_for("queuer", "client")) as sidecar, \
            grpc.aio.insecure_channel(sidecar.mesh_endpoint, options=BIG_RECEIVE) as channel:
        stub = mesh_pb2_grpc.MeshStub(channel)
        call_ids = [f"{i:02d}-" + "c" * 400_000 for i in range(held)]
        ids = [(await stub.Enqueue(held_request(cid, capability="nobody"), timeout=20)).id for cid in call_ids]

        call = stub.ListQueued(mesh_pb2.ListQueuedRequest(), timeout=30)
        listed = await call
        trailers = dict(await call.trailing_metadata() or ())
        assert listed.ByteSize() <= MAX_MESSAGE_BYTES
        kept = len(listed.calls)
        assert 15 <= kept < held, kept
        assert [c.id for c in listed.calls] == ids[:kept] and [c.call_id for c in listed.calls] == call_ids[:kept]
        assert trailers.get(LEFT_OFF_HEADER) == str(held - kept), trailers
        # A call left off is still there, by its id.
        last = await stub.GetQueued(mesh_pb2.GetQueuedRequest(id=ids[-1]), timeout=10)
        assert last.state == "queued" and last.call_id == call_ids[-1]



async def test_a_call_held_while_a_delivery_pass_runs_is_delivered_too(etcd: Any) -> None:
    release = asyncio.Event()
    sent: list[bytes] = []

    async def invoke(raw: bytes, capability: str, key: str, timeout: float | None) -> bytes:
        sent.append(raw)
        if raw == b"first":
            await release.wait()  # the pass that read only the first call is still running
        return agent_pb2.InvokeResponse(output=b'"ok"').SerializeToString()

    queue = CallQueue(etcd, "client-racer", invoke, lambda cap: True, poll_s=0.05)
    try:
        await queue.enqueue("echo", b"first", "", 60)
        assert await until(lambda: sent == [b"first"], 10), sent
        second = await queue.enqueue("echo", b"second", "", 60)  # the loop is running: start() does nothing
        release.set()

        async def delivered() -> bool:
            return (await queue.get(second)).state == DONE

        await wait_until(delivered, 15, "the call held mid-pass delivered")
        assert sent == [b"first", b"second"]
    finally:
        release.set()
        await queue.stop()

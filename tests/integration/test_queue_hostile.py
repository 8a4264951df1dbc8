"""Held calls that could never be delivered, or that are merely large, on a real mesh (etcd with TLS and roles):

- through a sidecar's `Mesh` service (generated stubs only): an empty or malformed capability, a call too large
  for etcd (Enqueue and Call with queue_for_ms), and a GetQueued id that is huge, malformed or not UTF-8 are each
  refused with a clear status naming the field, never UNKNOWN with aetcd's text, and nothing is held;
- held calls up to the size bound (five of ~1 MB: more than gRPC's default 4 MiB in one read) stay readable,
  counted and delivered, and an answer too large to keep fails that call PAYLOAD_TOO_LARGE instead of being lost.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from hivemesh.mesh.errors import (
    HivemeshError,
    InvalidInputError,
    PayloadTooLargeError,
    QueueFullError,
    from_rpc_error,
)
from hivemesh.mesh.queue import DONE, FAILED, CallQueue
from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
from hivemesh.v1 import agent_pb2, mesh_pb2, mesh_pb2_grpc
from tests.support.orch_env import Orch, wait_until


def _req(capability: str, size: int = 10, queue_for_ms: int = 0) -> agent_pb2.InvokeRequest:
    return agent_pb2.InvokeRequest(capability=capability, input=b"x" * size, content_type="application/json",
                                   queue_for_ms=queue_for_ms)


async def _refused(call: Any) -> HivemeshError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    assert len(refused.value.details() or "") < 400  # a clipped echo, never the caller's input back
    return from_rpc_error(refused.value)


async def test_sidecar_refuses_held_calls_it_could_never_deliver(orch: Orch) -> None:
    sidecar = Sidecar(SidecarConfig(client="queuer", mesh_listen="127.0.0.1:0", audit=False),
                      await orch.env.settings_for("queuer", "client"))
    async with sidecar, grpc.aio.insecure_channel(sidecar.mesh_endpoint) as channel:
        stub = mesh_pb2_grpc.MeshStub(channel)
        for capability in ("", "Not A Name!", "c" * 64):
            bad = await _refused(stub.Enqueue(_req(capability, queue_for_ms=60_000), timeout=5))
            assert isinstance(bad, InvalidInputError) and "capability" in bad.field_violations, (capability, bad)
        bad = await _refused(stub.Call(_req("", queue_for_ms=60_000), timeout=10))  # Call's queue fallback
        assert isinstance(bad, InvalidInputError) and "capability" in bad.field_violations, bad

        # 1.2 MB: base64-encoded, more than etcd takes in one request ("request is too large").
        for call in (stub.Enqueue(_req("nobody", 1_200_000, 60_000), timeout=10),
                     stub.Call(_req("nobody", 1_200_000, 60_000), timeout=10)):
            big = await _refused(call)
            assert isinstance(big, PayloadTooLargeError) and "input" in big.field_violations, big
            assert int(big.metadata["max_entry_bytes"]) < 1_200_000

        for held_id in ("q" * 20_000, "q-nope", "q-" + "0" * 15 + "/", ""):
            bad = await _refused(stub.GetQueued(mesh_pb2.GetQueuedRequest(id=held_id), timeout=5))
            assert isinstance(bad, InvalidInputError) and "id" in bad.field_violations, bad
        not_utf8 = channel.unary_unary("/hivemesh.v1.Mesh/GetQueued")(b"\x0a\x02\xff\xfe", timeout=5)
        assert isinstance(await _refused(not_utf8), InvalidInputError)

        assert list((await stub.ListQueued(mesh_pb2.ListQueuedRequest(), timeout=5)).calls) == []  # nothing held


async def test_held_calls_up_to_the_size_bound_stay_readable_and_delivered(etcd: Any) -> None:
    live = False
    sent: list[int] = []

    async def invoke(raw: bytes, capability: str, key: str, timeout: float | None) -> bytes:
        sent.append(len(raw))
        return b"y" * 1_200_000 if capability == "huge-answer" else b"ok"

    queue = CallQueue(etcd, "client-hostile", invoke, lambda cap: live, max_held=5, poll_s=0.05)
    try:
        raw = b"r" * 760_000  # ~1 MB stored, just under MAX_ENTRY_BYTES: five pass gRPC's default 4 MiB read
        ids = [await queue.enqueue("echo", raw, "", 60) for _ in range(5)]
        assert [c.id for c in await queue.held()] == ids
        with pytest.raises(QueueFullError):  # the count check reads them all
            await queue.enqueue("echo", b"one more", "", 60)
        live = True
        queue.start()

        async def delivered() -> bool:
            return [c.state for c in await queue.held()] == [DONE] * 5

        await wait_until(delivered, 20, "five large held calls delivered")
        assert sent == [len(raw)] * 5 and (await queue.get(ids[0])).response == b"ok"

        # An answer larger than a held call keeps: the call fails with that reason, not OUTCOME_UNKNOWN.
        huge = await queue.enqueue("huge-answer", b"small", "", 60)
        failed = await queue.wait(huge, 15)
        assert failed.state == FAILED and isinstance(failed.error, PayloadTooLargeError), failed
    finally:
        await queue.stop()

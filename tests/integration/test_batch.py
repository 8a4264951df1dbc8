"""Batch invoke on a real mesh: one bad item among good ones is only that item's error, through the Python SDK
(`MeshClient.call_batch`) and through a sidecar's `Mesh.CallBatch` (what an agent in any language calls)."""

from __future__ import annotations

import grpc
import pytest

from hivemesh.mesh.errors import InvalidInputError, UnknownCapabilityError
from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
from hivemesh.sdk.client import JSON
from hivemesh.v1 import agent_pb2, mesh_pb2, mesh_pb2_grpc
from tests.support.agents_for_tests import EchoAgent
from tests.support.orch_env import Orch


async def test_batch_with_a_bad_item(orch: Orch) -> None:
    await orch.serve(EchoAgent())

    # SDK: good, schema-invalid, not JSON-serializable, good; in order, each with its own outcome.
    items = await orch.mesh.call_batch("echo", [{"text": "a"}, {"nope": 1}, {"text": object()}, {"text": "d"}],
                                       concurrency=2, timeout=10)
    assert [i.index for i in items] == [0, 1, 2, 3]
    assert [i.ok for i in items] == [True, False, False, True]
    assert items[0].output["text"] == "a" and items[3].output["text"] == "d"
    assert isinstance(items[1].error, InvalidInputError) and isinstance(items[2].error, InvalidInputError)
    unknown = await orch.mesh.call_batch("no-such-capability", [{"text": "x"}], timeout=5)
    assert isinstance(unknown[0].error, UnknownCapabilityError)
    with pytest.raises(InvalidInputError, match=r"1\.\.1000 items"):
        await orch.mesh.call_batch("echo", [])
    with pytest.raises(InvalidInputError, match="concurrency"):
        await orch.mesh.call_batch("echo", [{"text": "a"}], concurrency=500)

    # The protocol: a caller-only sidecar serves Mesh.CallBatch on loopback.
    config = SidecarConfig(client="batcher", mesh_listen="127.0.0.1:0", audit=False)
    async with Sidecar(config, await orch.env.settings_for("batcher", "client")) as sidecar, \
            grpc.aio.insecure_channel(sidecar.mesh_endpoint) as channel:
        stub = mesh_pb2_grpc.MeshStub(channel)

        def req(capability: str, payload: bytes) -> agent_pb2.InvokeRequest:
            return agent_pb2.InvokeRequest(capability=capability, input=payload, content_type=JSON)

        resp = await stub.CallBatch(mesh_pb2.CallBatchRequest(items=[
            req("echo", b'{"text": "one"}'), req("echo", b'{"text": 5}'), req("missing", b"{}"),
            req("echo", b'{"text": "four"}')], concurrency=3), timeout=20)
        assert [r.index for r in resp.results] == [0, 1, 2, 3] and resp.failed == 2
        assert [r.WhichOneof("outcome") for r in resp.results] == ["response", "error", "error", "response"]
        assert b'"one"' in resp.results[0].response.output and b'"four"' in resp.results[3].response.output
        assert resp.results[1].error.code == "INVALID_ARGUMENT"
        assert resp.results[2].error.reason == UnknownCapabilityError.reason
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CallBatch(mesh_pb2.CallBatchRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "1..1000" in (refused.value.details()
                                                                                          or "")

"""A batch whose answers together pass one message's limit, on a real mesh through a sidecar's `Mesh.CallBatch`.

Before: a 2 KB request of 48 items answering ~1 MB each ran all 48 calls (their side effects too), then failed as a
whole with gRPC's bare "Sent message larger than max" (RESOURCE_EXHAUSTED, no ErrorInfo): every answer lost. Now
the answers that fit are kept, the item that would pass the limit and every item not yet started are that item's
PAYLOAD_TOO_LARGE (saying to split the batch), and the items after the limit are never sent.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from hivemesh.mesh import batch
from hivemesh.mesh.errors import AgentUnavailableError, PayloadTooLargeError
from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
from hivemesh.mesh.tls import MAX_MESSAGE_BYTES
from hivemesh.sdk import Agent, capability
from hivemesh.sdk.client import JSON
from hivemesh.v1 import agent_pb2, mesh_pb2, mesh_pb2_grpc
from tests.support.orch_env import Orch

ITEMS = 48
ANSWER = 1_000_000
CONCURRENCY = 4


class Blob(Agent):
    """Answers n bytes of text, and counts the calls it ran (each one a side effect the caller cannot undo)."""

    name = "blob"
    version = "1.0.0"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    @capability(description="n bytes of text")
    async def blob(self, req: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        return {"data": "x" * int(req["n"])}


async def test_answers_past_the_message_limit_keep_what_fits_and_stop_the_rest(orch: Orch) -> None:
    agent = Blob()
    await orch.serve(agent)
    config = SidecarConfig(client="batcher", mesh_listen="127.0.0.1:0", audit=False)
    async with Sidecar(config, await orch.env.settings_for("batcher", "client")) as sidecar, \
            grpc.aio.insecure_channel(sidecar.mesh_endpoint,
                                      options=[("grpc.max_receive_message_length", 4 * MAX_MESSAGE_BYTES)]) as ch:
        stub = mesh_pb2_grpc.MeshStub(ch)
        item = agent_pb2.InvokeRequest(capability="blob", input=json.dumps({"n": ANSWER}).encode(), content_type=JSON)
        resp = await stub.CallBatch(mesh_pb2.CallBatchRequest(items=[item] * ITEMS, concurrency=CONCURRENCY),
                                    timeout=120)

    assert resp.ByteSize() <= MAX_MESSAGE_BYTES
    assert [r.index for r in resp.results] == list(range(ITEMS))
    answered = [r for r in resp.results if r.HasField("response")]
    refused = [r for r in resp.results if r.HasField("error")]
    assert resp.failed == len(refused) == ITEMS - len(answered)
    # What fits is kept whole: about limit / answer of them, the first ones (items start in order).
    assert 6 <= len(answered) <= batch.RESPONSE_LIMIT // ANSWER, len(answered)
    # Items start in order, CONCURRENCY at a time, and finish in any order among those running: the answers kept
    # are of the first items started, give or take the ones still running when the limit was reached.
    assert max(r.index for r in answered) < len(answered) + CONCURRENCY, [r.index for r in answered]
    assert all(len(json.loads(r.response.output)["data"]) == ANSWER for r in answered)
    for r in refused:
        assert (r.error.code, r.error.reason) == ("RESOURCE_EXHAUSTED", PayloadTooLargeError.reason), r.error
        assert str(batch.RESPONSE_LIMIT) in r.error.message and "split the batch" in r.error.message
    # Only the calls in flight when the limit was reached ran past it; the rest were never sent.
    assert agent.calls <= len(answered) + CONCURRENCY, agent.calls
    ran_and_dropped = [r for r in refused if "this item ran" in r.error.message]
    not_started = [r for r in refused if "not started" in r.error.message]
    assert 1 <= len(ran_and_dropped) <= CONCURRENCY and len(ran_and_dropped) + len(not_started) == len(refused)
    assert agent.calls == len(answered) + len(ran_and_dropped)  # the refusals say truly which items ran


def test_the_final_size_check_refuses_the_largest_answers_until_the_response_fits() -> None:
    """Outcomes that came in unbounded (any caller of `batch.response`) still never make a response past limit."""
    def answer(n: int) -> bytes:
        return agent_pb2.InvokeResponse(output=b"x" * n, content_type=JSON).SerializeToString()

    outcomes: list[bytes | Any] = [answer(1000), answer(50_000), AgentUnavailableError("gone"), answer(30_000),
                                   answer(2000)]
    out = batch.response(outcomes, limit=40_000)
    assert out.ByteSize() <= 40_000
    assert [r.WhichOneof("outcome") for r in out.results] == ["response", "error", "error", "response", "response"]
    assert out.results[1].error.reason == PayloadTooLargeError.reason and out.failed == 2
    assert out.results[3].response.output == b"x" * 30_000

"""What the tests of a sidecar's held calls (Enqueue, ListQueued, GetQueued) share: the wire's names, a channel
option, an agent answering a sized text, and a held call's request."""

from __future__ import annotations

import json
from typing import Any

from hivemesh.mesh.tls import MAX_MESSAGE_BYTES
from hivemesh.sdk import Agent, capability
from hivemesh.sdk.client import JSON
from hivemesh.v1 import agent_pb2

LEFT_OFF_HEADER = "hivemesh-left-off"  # spelt out: the tests read the wire, not the module's name for it
BIG_RECEIVE = [("grpc.max_receive_message_length", 4 * MAX_MESSAGE_BYTES)]  # so only the server's limit counts


class Blob(Agent):
    """Answers {"data": n bytes of text}: answers of a chosen size."""

    name = "blob"
    version = "1.0.0"

    @capability(description="n bytes of text")
    async def blob(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"data": "x" * int(req["n"])}


def held_request(call_id: str, *, capability: str = "nobody-serves-this", queue_for_ms: int = 300_000,
                 payload: dict[str, Any] | None = None) -> agent_pb2.InvokeRequest:
    """A call to hold (Enqueue) for queue_for_ms, carrying call_id."""
    req = agent_pb2.InvokeRequest(capability=capability, input=json.dumps(payload or {}).encode(),
                                  content_type=JSON, queue_for_ms=queue_for_ms)
    req.context.call_id = call_id
    return req

"""A plain agent behind a sidecar whose stream's final chunk carries data within a few bytes of the message limit:
the agent's chunk fits one gRPC message (the sidecar's channel to it takes up to the limit), but the sidecar's hop,
appended to the final chunk, pushes it past. The caller gets PAYLOAD_TOO_LARGE naming the capability, its size and
the limit, and the sidecar's audit record of the call is that refusal (invalid, RESOURCE_EXHAUSTED, reason
PAYLOAD_TOO_LARGE). Before, gRPC refused to send the chunk after the inbound chain had let it out, with its own
"Sent message larger than max" naming neither capability nor limit. A chunk of the same size that is not the final
one is relayed as it came (no hop on it). Real plain gRPC agent, real sidecar and MeshClient, mutual TLS on
loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from hivemesh.mesh.sidecar import Sidecar
from hivemesh.mesh.tls import MAX_MESSAGE_BYTES
from hivemesh.sdk import MeshClient, PayloadTooLargeError
from hivemesh.v1 import agent_pb2
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv
from tests.support.plain_agent import PlainAgent
from tests.support.sidecar_audit import behind_sidecar, hop_bytes, inbound_records
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(120)

PLAIN = f"spiffe://{TRUST_DOMAIN}/agent/plain"
CAPABILITY = "plain-sized-stream"


def _sized_chunk(size: int, *, final: bool) -> agent_pb2.InvokeChunk:
    """An InvokeChunk of exactly size bytes whose data is a JSON string ("xx...x")."""
    chunk = agent_pb2.InvokeChunk(content_type="application/json", final=final,
                                  state=agent_pb2.TASK_STATE_COMPLETED if final else agent_pb2.TASK_STATE_WORKING)
    chars = size - chunk.ByteSize() - 8  # the data's field tag and length, its quotes: about 7 bytes
    while True:
        chunk.data = b'"' + b"x" * chars + b'"'
        missing = size - chunk.ByteSize()
        if missing == 0:
            return chunk
        chars += missing


class SizedStreamAgent(PlainAgent):
    """A plain agent (generated stubs only) whose `plain-sized-stream` streams "first", then one chunk of exactly
    the asked number of bytes ({"bytes": N}): the final chunk itself, or ({"final": false}) an item followed by
    a final chunk without data. Its other capabilities are PlainAgent's."""

    def card(self) -> agent_pb2.AgentCard:
        card = super().card()
        card.capabilities.add(name=CAPABILITY, description="stream a chunk of exactly 'bytes' bytes",
                              streaming=True, input_modes=["application/json"], output_modes=["application/json"])
        return card

    async def InvokeStream(
        self, request: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[agent_pb2.InvokeChunk]:
        if request.capability != CAPABILITY:
            async for chunk in super().InvokeStream(request, context):
                yield chunk
            return
        self._record(context)
        asked = json.loads(request.input)
        yield agent_pb2.InvokeChunk(data=b'"first"', content_type="application/json",
                                    state=agent_pb2.TASK_STATE_WORKING)
        final = bool(asked.get("final", True))
        yield _sized_chunk(int(asked["bytes"]), final=final)
        if not final:
            yield agent_pb2.InvokeChunk(final=True, state=agent_pb2.TASK_STATE_COMPLETED)


@dataclass
class Rig:
    sidecar: Sidecar
    mesh: MeshClient

    def hop_bytes(self) -> int:
        return hop_bytes(self.sidecar, PLAIN)

    def inbound(self, caller: str) -> list[dict[str, Any]]:
        return inbound_records(self.sidecar, caller)


@pytest.fixture
async def rig(mesh_env: MeshEnv, tmp_path: Path) -> AsyncIterator[Rig]:
    async with behind_sidecar(mesh_env, SizedStreamAgent("plain", prefix="plain-"), tmp_path / "spools", CAPABILITY,
                              (("stream-caller", False),)) as (sidecar, (mesh,)):
        yield Rig(sidecar, mesh)


async def _items(mesh: MeshClient, asked: dict[str, Any], got: list[Any]) -> None:
    """Stream CAPABILITY with asked, appending each item to got as it arrives."""
    async for item in mesh.stream(CAPABILITY, asked, timeout=60):
        got.append(item)


async def test_a_final_chunk_the_sidecars_hop_pushes_past_the_limit_is_payload_too_large_and_on_record(
    rig: Rig,
) -> None:
    # The agent's final chunk is 8 bytes under the limit: its channel to the sidecar carries it; the hop does not fit.
    asked = {"bytes": MAX_MESSAGE_BYTES - 8}
    assert rig.hop_bytes() > 8
    got: list[Any] = []
    await _items(rig.mesh, {"bytes": 64}, got)
    assert got[0] == "first" and len(got) == 2

    got.clear()
    with pytest.raises(PayloadTooLargeError) as refused:
        await _items(rig.mesh, asked, got)
    assert got == ["first"]
    err = refused.value
    assert f"'{CAPABILITY}'" in err.message and f"{MAX_MESSAGE_BYTES} bytes" in err.message, err.message
    assert "in its final stream chunk" in err.message, err.message
    assert "more items" in err.message and "or stream it" not in err.message, err.message
    assert "Sent message larger than max" not in err.message, err.message
    assert err.reason == "PAYLOAD_TOO_LARGE", err
    assert err.metadata.get("capability") == CAPABILITY, err
    assert MAX_MESSAGE_BYTES < int(err.metadata.get("size", "0")) <= MAX_MESSAGE_BYTES - 8 + rig.hop_bytes(), err
    assert err.metadata.get("limit") == str(MAX_MESSAGE_BYTES), err

    # A chunk of that size that is not the final one carries no hop: relayed as it came.
    got.clear()
    await _items(rig.mesh, {**asked, "final": False}, got)
    assert got[0] == "first" and len(got) == 2 and len(got[1]) > MAX_MESSAGE_BYTES - 64

    assert await until(lambda: len(rig.inbound("stream-caller")) >= 3, 10), rig.inbound("stream-caller")
    assert [(r["decision"], r["status"], r["reason"]) for r in rig.inbound("stream-caller")] == [
        ("allow", "OK", ""), ("invalid", "RESOURCE_EXHAUSTED", "PAYLOAD_TOO_LARGE"), ("allow", "OK", "")]

"""A plain agent behind a sidecar that answers within a few bytes of the message limit: its answer (with the
sidecar's hop) fits one gRPC message, but the Link answer frame around it does not. The caller on a link gets
PAYLOAD_TOO_LARGE naming the capability, and the sidecar's audit record of the call says so (invalid,
RESOURCE_EXHAUSTED, reason PAYLOAD_TOO_LARGE: the refusal noted with its reason, as the sidecar's output check
notes its own). Before, the link server refused the frame after the inbound chain
had recorded the call as answered (allow, OK). An answer the sidecar's hop pushes past the limit itself is
refused the same way called unary (gRPC's own "Sent message larger than max" named neither capability nor
limit). Real plain gRPC agent, real sidecar and MeshClient, mutual TLS on loopback."""

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


class SizedAgent(PlainAgent):
    """A plain agent (generated stubs only) whose `plain-sized` answers an InvokeResponse of exactly the asked
    number of bytes ({"bytes": N}); its other capabilities are PlainAgent's."""

    def card(self) -> agent_pb2.AgentCard:
        card = super().card()
        card.capabilities.add(name=f"{self.prefix}sized", description="answer exactly 'bytes' bytes",
                              input_modes=["application/json"], output_modes=["application/json"])
        return card

    async def Invoke(
        self, request: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.InvokeResponse:
        if request.capability != f"{self.prefix}sized":
            return await super().Invoke(request, context)
        self._record(context)
        size = int(json.loads(request.input)["bytes"])
        response = agent_pb2.InvokeResponse(content_type="application/json", state=agent_pb2.TASK_STATE_COMPLETED)
        chars = size - response.ByteSize() - 8  # the output's field tag and length, its quotes: about 7 bytes
        while True:
            response.output = b'"' + b"x" * chars + b'"'
            missing = size - response.ByteSize()
            if missing == 0:
                return response
            chars += missing


@dataclass
class Rig:
    sidecar: Sidecar
    linked: MeshClient
    unary: MeshClient

    def hop_bytes(self) -> int:
        return hop_bytes(self.sidecar, PLAIN)

    def inbound(self, caller: str) -> list[dict[str, Any]]:
        return inbound_records(self.sidecar, caller)


@pytest.fixture
async def rig(mesh_env: MeshEnv, tmp_path: Path) -> AsyncIterator[Rig]:
    callers = (("link-caller", True), ("unary-caller", False))
    async with behind_sidecar(mesh_env, SizedAgent("plain", prefix="plain-"), tmp_path / "spools", "plain-sized",
                              callers) as (sidecar, (linked, unary)):
        yield Rig(sidecar, linked, unary)


def _assert_named(err: PayloadTooLargeError, low: int, high: int) -> None:
    """err names the capability, a size in [low, high] and the limit."""
    message = err.message
    assert "'plain-sized'" in message and f"{MAX_MESSAGE_BYTES} bytes" in message, message
    assert "Sent message larger than max" not in message, message
    assert err.reason == "PAYLOAD_TOO_LARGE", err
    assert err.metadata.get("capability") == "plain-sized", err
    assert low <= int(err.metadata.get("size", "0")) <= high, err
    assert err.metadata.get("limit") == str(MAX_MESSAGE_BYTES), err


async def _records(rig: Rig, caller: str, count: int) -> list[tuple[str, str, str]]:
    assert await until(lambda: len(rig.inbound(caller)) >= count, 10), rig.inbound(caller)
    return [(r["decision"], r["status"], r["reason"]) for r in rig.inbound(caller)]


async def test_an_answer_refused_as_a_link_answer_frame_is_payload_too_large_and_on_record(rig: Rig) -> None:
    # The sidecar's answer (the agent's plus its hop) is 2 bytes under the limit: one unary message carries it.
    answer = MAX_MESSAGE_BYTES - 2
    asked = {"bytes": answer - rig.hop_bytes()}
    raw = await rig.unary.call_detailed("plain-sized", asked, timeout=60)
    assert isinstance(raw.output, str) and len(raw.output) > answer - 1024

    assert await rig.linked.call("plain-sized", {"bytes": 64}, timeout=10)  # the link is open and proven
    with pytest.raises(PayloadTooLargeError) as refused:
        await rig.linked.call("plain-sized", asked, timeout=60)
    assert "as a Link answer frame" in refused.value.message, refused.value
    _assert_named(refused.value, MAX_MESSAGE_BYTES + 1, MAX_MESSAGE_BYTES + 32)
    assert await rig.linked.call("plain-sized", {"bytes": 64}, timeout=10)
    assert rig.sidecar._link is not None and rig.sidecar._link.links == 1, "the link broke"

    assert await _records(rig, "link-caller", 3) == [
        ("allow", "OK", ""), ("invalid", "RESOURCE_EXHAUSTED", "PAYLOAD_TOO_LARGE"), ("allow", "OK", "")]


async def test_an_answer_the_sidecars_hop_pushes_past_the_limit_is_payload_too_large_and_on_record(
    rig: Rig,
) -> None:
    """The agent's answer fits (the sidecar's channel to it takes up to the limit), its hop added does not: gRPC
    refused to send it ("Sent message larger than max") after the chain had recorded it answered."""
    asked = {"bytes": MAX_MESSAGE_BYTES - 8}
    assert await rig.unary.call("plain-sized", {"bytes": 64}, timeout=10)
    with pytest.raises(PayloadTooLargeError) as refused:
        await rig.unary.call("plain-sized", asked, timeout=60)
    assert "as a Link answer frame" not in refused.value.message, refused.value
    _assert_named(refused.value, MAX_MESSAGE_BYTES + 1, MAX_MESSAGE_BYTES + 1024)
    assert await rig.unary.call("plain-sized", {"bytes": 64}, timeout=10)

    assert await _records(rig, "unary-caller", 3) == [
        ("allow", "OK", ""), ("invalid", "RESOURCE_EXHAUSTED", "PAYLOAD_TOO_LARGE"), ("allow", "OK", "")]

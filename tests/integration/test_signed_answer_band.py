"""A signed capability's answer that fits one gRPC message until the agent's side signs it: the signature (a
detached JWS carrying the signer's certificate, over a kilobyte) pushes the answer, or a stream's final chunk, past
the 8 MiB limit. The caller gets PAYLOAD_TOO_LARGE naming the capability, its size and the limit, and the agent's
audit record of the call is that refusal (invalid, RESOURCE_EXHAUSTED, reason PAYLOAD_TOO_LARGE). Before, the size
checks ran before the answer was signed: gRPC refused to send it ("Sent message larger than max", naming nothing)
after the inbound chain had recorded the call as answered (allow, OK); on a Link, the link server's own check named
it, but the record still said answered. Real agents (a plain gRPC one behind a real sidecar, an SDK one), real
MeshClient callers that sign their requests and verify the answers, mutual TLS on loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from hivemesh.mesh.link_wire import varint
from hivemesh.mesh.sidecar import Sidecar
from hivemesh.mesh.signing import ANSWER, Signer
from hivemesh.mesh.tls import MAX_MESSAGE_BYTES, Workload
from hivemesh.sdk import (
    Agent,
    AgentServer,
    AgentServerConfig,
    InputRequired,
    MeshClient,
    PayloadTooLargeError,
    capability,
)
from hivemesh.v1 import agent_pb2
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv
from tests.support.orch_env import Orch
from tests.support.plain_agent import PlainAgent
from tests.support.sidecar_audit import behind_sidecar, hop_bytes, inbound_records
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(180)

PLAIN = f"spiffe://{TRUST_DOMAIN}/agent/plain"
UNARY = "plain-signed"
STREAM = "plain-signed-stream"
MARGIN = 256
"""How far under the limit an answer is before it is signed: far less than a signature adds (asserted)."""
REFUSED = ("invalid", "RESOURCE_EXHAUSTED", "PAYLOAD_TOO_LARGE")
ANSWERED = ("allow", "OK", "")


def _signature_bytes(workload: Workload) -> int:
    """What signing adds to an answer: the signature field (tag, length, the JWS; its length does not depend on
    what is signed)."""
    jws = Signer(workload.key_pem, workload.cert_pem).sign(ANSWER, b"\0" * 32)
    return 1 + len(varint(len(jws))) + len(jws)


def _sized(message: Any, size: int, field: str) -> Any:
    """message with its bytes field set to a JSON string ("xx...x") making it exactly size bytes."""
    chars = size - message.ByteSize() - 8  # the field's tag and length, the quotes: about 7 bytes
    while True:
        setattr(message, field, b'"' + b"x" * chars + b'"')
        missing = size - message.ByteSize()
        if missing == 0:
            return message
        chars += missing


class SignedSizedAgent(PlainAgent):
    """A plain agent (generated stubs only) with two capabilities that declare signed payloads: `plain-signed`
    answers an InvokeResponse of exactly the asked number of bytes ({"bytes": N}); `plain-signed-stream` streams
    "first", then a final chunk of exactly that many bytes. Its other capabilities are PlainAgent's."""

    def card(self) -> agent_pb2.AgentCard:
        card = super().card()
        for name, streaming in ((UNARY, False), (STREAM, True)):
            card.capabilities.add(name=name, description="answer exactly 'bytes' bytes, signed", streaming=streaming,
                                  signed_payloads=True, input_modes=["application/json"],
                                  output_modes=["application/json"])
        return card

    async def Invoke(
        self, request: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.InvokeResponse:
        if request.capability != UNARY:
            return await super().Invoke(request, context)
        self._record(context)
        response = agent_pb2.InvokeResponse(content_type="application/json", state=agent_pb2.TASK_STATE_COMPLETED)
        return _sized(response, int(json.loads(request.input)["bytes"]), "output")

    async def InvokeStream(
        self, request: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[agent_pb2.InvokeChunk]:
        if request.capability != STREAM:
            async for chunk in super().InvokeStream(request, context):
                yield chunk
            return
        self._record(context)
        yield agent_pb2.InvokeChunk(data=b'"first"', content_type="application/json",
                                    state=agent_pb2.TASK_STATE_WORKING)
        final = agent_pb2.InvokeChunk(content_type="application/json", final=True,
                                      state=agent_pb2.TASK_STATE_COMPLETED)
        yield _sized(final, int(json.loads(request.input)["bytes"]), "data")


@dataclass
class Rig:
    sidecar: Sidecar
    linked: MeshClient
    unary: MeshClient

    def hop_bytes(self) -> int:
        return hop_bytes(self.sidecar, PLAIN)

    def signature_bytes(self) -> int:
        assert self.sidecar.node is not None
        return _signature_bytes(self.sidecar.node.workload)

    def inbound(self, caller: str) -> list[dict[str, Any]]:
        return inbound_records(self.sidecar, caller)


@pytest.fixture
async def rig(mesh_env: MeshEnv, tmp_path: Path) -> AsyncIterator[Rig]:
    callers = (("link-caller", True), ("unary-caller", False))
    async with behind_sidecar(mesh_env, SignedSizedAgent("plain", prefix="plain-"), tmp_path / "spools", STREAM,
                              callers) as (sidecar, (linked, unary)):
        yield Rig(sidecar, linked, unary)


def _assert_named(err: PayloadTooLargeError, capability: str, low: int, high: int) -> None:
    """err names the capability, a size in [low, high] and the limit, in its message and its ErrorInfo."""
    message = err.message
    assert f"'{capability}'" in message and f"{MAX_MESSAGE_BYTES} bytes" in message, message
    assert "Sent message larger than max" not in message, message
    assert err.reason == "PAYLOAD_TOO_LARGE", err
    assert err.metadata.get("capability") == capability, err
    assert low <= int(err.metadata.get("size", "0")) <= high, err
    assert err.metadata.get("limit") == str(MAX_MESSAGE_BYTES), err


async def _records(records: Any, count: int) -> list[tuple[str, str, str]]:
    assert await until(lambda: len(records()) >= count, 10), records()
    return [(r["decision"], r["status"], r["reason"]) for r in records()]


async def test_a_signed_answer_the_signature_pushes_past_the_limit_is_payload_too_large_and_on_record(
    rig: Rig,
) -> None:
    signature = rig.signature_bytes()
    assert signature > MARGIN + 64, signature
    # The sidecar's answer (the agent's plus its hop) is MARGIN bytes under the limit: it fits until it is signed.
    asked = {"bytes": MAX_MESSAGE_BYTES - MARGIN - rig.hop_bytes()}
    assert await rig.unary.call(UNARY, {"bytes": 64}, timeout=10)  # signed, verified by the caller
    with pytest.raises(PayloadTooLargeError) as refused:
        await rig.unary.call(UNARY, asked, timeout=60)
    _assert_named(refused.value, UNARY, MAX_MESSAGE_BYTES + 1, MAX_MESSAGE_BYTES - MARGIN + signature)
    assert "as a Link answer frame" not in refused.value.message, refused.value
    assert await rig.unary.call(UNARY, {"bytes": 64}, timeout=10)
    assert await _records(lambda: rig.inbound("unary-caller"), 3) == [ANSWERED, REFUSED, ANSWERED]


async def test_a_signed_answer_on_a_link_is_refused_inside_the_chain_and_the_link_serves_on(rig: Rig) -> None:
    """On a Link: pushed past one message by its signature, or signed to within a Link answer frame's few header
    bytes of the limit (one unary message carries it, the frame does not). Each is PAYLOAD_TOO_LARGE named, on
    record as the refusal, and the link serves the next call."""
    signature = rig.signature_bytes()
    past = {"bytes": MAX_MESSAGE_BYTES - MARGIN - rig.hop_bytes()}
    # Signed, the answer is 4 bytes under the limit: its answer frame (id and field headers) is not.
    framed = {"bytes": MAX_MESSAGE_BYTES - 4 - signature - rig.hop_bytes()}
    assert await rig.unary.call(UNARY, framed, timeout=60)  # one unary message carries it, signed
    assert await rig.linked.call(UNARY, {"bytes": 64}, timeout=10)  # the link is open and proven
    with pytest.raises(PayloadTooLargeError) as refused:
        await rig.linked.call(UNARY, past, timeout=60)
    _assert_named(refused.value, UNARY, MAX_MESSAGE_BYTES + 1, MAX_MESSAGE_BYTES - MARGIN + signature + 32)
    with pytest.raises(PayloadTooLargeError) as in_frame:
        await rig.linked.call(UNARY, framed, timeout=60)
    assert "as a Link answer frame" in in_frame.value.message, in_frame.value
    _assert_named(in_frame.value, UNARY, MAX_MESSAGE_BYTES + 1, MAX_MESSAGE_BYTES + 32)
    assert await rig.linked.call(UNARY, {"bytes": 64}, timeout=10)
    assert rig.sidecar._link is not None and rig.sidecar._link.links == 1, "the link broke"
    assert await _records(lambda: rig.inbound("link-caller"), 4) == [ANSWERED, REFUSED, REFUSED, ANSWERED]


async def test_a_signed_final_chunk_the_signature_pushes_past_the_limit_is_payload_too_large_and_on_record(
    rig: Rig,
) -> None:
    signature = rig.signature_bytes()
    # The final chunk with the sidecar's hop is MARGIN bytes under the limit: it fits until it is signed.
    asked = {"bytes": MAX_MESSAGE_BYTES - MARGIN - rig.hop_bytes()}
    small = [item async for item in rig.unary.stream(STREAM, {"bytes": 64}, timeout=10)]
    assert small[0] == "first" and len(small) == 2  # signed on its final chunk, verified by the caller
    got: list[Any] = []
    with pytest.raises(PayloadTooLargeError) as refused:
        async for item in rig.unary.stream(STREAM, asked, timeout=60):
            got.append(item)
    assert got == ["first"]
    assert "in its final stream chunk" in refused.value.message, refused.value
    assert "more items" in refused.value.message and "or stream it" not in refused.value.message, refused.value.message
    _assert_named(refused.value, STREAM, MAX_MESSAGE_BYTES + 1, MAX_MESSAGE_BYTES - MARGIN + signature)
    assert len([item async for item in rig.unary.stream(STREAM, {"bytes": 64}, timeout=10)]) == 2
    assert await _records(lambda: rig.inbound("unary-caller"), 3) == [ANSWERED, REFUSED, ANSWERED]


class Notary(Agent):
    """An SDK agent with signed capabilities: `sized` answers a string of the asked length; `asks` streams "first",
    then asks a person with a context of the asked length (the ask is its stream's final chunk)."""

    name = "notary"

    @capability(signed_payloads=True)
    async def sized(self, req: dict[str, int]) -> str:
        return "x" * req["chars"]

    @capability(signed_payloads=True)
    async def asks(self, req: dict[str, int]) -> AsyncIterator[str]:
        yield "first"
        raise InputRequired("r", {"x": "x" * req["chars"]})


def _sdk_inbound(server: AgentServer, caller: str) -> list[dict[str, Any]]:
    """The agent's audit records of the inbound calls caller made."""
    assert server.audit is not None, "the agent's audit log is off"
    return [r for r in (json.loads(line) for line in server.audit.spool.lines())
            if r.get("kind") == "inbound" and caller in r.get("caller", "")]


async def test_an_sdk_agents_signed_answer_the_signature_pushes_past_the_limit_is_payload_too_large(
    orch: Orch, tmp_path: Path,
) -> None:
    server = await orch.serve(Notary(), AgentServerConfig(link=True, audit_dir=tmp_path / "spools"))
    signature = _signature_bytes(server.node.workload)
    assert signature > MARGIN + 64, signature
    for name, link in (("sdk-unary", False), ("sdk-link", True)):
        mesh = await orch.stack.enter_async_context(
            MeshClient.connect(name=name, settings=await orch.env.settings_for(name, "client"), link=link))
        assert await mesh.node.registry.wait_for_capability("sized", 1, timeout=10)
        detailed = await mesh.call_detailed("sized", {"chars": 1}, timeout=10)  # signed, verified by the caller
        rest = agent_pb2.InvokeResponse(content_type="application/json", hops=detailed.hops,
                                        state=agent_pb2.TASK_STATE_COMPLETED).ByteSize()
        # The answer as the agent writes it is MARGIN bytes under the limit: 1 (the output's tag) + its length's
        # varint + the JSON string (chars and two quotes) + the rest. It fits until it is signed.
        chars = MAX_MESSAGE_BYTES - MARGIN - 1 - len(varint(MAX_MESSAGE_BYTES)) - rest - 2
        with pytest.raises(PayloadTooLargeError) as refused:
            await mesh.call("sized", {"chars": chars}, timeout=60)
        _assert_named(refused.value, "sized", MAX_MESSAGE_BYTES + 1, MAX_MESSAGE_BYTES - MARGIN + signature + 32)
        assert await mesh.call("sized", {"chars": 3}, timeout=10) == "xxx"
        assert await _records(lambda name=name: _sdk_inbound(server, name), 3) == [ANSWERED, REFUSED, ANSWERED], name


async def test_an_sdk_agents_signed_final_chunk_the_signature_pushes_past_the_limit_is_payload_too_large(
    orch: Orch, tmp_path: Path,
) -> None:
    """The final chunk of an SDK agent's stream carries data when its capability asks a person (InputRequired)."""
    server = await orch.serve(Notary(), AgentServerConfig(audit_dir=tmp_path / "spools"))
    signature = _signature_bytes(server.node.workload)
    mesh = await orch.client("sdk-stream")
    assert await mesh.node.registry.wait_for_capability("asks", 1, timeout=10)
    small = [item async for item in mesh.stream("asks", {"chars": 3}, timeout=10)]  # signed, verified by the caller
    assert small == ["first", {"reason": "r", "context": {"x": "xxx"}}], small
    # The final chunk as the agent writes it (its ask, state, content type and hop) is MARGIN bytes under the limit.
    hop = agent_pb2.Hop(kind="agent", identity=str(server.node.workload.spiffe_id), instance=server.instance_id,
                        endpoint=server.endpoint)

    def final_bytes(chars: int) -> int:
        ask = json.dumps({"reason": "r", "context": {"x": "x" * chars}}, separators=(",", ":")).encode()
        return agent_pb2.InvokeChunk(final=True, state=agent_pb2.TASK_STATE_INPUT_REQUIRED, hops=[hop], data=ask,
                                     content_type="application/json").ByteSize()

    chars = MAX_MESSAGE_BYTES - MARGIN - final_bytes(0) - 2
    chars += MAX_MESSAGE_BYTES - MARGIN - final_bytes(chars)
    assert final_bytes(chars) == MAX_MESSAGE_BYTES - MARGIN
    got: list[Any] = []
    with pytest.raises(PayloadTooLargeError) as refused:
        async for item in mesh.stream("asks", {"chars": chars}, timeout=60):
            got.append(item)
    assert got == ["first"]
    assert "in its final stream chunk" in refused.value.message, refused.value
    assert "more items" in refused.value.message and "or stream it" not in refused.value.message, refused.value.message
    _assert_named(refused.value, "asks", MAX_MESSAGE_BYTES + 1, MAX_MESSAGE_BYTES - MARGIN + signature + 32)
    assert len([item async for item in mesh.stream("asks", {"chars": 3}, timeout=10)]) == 2
    assert await _records(lambda: _sdk_inbound(server, "sdk-stream"), 3) == [ANSWERED, REFUSED, ANSWERED]

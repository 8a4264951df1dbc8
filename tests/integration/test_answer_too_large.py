"""An SDK capability's answer larger than one gRPC message (`hivemesh.mesh.tls.MAX_MESSAGE_BYTES`) is
PAYLOAD_TOO_LARGE naming the capability, the answer's size and the limit, called unary or on a Link. Before, a
unary call ended RESOURCE_EXHAUSTED with gRPC's own "Sent message larger than max (9000105 vs. 8388608)", and on
a Link the answer frame broke the whole link: every other call on it failed with that message too. Real agent,
real MeshClient, mutual TLS on loopback."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hivemesh.mesh.link_wire import varint
from hivemesh.mesh.tls import MAX_MESSAGE_BYTES
from hivemesh.sdk import Agent, AgentServer, AgentServerConfig, MeshClient, PayloadTooLargeError, capability
from hivemesh.v1 import agent_pb2
from tests.support.orch_env import Orch
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(120)

HUGE = 9_000_000
"""Characters of a string answer past the limit (its JSON is two more bytes)."""


class Big(Agent):
    """Answers a string of the asked length; `held` answers once released (a call left open on the link)."""

    name = "big"

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.items_closed = asyncio.Event()

    @capability()
    async def sized(self, req: dict[str, int]) -> str:
        return "x" * req["chars"]

    @capability()
    async def items(self, req: dict[str, int]) -> AsyncIterator[str]:
        """One small item, then one of the asked length, then (never reached when that one is refused) more."""
        try:
            yield "first"
            yield "x" * req["chars"]
            yield "after"
        finally:
            self.items_closed.set()

    @capability()
    async def held(self, req: dict[str, Any]) -> dict[str, Any]:
        await self.release.wait()
        return req


async def _client(orch: Orch, name: str, *, link: bool) -> MeshClient:
    client = MeshClient.connect(name=name, settings=await orch.env.settings_for(name, "client"), link=link)
    return await orch.stack.enter_async_context(client)


def _links(server: AgentServer) -> tuple[int, int]:
    """(links opened, calls served on them) by the agent."""
    served = server._link
    assert served is not None, "the agent serves no links"
    return served.links, served.calls


def _assert_named(err: PayloadTooLargeError, low: int, high: int) -> None:
    """err names the capability, a size in [low, high] and the limit, in its message and its ErrorInfo."""
    message = err.message
    found = re.search(r"answered (\d+) bytes", message)
    assert found is not None and low <= int(found.group(1)) <= high, message
    assert re.search(r"'(sized|items)'", message) and f"{MAX_MESSAGE_BYTES} bytes" in message, message
    assert "Sent message larger than max" not in message, message
    assert err.reason == "PAYLOAD_TOO_LARGE", err
    assert err.metadata.get("capability") in ("sized", "items"), err
    assert err.metadata.get("limit") == str(MAX_MESSAGE_BYTES), err


async def test_an_answer_past_the_limit_called_unary_is_payload_too_large_naming_it(orch: Orch) -> None:
    server = await orch.serve(Big(), AgentServerConfig(link=True, link_direct=False))
    mesh = await _client(orch, "unary-caller", link=False)
    with pytest.raises(PayloadTooLargeError) as refused:
        await mesh.call("sized", {"chars": HUGE}, timeout=60)
    _assert_named(refused.value, HUGE + 2, HUGE + 1024)
    assert await mesh.call("sized", {"chars": 3}, timeout=10) == "xxx"
    assert _links(server) == (0, 0), "the calls did not go unary"


async def test_an_answer_past_the_limit_on_a_link_is_payload_too_large_and_the_link_serves_on(orch: Orch) -> None:
    agent = Big()
    server = await orch.serve(agent, AgentServerConfig(link=True, link_direct=False))
    mesh = await _client(orch, "link-caller", link=True)
    assert await mesh.call("sized", {"chars": 1}, timeout=10) == "x"  # the link is open and proven
    held = asyncio.create_task(mesh.call("held", {"n": 1}, timeout=60))
    try:
        with pytest.raises(PayloadTooLargeError) as refused:
            await mesh.call("sized", {"chars": HUGE}, timeout=60)
    finally:
        agent.release.set()
    _assert_named(refused.value, HUGE + 2, HUGE + 1024)
    assert await held == {"n": 1}, "a call open on the same link failed with the answer too large"
    assert await mesh.call("sized", {"chars": 3}, timeout=10) == "xxx"
    assert _links(server) == (1, 4), "the calls did not all go on one link, or the link broke and was opened again"


async def test_an_answer_one_message_carries_but_not_as_a_link_frame_is_payload_too_large_on_the_link(
    orch: Orch,
) -> None:
    """An answer a few bytes under the limit fits a unary response; its Link answer frame (id and field headers
    around it) does not, and gRPC refused to write it, ending the link. The link server names it instead."""
    server = await orch.serve(Big(), AgentServerConfig(link=True, link_direct=False))
    unary = await _client(orch, "unary-caller", link=False)
    linked = await _client(orch, "link-caller", link=True)
    # The answer's bytes around its output, as the agent writes them (`AgentServicer.Invoke`): its hop and state.
    hops = (await unary.call_detailed("sized", {"chars": 1}, timeout=10)).hops
    rest = agent_pb2.InvokeResponse(content_type="application/json", hops=hops,
                                    state=agent_pb2.TASK_STATE_COMPLETED).ByteSize()
    wire = MAX_MESSAGE_BYTES - 2  # the response's bytes: 1 (field tag) + varint(len) + the JSON string + rest
    chars = wire - 1 - len(varint(MAX_MESSAGE_BYTES)) - rest - 2
    assert await unary.call("sized", {"chars": chars}, timeout=60) == "x" * chars  # one message carries it
    assert await linked.call("sized", {"chars": 1}, timeout=10) == "x"
    with pytest.raises(PayloadTooLargeError) as refused:
        await linked.call("sized", {"chars": chars}, timeout=60)
    assert "as a Link answer frame" in refused.value.message, refused.value
    _assert_named(refused.value, MAX_MESSAGE_BYTES + 1, MAX_MESSAGE_BYTES + 32)
    assert await linked.call("sized", {"chars": 3}, timeout=10) == "xxx"
    assert _links(server) == (1, 3), "the calls did not all go on one link, or the link broke and was opened again"


async def test_a_stream_item_past_the_limit_is_payload_too_large_naming_it_and_the_stream_is_closed(
    orch: Orch,
) -> None:
    """InvokeStream: the items before the huge one arrive; the huge one ends the stream PAYLOAD_TOO_LARGE naming
    the capability (gRPC's own refusal named neither), and the capability's generator is closed at once."""
    agent = Big()
    await orch.serve(agent)
    mesh = await _client(orch, "stream-caller", link=False)
    got: list[Any] = []
    with pytest.raises(PayloadTooLargeError) as refused:
        async for item in mesh.stream("items", {"chars": HUGE}, timeout=60):
            got.append(item)
    assert got == ["first"]
    assert "in one stream item" in refused.value.message, refused.value
    assert "more items" in refused.value.message and "or stream it" not in refused.value.message, refused.value
    _assert_named(refused.value, HUGE + 2, HUGE + 1024)
    await asyncio.wait_for(agent.items_closed.wait(), 30)
    assert [x async for x in mesh.stream("items", {"chars": 3}, timeout=10)] == ["first", "xxx", "after"]


def _inbound(server: AgentServer, caller: str) -> list[dict[str, Any]]:
    """The agent's audit records of the inbound calls caller made."""
    assert server.audit is not None, "the agent's audit log is off"
    return [r for r in (json.loads(line) for line in server.audit.spool.lines())
            if r.get("kind") == "inbound" and caller in r.get("caller", "")]


async def test_each_answer_too_large_is_on_record_as_the_refusal_with_its_reason(orch: Orch, tmp_path: Path) -> None:
    """A unary answer past the limit, a stream item past it, and a streaming capability called unary whose items
    pass it: each is on the agent's record as the sidecar records its own (invalid, RESOURCE_EXHAUSTED, reason
    PAYLOAD_TOO_LARGE). Before, the servicer refused them without noting why: (error, RESOURCE_EXHAUSTED, "")."""
    server = await orch.serve(Big(), AgentServerConfig(audit_dir=tmp_path / "spools"))
    mesh = await _client(orch, "audited-caller", link=False)
    with pytest.raises(PayloadTooLargeError):
        await mesh.call("sized", {"chars": HUGE}, timeout=60)
    with pytest.raises(PayloadTooLargeError) as streamed:
        async for _ in mesh.stream("items", {"chars": HUGE}, timeout=60):
            pass
    assert "in one stream item" in streamed.value.message, streamed.value
    with pytest.raises(PayloadTooLargeError) as collected:
        await mesh.call("items", {"chars": HUGE}, timeout=60)
    assert "call it with InvokeStream" in collected.value.message, collected.value
    assert await mesh.call("sized", {"chars": 3}, timeout=10) == "xxx"

    assert await until(lambda: len(_inbound(server, "audited-caller")) >= 4, 10), _inbound(server, "audited-caller")
    refused = ("invalid", "RESOURCE_EXHAUSTED", "PAYLOAD_TOO_LARGE")
    assert [(r["decision"], r["status"], r["reason"]) for r in _inbound(server, "audited-caller")] == [
        refused, refused, refused, ("allow", "OK", "")]


class Leaky(Agent):
    """Answers text that ends in the asked number of e-mail addresses, which its output screen redacts: each
    "[REDACTED:email]" is longer than the address it replaces, so the redacted answer is larger."""

    name = "leaky"

    @capability(output_screen="redact")
    async def spill(self, req: dict[str, int]) -> dict[str, str]:
        return {"t": "x" * req["chars"] + " ann@example.com" * req["emails"]}

    @capability(output_screen="redact")
    async def spills(self, req: dict[str, int]) -> AsyncIterator[dict[str, str]]:
        yield {"t": "x" * req["chars"] + " ann@example.com" * req["emails"]}


async def test_an_answer_a_redaction_grows_past_the_limit_is_payload_too_large_and_on_record(
    orch: Orch, tmp_path: Path
) -> None:
    """The handler measured its answer before the output screen redacted it; redacted, it no longer fit, and gRPC
    refused it with its own message after the record said answered. The chain now measures what a layer rewrote."""
    server = await orch.serve(Leaky(), AgentServerConfig(audit_dir=tmp_path / "spools"))
    mesh = await _client(orch, "redacted-caller", link=False)
    assert await mesh.node.registry.wait_for_capability("spill", 1, timeout=10)
    small = await mesh.call("spill", {"chars": 10, "emails": 2}, timeout=30)
    assert small == {"t": "x" * 10 + " [REDACTED:email]" * 2}
    emails = 4000  # 16 bytes each before, 17 after: the answer grows by 4,000 bytes
    chars = MAX_MESSAGE_BYTES - 16 * emails - 1000  # the unredacted answer fits with room to spare
    with pytest.raises(PayloadTooLargeError) as refused:
        await mesh.call("spill", {"chars": chars, "emails": emails}, timeout=60)
    message = refused.value.message
    assert "'spill'" in message and "rewrote it" in message and "Sent message larger than max" not in message
    assert MAX_MESSAGE_BYTES < int(refused.value.metadata["size"]) <= MAX_MESSAGE_BYTES + 4000, refused.value
    assert await until(lambda: len(_inbound(server, "redacted-caller")) >= 2, 10)
    assert [(r["decision"], r["status"], r["reason"]) for r in _inbound(server, "redacted-caller")] == [
        ("allow", "OK", ""), ("invalid", "RESOURCE_EXHAUSTED", "PAYLOAD_TOO_LARGE")]


async def test_a_stream_item_a_redaction_grows_past_the_limit_is_told_to_use_more_items(
    orch: Orch, tmp_path: Path
) -> None:
    """A stream item the output screen's redaction grows past one message is PAYLOAD_TOO_LARGE like a unary answer,
    and its advice fits a stream: put less in one item. It told a stream's author to stream the answer."""
    server = await orch.serve(Leaky(), AgentServerConfig(audit_dir=tmp_path / "spools"))
    mesh = await _client(orch, "redacted-streamer", link=False)
    assert await mesh.node.registry.wait_for_capability("spills", 1, timeout=10)
    emails = 4000
    chars = MAX_MESSAGE_BYTES - 16 * emails - 1000
    with pytest.raises(PayloadTooLargeError) as refused:
        async for _ in mesh.stream("spills", {"chars": chars, "emails": emails}, timeout=60):
            pass
    message = refused.value.message
    assert "'spills'" in message and "rewrote it" in message, message
    assert "more items" in message and "or stream it" not in message, message
    assert await until(lambda: len(_inbound(server, "redacted-streamer")) >= 1, 10)
    assert [(r["decision"], r["status"], r["reason"]) for r in _inbound(server, "redacted-streamer")] == [
        ("invalid", "RESOURCE_EXHAUSTED", "PAYLOAD_TOO_LARGE")]

"""An answer that fits one message but not as a Link answer frame (the id and field headers around it pass the
limit) is PAYLOAD_TOO_LARGE on the link, and the agent's audit log now says so: the call's record is the refusal with
its reason (invalid, RESOURCE_EXHAUSTED, PAYLOAD_TOO_LARGE, as the sidecar records the same refusal). Before, the link
server refused the frame after the inbound chain had recorded the call as answered (allow, OK), so the record said
the caller got an answer it never got; and then the servicer refused it without noting why (error,
RESOURCE_EXHAUSTED, no reason). Real agent, real MeshClient, mutual TLS on loopback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hivemesh.mesh.link_wire import varint
from hivemesh.mesh.tls import MAX_MESSAGE_BYTES
from hivemesh.sdk import AgentServer, AgentServerConfig, MeshClient, PayloadTooLargeError
from hivemesh.v1 import agent_pb2
from tests.integration.test_answer_too_large import Big
from tests.support.orch_env import Orch
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(120)


def _inbound(server: AgentServer) -> list[dict[str, Any]]:
    assert server.audit is not None, "the agent's audit log is off"
    return [r for r in (json.loads(line) for line in server.audit.spool.lines()) if r.get("kind") == "inbound"]


async def _client(orch: Orch, name: str, *, link: bool) -> MeshClient:
    client = MeshClient.connect(name=name, settings=await orch.env.settings_for(name, "client"), link=link)
    return await orch.stack.enter_async_context(client)


async def test_an_answer_refused_as_a_link_answer_frame_is_on_record_as_refused(orch: Orch, tmp_path: Path) -> None:
    server = await orch.serve(Big(), AgentServerConfig(link=True, link_direct=False, audit_dir=tmp_path / "spools"))
    unary = await _client(orch, "unary-caller", link=False)
    linked = await _client(orch, "link-caller", link=True)
    hops = (await unary.call_detailed("sized", {"chars": 1}, timeout=10)).hops
    rest = agent_pb2.InvokeResponse(content_type="application/json", hops=hops,
                                    state=agent_pb2.TASK_STATE_COMPLETED).ByteSize()
    chars = MAX_MESSAGE_BYTES - 2 - 1 - len(varint(MAX_MESSAGE_BYTES)) - rest - 2  # a response of limit - 2 bytes
    assert await linked.call("sized", {"chars": 1}, timeout=10) == "x"
    with pytest.raises(PayloadTooLargeError) as refused:
        await linked.call("sized", {"chars": chars}, timeout=60)
    assert "as a Link answer frame" in refused.value.message, refused.value
    assert await linked.call("sized", {"chars": 3}, timeout=10) == "xxx"
    assert server._link is not None and server._link.links == 1, "the link broke"

    assert await until(lambda: len([r for r in _inbound(server) if "link-caller" in r["caller"]]) >= 3, 10)
    records = [r for r in _inbound(server) if "link-caller" in r["caller"]]
    assert [(r["decision"], r["status"], r["reason"]) for r in records] == [
        ("allow", "OK", ""), ("invalid", "RESOURCE_EXHAUSTED", "PAYLOAD_TOO_LARGE"), ("allow", "OK", "")], records

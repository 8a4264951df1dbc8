"""Direct links to and from a `hivemesh sidecar` process: hivemesh's own processes run on uvloop (mesh/loop.py),
whose transports are not asyncio's classes, and the listener refused every connection there (an assertion on the
transport's class) while the in-process tests, on asyncio's loop, passed; callers fell back to Agent/Link without a
word to the user but a warning. Here a caller on asyncio's loop reaches the sidecar's direct port (uvloop serving),
and the sidecar's own outbound calls reach an SDK agent's direct port (uvloop calling). Real processes, etcd, TLS."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from hivemesh.sdk import AgentServer, AgentServerConfig, MeshClient
from hivemesh.v1 import agent_pb2, mesh_pb2_grpc
from tests.support.agents_for_tests import EchoAgent
from tests.support.links import settle_link
from tests.support.meshenv import MeshEnv
from tests.support.plain_agent import PlainAgent
from tests.support.spawn import start_sidecar_ready, stop
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(180)


async def test_a_sidecar_process_serves_and_uses_direct_links(mesh_env: MeshEnv, tmp_path: Path) -> None:
    async with PlainAgent("plain", prefix="plain-") as plain, AgentServer(
        EchoAgent("sdk"), await mesh_env.settings_for("echo"), AgentServerConfig(link=True, audit=False)
    ) as echo_agent:
        proc, ready = await start_sidecar_ready(mesh_env, plain.endpoint, tmp_path / "home", tmp_path / "sidecar.log")
        try:
            assert ready.get("link"), ready  # it serves direct links, on uvloop
            async with MeshClient.connect(name="direct-caller",
                                          settings=await mesh_env.settings_for("direct-caller", "client")) as client:
                assert await client.node.registry.wait_for_capability("plain-echo", 1, timeout=30)
                (entry,) = client.node.registry.instances("plain-echo")
                assert entry.link_endpoint == ready["link"]
                invoke = await settle_link(client, "plain-echo", {"text": "hi"})  # raises unless it went direct
                assert invoke is not None and invoke._link is not None and invoke._link.direct
                for n in range(5):  # large payloads: written as pieces, read into buffers of their own, on uvloop
                    big = {"text": f"{n}" + "x" * (100_000 + n * 7_000)}
                    assert (await client.call("plain-echo", big, timeout=15))["text"] == big["text"]
                assert invoke._link is not None and invoke._link.direct and not invoke._link.broken

            # The sidecar's outbound calls (a local caller's Mesh.Call of `echo`) go to the SDK agent's direct port.
            listener = echo_agent._direct
            assert listener is not None
            async with grpc.aio.insecure_channel(ready["mesh"]) as channel:
                call = mesh_pb2_grpc.MeshStub(channel).Call
                for n in range(100):
                    resp = await call(agent_pb2.InvokeRequest(capability="echo", input=json.dumps(
                        {"text": f"n{n}"}).encode(), content_type="application/json"), timeout=15)
                    assert json.loads(resp.output)["text"] == f"n{n}"
                    if await until(lambda: bool(listener._connections), 0.05):
                        break
            assert listener._connections, "the sidecar's calls never went over the agent's direct link"
            async with grpc.aio.insecure_channel(ready["mesh"]) as channel:
                call = mesh_pb2_grpc.MeshStub(channel).Call
                for n in range(5):  # the sidecar forwards a large request (a view of what it read) as pieces
                    text = f"{n}" + "y" * (90_000 + n * 11_000)
                    resp = await call(agent_pb2.InvokeRequest(capability="echo", input=json.dumps(
                        {"text": text}).encode(), content_type="application/json"), timeout=15)
                    assert json.loads(resp.output)["text"] == text
            assert listener.refused == 0  # no handshake failed (its audit is off here: no probe either)
        finally:
            await stop(proc)

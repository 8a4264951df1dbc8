"""The request bytes an agent behind a sidecar receives, decoded as a Node agent decodes them: grpc-js's Invoke
deserializer (@grpc/proto-loader over protobufjs, examples/node's own contracts). protobufjs keeps only the last
occurrence of a singular message field, so a caller's sidecar that appended a second `context` (the call chain)
made a Node agent see an empty idempotency key and call id. Here the caller's context must reach it whole."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import grpc

from hivemesh.v1 import agent_pb2, mesh_pb2_grpc
from tests.e2e.test_node_examples import NODE_DIR
from tests.e2e.test_node_examples import node_modules as node_modules  # the `npm ci` fixture
from tests.integration.test_sidecar_call_context import RELAY, Rig
from tests.integration.test_sidecar_call_context import rig as rig  # relay -> target, each behind a sidecar

_DECODE = """
const { loadHivemesh } = require(process.argv[1] + '/lib/contracts.js');
const invoke = loadHivemesh().Agent.service.Invoke;  // what a grpc-js agent's server runs on each request
let hex = '';
process.stdin.on('data', (d) => { hex += d; });
process.stdin.on('end', () => {
  const req = invoke.requestDeserialize(Buffer.from(hex.trim(), 'hex'));
  process.stdout.write(JSON.stringify(req.context));
});
"""


async def _node_context(raw: bytes) -> dict[str, object]:
    node = shutil.which("node")
    assert node, "node is needed (./run installs Debian's nodejs when it is missing)"
    proc = await asyncio.create_subprocess_exec(
        node, "-e", _DECODE, str(NODE_DIR), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(raw.hex().encode()), timeout=60)
    assert proc.returncode == 0, err.decode()
    decoded: dict[str, object] = json.loads(out)
    return decoded


async def test_a_node_agent_reads_the_callers_whole_context(rig: Rig, node_modules: Path) -> None:
    caller = agent_pb2.CallContext(idempotency_key="k2", call_id="c2", conversation_id="conv", priority=2)
    async with grpc.aio.insecure_channel(rig.relay_sidecar.mesh_endpoint) as channel:
        await mesh_pb2_grpc.MeshStub(channel).Call(
            agent_pb2.InvokeRequest(capability="fields", input=b"{}", context=caller), timeout=10)
    [raw] = rig.target.received
    context = await _node_context(raw)
    assert {k: context[k] for k in ("idempotency_key", "call_id", "conversation_id", "priority", "chain")} == {
        "idempotency_key": "k2", "call_id": "c2", "conversation_id": "conv", "priority": 2, "chain": [RELAY]}

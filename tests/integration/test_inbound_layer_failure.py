"""A layer that fails (a bug, not a refusal) refuses the call INTERNAL, closed and recorded.

Until 5 Dec a layer's unexpected exception escaped the interceptor: gRPC answered UNKNOWN ("Unexpected
<class 'RecursionError'>" for a token header nested too deep) and no audit record was written, so a caller that
found such a bug could also keep its calls out of the audit log. Now the interceptor turns it into an INTERNAL
refusal that the decision observers see like any other. Here on a real gRPC server on loopback with the real
interceptor and audit log; the failing layer is one a deployment could plug in, with a bug."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from hivemesh.mesh.audit import AuditLog, classify
from hivemesh.mesh.errors import HivemeshError, from_rpc_error
from hivemesh.mesh.inbound import InboundChain, MeshInboundInterceptor
from hivemesh.mesh.layers.base import Inbound
from hivemesh.v1 import agent_pb2, agent_pb2_grpc

NODE = "spiffe://hivemesh.local/agent/echo"


class _BuggyLayer:
    name = "buggy"

    def __init__(self) -> None:
        self.checked = 0

    def check(self, call: Inbound) -> None:
        self.checked += 1
        if call.request is not None and call.request.capability == "breaks":
            raise KeyError("a bug in a layer")


class _Echo(agent_pb2_grpc.AgentServicer):
    def __init__(self) -> None:
        self.ran = 0

    async def Invoke(self, request: agent_pb2.InvokeRequest, context: Any) -> agent_pb2.InvokeResponse:
        self.ran += 1
        return agent_pb2.InvokeResponse(output=request.input, content_type="application/json")


async def test_a_layers_bug_is_an_internal_refusal_with_its_audit_record(tmp_path: Path) -> None:
    audit = AuditLog.open(tmp_path, node=NODE, instance="i-1")
    layer, echo = _BuggyLayer(), _Echo()
    server = grpc.aio.server(interceptors=[MeshInboundInterceptor(InboundChain([layer]), observers=[audit])])
    agent_pb2_grpc.add_AgentServicer_to_server(echo, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            invoke = agent_pb2_grpc.AgentStub(channel).Invoke
            ok = await invoke(agent_pb2.InvokeRequest(capability="echo", input=b'{"a":1}'), timeout=10)
            assert ok.output == b'{"a":1}'
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await invoke(agent_pb2.InvokeRequest(capability="breaks", input=b"{}"), timeout=10)
        err = from_rpc_error(failed.value)
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert type(err) is HivemeshError and err.reason == "INTERNAL"
        assert "KeyError" not in (failed.value.details() or "")  # the bug stays in the node's log
        assert (layer.checked, echo.ran) == (2, 1)  # the broken call never reached the agent
        records = [json.loads(line) for line in audit.spool.lines()]
        assert [(r["capability"], r["decision"], r["status"], r["reason"]) for r in records] == [
            ("echo", "allow", "OK", ""),
            ("breaks", classify(err, grpc.StatusCode.INTERNAL), "INTERNAL", "INTERNAL"),
        ]
    finally:
        await server.stop(None)
        audit.spool.close()


"""Kubernetes-style probes on a real `hivemesh sidecar --health-listen`: plaintext, no certificate, no audit.

The sidecar runs as a process with the handshake audit live (gRPC reads its tracer setting at import), as
`hivemesh up` starts it. Probes on its health port are answered without TLS and leave no record; one plaintext
connection to its mutual-TLS port, the control, is refused and recorded, so the audit is shown to be listening.
SIGTERM: the health port says NOT_SERVING before the process exits.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hivemesh.mesh.audit.handshake.switch import child_environment
from hivemesh.v1 import audit_pb2
from tests.support.meshenv import MeshEnv
from tests.support.plain_agent import PlainAgent
from tests.support.spawn import start_sidecar_ready, stop
from tests.support.tls_attacks import H2_PREFACE, raw_attempt

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PROBES = 10


async def _handshake_records(env: MeshEnv) -> list[dict[str, Any]]:
    resp = await env.operator.call(env.operator.audit.Query, audit_pb2.AuditQueryRequest(limit=10000,
                                                                                        kind="handshake"))
    return [json.loads(e)["record"] for e in resp.entries]


async def test_health_port_answers_plaintext_probes_that_leave_no_audit_record(
    mesh_env: MeshEnv, tmp_path: Path
) -> None:
    async with PlainAgent("plain") as plain:
        proc, ready = await start_sidecar_ready(mesh_env, plain.endpoint, tmp_path / "home", tmp_path / "sidecar.log",
                                                "--health-listen", "127.0.0.1:0",
                                                **child_environment({}, inherit={}))
        try:
            health, inbound = ready["health"], ready["inbound"]
            mtls_port = int(inbound.rpartition(":")[2])
            async with grpc.aio.insecure_channel(health) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                for i in range(PROBES):
                    service = "" if i % 2 else "hivemesh.v1.Agent"
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                    assert reply.status == SERVING, (service, reply)
                # A probe that does not decode is the prober's bad input, said so (gRPC's own answer was UNKNOWN).
                garbage = channel.unary_unary("/grpc.health.v1.Health/Check")
                with pytest.raises(grpc.aio.AioRpcError) as bad:
                    await garbage(b"\x0a\x02\xff\xfe", timeout=10)  # service: two bytes that are not UTF-8
                assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad.value
                assert "not a valid grpc.health.v1.HealthCheckRequest" in (bad.value.details() or ""), bad.value

                # The control: a plaintext connection to the mutual-TLS port is refused and recorded.
                control = await asyncio.to_thread(raw_attempt, mtls_port, H2_PREFACE)
                deadline = time.monotonic() + 30
                records = await _handshake_records(mesh_env)
                while not any(r["remote"].endswith(f":{control}") for r in records):
                    assert time.monotonic() < deadline, f"the control attempt was not audited: {records}"
                    await asyncio.sleep(0.2)
                    records = await _handshake_records(mesh_env)
                # Shipped in order: the probes came first, and none of them left a record.
                assert [(r["reason"], r["remote"].rpartition(":")[2], r["count"]) for r in records] == \
                    [("TLS_PLAINTEXT", str(control), 1)], records
                assert records[0]["listener"].endswith(f":{mtls_port}")

                # SIGTERM: a watcher of the health port hears NOT_SERVING before the process is gone.
                watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=30).__aiter__()
                assert (await anext(watch)).status == SERVING
                proc.send_signal(signal.SIGTERM)
                assert (await asyncio.wait_for(anext(watch), 10)).status == NOT_SERVING
            assert await asyncio.wait_for(proc.wait(), 15) == 0
        finally:
            await stop(proc)

"""Readiness decides health from its causes; the health port's address and the reflection's service list.

The health servicers here are grpc's own (asked directly, no network): what a probe would be answered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2

from hivemesh.controlplane.server import ControlPlaneConfig
from hivemesh.mesh.health_port import HEALTH_LISTEN_ENV, health_listen, parse_health_listen
from hivemesh.mesh.readiness import Readiness
from hivemesh.mesh.reflection import V1_SERVICE, ServiceRecorder, enable_reflection
from hivemesh.mesh.sidecar import SidecarConfig
from hivemesh.sdk import AgentServerConfig
from hivemesh.v1 import agent_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
AGENT = "hivemesh.v1.Agent"


async def _status(servicer: health.aio.HealthServicer, service: str = "") -> int:
    reply = await servicer.Check(health_pb2.HealthCheckRequest(service=service), None)
    return int(reply.status)


async def _all(servicer: health.aio.HealthServicer) -> set[int]:
    return {await _status(servicer, name) for name in ("", AGENT)}


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_serving_only_once_ready_and_while_no_cause_is_reported() -> None:
    readiness, servicer = Readiness(), health.aio.HealthServicer()
    await readiness.attach(servicer, [AGENT])
    assert await _all(servicer) == {NOT_SERVING}  # grpc's servicer says SERVING for "" until told otherwise
    await readiness.ready()
    assert await _all(servicer) == {SERVING} and readiness.problems == {}

    await readiness.report("agent", "the agent at 127.0.0.1:1 does not answer")
    await readiness.report("registration", "the registry entry is gone")
    assert await _all(servicer) == {NOT_SERVING}
    assert set(readiness.problems) == {"agent", "registration"}
    await readiness.report("agent", None)
    assert await _all(servicer) == {NOT_SERVING}  # one cause left
    await readiness.report("registration", None)
    assert await _all(servicer) == {SERVING}

    late = health.aio.HealthServicer()  # a port attached later (the health port) says the same at once
    await readiness.report("certificate", "expired")
    await readiness.attach(late, [AGENT])
    assert await _all(late) == {NOT_SERVING}
    await readiness.report("certificate", None)
    assert await _all(late) == {SERVING} == await _all(servicer)


async def test_draining_is_final() -> None:
    readiness, servicer = Readiness(), health.aio.HealthServicer()
    await readiness.attach(servicer, [AGENT])
    await readiness.ready()
    await readiness.drain()
    assert await _all(servicer) == {NOT_SERVING} and "draining" in readiness.problems
    await readiness.report("anything", None)
    await readiness.ready()
    assert await _all(servicer) == {NOT_SERVING}
    after = health.aio.HealthServicer()
    await readiness.attach(after, [AGENT])
    assert await _all(after) == {NOT_SERVING}


async def test_pulled_checks_set_and_clear_their_cause_and_a_failing_check_counts_as_a_problem() -> None:
    readiness, servicer = Readiness(), health.aio.HealthServicer()
    await readiness.attach(servicer, [AGENT])
    await readiness.ready()
    answer: list[str | None] = ["the agent does not answer"]

    async def check() -> str | None:
        if answer[0] == "raise":
            raise ConnectionError("no route")
        return answer[0]

    readiness.watch("agent", check, interval_s=0.01)
    try:
        await _until(lambda: not readiness.serving)
        assert await _all(servicer) == {NOT_SERVING}
        answer[0] = None
        await _until(lambda: readiness.serving)
        assert await _all(servicer) == {SERVING}
        answer[0] = "raise"
        await _until(lambda: not readiness.serving)
        assert "ConnectionError('no route')" in readiness.problems["agent"]
    finally:
        await readiness.close()


def test_health_listen_address_flag_env_and_mistakes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_health_listen("0.0.0.0:8086") == ("0.0.0.0", 8086)
    assert parse_health_listen("[::]:0") == ("[::]", 0)
    assert parse_health_listen("off") is None
    for bad in ("8086", "host:", ":8086", "h:99999", "h:port"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_health_listen(bad)
    monkeypatch.delenv(HEALTH_LISTEN_ENV, raising=False)
    assert health_listen(None) is None  # off unless asked
    monkeypatch.setenv(HEALTH_LISTEN_ENV, "127.0.0.1:8086")
    assert health_listen(None) == "127.0.0.1:8086"
    assert health_listen("off") is None  # the flag wins over the environment
    with pytest.raises(ValueError, match="HOST:PORT"):
        SidecarConfig(agent="127.0.0.1:7001", health_listen="8086")
    with pytest.raises(ValueError, match="HOST:PORT"):
        AgentServerConfig(health_listen="localhost")
    with pytest.raises(ValueError, match="health_interval_s"):
        AgentServerConfig(health_interval_s=0)
    with pytest.raises(ValueError, match="HOST:PORT"):
        ControlPlaneConfig(etcd_endpoints="127.0.0.1:2379", certs_dir=Path("c"), state_dir=Path("s"),
                           health_listen="nope")


async def test_reflection_names_what_was_installed_on_both_apis() -> None:
    server = grpc.aio.server()
    recorder = ServiceRecorder(server)
    agent_pb2_grpc.add_AgentServicer_to_server(agent_pb2_grpc.AgentServicer(), recorder)
    assert recorder.names == [AGENT]
    enable_reflection(recorder, recorder.names)
    assert V1_SERVICE in recorder.names and "grpc.reflection.v1alpha.ServerReflection" in recorder.names
    # v1 describes itself like any listed service: its file is in the pool, with v1 messages.
    method = descriptor_pool.Default().FindServiceByName(V1_SERVICE).methods_by_name["ServerReflectionInfo"]
    assert method.input_type.full_name == "grpc.reflection.v1.ServerReflectionRequest"
    await server.stop(None)

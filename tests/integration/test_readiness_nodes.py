"""Health tells the truth on real nodes: each cause of NOT_SERVING, and the recovery, on real servers.

A sidecar in front of a real plain agent (agent stopped and started again on its port; its registry key
deleted; draining), an SDK agent whose certificate expires while renewal is refused (its identity revoked,
certificates of a few seconds), and a control plane whose etcd is paused. Each answers on its plaintext health
port and on its mutual-TLS port alike, and reflection lists every service each port serves, on v1 and v1alpha.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from hivemesh.mesh.etcd import EtcdServer
from hivemesh.mesh.pki import controlplane_dns_name, parse_spiffe_id
from hivemesh.mesh.ports import free_port
from hivemesh.mesh.registry import agent_key
from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
from hivemesh.mesh.tls import channel_credentials, secure_channel
from hivemesh.sdk import AgentServer, AgentServerConfig
from hivemesh.v1 import agent_pb2_grpc, trust_pb2
from tests.support.agents_for_tests import EchoAgent
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, start_mesh_env, stop_mesh_env
from tests.support.plain_agent import PlainAgent
from tests.support.spawn import freeze

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
AGENT = "hivemesh.v1.Agent"
REFLECTION = {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}
INTERVAL_S = 0.2
"""The readiness checks' interval here: a cause shows within about a second on a loaded machine."""


async def _status(channel: grpc.aio.Channel, service: str = "") -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def _becomes(channels: list[grpc.aio.Channel], status: int, what: str, timeout: float = 15.0) -> None:
    """Every channel's node answers status for "" and the Agent service (where it serves one)."""

    async def check() -> bool:
        return all([await _status(c) == status for c in channels])

    await _until(check, what, timeout)


async def _listed(channel: grpc.aio.Channel, api: str) -> set[str]:
    """The services a port lists through reflection API api (v1 or v1alpha)."""
    call = channel.stream_stream(f"/grpc.reflection.{api}.ServerReflection/ServerReflectionInfo",
                                 request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await call.read()
    await call.done_writing()
    assert isinstance(reply, reflection_pb2.ServerReflectionResponse), reply
    return {s.name for s in reply.list_services_response.service}


def _mtls(env: MeshEnv, address: str, server_name: str) -> grpc.aio.Channel:
    """The operator's mutual-TLS channel to address (what grpcurl is given in docs/observability.md)."""
    certs = env.certs
    creds = channel_credentials(certs.ca_cert.read_bytes(), certs.operator_cert.read_bytes(),
                                certs.operator_key.read_bytes())
    return secure_channel(address, creds, server_name=server_name)


async def _open_watch(channel: grpc.aio.Channel) -> AsyncIterator[health_pb2.HealthCheckResponse]:
    return health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30).__aiter__()


async def test_sidecar_health_follows_its_agent_its_registry_entry_and_its_drain(
    mesh_env: MeshEnv, etcd: Any
) -> None:
    plain = PlainAgent("plain")
    await plain.start(free_port())  # restarted on the same port below: outside the ephemeral range
    restarted: grpc.aio.Server | None = None
    config = SidecarConfig(agent=plain.endpoint, health_listen="127.0.0.1:0", health_interval_s=INTERVAL_S)
    sidecar = Sidecar(config, await mesh_env.settings_for("plain"))
    await sidecar.start()
    try:
        assert sidecar.health.address is not None
        assert f" health={sidecar.health.address}" in sidecar.ready_line
        probe = grpc.aio.insecure_channel(sidecar.health.address)  # plaintext: no certificate at all
        mtls = _mtls(mesh_env, sidecar.endpoint, parse_spiffe_id(f"spiffe://{TRUST_DOMAIN}/agent/plain").dns_name)
        both = [probe, mtls]
        for channel in both:
            assert await _status(channel) == await _status(channel, AGENT) == SERVING
        assert await _listed(mtls, "v1") == await _listed(mtls, "v1alpha") == {AGENT, "grpc.health.v1.Health",
                                                                               *REFLECTION}
        no_reflection = _listed(probe, "v1alpha")  # the health port serves health and nothing else
        try:
            await no_reflection
            raise AssertionError("the health port answered reflection")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNIMPLEMENTED

        # The agent stops answering: not serving until it answers again (on the same port).
        port = plain.port
        await plain.stop()
        await _becomes(both, NOT_SERVING, "NOT_SERVING with the agent down")
        assert await _status(probe, AGENT) == NOT_SERVING
        assert "agent" in sidecar.health.readiness.problems
        restarted = grpc.aio.server()
        agent_pb2_grpc.add_AgentServicer_to_server(plain, restarted)
        assert restarted.add_insecure_port(f"127.0.0.1:{port}") == port
        await restarted.start()
        await _becomes(both, SERVING, "SERVING once the agent answers again")

        # The registry entry is deleted under its live lease: not serving, then written again, serving.
        key = agent_key("plain", sidecar.instance_id).encode()
        assert (await etcd.get(key)) is not None
        await etcd.delete(key)
        await _becomes(both, NOT_SERVING, "NOT_SERVING with the registry entry gone")
        await _becomes(both, SERVING, "SERVING once the entry is back")
        assert (await etcd.get(key)) is not None

        # Draining: a watcher of the health port hears NOT_SERVING first, while the mutual-TLS port still
        # answers (it says NOT_SERVING too) before the entry goes and the ports close.
        watch = await _open_watch(probe)
        assert (await anext(watch)).status == SERVING
        stopping = asyncio.create_task(sidecar.stop())
        assert (await asyncio.wait_for(anext(watch), 10)).status == NOT_SERVING
        assert await _status(mtls) == NOT_SERVING
        await stopping
        await probe.close()
        await mtls.close()
    finally:
        await sidecar.stop()
        if restarted is not None:
            await restarted.stop(0.5)
        await plain.stop()


async def test_sdk_agent_stops_serving_when_its_certificate_expired_beyond_renewal(
    etcd: Any, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    env = await start_mesh_env(tmp_path, etcd_server.endpoint, cert_ttl_s=3)
    try:
        config = AgentServerConfig(health_listen="127.0.0.1:0", health_interval_s=INTERVAL_S)
        async with AgentServer(EchoAgent("ok"), await env.settings_for("echo"), config) as server:
            assert server.health_address is not None
            probe = grpc.aio.insecure_channel(server.health_address)
            mtls = _mtls(env, server.endpoint, parse_spiffe_id(f"spiffe://{TRUST_DOMAIN}/agent/echo").dns_name)
            assert await _status(probe) == await _status(probe, AGENT) == SERVING
            assert await _listed(mtls, "v1") == {AGENT, "grpc.health.v1.Health", *REFLECTION}
            await mtls.close()
            # Renewal is refused from now on; the 3 s certificate runs out.
            await env.operator.call(env.operator.trust.Revoke, trust_pb2.RevokeRequest(
                subject=f"spiffe://{TRUST_DOMAIN}/agent/echo", note="cut off for the test"))
            await _becomes([probe], NOT_SERVING, "NOT_SERVING once the certificate expired", timeout=30)
            assert "certificate" in server.health.readiness.problems
            assert time.time() >= server.node.workload.expires_at
            await probe.close()
    finally:
        await stop_mesh_env(env)


async def test_controlplane_health_follows_etcd_and_reflection_lists_every_service(
    own_etcd: EtcdServer, tmp_path: Path
) -> None:
    env = await start_mesh_env(tmp_path, own_etcd.endpoint, health_listen="127.0.0.1:0",
                               health_interval_s=INTERVAL_S)
    cp = env.controlplane
    paused = False
    try:
        assert cp.health_address is not None
        probe = grpc.aio.insecure_channel(cp.health_address)
        mtls = _mtls(env, cp.address, controlplane_dns_name(TRUST_DOMAIN))
        features = {f"hivemesh.v1.{s}"
                    for s in ("ControlPlane", "Policies", "Audit", "Trust", "Escalations", "State")}
        expected = {*features, "grpc.health.v1.Health", *REFLECTION}
        assert await _listed(mtls, "v1") == await _listed(mtls, "v1alpha") == expected
        for name in features:  # each answers health on both ports
            assert await _status(mtls, name) == await _status(probe, name) == SERVING

        # grpcio-reflection's own client, over the real TLS channel, finds every listed service's definition.
        def describe() -> set[str]:
            certs = env.certs
            creds = grpc.ssl_channel_credentials(certs.ca_cert.read_bytes(), certs.operator_key.read_bytes(),
                                                 certs.operator_cert.read_bytes())
            options = (("grpc.ssl_target_name_override", controlplane_dns_name(TRUST_DOMAIN)),)
            with grpc.secure_channel(cp.address, creds, options=options) as channel:
                db = ProtoReflectionDescriptorDatabase(channel)
                pool = descriptor_pool.DescriptorPool(db)
                return {pool.FindServiceByName(name).full_name for name in db.get_services()}

        assert await asyncio.to_thread(describe) == expected

        join = _mtls(env, cp.join_address, controlplane_dns_name(TRUST_DOMAIN))
        assert await _listed(join, "v1") == {"hivemesh.v1.Join", "grpc.health.v1.Health", *REFLECTION}
        await join.close()

        # etcd stops answering (the process paused): not serving; it answers again: serving.
        assert own_etcd.pid is not None
        freeze(own_etcd.pid)
        paused = True
        await _becomes([probe, mtls], NOT_SERVING, "NOT_SERVING with etcd paused")
        assert "etcd" in cp.readiness.problems
        os.kill(own_etcd.pid, signal.SIGCONT)
        paused = False
        await _becomes([probe, mtls], SERVING, "SERVING once etcd answers again", timeout=30)
        await probe.close()
        await mtls.close()
    finally:
        if paused and own_etcd.pid is not None:
            os.kill(own_etcd.pid, signal.SIGCONT)
        await stop_mesh_env(env)

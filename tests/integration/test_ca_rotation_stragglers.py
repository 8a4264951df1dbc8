"""A CA rotation cannot strand a node: real nodes (an SDK agent, a plain agent behind a sidecar), a real control
plane, the real `hivemesh` CLI in a child process.

The sidecar's identity is revoked before `activate`, so its renewal onto the new root is refused. `ca status`
lists it (and not the agent that renewed), and `ca rotate --step finish` refuses, naming it. Its certificate then
expires with renewal still refused: it reports NOT_SERVING and leaves the registry, and `finish` succeeds.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hivemesh.controlplane import ca_rotation
from hivemesh.mesh.cert_presence import CERT_ROOT_LABEL, issuing_root
from hivemesh.mesh.etcd import EtcdServer
from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
from hivemesh.sdk import AgentServer, MeshClient
from hivemesh.v1 import trust_pb2
from tests.support.agents_for_tests import EchoAgent
from tests.support.meshenv import TRUST_DOMAIN, run_cli, start_mesh_env, stop_mesh_env
from tests.support.plain_agent import PlainAgent

CERT_TTL_S = 20
"""Long enough that the stranded sidecar still holds a valid old-root certificate through `finish`'s refusal on a
loaded machine (about 3 s after it joined on a quiet one), short enough that it then expires within the test."""


async def _until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def _health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(reply.status)


async def test_finish_refuses_while_a_node_cannot_renew_and_names_it(
    etcd: Any, etcd_server: EtcdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `finish`'s own wait after `activate` off: its refusal here can only be the stranded node's.
    monkeypatch.setattr(ca_rotation, "MIN_ACTIVE_S", 0.0)
    env = await start_mesh_env(tmp_path, etcd_server.endpoint, cert_ttl_s=CERT_TTL_S)
    plain = PlainAgent("plain", prefix="p-")
    await plain.__aenter__()
    try:
        async with AgentServer(EchoAgent("ok"), await env.settings_for("echo")) as server, \
                Sidecar(SidecarConfig(agent=plain.endpoint), await env.settings_for("plain")) as sidecar, \
                MeshClient.connect(name="tester", settings=await env.settings_for("tester", "client")) as mesh:
            assert sidecar.node is not None
            for cap in ("echo", "p-echo"):
                assert await mesh.node.registry.wait_for_capability(cap, 1, timeout=10), cap
            # Each registry entry says which root issued the certificate its endpoint presents.
            listed = {i.card.name: i for i in await env.operator.list_agents()}
            assert listed["echo"].labels[CERT_ROOT_LABEL] == issuing_root(server.node.workload) != ""

            assert (await run_cli(env, "ca", "rotate", "--step", "prepare"))[0] == 0
            revoked = await env.operator.call(env.operator.trust.Revoke, trust_pb2.RevokeRequest(
                subject=f"spiffe://{TRUST_DOMAIN}/agent/plain", note="cut off for the test"))
            assert revoked.key
            code, out, err = await run_cli(env, "ca", "rotate", "--step", "activate", "--json")
            assert code == 0, err
            new_root = json.loads(out)["signing_root"]

            async def agent_renewed() -> bool:
                entries = {i.card.name: i for i in await env.operator.list_agents()}
                return entries["echo"].labels.get(CERT_ROOT_LABEL) == new_root

            await _until(agent_renewed, CERT_TTL_S, "the agent's registry entry to name the new root")
            (code, out, err), (_, text, _) = await asyncio.gather(
                run_cli(env, "ca", "status", "--json"), run_cli(env, "ca", "status"))
            assert code == 0, err
            behind = json.loads(out)["not_on_signing_root"]
            assert [(b["agent"], b["identity"]) for b in behind] == [("plain", f"spiffe://{TRUST_DOMAIN}/agent/plain")]
            assert "plain/" in text and "not on the signing root" in text

            code, out, err = await run_cli(env, "ca", "rotate", "--step", "finish")
            assert code == 1 and "FAILED_PRECONDITION" in err, (out, err)
            assert "plain/" in err and f"spiffe://{TRUST_DOMAIN}/agent/plain" in err and "echo/" not in err, err

            # The sidecar's certificate expires with renewal refused: it stops serving and leaves the registry.
            mesh_health = sidecar.mesh_endpoint

            async def left() -> bool:
                return "plain" not in {i.card.name for i in await env.operator.list_agents()}

            await _until(left, CERT_TTL_S + 30, "the stranded sidecar to leave the registry")
            assert await _health(mesh_health) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert time.time() >= sidecar.node.workload.expires_at  # it left because its certificate expired

            code, out, err = await run_cli(env, "ca", "rotate", "--step", "finish", "--json")
            assert code == 0, err
            assert json.loads(out)["roots"] == [new_root]
            assert (await mesh.call("echo", {"text": "after"}, timeout=10))["text"] == "after"
    finally:
        await plain.__aexit__(None, None, None)
        await stop_mesh_env(env)

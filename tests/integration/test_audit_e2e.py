"""The audit log end to end over the real mesh: nodes record every decision, ship it to the control plane,
keep it while the control plane is down and replay it afterwards with nothing lost and nothing duplicated;
the CLI queries and verifies it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from hivemesh.controlplane.server import ControlPlaneServer
from hivemesh.mesh.errors import HivemeshError, InvalidInputError
from hivemesh.sdk import Agent, AgentServer, AgentServerConfig, Context, MeshClient, capability
from hivemesh.v1 import audit_pb2
from tests.support.agents_for_tests import EchoAgent, Text
from tests.support.meshenv import MeshEnv, apply_policies_text, run_cli, start_mesh_env, stop_mesh_env


async def _query(env: MeshEnv, **kw: Any) -> list[dict[str, Any]]:
    resp = await env.operator.call(env.operator.audit.Query, audit_pb2.AuditQueryRequest(limit=10000, **kw))
    return [json.loads(e) for e in resp.entries]


async def test_every_decision_is_recorded_shipped_queried_and_verified(mesh_env: MeshEnv, tmp_path: Path) -> None:
    async with AgentServer(EchoAgent(), await mesh_env.settings_for("echo"),
                           AgentServerConfig(audit_dir=tmp_path / "spools")) as server:
        async with MeshClient.connect(name="tester", settings=await mesh_env.settings_for("tester", "client")) as mesh:
            assert await mesh.node.registry.wait_for_capability("echo", 1, timeout=10)
            for i in range(5):
                await mesh.call("echo", {"text": f"hi {i}"}, timeout=10)
            with pytest.raises(InvalidInputError):
                await mesh.call("echo", {"txt": "no text"}, timeout=10)
        assert server.audit is not None and server.audit.shipper is not None
        assert await server.audit.shipper.wait_shipped(timeout=10)
        spool_dir = server.audit.spool.dir
    records = [e["record"] for e in await _query(mesh_env, agent="*/agent/echo")]
    assert [r["decision"] for r in records] == ["allow"] * 5 + ["invalid"]
    first = records[0]
    assert first["caller"] == "spiffe://hivemesh.local/client/tester"
    assert first["principal"] == "spiffe://hivemesh.local/client/tester"
    assert first["capability"] == "echo" and first["status"] == "OK" and first["jti"] and first["trace_id"]
    assert first["instance"] == server.instance_id and first["latency_us"] > 0
    assert records[-1]["reason"] == "INVALID_INPUT"
    # The control plane recorded its own decisions too: joins and token issues, with who asked.
    own = [e["record"] for e in await _query(mesh_env, caller="*/client/tester")]
    assert {"ControlPlane/IssueToken"} <= {r.get("method") for r in own}

    code, out, err = await run_cli(mesh_env, "audit", "query", "--decision", "invalid", "--json")
    assert code == 0, err
    lines = [json.loads(x) for x in out.splitlines()]
    assert [x["record"]["reason"] for x in lines] == ["INVALID_INPUT"]
    # That query is on record as what it was (an operator's allowed read), its filters kept apart: a filter
    # named like a record field (decision, caller, kind) must not pose as the record's own.
    code, out, err = await run_cli(mesh_env, "audit", "query", "--decision", "deny", "--caller", "*/client/x",
                                   "--kind", "handshake", "--json")
    assert code == 0 and out == "", err
    reads = [e["record"] for e in await _query(mesh_env, kind="controlplane")
             if e["record"].get("method") == "Audit/Query" and e["record"].get("request_decision") == "deny"]
    assert len(reads) == 1, reads
    assert (reads[0]["decision"], reads[0]["kind"], reads[0]["request_caller"], reads[0]["request_kind"]) == (
        "allow", "controlplane", "*/client/x", "handshake")
    assert reads[0]["caller"].startswith("spiffe://hivemesh.local/operator/"), reads[0]
    code, out, err = await run_cli(mesh_env, "audit", "tail", "-n", "3")
    assert code == 0 and "allow" in out, err
    code, out, err = await run_cli(mesh_env, "audit", "verify", "--json")
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["ok"] is True
    export = tmp_path / "export"
    code, out, err = await run_cli(mesh_env, "audit", "export", "--out", str(export))
    assert code == 0, err
    code, out, err = await run_cli(
        mesh_env, "audit", "verify", "--file", str(export / "log.jsonl"), "--checkpoints",
        str(export / "checkpoints.jsonl"), "--key", str(export / "checkpoint-key.pem"),
    )
    assert code == 0 and "OK" in out, out + err
    code, out, err = await run_cli(mesh_env, "audit", "verify", "--file", str(spool_dir))
    assert code == 0 and "OK" in out, out + err
    # One changed byte in the export: verify names the record and exits 1.
    data = (export / "log.jsonl").read_bytes().splitlines()
    data[2] = data[2].replace(b'"decision":"allow"', b'"decision":"deny"', 1)
    (export / "log.jsonl").write_bytes(b"\n".join(data) + b"\n")
    code, out, err = await run_cli(mesh_env, "audit", "verify", "--file", str(export / "log.jsonl"), "--json")
    assert code == 1
    assert json.loads(out.splitlines()[0])["first_bad_seq"] == 3


@pytest.mark.slow
async def test_spool_grows_while_control_plane_is_down_then_replays_exactly_once(
    mesh_env: MeshEnv, tmp_path: Path
) -> None:
    cp = mesh_env.controlplane
    config = dataclasses.replace(cp.config, port=cp.port, join_port=cp.join_port)
    async with AgentServer(EchoAgent(), await mesh_env.settings_for("echo"),
                           AgentServerConfig(audit_dir=tmp_path / "spools")) as server:
        async with MeshClient.connect(name="tester", settings=await mesh_env.settings_for("tester", "client")) as mesh:
            assert await mesh.node.registry.wait_for_capability("echo", 1, timeout=10)
            for i in range(20):
                await mesh.call("echo", {"text": str(i)}, timeout=10)
            assert server.audit is not None and server.audit.shipper is not None
            spool = server.audit.spool
            assert await server.audit.shipper.wait_shipped(timeout=10)
            await cp.stop(0.2)
            # The control plane is down: calls flow on cached tokens and the spool grows.
            for i in range(300):
                await mesh.call("echo", {"text": str(i)}, timeout=10)
            await asyncio.sleep(0.5)
            assert spool.pending == 300
            restarted = ControlPlaneServer(config)
            await restarted.start()
            mesh_env.controlplane = restarted
            try:
                assert await server.audit.shipper.wait_shipped(timeout=30), server.audit.shipper.last_error
                entries = await _query(mesh_env, agent="*/agent/echo")
                seqs = [e["record"]["seq"] for e in entries]
                assert seqs == list(range(1, 321)), "lost or duplicated records"
                verified = await mesh_env.operator.call(mesh_env.operator.audit.Verify, audit_pb2.AuditVerifyRequest())
                assert verified.ok, verified.problem
                print(f"\nFIGURE audit outage: 300 records spooled while the control plane was down, replayed "
                      f"with 0 lost, 0 duplicated (shipper retries: {server.audit.shipper.failures})")
            finally:
                await restarted.stop(0.2)


async def test_unrecordable_call_fails_closed(mesh_env: MeshEnv, tmp_path: Path) -> None:
    """A node that cannot write its audit record does not answer: the caller gets AUDIT_UNAVAILABLE."""
    agent = EchoAgent()
    async with AgentServer(agent, await mesh_env.settings_for("echo"),
                           AgentServerConfig(audit_dir=tmp_path / "spools")) as server:
        async with MeshClient.connect(name="tester", settings=await mesh_env.settings_for("tester", "client")) as mesh:
            assert await mesh.node.registry.wait_for_capability("echo", 1, timeout=10)
            await mesh.call("echo", {"text": "ok"}, timeout=10)
            assert server.audit is not None
            spool = server.audit.spool
            import os

            with spool._lock:
                assert spool._fd is not None
                os.close(spool._fd)
                spool._fd = os.open("/dev/full", os.O_WRONLY)  # a full disk from now on
            from hivemesh.mesh.errors import HivemeshError

            with pytest.raises(HivemeshError) as info:
                await mesh.call("echo", {"text": "unaudited"}, timeout=10)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.reason == "AUDIT_UNAVAILABLE"
            assert agent.calls == 2  # the handler ran, but its answer was never released


class Caller(Agent):
    """Calls `boom` (which always fails) on another agent, from inside its own capability."""

    name = "caller"
    version = "1.0.0"

    @capability(description="call boom onward")
    async def relay_boom(self, req: Text, ctx: Context) -> Text:
        out: Text = await ctx.call_capability("boom", req)
        return out


async def test_a_node_records_the_calls_it_refuses_itself(etcd: Any, etcd_server: Any, tmp_path: Path) -> None:
    """Decisions taken on the way out are decisions too: an open circuit (CIRCUIT_OPEN) is recorded by the
    node that refused to send the call, next to its inbound records."""
    grants = {"grants": [{"name": "all", "subjects": ["spiffe://hivemesh.local/*"], "capabilities": ["*"]}]}
    mesh_env = await start_mesh_env(tmp_path, etcd_server.endpoint, grants)
    try:
        await _refused_on_the_way_out(mesh_env, tmp_path)
    finally:
        await stop_mesh_env(mesh_env)


async def _refused_on_the_way_out(mesh_env: MeshEnv, tmp_path: Path) -> None:
    await apply_policies_text(mesh_env.etcd, yaml.safe_dump({"kind": "breakers", "name": "boom", "spec": {
        "capabilities": ["boom"], "capability": {"consecutive_failures": 1, "open_ms": 60_000}}}))
    async with AgentServer(EchoAgent(), await mesh_env.settings_for("echo"),
                           AgentServerConfig(audit_dir=tmp_path / "a")), \
            AgentServer(Caller(), await mesh_env.settings_for("caller"),
                        AgentServerConfig(audit_dir=tmp_path / "b")) as caller:
        async with MeshClient.connect(name="tester", settings=await mesh_env.settings_for("tester", "client")) as mesh:
            assert await mesh.node.registry.wait_for_capability("relay-boom", 1, timeout=10)
            for _ in range(2):
                with pytest.raises(HivemeshError):
                    await mesh.call("relay-boom", {"text": "x"}, timeout=10)
        assert caller.audit is not None
        records = [json.loads(x) for x in caller.audit.spool.lines()]
    outbound = [r for r in records if r.get("kind") == "outbound"]
    assert [(r["capability"], r["decision"], r["reason"]) for r in outbound] == [
        ("boom", "circuit_open", "CIRCUIT_OPEN")
    ]
    assert outbound[0]["caller"] == "spiffe://hivemesh.local/agent/caller"
    inbound = [r for r in records if r.get("kind") == "inbound"]
    assert [r["decision"] for r in inbound] == ["error", "error"], inbound  # both relay-boom calls failed


async def test_a_proxyless_client_records_the_calls_it_refuses_itself(
    etcd: Any, etcd_server: Any, tmp_path: Path
) -> None:
    """A MeshClient runs the outbound layers in-process, as a sidecar would: its own refusals (here an open
    circuit) are audited in its own spool, which it ships to the control plane."""
    grants = {"grants": [{"name": "all", "subjects": ["spiffe://hivemesh.local/*"], "capabilities": ["*"]}]}
    mesh_env = await start_mesh_env(tmp_path, etcd_server.endpoint, grants)
    try:
        await apply_policies_text(mesh_env.etcd, yaml.safe_dump({"kind": "breakers", "name": "boom", "spec": {
            "capabilities": ["boom"], "capability": {"consecutive_failures": 1, "open_ms": 60_000}}}))
        async with AgentServer(EchoAgent(), await mesh_env.settings_for("echo"),
                               AgentServerConfig(audit_dir=tmp_path / "a")):
            client = MeshClient.connect(name="tester", settings=await mesh_env.settings_for("tester", "client"),
                                        audit_dir=tmp_path / "client")
            async with client as mesh:
                assert await mesh.node.registry.wait_for_capability("boom", 1, timeout=10)
                for _ in range(2):
                    with pytest.raises(HivemeshError):
                        await mesh.call("boom", {"text": "x"}, timeout=10)
                assert mesh.audit is not None
                records = [json.loads(x) for x in mesh.audit.spool.lines()]
    finally:
        await stop_mesh_env(mesh_env)
    outbound = [r for r in records if r.get("kind") == "outbound"]
    assert [(r["capability"], r["decision"], r["reason"]) for r in outbound] == [
        ("boom", "circuit_open", "CIRCUIT_OPEN")
    ]
    assert outbound[0]["caller"] == "spiffe://hivemesh.local/client/tester"


async def test_a_call_to_one_given_instance_goes_through_the_same_outbound_checks(
    etcd: Any, etcd_server: Any, tmp_path: Path
) -> None:
    """`call_on` (fan-out to every instance) is no side door: a capability the caller is not granted is
    refused locally and audited, exactly as through `call`."""
    grants = {"grants": [{"name": "echo-only", "subjects": ["spiffe://hivemesh.local/client/*"],
                          "capabilities": ["echo"]}]}
    mesh_env = await start_mesh_env(tmp_path, etcd_server.endpoint, grants)
    try:
        async with AgentServer(EchoAgent(), await mesh_env.settings_for("echo"),
                               AgentServerConfig(audit_dir=tmp_path / "a")):
            client = MeshClient.connect(name="tester", settings=await mesh_env.settings_for("tester", "client"),
                                        audit_dir=tmp_path / "client")
            async with client as mesh:
                assert await mesh.node.registry.wait_for_capability("echo", 1, timeout=10)
                (instance,) = mesh.instances("echo")
                ok = await mesh.call_on(instance, "echo", {"text": "hi"}, timeout=10)
                assert ok.output["text"] == "hi"
                with pytest.raises(HivemeshError) as refused:
                    await mesh.call_on(instance, "boom", {"text": "x"}, timeout=10)
                assert refused.value.reason == "GRANT_DENIED"
                assert mesh.audit is not None
                records = [json.loads(x) for x in mesh.audit.spool.lines()]
    finally:
        await stop_mesh_env(mesh_env)
    outbound = [(r["capability"], r["reason"]) for r in records if r.get("kind") == "outbound"]
    assert outbound == [("boom", "GRANT_DENIED")]


async def test_a_request_that_does_not_decode_is_recorded_with_its_sender(mesh_env: MeshEnv, tmp_path: Path) -> None:
    """Bytes that are not an InvokeRequest, from a workload of the mesh over mutual TLS: refused INVALID_ARGUMENT
    before the chain ran, and recorded with who sent them (the record's caller was empty)."""
    from hivemesh.mesh.tls import join, secure_channel
    from tests.support.meshenv import TRUST_DOMAIN

    async with AgentServer(EchoAgent(), await mesh_env.settings_for("echo"),
                           AgentServerConfig(audit_dir=tmp_path / "spools")) as server:
        resp = await mesh_env.operator.create_join_token("garbler", "client", 60)
        w = await join(mesh_env.controlplane.join_address, mesh_env.certs.ca_cert.read_bytes(), resp.token,
                       "garbler", "client", trust_domain=TRUST_DOMAIN)
        async with secure_channel(server.endpoint, w.channel_credentials(),
                                  server_name=server.node.workload.identity.dns_name) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await channel.unary_unary("/hivemesh.v1.Agent/Invoke")(b"\x0a\xff\xff", timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
        assert server.audit is not None and server.audit.shipper is not None
        assert await server.audit.shipper.wait_shipped(timeout=10)
    records = [e["record"] for e in await _query(mesh_env, agent="*/agent/echo")]
    assert [(r["decision"], r["reason"]) for r in records] == [("invalid", "INVALID_INPUT")], records
    assert records[0]["caller"] == "spiffe://hivemesh.local/client/garbler", records[0]

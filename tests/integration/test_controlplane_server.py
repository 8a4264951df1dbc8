"""The control plane over real TLS on loopback with a real etcd: join, renew, tokens, grants, and who may
reach what."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aetcd
import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hivemesh.controlplane.ca import CaFiles, init_ca
from hivemesh.controlplane.server import CA_KEY, ControlPlaneConfig, ControlPlaneServer, main
from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.errors import (
    FailedPreconditionError,
    GrantDeniedError,
    InvalidInputError,
    JoinTokenInvalidError,
    PermissionDeniedError,
    TokenInvalidError,
)
from hivemesh.mesh.etcd import EtcdServer
from hivemesh.mesh.pki import cert_thumbprint_s256, new_key_and_csr, spiffe_id_of
from hivemesh.mesh.tls import Workload, channel_credentials, join, load_workload_files, secure_channel
from hivemesh.mesh.token_source import TokenSource
from hivemesh.mesh.tokens import JWKS_KEY, KeySet, TokenVerifier
from hivemesh.v1 import agent_pb2, control_pb2, control_pb2_grpc, mesh_pb2
from tests.support.meshenv import copy_session_ca

TD = "hivemesh.local"
CP_NAME = "controlplane.hivemesh.local"
EXTRACTOR = "spiffe://hivemesh.local/agent/extractor"
ISSUER = "spiffe://hivemesh.local/controlplane"
GRANTS = """
grants:
  - name: clients-to-agents
    subjects: ["spiffe://hivemesh.local/client/*", "spiffe://hivemesh.local/operator/*"]
    audiences: ["spiffe://hivemesh.local/agent/*"]
    capabilities: ["*"]
"""


@dataclass
class Rig:
    server: ControlPlaneServer
    files: CaFiles
    operator: ControlPlaneClient
    etcd: aetcd.Client

    async def joined(self, name: str, kind: str) -> Workload:
        resp = await self.operator.create_join_token(name, kind, 60)
        return await join(self.server.join_address, self.files.ca_cert.read_bytes(), resp.token, name, kind)


@pytest.fixture
async def rig(tmp_path: Path, etcd: aetcd.Client, etcd_server: EtcdServer) -> AsyncIterator[Rig]:
    files = copy_session_ca(tmp_path / "certs")  # the CA etcd trusts
    grants = tmp_path / "grants.yaml"
    grants.write_text(GRANTS)
    config = ControlPlaneConfig(
        etcd_endpoints=etcd_server.endpoint, certs_dir=files.certs_dir, state_dir=tmp_path / "state",
        trust_domain=TD, grants_file=grants, grace_s=0,
    )
    server = ControlPlaneServer(config)
    await server.start()
    operator = ControlPlaneClient.from_certs_dir(server.address, files.certs_dir)
    try:
        yield Rig(server, files, operator, etcd)
    finally:
        await operator.close()
        await server.stop(0)


async def _register(etcd: aetcd.Client, name: str, capabilities: list[str]) -> None:
    card = agent_pb2.AgentCard(name=name, capabilities=[agent_pb2.Capability(name=c) for c in capabilities])
    inst = mesh_pb2.AgentInstance(
        card=card, instance_id="i1", endpoint="127.0.0.1:1", identity=f"spiffe://{TD}/agent/{name}"
    )
    await etcd.put(f"/hivemesh/agents/{name}/i1".encode(), inst.SerializeToString())


async def test_start_publishes_trust_material(rig: Rig) -> None:
    jwks = await rig.etcd.get(JWKS_KEY)
    ca = await rig.etcd.get(CA_KEY)
    assert jwks is not None and ca is not None
    assert ca.value == rig.files.ca_cert.read_bytes()
    assert KeySet.from_jwks(jwks.value).kids == KeySet.from_jwks(await rig.operator.get_jwks()).kids  # + sigs
    assert KeySet.from_jwks(jwks.value).kids
    grants = list(await rig.etcd.get_prefix(b"/hivemesh/grants/"))
    assert [kv.key for kv in grants] == [b"/hivemesh/grants/clients-to-agents"]


async def test_join_yields_the_right_identity_and_a_token_works_once(rig: Rig) -> None:
    resp = await rig.operator.create_join_token("extractor", "agent", 60)
    assert resp.expires_at_unix >= time.time() + 55
    bundle = rig.files.ca_cert.read_bytes()
    workload = await join(rig.server.join_address, bundle, resp.token, "extractor", "agent")
    assert workload.spiffe_id == EXTRACTOR == spiffe_id_of(workload.cert_pem)
    assert workload.bundle_pem == bundle
    assert 3500 < workload.expires_at - time.time() <= 3600
    sans = x509.load_pem_x509_certificate(workload.cert_pem).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value
    assert "extractor.agent.hivemesh.local" in sans.get_values_for_type(x509.DNSName)
    with pytest.raises(JoinTokenInvalidError) as info:
        await join(rig.server.join_address, bundle, resp.token, "extractor", "agent")
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert info.value.reason == "JOIN_TOKEN_INVALID"


async def test_join_with_a_bad_csr_is_invalid_argument_and_keeps_the_token(rig: Rig) -> None:
    resp = await rig.operator.create_join_token("extractor", "agent", 60)
    bundle = rig.files.ca_cert.read_bytes()
    channel = secure_channel(rig.server.join_address, channel_credentials(bundle), server_name=CP_NAME)
    try:
        stub = control_pb2_grpc.JoinStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SignCertificate(
                control_pb2.SignCertificateRequest(
                    csr_pem=b"garbage", join_token=resp.token, name="extractor"
                ),
                timeout=5,
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await channel.close()
    workload = await join(rig.server.join_address, bundle, resp.token, "extractor", "agent")
    assert workload.spiffe_id == EXTRACTOR


async def test_issue_token_verifies_offline_and_is_bound_to_the_caller(rig: Rig) -> None:
    caller = await rig.joined("caller", "client")
    await _register(rig.etcd, "extractor", ["extract", "summarize"])
    async with ControlPlaneClient(rig.server.address, caller, TD) as client:
        resp = await client.issue_token(EXTRACTOR)
        assert list(resp.scopes) == ["extract", "summarize"]
        narrowed = await client.issue_token(EXTRACTOR, ["extract", "not-offered"], ttl_s=3600)
        assert list(narrowed.scopes) == ["extract"]
        assert narrowed.expires_at_unix - time.time() <= 300
        with pytest.raises(GrantDeniedError) as denied:
            await client.issue_token(EXTRACTOR, ["not-offered"])
        assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
    jwks = await rig.etcd.get(JWKS_KEY)
    assert jwks is not None
    verifier = TokenVerifier(KeySet.from_jwks(jwks.value), issuer=ISSUER, audience=EXTRACTOR)
    claims = verifier.verify(resp.token, capability="summarize", peer_thumbprint=caller.thumbprint)
    assert claims.subject == caller.spiffe_id == f"spiffe://{TD}/client/caller"
    assert claims.cnf_thumbprint == cert_thumbprint_s256(caller.cert_pem)
    assert claims.jti == resp.jti
    other = await rig.joined("other", "client")
    with pytest.raises(TokenInvalidError, match="another certificate"):
        verifier.verify(resp.token, capability="extract", peer_thumbprint=other.thumbprint)


async def test_issue_token_for_an_unregistered_agent_uses_the_grants_alone(rig: Rig) -> None:
    caller = await rig.joined("caller", "client")
    async with ControlPlaneClient(rig.server.address, caller, TD) as client:
        resp = await client.issue_token("spiffe://hivemesh.local/agent/not-yet-up", ["translate"])
        assert list(resp.scopes) == ["translate"]
        # A glob grant cannot be enumerated for an agent nobody knows: the refusal says to ask by name.
        with pytest.raises(GrantDeniedError) as unlisted:
            await client.issue_token("spiffe://hivemesh.local/agent/not-yet-up")
        assert unlisted.value.metadata.get("ask_by_name") == "true"
        assert "no registered instance" in unlisted.value.message and "hivemesh allow" not in unlisted.value.message
        # A token source, asked for one capability, then gets it by name: a registration that lapsed for a
        # moment (its lease being renewed) must not fail a call the grants allow.
        source = TokenSource(client)
        token = await source.get("spiffe://hivemesh.local/agent/not-yet-up", "translate")
        jwks = await rig.etcd.get(JWKS_KEY)
        assert jwks is not None
        verifier = TokenVerifier(KeySet.from_jwks(jwks.value), issuer=ISSUER,
                                 audience="spiffe://hivemesh.local/agent/not-yet-up")
        claims = verifier.verify(token, capability="translate", peer_thumbprint=caller.thumbprint)
        assert claims.scopes == frozenset({"translate"})
        await source.close()


async def test_a_caller_no_grant_names_is_not_told_to_ask_by_name(rig: Rig) -> None:
    agent = await rig.joined("extractor", "agent")  # grants name clients and operators, not agents
    async with ControlPlaneClient(rig.server.address, agent, TD) as client:
        with pytest.raises(GrantDeniedError) as denied:
            await client.issue_token("spiffe://hivemesh.local/agent/not-yet-up")
        assert "ask_by_name" not in denied.value.metadata
        assert "`hivemesh allow agent/extractor CAPABILITY... --agent agent/not-yet-up`" in denied.value.message
        source = TokenSource(client)
        with pytest.raises(GrantDeniedError, match="any capability"):  # the first refusal, not asked again
            await source.get("spiffe://hivemesh.local/agent/not-yet-up", "translate")
        await source.close()


@pytest.mark.parametrize(
    ("audience", "scopes"),
    [
        ("spiffe://hivemesh.local/client/caller", []),
        ("spiffe://other.domain/agent/extractor", []),
        ("spiffe://hivemesh.local/agent/../operator/admin", []),
        (EXTRACTOR, ["Bad Scope"]),
        (EXTRACTOR, ["*"]),
    ],
)
async def test_issue_token_rejects_bad_requests(rig: Rig, audience: str, scopes: list[str]) -> None:
    with pytest.raises(InvalidInputError) as info:
        await rig.operator.issue_token(audience, scopes)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_grants_deny_is_permission_denied_with_reason(rig: Rig) -> None:
    agent = await rig.joined("extractor", "agent")  # grants name clients and operators, not agents
    await _register(rig.etcd, "summarizer", ["summarize"])
    async with ControlPlaneClient(rig.server.address, agent, TD) as client:
        with pytest.raises(GrantDeniedError) as info:
            await client.issue_token("spiffe://hivemesh.local/agent/summarizer", ["summarize"])
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.reason == "GRANT_DENIED"


async def test_only_operators_create_join_tokens(rig: Rig) -> None:
    caller = await rig.joined("caller", "client")
    async with ControlPlaneClient(rig.server.address, caller, TD) as client:
        with pytest.raises(PermissionDeniedError) as info:
            await client.create_join_token("sneaky", "agent", 60)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert not list(await rig.etcd.get_prefix(b"/hivemesh/join/"))


async def test_renew_keeps_the_callers_identity_with_a_new_key(rig: Rig) -> None:
    caller = await rig.joined("caller", "client")
    async with ControlPlaneClient(rig.server.address, caller, TD) as client:
        renewed = await client.renew()
        assert renewed.spiffe_id == caller.spiffe_id
        assert renewed.key_pem != caller.key_pem and renewed.thumbprint != caller.thumbprint
        # The client now speaks with the renewed certificate and is still recognised.
        await _register(rig.etcd, "extractor", ["extract"])
        resp = await client.issue_token(EXTRACTOR)
    verifier = TokenVerifier(
        KeySet.from_jwks(await rig.operator.get_jwks()), issuer=ISSUER, audience=EXTRACTOR
    )
    assert verifier.verify(resp.token, capability="extract", peer_thumbprint=renewed.thumbprint)


async def test_list_agents(rig: Rig) -> None:
    await _register(rig.etcd, "extractor", ["extract"])
    await rig.etcd.put(b"/hivemesh/agents/broken/i1", b"\xff\xff not a protobuf")
    instances = await rig.operator.list_agents()
    assert [i.card.name for i in instances] == ["extractor"]


async def _call_get_jwks(address: str, creds: grpc.ChannelCredentials) -> grpc.StatusCode:
    channel = secure_channel(address, creds, server_name=CP_NAME)
    try:
        await control_pb2_grpc.ControlPlaneStub(channel).GetJwks(control_pb2.GetJwksRequest(), timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    finally:
        await channel.close()
    return grpc.StatusCode.OK


async def test_no_client_certificate_cannot_reach_controlplane(rig: Rig) -> None:
    creds = channel_credentials(rig.files.ca_cert.read_bytes())
    assert await _call_get_jwks(rig.server.address, creds) == grpc.StatusCode.UNAVAILABLE
    # Control: the same call with a mesh identity succeeds.
    op = load_workload_files(rig.files.operator_cert, rig.files.operator_key, rig.files.ca_cert)
    assert await _call_get_jwks(rig.server.address, op.channel_credentials()) == grpc.StatusCode.OK


async def test_a_certificate_from_another_ca_is_refused(rig: Rig, tmp_path: Path) -> None:
    foreign = init_ca(tmp_path / "foreign", TD)  # same trust domain name, different root
    creds = channel_credentials(
        rig.files.ca_cert.read_bytes(), foreign.operator_cert.read_bytes(), foreign.operator_key.read_bytes()
    )
    assert await _call_get_jwks(rig.server.address, creds) == grpc.StatusCode.UNAVAILABLE


async def test_plaintext_cannot_reach_either_port(rig: Rig) -> None:
    for address in (rig.server.address, rig.server.join_address):
        channel = grpc.aio.insecure_channel(address)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await channel.close()


async def test_join_port_serves_health_but_not_controlplane(rig: Rig) -> None:
    bundle = rig.files.ca_cert.read_bytes()
    channel = secure_channel(rig.server.join_address, channel_credentials(bundle), server_name=CP_NAME)
    try:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await control_pb2_grpc.ControlPlaneStub(channel).GetJwks(control_pb2.GetJwksRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await channel.close()


async def test_the_server_identity_is_checked_by_name(rig: Rig) -> None:
    operator = load_workload_files(rig.files.operator_cert, rig.files.operator_key, rig.files.ca_cert)
    channel = secure_channel(
        rig.server.address, operator.channel_credentials(), server_name="extractor.agent.hivemesh.local"
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await control_pb2_grpc.ControlPlaneStub(channel).GetJwks(control_pb2.GetJwksRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close()


async def test_renew_refuses_a_bad_csr(rig: Rig) -> None:
    _, csr = new_key_and_csr("spiffe://hivemesh.local/operator/admin")
    operator = load_workload_files(rig.files.operator_cert, rig.files.operator_key, rig.files.ca_cert)
    channel = secure_channel(rig.server.address, operator.channel_credentials(), server_name=CP_NAME)
    try:
        stub = control_pb2_grpc.ControlPlaneStub(channel)
        ok = await stub.RenewCertificate(control_pb2.SignCertificateRequest(csr_pem=csr), timeout=5)
        assert ok.spiffe_id == "spiffe://hivemesh.local/operator/admin"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RenewCertificate(control_pb2.SignCertificateRequest(csr_pem=csr[:-40]), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await channel.close()


async def test_main_runs_until_sigterm_and_drains(
    tmp_path: Path, etcd: aetcd.Client, etcd_server: EtcdServer
) -> None:
    files = copy_session_ca(tmp_path / "certs")  # the CA etcd trusts
    config = ControlPlaneConfig(
        etcd_endpoints=etcd_server.endpoint, certs_dir=files.certs_dir, state_dir=tmp_path / "state",
        grace_s=0,
    )
    started: asyncio.Queue[ControlPlaneServer] = asyncio.Queue()
    task = asyncio.create_task(main(config, on_started=started.put_nowait))
    try:
        server = await asyncio.wait_for(started.get(), timeout=10)
        async with ControlPlaneClient.from_certs_dir(server.address, files.certs_dir) as operator:
            assert await operator.get_jwks()
        os.kill(os.getpid(), signal.SIGTERM)  # handled by main's loop handler, not the default action
        await asyncio.wait_for(task, timeout=10)
        # With the operator's identity the call would succeed on a live server: now the port is closed.
        op = load_workload_files(files.operator_cert, files.operator_key, files.ca_cert)
        assert await _call_get_jwks(server.address, op.channel_credentials()) == grpc.StatusCode.UNAVAILABLE
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.mark.parametrize(
    "overrides",
    [{"port": 70000}, {"trust_domain": "Bad_Domain"}, {"etcd_endpoints": "nohostport"}, {"token_ttl_s": 301},
     {"cert_ttl_s": 0}],
)
def test_config_validates(tmp_path: Path, overrides: dict[str, object]) -> None:
    kwargs: dict[str, object] = {
        "etcd_endpoints": "127.0.0.1:2379", "certs_dir": tmp_path, "state_dir": tmp_path, **overrides
    }
    with pytest.raises(ValueError):
        ControlPlaneConfig(**kwargs)  # type: ignore[arg-type]


async def test_start_refuses_a_ca_for_another_trust_domain(
    tmp_path: Path, etcd: aetcd.Client, etcd_server: EtcdServer
) -> None:
    files = init_ca(tmp_path / "certs", "other.domain")
    config = ControlPlaneConfig(
        etcd_endpoints=etcd_server.endpoint, certs_dir=files.certs_dir, state_dir=tmp_path
    )
    with pytest.raises(FailedPreconditionError, match=r"other\.domain"):
        await ControlPlaneServer(config).start()

"""Identities that survive restarts, in-process against a real control plane, etcd and TLS: a MeshClient and an
SDK agent restart with their join token consumed and come back as the same SPIFFE id (renewed at start); what
cannot be reused (expired, revoked, another workload's, open to other users) asks for a new join token, clearly;
and a join token of another kind or name is refused with a message saying what it was minted for."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aetcd
import pytest

from hivemesh.controlplane import joins
from hivemesh.mesh.errors import JoinTokenInvalidError, JoinTokenRequiredError, StoredIdentityMismatchError
from hivemesh.mesh.etcd import EtcdServer
from hivemesh.mesh.pki import cert_expiry, spiffe_id_of
from hivemesh.mesh.settings import MeshSettings
from hivemesh.sdk import AgentServer, AgentServerConfig, MeshClient
from hivemesh.v1 import trust_pb2
from tests.support.agents_for_tests import EchoAgent
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, start_mesh_env, stop_mesh_env


async def _settings(env: MeshEnv, name: str, kind: str, home: Path, *, token: bool = True) -> MeshSettings:
    """Settings as `MeshSettings.resolve` makes them: an identity folder in the state folder."""
    base = await env.settings_for(name, kind) if token else env.base_settings()
    return dataclasses.replace(base, identity_dir=home / "identity")


async def _pending_join_tokens(etcd: aetcd.Client) -> int:
    return len(list(await etcd.get_prefix(joins.JOIN_PREFIX)))


async def test_a_mesh_client_restarts_with_its_stored_identity_and_no_new_join(
    mesh_env: MeshEnv, etcd: aetcd.Client, tmp_path: Path
) -> None:
    settings = await _settings(mesh_env, "reporter", "client", tmp_path)
    async with MeshClient.connect(name="reporter", settings=settings) as first:
        identity = first.node.workload.spiffe_id
        first_cert = first.node.workload.cert_pem
    assert identity == f"spiffe://{TRUST_DOMAIN}/client/reporter"
    folder = tmp_path / "identity" / "client-reporter"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "key.pem").stat().st_mode) == 0o600
    assert spiffe_id_of((folder / "cert.pem").read_bytes()) == identity
    assert await _pending_join_tokens(etcd) == 0  # the token was consumed: a second join with it would fail

    # Restart with the consumed token still set, then with none at all: the same identity, renewed at start.
    for again in (settings, dataclasses.replace(settings, join_token=None)):
        async with MeshClient.connect(name="reporter", settings=again) as client:
            assert client.node.workload.spiffe_id == identity
            assert client.node.workload.cert_pem != first_cert
            assert client.node.workload.key_pem == (folder / "key.pem").read_bytes()  # kept up to date
            assert await client.node.controlplane.get_jwks()  # the control plane accepts it over mutual TLS
    assert await _pending_join_tokens(etcd) == 0


async def test_an_sdk_agent_restarts_with_its_stored_identity_and_serves(
    mesh_env: MeshEnv, tmp_path: Path
) -> None:
    settings = await _settings(mesh_env, "echo", "agent", tmp_path)
    async with AgentServer(EchoAgent("first"), settings, AgentServerConfig(audit_dir=tmp_path / "audit")) as server:
        identity = server.node.workload.spiffe_id
    caller = await _settings(mesh_env, "tester", "client", tmp_path)
    # The same settings (the join token consumed): the agent comes back as itself and callers reach it.
    async with AgentServer(EchoAgent("second"), settings, AgentServerConfig(audit_dir=tmp_path / "audit")) as server:
        assert server.node.workload.spiffe_id == identity == f"spiffe://{TRUST_DOMAIN}/agent/echo"
        async with MeshClient.connect(name="tester", settings=caller) as mesh:
            assert await mesh.node.registry.wait_for_capability("echo", 1, timeout=10)
            [instance] = mesh.instances("echo")
            assert instance.identity == identity
            out = await mesh.call("echo", {"text": "again"}, timeout=10)
            assert out["served_by"] == "second"


@pytest.mark.parametrize(("minted", "used"), [("agent", "client"), ("client", "agent")])
async def test_a_join_token_of_another_kind_is_refused_and_says_so(
    mesh_env: MeshEnv, tmp_path: Path, minted: str, used: str
) -> None:
    token = (await mesh_env.operator.create_join_token("worker", minted, 60)).token
    settings = dataclasses.replace(mesh_env.base_settings(), join_token=token, identity_dir=tmp_path / "id")
    with pytest.raises(JoinTokenInvalidError) as info:
        await MeshClient.connect(name="worker", kind=used, settings=settings).start()
    assert info.value.message.startswith(f"this join token was minted for {minted} 'worker', not {used} 'worker'")
    assert not (tmp_path / "id" / f"{used}-worker").exists()
    # Not burnt: the kind it was minted for joins with it.
    async with MeshClient.connect(name="worker", kind=minted, settings=settings) as client:
        assert client.node.workload.spiffe_id == f"spiffe://{TRUST_DOMAIN}/{minted}/worker"


async def test_a_join_token_for_another_name_is_refused_and_says_so(mesh_env: MeshEnv) -> None:
    token = (await mesh_env.operator.create_join_token("billing", "client", 60)).token
    settings = dataclasses.replace(mesh_env.base_settings(), join_token=token)
    with pytest.raises(JoinTokenInvalidError) as info:
        await MeshClient.connect(name="reporter", settings=settings).start()
    assert info.value.message.startswith("this join token was minted for client 'billing', not client 'reporter'")


async def test_a_stored_identity_of_another_workload_is_refused(mesh_env: MeshEnv, tmp_path: Path) -> None:
    async with MeshClient.connect(name="alpha", settings=await _settings(mesh_env, "alpha", "client", tmp_path)):
        pass
    shutil.copytree(tmp_path / "identity" / "client-alpha", tmp_path / "identity" / "client-beta")
    # Even with a valid join token for beta: a folder naming someone else is a mistake to show, not to overwrite.
    with pytest.raises(StoredIdentityMismatchError) as info:
        await MeshClient.connect(name="beta", settings=await _settings(mesh_env, "beta", "client", tmp_path)).start()
    assert info.value.message.startswith(
        f"the identity stored in {tmp_path / 'identity' / 'client-beta'} is spiffe://{TRUST_DOMAIN}/client/alpha, "
        f"not spiffe://{TRUST_DOMAIN}/client/beta"
    )


async def test_a_stored_key_open_to_other_users_is_not_used(mesh_env: MeshEnv, tmp_path: Path) -> None:
    async with MeshClient.connect(name="loose", settings=await _settings(mesh_env, "loose", "client", tmp_path)):
        pass
    key = tmp_path / "identity" / "client-loose" / "key.pem"
    key.chmod(0o644)
    with pytest.raises(JoinTokenRequiredError) as info:
        await MeshClient.connect(name="loose", settings=await _settings(mesh_env, "loose", "client", tmp_path,
                                                                        token=False)).start()
    assert f"the identity private key {key} is open to other users (mode 0644)" in info.value.message


async def test_a_revoked_identity_needs_a_new_join_token(mesh_env: MeshEnv, tmp_path: Path) -> None:
    settings = await _settings(mesh_env, "suspect", "client", tmp_path)
    async with MeshClient.connect(name="suspect", settings=settings) as client:
        identity = client.node.workload.spiffe_id
    operator = mesh_env.operator
    await operator.call(operator.trust.Revoke, trust_pb2.RevokeRequest(subject=identity, note="test"))
    # With no join token, and with the consumed one of the first start still set: the revocation is the news.
    for again in (dataclasses.replace(settings, join_token=None), settings):
        with pytest.raises(JoinTokenRequiredError) as info:
            await MeshClient.connect(name="suspect", settings=again).start()
        assert info.value.message.startswith(
            f"the control plane refused to renew the identity stored in {tmp_path / 'identity' / 'client-suspect'} "
            "(TOKEN_REVOKED:"
        )
        assert "hivemesh join-token suspect --kind client" in info.value.message
    assert info.value.message.endswith("(the join token given was refused too: the join token is unknown, "
                                       "expired or already used)")


@pytest.fixture
async def short_lived_env(etcd: aetcd.Client, etcd_server: EtcdServer, tmp_path: Path) -> AsyncIterator[MeshEnv]:
    """A control plane issuing 2 s certificates, so a stored one can expire within a test."""
    env = await start_mesh_env(tmp_path / "short", etcd_server.endpoint, cert_ttl_s=2)
    try:
        yield env
    finally:
        await stop_mesh_env(env)


async def test_an_expired_stored_certificate_asks_for_a_new_join_token(
    short_lived_env: MeshEnv, tmp_path: Path
) -> None:
    env = short_lived_env
    settings = await _settings(env, "sleeper", "client", tmp_path)
    async with MeshClient.connect(name="sleeper", settings=settings) as client:
        identity = client.node.workload.spiffe_id
    cert = tmp_path / "identity" / "client-sleeper" / "cert.pem"
    expires_at_s = cert_expiry(cert.read_bytes())
    deadline = time.monotonic() + 10
    while time.time() <= expires_at_s:  # the certificate lives 2 s: wait (bounded) until it has expired
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    with pytest.raises(JoinTokenRequiredError) as info:
        await MeshClient.connect(name="sleeper", settings=settings).start()  # its token is consumed
    assert info.value.message.startswith(f"the stored certificate of {identity} ({cert}) expired at ")
    assert ("so it cannot be renewed: ask an operator for a new join token (hivemesh join-token sleeper --kind "
            "client) and set HIVEMESH_JOIN_TOKEN (the join token given was refused too: ") in info.value.message
    # With a new join token it joins again, as the same identity.
    async with MeshClient.connect(name="sleeper", settings=await _settings(env, "sleeper", "client", tmp_path)) as c:
        assert c.node.workload.spiffe_id == identity
        assert cert_expiry(cert.read_bytes()) > time.time()

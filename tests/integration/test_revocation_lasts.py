"""A subject's revocation lasts as long as anything the subject holds could get it new credentials.

Its etcd entry used to live under a lease sized for tokens alone (5 min + 30 s): once it lapsed, the revoked
identity renewed its still-valid one-hour certificate (a fresh hour) and got tokens again, and a join token minted
for it before the revocation made it a new certificate. Waiting minutes is no test: these check the lease etcd
holds for the entry against the certificate the subject holds, the control plane's certificate lifetime and an
unused join token, and that the subject renews nothing meanwhile. Also: while an agent is revoked, nobody is issued
a token (nor a delegation) addressed to it, so no new call reaches it; operators and other agents are unaffected.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from hivemesh.controlplane.issuer import MAX_TTL_S
from hivemesh.controlplane.trust_service import REVOCATION_MARGIN_S
from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.errors import HivemeshError, TokenRevokedError
from hivemesh.mesh.revocation import Revocation
from hivemesh.mesh.tls import Workload, join
from hivemesh.v1 import trust_pb2
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv

pytestmark = pytest.mark.timeout(120)
MALLORY = f"spiffe://{TRUST_DOMAIN}/agent/mallory"


async def _join(env: MeshEnv, name: str, kind: str = "agent") -> tuple[Workload, ControlPlaneClient]:
    token = (await env.operator.create_join_token(name, kind, 120)).token
    w = await join(env.controlplane.join_address, env.certs.ca_cert.read_bytes(), token, name, kind,
                   trust_domain=TRUST_DOMAIN)
    return w, ControlPlaneClient(env.controlplane.address, w, TRUST_DOMAIN)


@pytest.fixture
async def mallory(mesh_env: MeshEnv) -> AsyncIterator[tuple[Workload, ControlPlaneClient]]:
    w, cp = await _join(mesh_env, "mallory")
    try:
        yield w, cp
    finally:
        await cp.close()


async def _revoke(env: MeshEnv, subject: str = "", jti: str = "") -> trust_pb2.RevokeResponse:
    resp: trust_pb2.RevokeResponse = await env.operator.call(
        env.operator.trust.Revoke, trust_pb2.RevokeRequest(subject=subject, jti=jti, note="leaked"))
    return resp


async def _lease_of(etcd: Any, key: str) -> tuple[Revocation, int, int]:
    """The entry at key as etcd holds it: (the revocation, its lease's granted TTL, the TTL it has left)."""
    kv = await etcd.get(key.encode())
    assert kv is not None and kv.lease, f"no leased revocation at {key}"
    info = await etcd.get_lease_info(kv.lease)
    return Revocation.from_json(kv.value), int(info.grantedTTL), int(info.TTL)


async def test_a_revoked_subject_stays_revoked_while_its_certificate_could_renew(
    mesh_env: MeshEnv, etcd: Any, mallory: tuple[Workload, ControlPlaneClient]
) -> None:
    w, cp = mallory
    cert_ttl = mesh_env.controlplane.config.cert_ttl_s
    renewed = await cp.renew()  # before: it renews, a fresh certificate of the control plane's lifetime
    assert renewed.expires_at >= w.expires_at and cert_ttl >= renewed.expires_at - time.time() > cert_ttl - 60
    await cp.issue_token(f"spiffe://{TRUST_DOMAIN}/agent/echo", ["echo"])

    done = await _revoke(mesh_env, subject=MALLORY)
    rev, granted, left = await _lease_of(etcd, done.key)
    holds_until = renewed.expires_at  # the latest certificate mallory could present to renew with
    # The entry (and etcd's lease on it) outlasts every certificate mallory holds, and the clock leeway after it.
    assert granted >= cert_ttl + REVOCATION_MARGIN_S, (granted, cert_ttl)
    assert time.time() + left >= holds_until + REVOCATION_MARGIN_S - 2, (left, holds_until - time.time())
    assert rev.expires_at >= holds_until + REVOCATION_MARGIN_S - 1 and done.expires_at_unix == int(rev.expires_at)
    assert granted <= cert_ttl + REVOCATION_MARGIN_S + 5, "still bounded: no longer than the credentials need"
    # Meanwhile mallory renews nothing and gets no token, naming the revocation and how long it lasts.
    with pytest.raises(TokenRevokedError) as refused:
        await cp.renew()
    assert f"{MALLORY} is revoked until {time.ctime(rev.expires_at)}" in refused.value.message
    with pytest.raises(TokenRevokedError):
        await cp.issue_token(f"spiffe://{TRUST_DOMAIN}/agent/echo", ["echo"])
    listed = await mesh_env.operator.call(mesh_env.operator.trust.ListRevocations,
                                          trust_pb2.ListRevocationsRequest())
    assert [(r.subject, r.expires_at_unix) for r in listed.revocations] == [(MALLORY, int(rev.expires_at))]


async def test_a_revocation_outlasts_a_join_token_minted_for_the_subject_before(
    mesh_env: MeshEnv, etcd: Any, mallory: tuple[Workload, ControlPlaneClient]
) -> None:
    """A join token minted before the revocation (perhaps the leaked one) is refused only while the entry lasts:
    the entry lasts as long as the token does, and a token minted for another identity changes nothing."""
    cert_ttl = mesh_env.controlplane.config.cert_ttl_s
    leaked = (await mesh_env.operator.create_join_token("mallory", "agent", 3 * cert_ttl)).token
    await mesh_env.operator.create_join_token("bystander", "agent", 5 * cert_ttl)
    await mesh_env.operator.create_join_token("mallory", "client", 5 * cert_ttl)  # another identity: client/mallory
    done = await _revoke(mesh_env, subject=MALLORY)
    _, granted, _ = await _lease_of(etcd, done.key)
    assert 3 * cert_ttl + REVOCATION_MARGIN_S <= granted <= 3 * cert_ttl + REVOCATION_MARGIN_S + 5, granted
    with pytest.raises(TokenRevokedError):
        await join(mesh_env.controlplane.join_address, mesh_env.certs.ca_cert.read_bytes(), leaked, "mallory",
                   "agent", trust_domain=TRUST_DOMAIN)
    # A token's revocation stays sized for the token: the list keeps only what still matters.
    by_jti = await _revoke(mesh_env, jti="a-leaked-token")
    _, granted, _ = await _lease_of(etcd, by_jti.key)
    assert granted == MAX_TTL_S + REVOCATION_MARGIN_S


async def test_nobody_gets_a_token_addressed_to_a_revoked_agent(
    mesh_env: MeshEnv, mallory: tuple[Workload, ControlPlaneClient]
) -> None:
    relay_w, relay = await _join(mesh_env, "relay")
    _, user = await _join(mesh_env, "user", "client")
    try:
        # Before: the operator and other workloads get tokens for mallory, and delegations to it.
        await mesh_env.operator.issue_token(MALLORY, ["echo"])
        users = (await user.issue_token(relay_w.spiffe_id, ["echo"])).token
        await relay.exchange_token(users, MALLORY, ["echo"])
        await _revoke(mesh_env, subject=MALLORY)
        for attempt in (lambda: mesh_env.operator.issue_token(MALLORY, ["echo"]),
                        lambda: user.issue_token(MALLORY, ["echo"]),
                        lambda: relay.exchange_token(users, MALLORY, ["echo"])):
            with pytest.raises(HivemeshError) as refused:
                await attempt()
            assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED, repr(refused.value)
            assert f"{MALLORY} is revoked until" in refused.value.message, refused.value.message
            assert "addressed to it" in refused.value.message
            assert refused.value.metadata.get("audience") == MALLORY, refused.value.metadata
        # The callers themselves are fine: tokens for any other agent, and delegations, are issued as before.
        await mesh_env.operator.issue_token(relay_w.spiffe_id, ["echo"])
        await user.issue_token(relay_w.spiffe_id, ["echo"])
        await relay.exchange_token(users, f"spiffe://{TRUST_DOMAIN}/agent/echo", ["echo"])
    finally:
        await relay.close()
        await user.close()

"""Revocation at the edges of the trust service: a revoked identity gets no certificate from the join port either
(a join token minted for it before the revocation used to make it a fresh one); a revocation that could cover no
token (a subject of another trust domain, e.g. a typo) is refused naming the field, not stored as a no-op; and an
exchange's and a token request's capability lists are bounded before any per-name work."""

from __future__ import annotations

import grpc
import pytest

from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.errors import InvalidInputError, JoinTokenInvalidError, TokenRevokedError
from hivemesh.mesh.tls import join
from hivemesh.v1 import trust_pb2, trust_pb2_grpc
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv


async def _join(env: MeshEnv, token: str, name: str) -> object:
    return await join(env.controlplane.join_address, env.certs.ca_cert.read_bytes(), token, name, "agent",
                      trust_domain=TRUST_DOMAIN)


async def test_a_revoked_identity_gets_no_certificate_from_a_join_token_minted_before(mesh_env: MeshEnv) -> None:
    trust = trust_pb2_grpc.TrustStub(mesh_env.operator.channel)
    leaked = (await mesh_env.operator.create_join_token("victim", "agent", 120)).token
    other = (await mesh_env.operator.create_join_token("bystander", "agent", 120)).token
    await trust.Revoke(trust_pb2.RevokeRequest(subject=f"spiffe://{TRUST_DOMAIN}/agent/victim"), timeout=10)

    with pytest.raises(TokenRevokedError) as refused:
        await _join(mesh_env, leaked, "victim")
    assert f"spiffe://{TRUST_DOMAIN}/agent/victim is revoked" in refused.value.message
    # Another identity joins as before, and a bad token is still refused as one (not as a revocation).
    assert (await _join(mesh_env, other, "bystander")).spiffe_id == f"spiffe://{TRUST_DOMAIN}/agent/bystander"
    with pytest.raises(JoinTokenInvalidError):
        await _join(mesh_env, "x" * 43, "victim")


async def test_revoking_a_subject_of_another_trust_domain_is_invalid_argument(mesh_env: MeshEnv) -> None:
    trust = trust_pb2_grpc.TrustStub(mesh_env.operator.channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await trust.Revoke(trust_pb2.RevokeRequest(subject="spiffe://hivemesh.locl/agent/x"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "subject" in (refused.value.details() or "") and TRUST_DOMAIN in (refused.value.details() or "")
    listed = await trust.ListRevocations(trust_pb2.ListRevocationsRequest(), timeout=10)
    assert not listed.revocations  # nothing stored
    done = await trust.Revoke(trust_pb2.RevokeRequest(subject=f"spiffe://{TRUST_DOMAIN}/agent/x"), timeout=10)
    assert done.key.startswith("/hivemesh/revoked/sub/")


async def test_an_exchange_listing_more_capabilities_than_a_token_can_hold_is_invalid_argument(
    mesh_env: MeshEnv,
) -> None:
    """Each listed name was checked, sorted and matched against the grants before the subject token was even read:
    a 6 MB list held the control plane's event loop for about a second per field, from any workload."""
    token = (await mesh_env.operator.create_join_token("lister", "client", 120)).token
    w = await join(mesh_env.controlplane.join_address, mesh_env.certs.ca_cert.read_bytes(), token, "lister", "client",
                   trust_domain=TRUST_DOMAIN)
    cp = ControlPlaneClient(mesh_env.controlplane.address, w, TRUST_DOMAIN)
    try:
        trust = trust_pb2_grpc.TrustStub(cp.channel)
        many = [f"c{i}" for i in range(100_000)]
        for field in ("scopes", "delegable"):
            request = trust_pb2.ExchangeTokenRequest(subject_token="a.b.c", audience=f"spiffe://{TRUST_DOMAIN}/agent/x",
                                                     **{field: many})
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await trust.ExchangeToken(request, timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
            assert (refused.value.details() or "").startswith(f"{field}: at most")
        # A short list reaches the subject token's check, as before.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await trust.ExchangeToken(trust_pb2.ExchangeTokenRequest(
                subject_token="a.b.c", audience=f"spiffe://{TRUST_DOMAIN}/agent/x", scopes=["echo"]), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # IssueToken, which any workload may ask, is bounded alike (the bad-name message names the field too).
        with pytest.raises(InvalidInputError) as too_many:
            await cp.issue_token(f"spiffe://{TRUST_DOMAIN}/agent/x", many)
        assert too_many.value.message.startswith("scopes: at most"), too_many.value
        with pytest.raises(grpc.aio.AioRpcError) as bad_name:
            await trust.ExchangeToken(trust_pb2.ExchangeTokenRequest(
                subject_token="a.b.c", audience=f"spiffe://{TRUST_DOMAIN}/agent/x", delegable=["Bad Name"]), timeout=10)
        assert (bad_name.value.details() or "").startswith("delegable must be capability names"), bad_name.value
    finally:
        await cp.close()

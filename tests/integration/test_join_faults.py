"""Join.SignCertificate under bad input and a passing etcd fault: the port answers anyone, so every refusal is a
clear INVALID_ARGUMENT, and a join that failed for the control plane's own trouble leaves the token for the retry."""

from __future__ import annotations

import aetcd
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID

from hivemesh.mesh.errors import HivemeshError
from hivemesh.mesh.pki import controlplane_dns_name, new_key_and_csr
from hivemesh.mesh.tls import channel_credentials, join, secure_channel
from hivemesh.v1 import control_pb2, control_pb2_grpc
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv


async def _sign(env: MeshEnv, request: control_pb2.SignCertificateRequest) -> grpc.aio.AioRpcError:
    creds = channel_credentials(env.certs.ca_cert.read_bytes())
    async with secure_channel(env.controlplane.join_address, creds,
                              server_name=controlplane_dns_name(TRUST_DOMAIN)) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await control_pb2_grpc.JoinStub(ch).SignCertificate(request, timeout=10)
    return refused.value


async def test_a_csr_whose_names_do_not_parse_or_a_huge_name_is_invalid_argument(mesh_env: MeshEnv) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    bad_san = x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x03\x02\x01\x01")
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(bad_san, critical=False).sign(key, hashes.SHA256()))
    refused = await _sign(mesh_env, control_pb2.SignCertificateRequest(
        csr_pem=csr.public_bytes(serialization.Encoding.PEM), join_token="x" * 40, name="x"))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "extensions" in (refused.details() or "")
    # A 20,000-character name, quoted by the refusal: bounded, so the code arrives (not RESOURCE_EXHAUSTED).
    _, good_csr = new_key_and_csr(f"spiffe://{TRUST_DOMAIN}/agent/x")
    refused = await _sign(mesh_env, control_pb2.SignCertificateRequest(
        csr_pem=good_csr, join_token="x" * 40, name="a" * 20_000))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "bad name" in (refused.details() or "")


async def test_a_join_failed_by_a_passing_etcd_fault_leaves_the_token_for_the_retry(
    mesh_env: MeshEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = mesh_env.controlplane._core
    token = (await mesh_env.operator.create_join_token("w1", "agent", 120)).token
    real = core.ensure_etcd_user
    faults = [aetcd.exceptions.ConnectionTimeoutError("etcd did not answer in time")]

    async def once_unavailable(spiffe_id: str) -> None:
        if faults:
            raise faults.pop()
        await real(spiffe_id)

    monkeypatch.setattr(core, "ensure_etcd_user", once_unavailable)
    bundle = mesh_env.certs.ca_cert.read_bytes()
    with pytest.raises(HivemeshError) as first:
        await join(mesh_env.controlplane.join_address, bundle, token, "w1", "agent", trust_domain=TRUST_DOMAIN)
    assert first.value.code == grpc.StatusCode.UNAVAILABLE and not faults
    workload = await join(mesh_env.controlplane.join_address, bundle, token, "w1", "agent",
                          trust_domain=TRUST_DOMAIN)
    assert str(workload.spiffe_id) == f"spiffe://{TRUST_DOMAIN}/agent/w1"
    with pytest.raises(HivemeshError) as spent:  # and it is one-time still
        await join(mesh_env.controlplane.join_address, bundle, token, "w1", "agent", trust_domain=TRUST_DOMAIN)
    assert spent.value.reason == "JOIN_TOKEN_INVALID"

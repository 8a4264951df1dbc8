"""Workload PKI helpers: SPIFFE id parsing, CSRs, certificate facts and the peer behind an mTLS call."""

from __future__ import annotations

import base64
import datetime
import hashlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hivemesh.controlplane.ca import CaFiles, CertificateAuthority, init_ca, load_ca
from hivemesh.mesh.errors import PeerUnauthenticatedError
from hivemesh.mesh.pki import (
    SpiffeId,
    cert_expiry,
    cert_thumbprint_s256,
    new_key_and_csr,
    parse_spiffe_id,
    peer_from_auth_context,
    spiffe_id_of,
)

TD = "hivemesh.local"


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    init_ca(tmp_path / "certs", TD)
    return load_ca(tmp_path / "certs")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("spiffe://hivemesh.local/agent/extractor", SpiffeId(TD, "agent", "extractor")),
        ("spiffe://hivemesh.local/client/a.b-c_d", SpiffeId(TD, "client", "a.b-c_d")),
        ("spiffe://hivemesh.local/operator/admin", SpiffeId(TD, "operator", "admin")),
        ("spiffe://example-1.org/agent/0", SpiffeId("example-1.org", "agent", "0")),
        ("spiffe://td/agent/" + "a" * 63, SpiffeId("td", "agent", "a" * 63)),
    ],
)
def test_parse_spiffe_id_accepts(text: str, expected: SpiffeId) -> None:
    sid = parse_spiffe_id(text)
    assert sid == expected
    assert str(sid) == text
    assert sid.dns_name == f"{expected.name}.{expected.kind}.{expected.trust_domain}"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("spiffe://hivemesh.local/agent/a..b", "'..'"),
        ("spiffe://hivemesh.local/agent/../operator/admin", "'..'"),
        ("spiffe://hivemesh.local/agent/./x", "'.'"),
        ("spiffe://hivemesh.local:443/agent/x", "port"),
        ("spiffe://hivemesh.local/agent/x?admin=1", "query"),
        ("spiffe://hivemesh.local/agent/x#frag", "fragment"),
        ("spiffe://user@hivemesh.local/agent/x", "userinfo"),
        ("spiffe://hivemesh.local/service/x", "kind"),
        ("spiffe://hivemesh.local/controlplane", "kind"),
        ("spiffe://hivemesh.local/Agent/x", "kind"),
        ("spiffe://hivemesh.local/agent/Extractor", "name"),
        ("spiffe://HiveMesh.local/agent/x", "trust domain"),
        ("SPIFFE://hivemesh.local/agent/x", "spiffe://"),
        ("https://hivemesh.local/agent/x", "spiffe://"),
        ("spiffe://hivemesh.local/agent/x/y", "exactly"),
        ("spiffe://hivemesh.local/agent/", "empty"),
        ("spiffe://hivemesh.local/agent//x", "empty"),
        ("spiffe://hivemesh.local", "expected"),
        ("spiffe:///agent/x", "trust domain"),
        ("spiffe://hivemesh.local/agent/x%2e", "percent"),
        ("spiffe://hivemesh.local/agent/" + "a" * 64, "name"),
        ("spiffe://hivemesh.local/agent/-x", "name"),
    ],
)
def test_parse_spiffe_id_refuses_with_reason(text: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_spiffe_id(text)
    assert why in str(info.value)


def test_parse_spiffe_id_refuses_non_strings() -> None:
    with pytest.raises(ValueError):
        parse_spiffe_id(b"spiffe://hivemesh.local/agent/x")  # type: ignore[arg-type]


def test_new_key_and_csr_is_p256_and_self_signed() -> None:
    key_pem, csr_pem = new_key_and_csr("spiffe://hivemesh.local/agent/x")
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    assert csr.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]


def _self_signed(uris: list[str], *, ca: bool = False) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([])
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_spiffe_id_of_requires_exactly_one_uri() -> None:
    assert spiffe_id_of(_self_signed(["spiffe://td/agent/a"])) == "spiffe://td/agent/a"
    with pytest.raises(ValueError, match="exactly one URI SAN"):
        spiffe_id_of(_self_signed([]))
    with pytest.raises(ValueError, match="exactly one URI SAN"):
        spiffe_id_of(_self_signed(["spiffe://td/agent/a", "spiffe://td/agent/b"]))
    with pytest.raises(ValueError, match="not a SPIFFE id"):
        spiffe_id_of(_self_signed(["https://example.com/"]))


def test_thumbprint_is_rfc8705_x5t_s256(ca: CertificateAuthority) -> None:
    pem = ca.bundle_pem()
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    assert cert_thumbprint_s256(pem) == expected == cert_thumbprint_s256(der)
    assert len(expected) == 43 and "=" not in expected


def test_cert_expiry_is_unix_not_after(tmp_path: Path, ca: CertificateAuthority) -> None:
    _, csr = new_key_and_csr("spiffe://hivemesh.local/agent/x")
    now = datetime.datetime.now(datetime.UTC).timestamp()
    cert = ca.sign_csr(csr, "spiffe://hivemesh.local/agent/x", ttl_s=600)
    assert now + 590 < cert_expiry(cert) < now + 610


def test_peer_from_auth_context(ca: CertificateAuthority) -> None:
    _, csr = new_key_and_csr("spiffe://hivemesh.local/client/c")
    cert = ca.sign_csr(csr, "spiffe://hivemesh.local/client/c")
    peer = peer_from_auth_context({"x509_pem_cert": [cert], "transport_security_type": [b"ssl"]})
    assert peer.spiffe_id == SpiffeId(TD, "client", "c")
    assert peer.thumbprint == cert_thumbprint_s256(cert)
    assert peer.cert_pem == cert
    assert peer_from_auth_context({"x509_pem_cert": [cert]}, trust_domain=TD) == peer


@pytest.mark.parametrize("case", ["empty", "no-cert", "ca-as-leaf", "two-uris", "other-domain", "garbage"])
def test_peer_from_auth_context_refuses(case: str, tmp_path: Path, ca: CertificateAuthority) -> None:
    ctx: dict[str, list[bytes]]
    if case == "empty":
        ctx = {}
    elif case == "no-cert":
        ctx = {"transport_security_type": [b"ssl"]}
    elif case == "ca-as-leaf":
        ctx = {"x509_pem_cert": [ca.bundle_pem()]}
    elif case == "two-uris":
        ctx = {"x509_pem_cert": [_self_signed(["spiffe://hivemesh.local/agent/a", "spiffe://hivemesh.local/agent/b"])]}
    elif case == "other-domain":
        ctx = {"x509_pem_cert": [_self_signed(["spiffe://evil.example/agent/a"])]}
    else:
        ctx = {"x509_pem_cert": [b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"]}
    with pytest.raises(PeerUnauthenticatedError):
        peer_from_auth_context(ctx, trust_domain=TD)


def test_operator_files_form_a_valid_identity(tmp_path: Path) -> None:
    files = init_ca(tmp_path / "c", TD)
    assert files == CaFiles.in_dir(tmp_path / "c")
    assert spiffe_id_of(files.operator_cert.read_bytes()) == "spiffe://hivemesh.local/operator/admin"

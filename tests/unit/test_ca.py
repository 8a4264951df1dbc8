"""The certificate authority: init/load, what it signs, and what it refuses."""

from __future__ import annotations

import datetime
import ipaddress
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from hivemesh.controlplane.ca import (
    CaFiles,
    CertificateAuthority,
    ensure_controlplane_cert,
    init_ca,
    load_ca,
)
from hivemesh.mesh.errors import FailedPreconditionError, InvalidInputError
from hivemesh.mesh.pki import new_key_and_csr, spiffe_id_of

TD = "hivemesh.local"
AGENT = "spiffe://hivemesh.local/agent/extractor"


@pytest.fixture
def files(tmp_path: Path) -> CaFiles:
    return init_ca(tmp_path / "certs", TD)


@pytest.fixture
def ca(files: CaFiles) -> CertificateAuthority:
    return load_ca(files.certs_dir)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _verify_signed_by(cert: x509.Certificate, ca: CertificateAuthority) -> None:
    pub = ca.certificate.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    assert cert.issuer == ca.certificate.subject


def _sans(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def test_init_writes_root_and_identities_with_private_keys_0600(files: CaFiles) -> None:
    for key in (files.ca_key, files.operator_key, files.controlplane_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    root = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is True and bc.path_length == 0
    assert _sans(root).get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://hivemesh.local"]
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.not_valid_after_utc - _now() > datetime.timedelta(days=9 * 365)
    assert not list(files.certs_dir.glob(".*.tmp"))


def test_operator_and_controlplane_certs(files: CaFiles, ca: CertificateAuthority) -> None:
    op = x509.load_pem_x509_certificate(files.operator_cert.read_bytes())
    _verify_signed_by(op, ca)
    assert spiffe_id_of(op) == "spiffe://hivemesh.local/operator/admin"
    assert datetime.timedelta(days=29) < op.not_valid_after_utc - _now() <= datetime.timedelta(days=30)
    cp = x509.load_pem_x509_certificate(files.controlplane_cert.read_bytes())
    _verify_signed_by(cp, ca)
    sans = _sans(cp)
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://hivemesh.local/controlplane"]
    assert set(sans.get_values_for_type(x509.DNSName)) == {"controlplane.hivemesh.local", "localhost"}
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_init_refuses_to_overwrite_without_force(files: CaFiles) -> None:
    before = files.ca_cert.read_bytes()
    with pytest.raises(FailedPreconditionError, match="refusing to overwrite"):
        init_ca(files.certs_dir, TD)
    assert files.ca_cert.read_bytes() == before
    init_ca(files.certs_dir, TD, force=True)
    assert files.ca_cert.read_bytes() != before


def test_load_ca_reads_trust_domain_and_bundle(files: CaFiles, ca: CertificateAuthority) -> None:
    assert ca.trust_domain == TD
    assert ca.bundle_pem() == files.ca_cert.read_bytes()
    with pytest.raises(FailedPreconditionError, match="missing"):
        load_ca(files.certs_dir / "nope")


def test_sign_csr_issues_the_identity_the_ca_decides(ca: CertificateAuthority) -> None:
    # The CSR asks to be the operator with an extra DNS name; the CA makes it the agent it chose.
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([
                x509.UniformResourceIdentifier("spiffe://hivemesh.local/operator/admin"),
                x509.DNSName("evil.example.com"),
            ]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    t0 = _now()
    cert = x509.load_pem_x509_certificate(ca.sign_csr(csr, AGENT, ttl_s=600))
    _verify_signed_by(cert, ca)
    sans = _sans(cert)
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [AGENT]
    assert sans.get_values_for_type(x509.DNSName) == ["extractor.agent.hivemesh.local", "localhost"]
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert abs((t0 - cert.not_valid_before_utc).total_seconds() - 30) < 3
    assert abs((cert.not_valid_after_utc - t0).total_seconds() - 600) < 3


def test_sign_csr_accepts_ed25519_keys(ca: CertificateAuthority) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    csr = (
        x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, None)
        .public_bytes(serialization.Encoding.PEM)
    )
    cert = x509.load_pem_x509_certificate(ca.sign_csr(csr, AGENT))
    assert isinstance(cert.public_key(), ed25519.Ed25519PublicKey)


def _tampered_csr() -> bytes:
    _, csr_pem = new_key_and_csr(AGENT)
    csr = x509.load_pem_x509_csr(csr_pem)
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


def _rsa_csr() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return (
        x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


@pytest.mark.parametrize("case", ["empty", "garbage", "tampered", "rsa", "huge"])
def test_sign_csr_rejects_bad_csrs(case: str, ca: CertificateAuthority) -> None:
    makers: dict[str, Callable[[], bytes]] = {
        "empty": lambda: b"",
        "garbage": lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n",
        "tampered": _tampered_csr,
        "rsa": _rsa_csr,
        "huge": lambda: b"A" * 20000,
    }
    csr = makers[case]()
    with pytest.raises(InvalidInputError):
        ca.sign_csr(csr, AGENT)


@pytest.mark.parametrize(
    ("spiffe_id", "ttl"),
    [
        ("spiffe://other.domain/agent/x", 60),
        ("spiffe://hivemesh.local/agent/../x", 60),
        (AGENT, 0),
        (AGENT, 10**9),
    ],
)
def test_sign_csr_rejects_bad_identity_or_ttl(ca: CertificateAuthority, spiffe_id: str, ttl: int) -> None:
    _, csr = new_key_and_csr(AGENT)
    with pytest.raises(InvalidInputError):
        ca.sign_csr(csr, spiffe_id, ttl_s=ttl)


def test_ensure_controlplane_cert_reissues_when_missing_or_foreign(
    tmp_path: Path, files: CaFiles, ca: CertificateAuthority
) -> None:
    original = files.controlplane_cert.read_bytes()
    ensure_controlplane_cert(ca, files.certs_dir)
    assert files.controlplane_cert.read_bytes() == original  # fresh: untouched
    files.controlplane_cert.unlink()
    ensure_controlplane_cert(ca, files.certs_dir)
    _verify_signed_by(x509.load_pem_x509_certificate(files.controlplane_cert.read_bytes()), ca)
    assert stat.S_IMODE(files.controlplane_key.stat().st_mode) == 0o600
    # A certificate from another CA (e.g. after `init --force` elsewhere) is replaced too.
    other = init_ca(tmp_path / "other", TD)
    files.controlplane_cert.write_bytes(other.controlplane_cert.read_bytes())
    ensure_controlplane_cert(ca, files.certs_dir)
    _verify_signed_by(x509.load_pem_x509_certificate(files.controlplane_cert.read_bytes()), ca)

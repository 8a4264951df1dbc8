"""Certificates for the embedded etcd, issued by the mesh CA: the member's server (and peer) certificate and the
bootstrap identity (Common Name `root`) that creates etcd's users and roles.

The mesh CA and not a CA of etcd's own, so that there is one trust anchor: etcd accepts exactly the
certificates the mesh issues (its `--trusted-ca-file` is the mesh bundle, `ca.pem`), a workload verifies etcd
with the bundle it already holds, and a workload certificate's Common Name (`<kind>:<name>`) is its etcd user.
Neither certificate carries a mesh identity (`spiffe://<td>/etcd*` is no agent, client or operator), so
neither can be used to call the mesh.

Through a CA rotation (`hivemesh up` drives this, `launcher.py`): etcd reads `--trusted-ca-file` once, at start, so
`up` gives it a copy of the bundle (`etcd-ca.pem`, `write_etcd_trust`) and restarts it when the bundle's roots
change; etcd reads its own certificate at every handshake, so `follow_signing_root` re-issues it (and the root
identity) from the new signing root in place, keeping their keys, while every client still trusts both roots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hivemesh.controlplane.ca import CaFiles, CertificateAuthority, _write_atomic
from hivemesh.mesh.advertise import san_entries
from hivemesh.mesh.etcd import EtcdServerTls, EtcdTls
from hivemesh.mesh.etcd_roles import ROOT_USER
from hivemesh.mesh.pki import SCHEME
from hivemesh.mesh.trustdoc import fingerprint

ETCD_TTL_S: Final = 365 * 86400


@dataclass(frozen=True)
class EtcdCertFiles:
    """Where `issue_etcd_certs` put the member's and the bootstrap identity's files (keys 0600)."""

    server_cert: Path
    server_key: Path
    root_cert: Path
    root_key: Path
    trusted_ca: Path
    """The member's own copy of the bundle, when it has one (`issue_etcd_certs(own_trust=True)`)."""

    @classmethod
    def in_dir(cls, d: Path) -> EtcdCertFiles:
        return cls(d / "etcd.pem", d / "etcd.key", d / "etcd-root.pem", d / "etcd-root.key", d / "etcd-ca.pem")


def issue_etcd_certs(
    ca: CertificateAuthority, certs_dir: Path, *, host: str = "127.0.0.1", out_dir: Path | None = None,
    hosts: Sequence[str] = (), own_trust: bool = False,
) -> EtcdServerTls:
    """Issue (or re-issue) the member's certificate for host and the root identity, next to the CA.

    hosts adds the advertised address of every member that shares this certificate: clients given several
    endpoints check each member against one name, and a member checks its peers' certificates against the
    address they connect from, so a cluster's certificate names all of them (DNS names and IPs).
    Returns the member's TLS configuration: its certificate, the mesh bundle as the CAs it trusts (a client
    certificate from any mesh root is accepted; etcd's roles decide what it may do), and the root identity.
    own_trust: the member trusts a copy of the bundle (`write_etcd_trust`), which changes only when its holder
    restarts it, so the holder knows which roots the running member accepts; it checks the member against
    `ca.pem` itself, which always holds the root that signs.
    """
    files = EtcdCertFiles.in_dir(out_dir or certs_dir)
    td = ca.trust_domain
    extra_dns, extra_ips = san_entries([host, *hosts])
    ips = ["127.0.0.1", *(ip for ip in extra_ips if ip != "127.0.0.1")]
    dns = ["localhost", f"etcd.{td}", *(name for name in extra_dns if name != "localhost")]
    cert, key = ca.issue_with_new_key(f"{SCHEME}{td}/etcd", common_name="etcd", dns_names=dns, ips=ips,
                                      ttl_s=ETCD_TTL_S)
    root_cert, root_key = ca.issue_with_new_key(f"{SCHEME}{td}/etcd-root", common_name=ROOT_USER,
                                                dns_names=[], ttl_s=ETCD_TTL_S)
    for path, data, mode in ((files.server_key, key, 0o600), (files.root_key, root_key, 0o600),
                             (files.server_cert, cert, 0o644), (files.root_cert, root_cert, 0o644)):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_atomic(path, data, mode)
    bundle = CaFiles.in_dir(certs_dir).ca_cert
    if own_trust:
        write_etcd_trust(certs_dir, files.trusted_ca)
    return EtcdServerTls(
        cert_file=files.server_cert, key_file=files.server_key,
        trusted_ca_file=files.trusted_ca if own_trust else bundle,
        admin_cert_file=files.root_cert, admin_key_file=files.root_key, server_ca_file=bundle if own_trust else None,
    )


def roots_in(path: Path) -> frozenset[str]:
    """The fingerprints of the certificates in a PEM bundle file (none when it cannot be read)."""
    try:
        return frozenset(fingerprint(c) for c in x509.load_pem_x509_certificates(path.read_bytes()))
    except (OSError, ValueError):
        return frozenset()


def write_etcd_trust(certs_dir: Path, path: Path) -> frozenset[str]:
    """Copy the mesh bundle (`ca.pem`) to the member's trusted-CA file path; the roots it now holds. etcd reads it
    at its next start only."""
    bundle = CaFiles.in_dir(certs_dir).ca_cert.read_bytes()
    _write_atomic(path, bundle, 0o644)
    return frozenset(fingerprint(c) for c in x509.load_pem_x509_certificates(bundle))


def issuer_of(cert_path: Path, roots: Sequence[x509.Certificate]) -> str | None:
    """The fingerprint of the root among roots whose key signed the certificate in cert_path (None: none did, or
    it cannot be read)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return None
    for root in roots:
        pub = root.public_key()
        if cert.issuer != root.subject or not isinstance(pub, ec.EllipticCurvePublicKey):
            continue
        try:
            pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            continue
        return fingerprint(root)
    return None


def follow_signing_root(ca: CertificateAuthority, d: Path) -> list[str]:
    """Re-issue the member's certificate and the root identity in folder d from ca's signing root when another root
    issued them; the names of the files rewritten. Each keeps its key, names and identity, and only its
    certificate file changes (atomically): etcd reads the pair at each handshake, and a new certificate beside
    the old key would fail every handshake in between. Clients must trust the signing root already (they do from
    `prepare` on); etcd trusts client certificates by its own list (`write_etcd_trust`), which this leaves alone."""
    files = EtcdCertFiles.in_dir(d)
    changed: list[str] = []
    for cert_path, key_path in ((files.server_cert, files.server_key), (files.root_cert, files.root_key)):
        if issuer_of(cert_path, [ca.certificate]) is not None:
            continue
        old = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path} is not an EC private key")
        sans = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        common_name = old.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        cert = ca._issue(
            key.public_key(), sans.get_values_for_type(x509.UniformResourceIdentifier)[0],
            common_name=str(common_name), dns_names=sans.get_values_for_type(x509.DNSName),
            ips=[str(ip) for ip in sans.get_values_for_type(x509.IPAddress)], ttl_s=ETCD_TTL_S,
        )
        _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        changed.append(cert_path.name)
    return changed


def controlplane_etcd_tls(certs_dir: Path, etcd_ca: Path | None = None) -> EtcdTls:
    """The control plane's etcd identity: its own certificate (Common Name `controlplane`, etcd's root role),
    verifying etcd against etcd_ca or else the mesh bundle."""
    files = CaFiles.in_dir(certs_dir)
    return EtcdTls.from_files(etcd_ca or files.ca_cert, files.controlplane_cert, files.controlplane_key)

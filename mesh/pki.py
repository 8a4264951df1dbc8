"""Workload PKI helpers: SPIFFE ids, keys and CSRs, certificate facts, and the peer behind an mTLS call.

The CA (`hivemesh.controlplane.ca`) decides identities; these helpers are what workloads (agents, sidecars,
the CLI) need to ask for one and to read one back, so they live in the data plane and never touch a CA key.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hivemesh.mesh.errors import PeerUnauthenticatedError

SCHEME = "spiffe://"
KINDS = frozenset({"agent", "client", "operator"})
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
# Lower-case DNS-like labels, as the SPIFFE spec requires of trust domains.
_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")
_MAX_ID_LEN = 2048


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A parsed hivemesh workload identity: spiffe://<trust_domain>/<kind>/<name>."""

    trust_domain: str
    kind: str
    name: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}/{self.kind}/{self.name}"

    @property
    def dns_name(self) -> str:
        """`<name>.<kind>.<td>`: the DNS SAN clients pin with `grpc.ssl_target_name_override`."""
        return f"{self.name}.{self.kind}.{self.trust_domain}"


def validate_trust_domain(trust_domain: str) -> str:
    """Return trust_domain if it is a lower-case DNS-like name, else raise ValueError saying why."""
    if not isinstance(trust_domain, str) or not trust_domain:
        raise ValueError("trust domain must be a non-empty string")
    if len(trust_domain) > 253 or not _TRUST_DOMAIN_RE.fullmatch(trust_domain):
        raise ValueError(
            f"bad trust domain {trust_domain!r}: "
            "use lower-case letters, digits, '-' and '.' (e.g. hivemesh.local)"
        )
    return trust_domain


def validate_name(name: str, what: str = "name") -> str:
    """Return name if it is a valid workload name ([a-z0-9][a-z0-9._-]{0,62}, no '..'), else ValueError."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(
            f"bad {what} {name!r}: must match [a-z0-9][a-z0-9._-]{{0,62}} and must not contain '..'"
        )
    return name


def parse_spiffe_id(s: str) -> SpiffeId:
    """Parse and strictly validate spiffe://<td>/<kind>/<name>.

    Refuses (ValueError with the reason): another scheme or upper-case scheme, userinfo, port, query,
    fragment, percent-encoding, empty or '.'/'..' segments, kinds other than agent|client|operator, and
    names outside [a-z0-9][a-z0-9._-]{0,62}.
    """
    if not isinstance(s, str):
        raise ValueError(f"SPIFFE id must be a string, not {type(s).__name__}")
    if len(s) > _MAX_ID_LEN:
        raise ValueError("SPIFFE id is too long")
    if not s.startswith(SCHEME):
        raise ValueError(f"bad SPIFFE id {s!r}: must start with {SCHEME!r}")
    rest = s[len(SCHEME):]
    for ch, what in (("?", "a query"), ("#", "a fragment"), ("%", "percent-encoding"), ("@", "userinfo")):
        if ch in rest:
            raise ValueError(f"bad SPIFFE id {s!r}: must not contain {what}")
    td, sep, path = rest.partition("/")
    if ":" in td:
        raise ValueError(f"bad SPIFFE id {s!r}: the trust domain must not carry a port")
    try:
        validate_trust_domain(td)
    except ValueError as exc:
        raise ValueError(f"bad SPIFFE id {s!r}: {exc}") from None
    if not sep or not path:
        raise ValueError(f"bad SPIFFE id {s!r}: expected spiffe://<trust-domain>/<kind>/<name>")
    segments = path.split("/")
    if any(seg in ("", ".", "..") for seg in segments) or ".." in path:
        raise ValueError(f"bad SPIFFE id {s!r}: empty, '.' or '..' path segments are not allowed")
    if len(segments) != 2:
        raise ValueError(f"bad SPIFFE id {s!r}: expected exactly <kind>/<name> after the trust domain")
    kind, name = segments
    if kind not in KINDS:
        raise ValueError(f"bad SPIFFE id {s!r}: kind {kind!r} is not one of {', '.join(sorted(KINDS))}")
    try:
        validate_name(name)
    except ValueError as exc:
        raise ValueError(f"bad SPIFFE id {s!r}: {exc}") from None
    return SpiffeId(td, kind, name)


def controlplane_id(trust_domain: str) -> str:
    """The control plane's own SPIFFE id (it has no kind/name; it is the issuer of every other id)."""
    return f"{SCHEME}{validate_trust_domain(trust_domain)}/controlplane"


def controlplane_dns_name(trust_domain: str) -> str:
    """The DNS SAN of the control plane's server certificate, used as its TLS target name."""
    return f"controlplane.{validate_trust_domain(trust_domain)}"


def new_key_and_csr(spiffe_id: str) -> tuple[bytes, bytes]:
    """A fresh EC P-256 key (PKCS#8 PEM) and a CSR for spiffe_id; the key never leaves the workload.

    The CA decides the identity itself (a renewal keeps the caller's, a join the token's); a join refuses a
    CSR whose SAN asks for another kind or name than its token was minted for.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def load_cert(cert: bytes | x509.Certificate) -> x509.Certificate:
    """A certificate from PEM or DER bytes (the first one of a PEM bundle)."""
    if isinstance(cert, x509.Certificate):
        return cert
    try:
        if cert.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(cert)
        return x509.load_der_x509_certificate(cert)
    except ValueError as exc:
        raise ValueError(f"not a valid X.509 certificate: {exc}") from None


def load_certs(bundle_pem: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle (ValueError if there is none)."""
    try:
        certs = x509.load_pem_x509_certificates(bundle_pem)
    except ValueError as exc:
        raise ValueError(f"not a valid PEM certificate bundle: {exc}") from None
    return certs


def uri_sans(cert: x509.Certificate) -> list[str]:
    """The URI SANs of cert (empty if it has no SAN extension)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def spiffe_id_of(cert_pem: bytes | x509.Certificate) -> str:
    """The one spiffe:// URI SAN of a certificate; ValueError when there is none or more than one URI SAN."""
    uris = uri_sans(load_cert(cert_pem))
    if len(uris) != 1:
        raise ValueError(f"certificate must carry exactly one URI SAN (a SPIFFE id), found {len(uris)}")
    if not uris[0].startswith(SCHEME):
        raise ValueError(f"certificate URI SAN {uris[0]!r} is not a SPIFFE id")
    return uris[0]


def trust_domain_of_bundle(bundle_pem: bytes) -> str:
    """The trust domain named by the first CA certificate of a bundle (its URI SAN spiffe://<td>)."""
    uri = spiffe_id_of(load_certs(bundle_pem)[0])
    td = uri[len(SCHEME):].rstrip("/")
    return validate_trust_domain(td)


def cert_expiry(cert_pem: bytes | x509.Certificate) -> float:
    """notAfter of a certificate as a unix timestamp."""
    return load_cert(cert_pem).not_valid_after_utc.timestamp()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def cert_thumbprint_s256(cert: bytes | x509.Certificate) -> str:
    """RFC 8705 x5t#S256: base64url (no padding) SHA-256 of the certificate's DER; accepts PEM or DER."""
    if isinstance(cert, x509.Certificate):
        der = cert.public_bytes(serialization.Encoding.DER)
    elif cert.lstrip().startswith(b"-----BEGIN"):
        der = load_cert(cert).public_bytes(serialization.Encoding.DER)
    else:
        der = cert
    return _b64url(hashlib.sha256(der).digest())


def is_ca_cert(cert: x509.Certificate) -> bool:
    """True when the certificate says CA:TRUE (such a certificate must never act as a workload)."""
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


@dataclass(frozen=True, slots=True)
class Peer:
    """The verified other end of a mutual-TLS connection."""

    spiffe_id: SpiffeId
    thumbprint: str
    """x5t#S256 of the peer's certificate: what capability tokens are bound to (cnf)."""
    cert_pem: bytes


def peer_from_auth_context(
    auth_ctx: Mapping[str, Sequence[bytes]] | Mapping[str, Any], *, trust_domain: str | None = None
) -> Peer:
    """Who called: the SPIFFE id and thumbprint of the client certificate gRPC verified in the handshake.

    Reads `x509_pem_cert` (the leaf gRPC exposes; grpc 1.85 also exposes `peer_spiffe_id`, `peer_uri` and
    `x509_subject_alternative_name`, but the PEM is the one source that also yields the thumbprint). Raises
    PeerUnauthenticatedError when there is no certificate, it is a CA certificate, it does not carry exactly
    one valid SPIFFE id, or (when trust_domain is given) the id is in another trust domain.
    """
    values = auth_ctx.get("x509_pem_cert") if auth_ctx else None
    if not values:
        raise PeerUnauthenticatedError()
    pem = values[0]
    if isinstance(pem, str):
        pem = pem.encode("ascii")
    try:
        cert = load_cert(pem)
        if is_ca_cert(cert):
            raise ValueError("a CA certificate cannot be used as a workload certificate")
        sid = parse_spiffe_id(spiffe_id_of(cert))
    except ValueError as exc:
        raise PeerUnauthenticatedError(
            f"the client certificate is not a valid mesh identity: {exc}"
        ) from None
    if trust_domain is not None and sid.trust_domain != trust_domain:
        raise PeerUnauthenticatedError(f"peer {sid} is outside trust domain {trust_domain}")
    return Peer(spiffe_id=sid, thumbprint=cert_thumbprint_s256(cert), cert_pem=bytes(pem))

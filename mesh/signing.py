"""Signed payloads: detached JWS (RFC 7515 appendix F, ES256) over a call's request and its answer.

A capability that declares `signed_payloads` has every request signed by its caller and every answer signed
by its agent, each with the private key of its mesh workload certificate, so a party cannot later deny what it
sent: the audit record keeps both signed digests. The JWS payload is the SHA-256 digest of the content (length
prefixed fields, so no field boundary can be shifted), never sent (detached); the header carries the signer's
certificate (`x5c`), its thumbprint (`kid`, x5t#S256), a nonce, the signing time and what was signed (`typ`).
The verifier checks the certificate is the peer's (the mTLS one, or one the mesh CA issued to the expected
SPIFFE id), the signature, the time window and (for requests) that the nonce is new.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from hivemesh.mesh import json_depth
from hivemesh.mesh.errors import ReplayedError, SignatureInvalidError
from hivemesh.mesh.pki import cert_thumbprint_s256, load_cert, load_certs, spiffe_id_of

SIGNATURE_HEADER: Final = "hivemesh-signature"
"""gRPC metadata key of a request's detached JWS (an answer's travels in `InvokeResponse.signature`)."""
REQUEST: Final = "hivemesh-request"
ANSWER: Final = "hivemesh-answer"
DEFAULT_WINDOW_S: Final = 60.0
"""How far a signature's `iat` may be from the verifier's clock (either way)."""
_MAX_IAT: Final = 2**53
"""iat at or past this is refused as no time: beyond it a float (the clock) no longer holds every second."""
DEFAULT_MAX_NONCES: Final = 100_000
_MAX_JWS: Final = 16_384


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def digest(*fields: bytes | memoryview | str) -> bytes:
    """SHA-256 over the fields, each prefixed with its length (so `("ab", "c")` and `("a", "bc")` differ)."""
    h = hashlib.sha256()
    for f in fields:
        data = f.encode() if isinstance(f, str) else f
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.digest()


def audience(agent_id: str, instance_id: str) -> str:
    """Whom a request is signed for: one instance of an agent, so a signed request cannot be replayed to another
    agent, nor to another replica of the same agent (each keeps its own nonce cache)."""
    return f"{agent_id}#{instance_id}" if instance_id else agent_id


def request_digest(capability: str, content_type: str, payload: bytes | memoryview, audience: str) -> bytes:
    """What a caller signs: the capability, the input and its type, and the instance it is meant for
    (`audience`)."""
    return digest(REQUEST, capability, content_type or "application/json", payload, audience)


def answer_digest(request: bytes, output: bytes, content_type: str, state: int) -> bytes:
    """What an agent signs: its answer bound to the request digest it answers."""
    return digest(ANSWER, request, output, content_type or "application/json", str(state))


@dataclass(frozen=True)
class Signer:
    """A workload's key and certificate, as PEM (the `Workload` of `hivemesh.mesh.tls`)."""

    key_pem: bytes
    cert_pem: bytes

    def sign(self, typ: str, content_digest: bytes, *, now: float | None = None) -> str:
        """The detached compact JWS (`header..signature`) over content_digest."""
        key, kid, x5c = _signing_parts(self.key_pem, self.cert_pem)
        header = {
            "alg": "ES256",
            "typ": typ,
            "kid": kid,
            "x5c": [x5c],
            "iat": int(now if now is not None else time.time()),
            "nonce": secrets.token_urlsafe(16),
        }
        protected = _b64(json.dumps(header, separators=(",", ":"), sort_keys=True).encode())
        der = key.sign(f"{protected}.{_b64(content_digest)}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{protected}..{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


@functools.lru_cache(maxsize=8)
def _signing_parts(key_pem: bytes, cert_pem: bytes) -> tuple[ec.EllipticCurvePrivateKey, str, str]:
    """The parsed key, kid and x5c entry of a workload (parsed once per certificate: parsing costs more than
    signing). A few entries: renewals replace the workload now and then."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("signed payloads need a P-256 workload key (ES256)")
    cert = load_cert(cert_pem)
    x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii")
    return key, cert_thumbprint_s256(cert), x5c


@dataclass(frozen=True)
class Verified:
    """A signature that checked out: who made it, its nonce and the digest it covers (hex, for the audit)."""

    signer: str
    nonce: str
    iat: int
    digest_hex: str


class NonceCache:
    """Nonces seen within the time window, bounded. When full, the oldest is forgotten and its `iat` becomes a
    floor: a signature made at or before it is refused as a possible replay, so forgetting never lets one
    through (under a flood, honest requests older than the floor are refused too; they may be re-signed).
    Thread-safe: both packagings call it."""

    def __init__(self, *, window_s: float = DEFAULT_WINDOW_S, max_entries: int = DEFAULT_MAX_NONCES) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._seen: OrderedDict[str, int] = OrderedDict()
        self._floor = -1
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, key: str, iat: int, now: float) -> bool:
        """Remember key (signed at iat); False when it was seen, or may have been, within the window."""
        with self._lock:
            seen = self._seen
            if key in seen or iat <= self._floor:
                return False
            while seen:
                at = next(iter(seen.values()))
                if at >= now - self.window_s and len(seen) < self.max_entries:
                    break
                seen.popitem(last=False)
                if at >= now - self.window_s:
                    self._floor = max(self._floor, at)
            seen[key] = iat
            return True


def _header(jws: str) -> tuple[dict[str, Any], str, bytes]:
    if not jws or len(jws) > _MAX_JWS:
        raise SignatureInvalidError("the payload signature is missing or too long")
    parts = jws.split(".")
    if len(parts) != 3 or parts[1] != "":
        raise SignatureInvalidError("the payload signature is not a detached compact JWS (header..signature)")
    try:
        header = json_depth.loads(_unb64(parts[0]))
        sig = _unb64(parts[2])
    except (ValueError, binascii.Error, RecursionError):
        raise SignatureInvalidError("the payload signature's header or signature is not valid base64url JSON") \
            from None
    if not isinstance(header, dict) or header.get("alg") != "ES256" or len(sig) != 64:
        raise SignatureInvalidError("the payload signature must be ES256")
    return header, parts[0], sig


def verify(
    jws: str,
    typ: str,
    content_digest: bytes,
    *,
    peer_cert: bytes | None = None,
    expect_id: str | None = None,
    bundle_pem: bytes | None = None,
    window_s: float = DEFAULT_WINDOW_S,
    nonces: NonceCache | None = None,
    now: float | None = None,
) -> Verified:
    """Check a detached JWS over content_digest. The signer is peer_cert (the mTLS peer's certificate, PEM);
    without it, the header's `x5c` certificate, which must be issued by a CA of bundle_pem to expect_id.
    Raises SignatureInvalidError (forged, altered, stale, not the peer's) or ReplayedError (nonce seen)."""
    header, protected, sig = _header(jws)
    now = time.time() if now is None else now
    if header.get("typ") != typ:
        raise SignatureInvalidError(f"the payload signature is a {str(header.get('typ'))[:40]!r}, not a {typ!r}")
    cert = _signer_cert(header, peer_cert, expect_id, bundle_pem, now)
    if header.get("kid") != cert_thumbprint_s256(cert):
        raise SignatureInvalidError("the payload signature was not made with the peer's mesh certificate")
    iat, nonce = header.get("iat"), header.get("nonce")
    if type(iat) is not int or not isinstance(nonce, str) or not 8 <= len(nonce) <= 128:
        raise SignatureInvalidError("the payload signature lacks its iat or nonce")
    if not 0 <= iat < _MAX_IAT:  # a float would overflow on it (10**400) and a 309-digit one fill the message
        raise SignatureInvalidError("the payload signature's iat is not a time (seconds since 1970)")
    if abs(now - iat) > window_s:
        raise SignatureInvalidError(f"the payload signature was made {int(now - iat)} s ago, outside ±{window_s:g} s")
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SignatureInvalidError("the signer's certificate has no P-256 key")
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    try:
        key.verify(der, f"{protected}.{_b64(content_digest)}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureInvalidError("the payload signature does not match the payload (altered or forged)") \
            from None
    signer = spiffe_id_of(cert)
    if nonces is not None and not nonces.add(f"{signer}|{nonce}", iat, now):
        raise ReplayedError("this signed request was already received (replayed nonce)")
    return Verified(signer=signer, nonce=nonce, iat=iat, digest_hex=content_digest.hex())


def _signer_cert(
    header: dict[str, Any], peer_cert: bytes | None, expect_id: str | None, bundle_pem: bytes | None, now: float
) -> x509.Certificate:
    if peer_cert is not None:
        return _peer_cert(peer_cert)
    x5c = header.get("x5c")
    if not isinstance(x5c, list) or not x5c or not isinstance(x5c[0], str) or bundle_pem is None:
        raise SignatureInvalidError("the payload signature carries no certificate")
    try:
        cert = x509.load_der_x509_certificate(base64.b64decode(x5c[0], validate=True))
        sid = spiffe_id_of(cert)
    except (ValueError, binascii.Error):
        raise SignatureInvalidError("the payload signature's certificate cannot be read") from None
    if expect_id is not None and sid != expect_id:
        raise SignatureInvalidError(f"the payload was signed by {sid[:200]}, not {expect_id[:200]}")
    if not cert.not_valid_before_utc.timestamp() <= now <= cert.not_valid_after_utc.timestamp():
        raise SignatureInvalidError("the payload signature's certificate is not valid now")
    if not any(_issued_by(cert, ca) for ca in _cas(bundle_pem)):
        raise SignatureInvalidError("the payload signature's certificate was not issued by the mesh CA")
    return cert


@functools.lru_cache(maxsize=256)
def _peer_cert(pem: bytes) -> x509.Certificate:
    """A peer's certificate, parsed once (the same few peers call again and again)."""
    return load_cert(pem)


@functools.lru_cache(maxsize=4)
def _cas(bundle_pem: bytes) -> tuple[x509.Certificate, ...]:
    return tuple(load_certs(bundle_pem))


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


__all__ = [
    "ANSWER", "REQUEST", "SIGNATURE_HEADER", "NonceCache", "Signer", "Verified", "answer_digest", "audience", "digest",
    "request_digest", "verify",
]

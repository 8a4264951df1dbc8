"""The signed trust documents in etcd: the CA bundle (`/hivemesh/trust/bundle`) and the token key set
(`/hivemesh/trust/jwks`).

During a CA rotation the control plane publishes a new bundle at each step; every node swaps it in (new
handshakes then use it) and, when asked (`renew`), renews its certificate at once so it is signed by the new
root. etcd is not trusted to say which roots to trust: the document is signed by the root keys the control
plane holds, and a node accepts it only if a signature verifies with a root the node already trusts. Someone
who can write etcd cannot slip in a root of their own.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hivemesh.mesh import json_depth
from hivemesh.mesh.etcd import PREFIX
from hivemesh.mesh.pki import load_certs

TRUST_BUNDLE_KEY: Final = PREFIX + "trust/bundle"
JWKS_DOC_KEY: Final = PREFIX + "trust/jwks"
_JWKS_TYP: Final = "hivemesh-jwks"
"""Bound into the signed JWKS payload, so no other signed document can pass for a key set."""

Signer = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 hex of the certificate's DER."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class TrustDoc:
    generation: int
    bundle_pem: bytes
    signing_root: str
    """Fingerprint of the root that signs new certificates."""
    renew: bool
    """Every node should renew now (the signing root changed)."""


def _sign(payload: bytes, signers: list[Signer]) -> list[dict[str, str]]:
    return [
        {"root": fingerprint(cert), "sig": base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()}
        for cert, key in signers
    ]


def _signed_by_trusted_root(sigs: list[Any], payload: bytes, trusted_bundle_pem: bytes) -> bool:
    """True when one entry of sigs is a valid signature of payload by a root of trusted_bundle_pem."""
    trusted = {fingerprint(c): c for c in load_certs(trusted_bundle_pem)}
    for entry in sigs:
        if not isinstance(entry, dict):
            continue
        cert = trusted.get(str(entry.get("root")))
        if cert is None:
            continue
        pub = cert.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            continue
        try:
            pub.verify(base64.b64decode(str(entry.get("sig"))), payload, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            continue
        return True
    return False


def sign_trust_doc(doc: TrustDoc, signers: list[Signer]) -> bytes:
    """The signed JSON document; signed by every (root, key) given."""
    body: dict[str, Any] = {"generation": doc.generation, "bundle_pem": doc.bundle_pem.decode("ascii"),
                            "signing_root": doc.signing_root, "renew": doc.renew}
    body["sigs"] = _sign(_canonical(body), signers)
    return _canonical(body)


def verify_trust_doc(raw: bytes, trusted_bundle_pem: bytes) -> TrustDoc:
    """The document, if a signature verifies with a root of trusted_bundle_pem; ValueError saying why not."""
    try:
        doc = json_depth.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"the trust bundle document is not JSON: {exc!r}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("sigs"), list):
        raise ValueError("the trust bundle document is malformed")
    body = {k: doc.get(k) for k in ("generation", "bundle_pem", "signing_root", "renew")}
    if not isinstance(body["generation"], int) or not isinstance(body["bundle_pem"], str):
        raise ValueError("the trust bundle document is malformed")
    if not _signed_by_trusted_root(doc["sigs"], _canonical(body), trusted_bundle_pem):
        raise ValueError("the trust bundle document is not signed by a root this node trusts")
    bundle = body["bundle_pem"].encode("ascii")
    load_certs(bundle)  # it must parse
    return TrustDoc(body["generation"], bundle, str(body["signing_root"]), bool(body["renew"]))


def _jwks_payload(keys: list[Any], issued_at_ns: int) -> bytes:
    return _canonical({"typ": _JWKS_TYP, "keys": keys, "hivemesh_iat": issued_at_ns})


def sign_jwks(jwks_json: str, issued_at_ns: int, signers: list[Signer]) -> bytes:
    """The JWKS with `hivemesh_iat` (publication time, ns: nodes never go back to an older set) and `sigs`
    (one per (root, key) given) added; still a JWKS to any reader."""
    doc = json_depth.loads(jwks_json)
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('a JWKS is an object {"keys": [...]}')
    signed = {"keys": doc["keys"], "hivemesh_iat": issued_at_ns,
              "sigs": _sign(_jwks_payload(doc["keys"], issued_at_ns), signers)}
    return _canonical(signed)


@dataclass(frozen=True)
class SignedJwks:
    jwks_json: str
    """The bare JWKS (`{"keys": [...]}`), for KeySet.update_from_jwks."""
    issued_at_ns: int


def verify_jwks(raw: bytes, trusted_bundle_pem: bytes) -> SignedJwks:
    """The key set, if a signature verifies with a root of trusted_bundle_pem; ValueError saying why not."""
    try:
        doc = json_depth.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"the key set is not JSON: {exc!r}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('the key set is not a JWKS object {"keys": [...]}')
    iat, sigs = doc.get("hivemesh_iat"), doc.get("sigs")
    if not isinstance(sigs, list) or not sigs or not isinstance(iat, int) or isinstance(iat, bool):
        raise ValueError("the key set is not signed (no 'sigs' / 'hivemesh_iat'): it was not published by the "
                         "control plane")
    if not _signed_by_trusted_root(sigs, _jwks_payload(doc["keys"], iat), trusted_bundle_pem):
        raise ValueError("the key set is not signed by a root this node trusts")
    return SignedJwks(_canonical({"keys": doc["keys"]}).decode("ascii"), iat)


def issued_by(cert_pem: bytes, root: x509.Certificate) -> bool:
    """True when the leaf in cert_pem was signed by root."""
    leaf = x509.load_pem_x509_certificate(cert_pem)
    try:
        leaf.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True

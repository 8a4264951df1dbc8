"""The trust bundle document in etcd (`/hivemesh/trust/bundle`): which root CAs the mesh trusts now.

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

from hivemesh.mesh.etcd import PREFIX
from hivemesh.mesh.pki import load_certs

TRUST_BUNDLE_KEY: Final = PREFIX + "trust/bundle"


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


def sign_trust_doc(
    doc: TrustDoc, signers: list[tuple[x509.Certificate, ec.EllipticCurvePrivateKey]]
) -> bytes:
    """The signed JSON document; signed by every (root, key) given."""
    body = {"generation": doc.generation, "bundle_pem": doc.bundle_pem.decode("ascii"),
            "signing_root": doc.signing_root, "renew": doc.renew}
    payload = _canonical(body)
    body["sigs"] = [
        {"root": fingerprint(cert), "sig": base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()}
        for cert, key in signers
    ]
    return _canonical(body)


def verify_trust_doc(raw: bytes, trusted_bundle_pem: bytes) -> TrustDoc:
    """The document, if a signature verifies with a root of trusted_bundle_pem; ValueError saying why not."""
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"the trust bundle document is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("sigs"), list):
        raise ValueError("the trust bundle document is malformed")
    body = {k: doc.get(k) for k in ("generation", "bundle_pem", "signing_root", "renew")}
    if not isinstance(body["generation"], int) or not isinstance(body["bundle_pem"], str):
        raise ValueError("the trust bundle document is malformed")
    payload = _canonical(body)
    trusted = {fingerprint(c): c for c in load_certs(trusted_bundle_pem)}
    for entry in doc["sigs"]:
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
        bundle = body["bundle_pem"].encode("ascii")
        load_certs(bundle)  # it must parse
        return TrustDoc(body["generation"], bundle, str(body["signing_root"]), bool(body["renew"]))
    raise ValueError("the trust bundle document is not signed by a root this node trusts")


def issued_by(cert_pem: bytes, root: x509.Certificate) -> bool:
    """True when the leaf in cert_pem was signed by root."""
    leaf = x509.load_pem_x509_certificate(cert_pem)
    try:
        leaf.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True

"""Root CA rotation in three steps, each one safe for traffic (Istio's cacert rotation, SPIRE's prepared →
active → old authority):

1. `prepare`: a new root is created; every node is told to trust old + new (the old root still signs).
2. `activate`: the new root signs from now on; every node is told to renew at once, so all certificates in
   use move to the new root while both roots are still trusted. The control plane's own server certificate
   (with the advertised hosts it named) and the operator certificate are re-issued too.
3. `finish`: the old root is dropped from the bundle and its key is deleted.

State lives in the certs directory, so a restarted control plane resumes mid-rotation: `ca.pem` is the bundle
(signing root first), `ca.key` the signing key, `ca-next.*` the prepared root, `ca-prev.*` the retiring one,
`rotation.json` the phase and generation. Each step publishes the bundle document (`hivemesh.mesh.trustdoc`)
signed by every root key held, so a node that missed a step still accepts the next one. A running control plane
runs the steps on the state every replica shares through etcd (`hivemesh.controlplane.shared_ca`); the certs
directory is each replica's cache of it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hivemesh.controlplane.ca import (
    CaFiles,
    CertificateAuthority,
    _key_pem,
    _new_root,
    _write_atomic,
    load_ca,
)
from hivemesh.mesh import json_depth
from hivemesh.mesh.errors import FailedPreconditionError, InvalidInputError
from hivemesh.mesh.pki import controlplane_dns_name
from hivemesh.mesh.trustdoc import TRUST_BUNDLE_KEY, TrustDoc, fingerprint, sign_trust_doc

log = logging.getLogger(__name__)

STEPS: Final = ("prepare", "activate", "finish")
STATE_FILE: Final = "rotation.json"
"""The phase and generation, in the certs directory; every step writes it last."""
MIN_ACTIVE_S: Final = 5.0
"""`finish` waits at least this long after `activate` (nodes renew within about a second of it)."""


@dataclass
class RotationState:
    phase: str = "steady"  # steady | prepared | activated
    generation: int = 1
    activated_at: float = 0.0


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FailedPreconditionError(f"{path} is not an EC private key")
    return key


def _advertised_sans(cert_path: Path, trust_domain: str) -> list[str]:
    """The DNS names and IPs cert_path names beyond those every control-plane certificate carries."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return []
    standard = {controlplane_dns_name(trust_domain), "localhost", "127.0.0.1"}
    names = [*sans.get_values_for_type(x509.DNSName), *(str(ip) for ip in sans.get_values_for_type(x509.IPAddress))]
    return [n for n in names if n not in standard]


class CaRotation:
    """Runs the steps on the CA files and says which CA is in force."""

    def __init__(self, certs_dir: Path, *, hosts: Sequence[str] = ()) -> None:
        self.dir = Path(certs_dir)
        self.hosts = tuple(hosts)
        """The control plane's advertised hosts: its re-issued certificate names them (and every host the one it
        replaces named), so a remote client that checks the host it dialled still accepts it after `activate`."""
        self.files = CaFiles.in_dir(self.dir)
        self._state_path = self.dir / STATE_FILE
        self.state = self._load_state()

    def _load_state(self) -> RotationState:
        try:
            raw = json_depth.loads(self._state_path.read_text())
            return RotationState(str(raw["phase"]), int(raw["generation"]), float(raw.get("activated_at", 0)))
        except (OSError, ValueError, KeyError, TypeError):
            return RotationState()

    def _save_state(self) -> None:
        doc = {"phase": self.state.phase, "generation": self.state.generation,
               "activated_at": self.state.activated_at}
        _write_atomic(self._state_path, json.dumps(doc).encode(), 0o644)

    @property
    def next_cert(self) -> Path:
        return self.dir / "ca-next.pem"

    @property
    def next_key(self) -> Path:
        return self.dir / "ca-next.key"

    @property
    def prev_cert(self) -> Path:
        return self.dir / "ca-prev.pem"

    @property
    def prev_key(self) -> Path:
        return self.dir / "ca-prev.key"

    def step(self, name: str, *, force: bool = False) -> CertificateAuthority:
        """Run one step; returns the CA now in force. FailedPreconditionError when the step is out of order."""
        if name not in STEPS:
            raise InvalidInputError(f"step must be one of {', '.join(STEPS)}",
                                    field_violations={"step": f"one of {', '.join(STEPS)}"})  # not the input echoed
        phase = self.state.phase
        expected = {"prepare": "steady", "activate": "prepared", "finish": "activated"}[name]
        if phase != expected:
            raise FailedPreconditionError(
                f"cannot {name}: the rotation is {phase} (steps run in order: prepare → activate → finish)"
            )
        if name == "prepare":
            return self._prepare()
        if name == "activate":
            return self._activate()
        since = time.time() - self.state.activated_at
        if since < MIN_ACTIVE_S and not force:
            raise FailedPreconditionError(
                f"the new root signs for {since:.1f} s only: give every node time to renew (at least "
                f"{MIN_ACTIVE_S:.0f} s) before dropping the old root"
            )
        return self._finish()

    def _prepare(self) -> CertificateAuthority:
        ca = load_ca(self.dir)
        new_cert, new_key = _new_root(ca.trust_domain)
        _write_atomic(self.next_key, _key_pem(new_key), 0o600)
        _write_atomic(self.next_cert, _pem(new_cert), 0o644)
        bundle = _pem(ca.certificate) + _pem(new_cert)
        _write_atomic(self.files.ca_cert, bundle, 0o644)
        self.state = RotationState("prepared", self.state.generation + 1)
        self._save_state()
        log.info("CA rotation prepared: trusting old and new roots (generation %d)", self.state.generation)
        return load_ca(self.dir)

    def _activate(self) -> CertificateAuthority:
        old = load_ca(self.dir)
        old_key = _load_key(self.files.ca_key)
        new_cert = x509.load_pem_x509_certificate(self.next_cert.read_bytes())
        new_key = _load_key(self.next_key)
        _write_atomic(self.prev_key, _key_pem(old_key), 0o600)
        _write_atomic(self.prev_cert, _pem(old.certificate), 0o644)
        _write_atomic(self.files.ca_key, _key_pem(new_key), 0o600)
        _write_atomic(self.files.ca_cert, _pem(new_cert) + _pem(old.certificate), 0o644)
        for p in (self.next_key, self.next_cert):
            p.unlink(missing_ok=True)
        ca = load_ca(self.dir)
        hosts = dict.fromkeys([*_advertised_sans(self.files.controlplane_cert, ca.trust_domain), *self.hosts])
        cp_cert, cp_key = ca.issue_controlplane_cert(hosts=list(hosts))
        _write_atomic(self.files.controlplane_key, cp_key, 0o600)
        _write_atomic(self.files.controlplane_cert, cp_cert, 0o644)
        if self.files.operator_cert.exists():
            op_cert, op_key = ca.issue_operator_cert()
            _write_atomic(self.files.operator_key, op_key, 0o600)
            _write_atomic(self.files.operator_cert, op_cert, 0o644)
        self.state = RotationState("activated", self.state.generation + 1, time.time())
        self._save_state()
        log.info("CA rotation activated: the new root signs (generation %d)", self.state.generation)
        return ca

    def _finish(self) -> CertificateAuthority:
        ca = load_ca(self.dir)
        _write_atomic(self.files.ca_cert, _pem(ca.certificate), 0o644)
        for p in (self.prev_key, self.prev_cert):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        self.state = RotationState("steady", self.state.generation + 1)
        self._save_state()
        log.info("CA rotation finished: only the new root is trusted (generation %d)", self.state.generation)
        return load_ca(self.dir)

    # --- what to publish ---
    def signers(self, ca: CertificateAuthority) -> list[tuple[x509.Certificate, ec.EllipticCurvePrivateKey]]:
        out = [(ca.certificate, _load_key(self.files.ca_key))]
        for cert_path, key_path in ((self.next_cert, self.next_key), (self.prev_cert, self.prev_key)):
            if cert_path.exists() and key_path.exists():
                out.append((x509.load_pem_x509_certificate(cert_path.read_bytes()), _load_key(key_path)))
        return out

    def trust_doc(self, ca: CertificateAuthority) -> bytes:
        doc = TrustDoc(
            generation=self.state.generation,
            bundle_pem=ca.bundle_pem(),
            signing_root=fingerprint(ca.certificate),
            renew=self.state.phase == "activated",
        )
        return sign_trust_doc(doc, self.signers(ca))

    async def publish(self, etcd: Any, ca: CertificateAuthority) -> None:
        await etcd.put(TRUST_BUNDLE_KEY.encode(), self.trust_doc(ca))
        await etcd.put(b"/hivemesh/trust/ca", ca.bundle_pem())

    def status(self, ca: CertificateAuthority) -> dict[str, Any]:
        roots = [fingerprint(c) for c in x509.load_pem_x509_certificates(ca.bundle_pem())]
        return {"phase": self.state.phase, "generation": self.state.generation, "roots": roots,
                "signing_root": fingerprint(ca.certificate)}

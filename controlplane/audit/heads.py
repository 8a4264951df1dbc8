"""Signed heads of the audit log: what makes cutting its tail (or its trailing checkpoints) detectable.

A checkpoint covers the log only up to where it was signed (every 30 s or 1,000 entries), so the entries after
the last one, or the last checkpoints together with the entries they covered, could be cut without a trace. A
head is signed with the same checkpoint key over `{"type": "head", "head_no", "log_seq", "head", "count",
"checkpoints", "checkpoint_sig", "export", "time", "prev_sig"}`: the last entry, how many there are, and how
many checkpoints existed then (with the last one's signature), chained to the previous head's signature. The
control plane issues one at every export and, while records arrive, at most once a second (`HeadCadence`).
`compare_to_head` says what a log lacks compared to a head: which seqs, how many entries, which checkpoints.
The `type` member keeps a head from ever passing as a checkpoint and the other way round.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from hivemesh.mesh import json_depth
from hivemesh.mesh.audit.chain import canonical

HEAD_TYPE: Final = "head"
KEY_CERT_PATH: Final = "/controlplane/audit-checkpoints"
"""The URI path (after `spiffe://<td>`) of the CA-issued certificate for the checkpoint key."""


class HeadCadence:
    """When to sign a head: at most once per `interval_s`, and only when the log grew since the last one.

    Pure (the caller passes the clock and the log's seq) so the rule is testable without a timer."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.signed_seq = 0
        self.signed_at = float("-inf")

    def due(self, seq: int, now: float) -> bool:
        return seq > self.signed_seq and now - self.signed_at >= self.interval_s

    def signed(self, seq: int, now: float) -> None:
        self.signed_seq = seq
        self.signed_at = now


def sign_head(key: ed25519.Ed25519PrivateKey, body: Mapping[str, Any], kid: str) -> dict[str, Any]:
    doc = {k: v for k, v in body.items() if k != "sig"}
    doc["type"] = HEAD_TYPE
    doc["kid"] = kid
    doc["sig"] = base64.b64encode(key.sign(canonical(doc))).decode("ascii")
    return doc


def verify_head(raw: bytes | str, public_key: ed25519.Ed25519PublicKey) -> dict[str, Any]:
    """The head, if raw is one signed by public_key; ValueError saying why not."""
    try:
        head = json_depth.loads(raw)
    except ValueError:
        raise ValueError("the head is not valid JSON") from None
    if not isinstance(head, dict) or head.get("type") != HEAD_TYPE or not isinstance(head.get("sig"), str):
        raise ValueError("not a signed audit head")
    for name in ("head_no", "log_seq", "count", "checkpoints"):
        if not isinstance(head.get(name), int) or isinstance(head.get(name), bool):
            raise ValueError(f"the head has no integer {name}")
    body = {k: v for k, v in head.items() if k != "sig"}
    try:
        public_key.verify(base64.b64decode(head["sig"], validate=True), canonical(body))
    except (InvalidSignature, ValueError):
        raise ValueError("the head's signature does not verify with the trusted key (forged, altered, or "
                         "signed by another key)") from None
    return head


def trusted_key_from_cert(cert_pem: bytes, bundle_pem: bytes, trust_domain: str) -> ed25519.Ed25519PublicKey:
    """The checkpoint key in cert_pem, if a root of the operator's own trust bundle issued it for the control
    plane's audit identity; ValueError otherwise. Validity dates are not checked: old exports stay verifiable."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        roots = x509.load_pem_x509_certificates(bundle_pem)
    except ValueError as exc:
        raise ValueError(f"unreadable checkpoint-key certificate or trust bundle: {exc}") from None
    issued = False
    for root in roots:
        try:
            cert.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        issued = True
        break
    if not issued:
        raise ValueError("the checkpoint-key certificate is not issued by a root of your trust bundle")
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    want = f"spiffe://{trust_domain}{KEY_CERT_PATH}"
    if uris != [want]:
        raise ValueError(f"the checkpoint-key certificate is for {uris}, not {want}")
    key = cert.public_key()
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError("the checkpoint-key certificate does not carry an Ed25519 key")
    return key


@dataclass
class Missing:
    """What a log lacks compared to a signed head."""

    first_seq: int = 0
    last_seq: int = 0
    checkpoints: tuple[int, ...] = ()
    problem: str = ""

    @property
    def entries(self) -> int:
        return self.last_seq - self.first_seq + 1 if self.last_seq else 0

    def to_json(self) -> dict[str, Any]:
        return {"missing_first_seq": self.first_seq, "missing_last_seq": self.last_seq,
                "missing_entries": self.entries, "missing_checkpoints": list(self.checkpoints),
                "head_problem": self.problem}


def compare_to_head(
    head: Mapping[str, Any], log_end_seq: int, hash_at_head: str | None, checkpoints: Sequence[Mapping[str, Any]]
) -> Missing | None:
    """What the log (ending at log_end_seq, with hash_at_head its entry hash at the head's seq, and its
    verified checkpoints) lacks compared to head; None when it holds everything the head covers."""
    out = Missing()
    head_seq, want_cps = int(head["log_seq"]), int(head["checkpoints"])
    parts = []
    if log_end_seq < head_seq:
        out.first_seq, out.last_seq = log_end_seq + 1, head_seq
        parts.append(f"missing entries: seq {out.first_seq}..{head_seq} ({out.entries} entr"
                     f"{'y' if out.entries == 1 else 'ies'}) that signed head {head['head_no']} covers")
    elif hash_at_head != head.get("head"):
        parts.append(f"the entry at seq {head_seq} differs from signed head {head['head_no']} (rewritten)")
    if len(checkpoints) < want_cps:
        out.checkpoints = tuple(range(len(checkpoints) + 1, want_cps + 1))
        parts.append(f"missing checkpoint(s) {_span(out.checkpoints)} of {want_cps} that the head counts")
    elif want_cps and checkpoints[want_cps - 1].get("sig") != head.get("checkpoint_sig"):
        parts.append(f"checkpoint {want_cps} differs from the one signed head {head['head_no']} names")
    if not parts:
        return None
    out.problem = "; ".join(parts)
    return out


def _span(nums: Sequence[int]) -> str:
    return str(nums[0]) if len(nums) == 1 else f"{nums[0]}..{nums[-1]}"

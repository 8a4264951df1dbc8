"""Signed checkpoints of the control plane's audit log, and verifying a log against them.

`checkpoints.jsonl` holds `{"checkpoint", "log_seq", "head", "time", "prev_sig", "kid", "sig"}`, each an Ed25519
signature over the canonical JSON of the rest, linking the previous checkpoint's signature (the CloudTrail
digest chain): deleting or altering a checkpoint breaks the link, and a log rewritten after a checkpoint was
signed (a re-hashed fork) no longer matches that checkpoint's head. A replica's copy may begin later than
checkpoint 1 (the mesh-wide log's earlier checkpoints were trimmed from etcd before that replica joined,
`AuditStore.adopt_checkpoint_locked`): its first checkpoint links to one it does not hold, and every one after
links on. Nothing of the log goes unproven: a checkpoint's head is the hash of its entry, which chains every
entry before it, so the first checkpoint held proves all that the trimmed ones did. `checkpoint.key` is the
signing key (0600), separate from the token signing keys: a leaked token key cannot forge checkpoints, and
whoever can write the log cannot sign for it.

`verify_log` is a pure function over the lines, so the CLI verifies an export offline with a pinned public key
and does not have to trust the control plane's own word.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from hivemesh.controlplane.audit.heads import Missing, compare_to_head
from hivemesh.mesh import json_depth
from hivemesh.mesh.audit.chain import GENESIS, ChainProblem, ChainState, canonical, check_link
from hivemesh.mesh.errors import FailedPreconditionError
from hivemesh.mesh.files import write_atomic

log = logging.getLogger(__name__)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_pem(public_key: ed25519.Ed25519PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_public_key(pem: str | bytes) -> ed25519.Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError("the checkpoint key must be an Ed25519 public key")
    return key


def write_private(path: Path, data: bytes) -> None:
    write_atomic(path, data, 0o600)


def load_or_create_checkpoint_key(path: Path) -> ed25519.Ed25519PrivateKey:
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise FailedPreconditionError(f"{path} is not an Ed25519 private key")
        return key
    key = ed25519.Ed25519PrivateKey.generate()
    write_private(
        path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    log.info("created the audit checkpoint signing key %s", path)
    return key


def sign_checkpoint(key: ed25519.Ed25519PrivateKey, body: Mapping[str, Any]) -> dict[str, Any]:
    doc = {k: v for k, v in body.items() if k != "sig"}
    doc["kid"] = key_id(key.public_key())
    doc["sig"] = _b64(key.sign(canonical(doc)))
    return doc



def checkpoint_problem(cp: Any, public_key: ed25519.Ed25519PublicKey | None, label: object = "") -> str:
    """What is wrong with one checkpoint on its own: its form, and (given a key) its signature; "" when nothing.
    label: how messages name it (default: its own number)."""
    if not isinstance(cp, dict) or not isinstance(cp.get("sig"), str):
        return f"checkpoint {label or '?'} is malformed"
    label = label or cp.get("checkpoint")
    log_seq = cp.get("log_seq", 0)
    if not isinstance(log_seq, int) or isinstance(log_seq, bool) or log_seq < 0:
        # Unsigned (no key given), anything passes the signature check: int() of it raised in the CLI.
        return f"checkpoint {label} is malformed: its log_seq is not a whole number"
    if public_key is not None:
        body = {k: v for k, v in cp.items() if k != "sig"}
        try:
            public_key.verify(base64.b64decode(cp["sig"], validate=True), canonical(body))
        except (InvalidSignature, ValueError):
            return f"checkpoint {label}'s signature does not verify (altered, or signed by another key)"
    return ""


def _number(cp: Mapping[str, Any]) -> int:
    """A checkpoint's number if it is a whole number above 0, else 0."""
    n = cp.get("checkpoint")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0


@dataclass
class LogReport:
    """What `verify_log` found."""

    entries: int = 0
    sources: int = 0
    checkpoints: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS
    problem: ChainProblem | None = None
    checkpoint_problem: str = ""
    signatures_checked: bool = False
    """False when no trusted key was given: then no checkpoint or head signature was checked."""
    head_no: int = 0
    """The signed head the log was compared with (0: none)."""
    missing: Missing | None = None
    first_checkpoint: int = 0
    """The number of the first checkpoint given (0: none): past 1 for a replica's copy begun after the earlier
    ones were trimmed from etcd (the first one held links to them; the log before it is proven by it)."""

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ok": self.ok, "entries": self.entries, "sources": self.sources, "checkpoints": self.checkpoints,
            "head_seq": self.head_seq, "head_hash": self.head_hash, "signatures_checked": self.signatures_checked,
            "signed_head": self.head_no, "first_checkpoint": self.first_checkpoint,
        }
        if self.missing is not None:
            out.update(self.missing.to_json())
        if self.problem is not None:
            out.update(first_bad_seq=self.problem.seq, first_bad_line=self.problem.line, problem=self.problem.reason)
        return out


def _parse_checkpoints(
    raw: Sequence[bytes | str], public_key: ed25519.Ed25519PublicKey | None
) -> tuple[list[dict[str, Any]], str]:
    """The checkpoints in order, verified (signature, numbering, previous-signature link); (good ones, problem).

    They are numbered on from the first: checkpoint 1 (no previous signature), or a later one that links to a
    previous signature (a copy begun after the earlier checkpoints were trimmed from etcd); either way none may
    be missing, added or altered after it."""
    out: list[dict[str, Any]] = []
    prev_sig = ""
    start = 1
    for n, line in enumerate(raw):
        i = start + n
        try:
            cp = json_depth.loads(line)
        except (ValueError, RecursionError):
            return out, f"checkpoint {i} is not valid JSON"
        problem = checkpoint_problem(cp, None, i)
        if problem:
            return out, problem
        if n == 0 and _number(cp) > 1 and isinstance(cp.get("prev_sig"), str) and cp["prev_sig"]:
            start = i = _number(cp)  # the chain as this copy holds it begins here: it links to what was trimmed
            prev_sig = cp["prev_sig"]
        if cp.get("checkpoint") != i:
            return out, f"checkpoint {i} is numbered {cp.get('checkpoint')!r}: a checkpoint was deleted or inserted"
        if cp.get("prev_sig") != prev_sig:
            return out, f"checkpoint {i} does not link to checkpoint {i - 1}'s signature (deleted or altered)"
        problem = checkpoint_problem(cp, public_key, i)
        if problem:
            return out, problem
        if out and cp.get("log_seq", 0) < int(out[-1].get("log_seq", 0)):
            return out, f"checkpoint {i} covers fewer entries than checkpoint {i - 1}"
        prev_sig = cp["sig"]
        out.append(cp)
    return out, ""


class _Numbered(Sequence[Mapping[str, Any]]):
    """A copy's checkpoints (verified, beginning at first > 1) as `compare_to_head` reads a list: position n - 1
    holds checkpoint n. Before first only first - 1 is known, by its signature (first's prev_sig); the others
    read as empty. Computed on access: first comes from the file, and a list padded to it could be any size."""

    def __init__(self, cps: Sequence[dict[str, Any]]) -> None:
        self._cps = cps
        self._first = _number(cps[0])

    def __len__(self) -> int:
        return self._first + len(self._cps) - 1

    @overload
    def __getitem__(self, index: int) -> Mapping[str, Any]: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Mapping[str, Any]]: ...
    def __getitem__(self, index: int | slice) -> Mapping[str, Any] | Sequence[Mapping[str, Any]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        if index >= self._first - 1:
            return self._cps[index - self._first + 1]
        return {"sig": self._cps[0].get("prev_sig")} if index == self._first - 2 else {}


def _as_numbered(
    head: Mapping[str, Any], cps: Sequence[dict[str, Any]]
) -> tuple[Mapping[str, Any], Sequence[Mapping[str, Any]]]:
    """(head, checkpoints) as `compare_to_head` reads them, for a copy whose checkpoints begin at first > 1
    (`_Numbered`): a head naming first - 1 is still compared with first's link to it. A head older than that
    names a checkpoint this copy never held: its entries are still compared, its checkpoint cannot be (the
    later ones held cover at least as much of the log)."""
    if not cps or _number(cps[0]) <= 1:
        return head, cps
    if int(head["checkpoints"]) < _number(cps[0]) - 1:
        head = {**head, "checkpoints": 0}
    return head, _Numbered(cps)


def verify_log(
    lines: Iterable[bytes | str],
    checkpoints: Sequence[bytes | str] = (),
    public_key: ed25519.Ed25519PublicKey | None = None,
    head: Mapping[str, Any] | None = None,
) -> LogReport:
    """Verify the log's chain, each source's chain inside it, the checkpoints against both, and (given a
    signed head, already verified) that nothing the head covers is missing: a cut tail, or trailing checkpoints
    removed with their entries, is named by the seqs and checkpoint numbers that are gone.

    Names the first bad entry: changed (hash mismatch), deleted (seq gap), inserted or reordered (broken link),
    a broken source chain, a log shorter than a signed checkpoint (truncated), or a log whose hash at a
    checkpointed seq differs from the signed head (rewritten: a re-hashed fork).
    """
    report = LogReport(signatures_checked=public_key is not None)
    cps, cp_problem = _parse_checkpoints(checkpoints, public_key)
    report.checkpoints = len(cps)
    report.first_checkpoint = _number(cps[0]) if cps else 0
    wanted: dict[int, Any] = {int(cp.get("log_seq", 0)): cp for cp in cps}
    if head is not None:
        report.head_no = int(head["head_no"])
        wanted.setdefault(int(head["log_seq"]), head)
    seen_heads: dict[int, str] = {}
    state = ChainState()
    sources: dict[str, ChainState] = {}
    for n, raw in enumerate(lines, 1):
        try:
            entry = json_depth.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than json reads
            report.problem = ChainProblem(n, state.next_seq, "not valid JSON (changed or torn)")
            break
        problem = check_link(entry, state, n)
        if problem is not None:
            report.problem = problem
            break
        seq = entry["seq"]
        source, record = entry.get("source"), entry.get("record")
        if not isinstance(source, str) or not isinstance(record, dict):
            report.problem = ChainProblem(n, seq, "entry has no source or record")
            break
        src_state = sources.get(source)
        if src_state is None:
            # A source's chain may begin past 1 when the control plane first heard of it mid-chain.
            first = record.get("seq")
            src_state = ChainState(
                next_seq=first if isinstance(first, int) else 1,
                prev=record.get("prev") if isinstance(record.get("prev"), str) else GENESIS,  # type: ignore[arg-type]
            )
            sources[source] = src_state
        inner = check_link(record, src_state, n)
        if inner is not None:
            report.problem = ChainProblem(n, seq, f"source {source} record {record.get('seq')}: {inner.reason}")
            break
        if seq in wanted:
            seen_heads[seq] = entry["hash"]
    report.entries = state.count
    report.sources = len(sources)
    report.head_seq = state.next_seq - 1
    report.head_hash = state.prev
    if report.problem is not None:
        return report
    if head is not None and not cp_problem:
        at = int(head["log_seq"])
        compared, numbered = _as_numbered(head, cps)
        missing = compare_to_head(compared, report.head_seq, seen_heads.get(at, GENESIS if at == 0 else None),
                                  numbered)
        if missing is not None:
            report.missing = missing
            report.problem = ChainProblem(report.entries + 1 if missing.last_seq else 0,
                                          missing.first_seq or report.head_seq + 1, missing.problem)
            return report
    if cp_problem:
        report.checkpoint_problem = cp_problem
        report.problem = ChainProblem(0, report.head_seq + 1, cp_problem)
        return report
    last_good = 0
    for cp in cps:
        log_seq = int(cp.get("log_seq", 0))
        if log_seq > report.head_seq:
            report.problem = ChainProblem(
                report.entries + 1, report.head_seq + 1,
                f"truncated: the log ends at seq {report.head_seq} but checkpoint {cp['checkpoint']} covers "
                f"seq {log_seq}",
            )
            return report
        if log_seq and seen_heads.get(log_seq) != cp.get("head"):
            report.problem = ChainProblem(
                0, last_good + 1,
                f"rewritten: the log's hash at seq {log_seq} differs from signed checkpoint {cp['checkpoint']} "
                f"(entries {last_good + 1}..{log_seq} were re-hashed)",
            )
            return report
        last_good = log_seq
    return report

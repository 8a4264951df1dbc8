"""The root CA and its rotation state, shared by every control-plane replica through etcd.

A rotation step changes the CA while the mesh runs (`hivemesh.controlplane.ca_rotation`), on whichever replica the
operator reached; every other replica must trust the same roots and sign with the same root within a second or
two, without a restart. So the CA files a rotation manages (`ca.pem` bundle, `ca.key`, `ca-next.*`, `ca-prev.*`,
`rotation.json`) live in one etcd document, `keyspace.CONTROLPLANE_CA`, the way the token signing keys do
(`hivemesh.controlplane.shared_keys`, where the choice of etcd over a shared folder is argued): only etcd root reads
it (no workload role covers it, `hivemesh.mesh.etcd_roles`), and every write is a compare-and-swap on its mod
revision, so two operators racing one step cannot both win. The cost: etcd and its backups hold the CA key.

Each replica's certs folder is its local cache of the document (files rewritten atomically when it changes), so
`load_ca`, `CaRotation` and the CLI keep reading files. The folder's own files (`controlplane.*`, `operator.*`)
are not shared: each replica re-issues them from the signing root in force (`follow_local`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from hivemesh.controlplane.ca import (
    CaFiles,
    CertificateAuthority,
    _write_atomic,
    ensure_controlplane_cert,
    load_ca,
)
from hivemesh.controlplane.ca_rotation import CaRotation
from hivemesh.mesh import json_depth
from hivemesh.mesh.errors import FailedPreconditionError
from hivemesh.mesh.keyspace import CONTROLPLANE_CA
from hivemesh.mesh.trustdoc import fingerprint

log = logging.getLogger(__name__)

_KEY: Final = CONTROLPLANE_CA.encode()
FILES: Final = {
    "ca.pem": 0o644, "ca.key": 0o600, "ca-next.pem": 0o644, "ca-next.key": 0o600,
    "ca-prev.pem": 0o644, "ca-prev.key": 0o600, "rotation.json": 0o644,
}
"""The files the document holds (name -> mode in the folder)."""
_RETIRED_KEPT: Final = 32


class CaRotationRaceError(FailedPreconditionError):
    """The shared CA changed between reading it and writing the step's result: another replica ran a step."""

    reason = "CA_ROTATION_RACED"
    default_message = "the CA rotation changed on another control-plane replica while this step ran"


Files = dict[str, str]


def snapshot(certs_dir: Path) -> Files:
    """The rotation-managed files present in certs_dir (name -> text)."""
    out: Files = {}
    for name in FILES:
        with contextlib.suppress(FileNotFoundError):
            out[name] = (Path(certs_dir) / name).read_text()
    return out


def mirror(files: Files, certs_dir: Path) -> bool:
    """Make certs_dir hold exactly files among the managed ones (atomic writes, keys 0600); True if any changed.

    Keys first, the bundle and state last, so a reader never sees a bundle whose signing key is not there yet.
    """
    d = Path(certs_dir)
    changed = False
    for name in sorted(FILES, key=lambda n: (not n.endswith(".key"), n == "rotation.json", n)):
        path = d / name
        if name in files:
            try:
                same = path.read_text() == files[name]
            except OSError:
                same = False
            if not same:
                _write_atomic(path, files[name].encode(), FILES[name])
                changed = True
        elif path.exists():
            path.unlink(missing_ok=True)
            changed = True
    return changed


def roots_of(files: Files) -> list[str]:
    """Fingerprints of every root the files hold (the bundle's, then the prepared and retiring ones)."""
    out: list[str] = []
    for name in ("ca.pem", "ca-next.pem", "ca-prev.pem"):
        if name in files:
            for cert in x509.load_pem_x509_certificates(files[name].encode()):
                if fingerprint(cert) not in out:
                    out.append(fingerprint(cert))
    return out


def _signing_root(files: Files) -> str:
    return fingerprint(x509.load_pem_x509_certificates(files["ca.pem"].encode())[0])


def _encode(files: Files, retired: Sequence[str]) -> bytes:
    return json.dumps({"files": files, "retired": list(retired)[-_RETIRED_KEPT:]}, sort_keys=True).encode()


def _parse(raw: bytes) -> tuple[Files, list[str]]:
    try:
        doc = json_depth.loads(raw)
        files = {str(k): str(v) for k, v in doc["files"].items() if k in FILES}
        if "ca.pem" not in files or "ca.key" not in files:
            raise ValueError("no ca.pem / ca.key")
        return files, [str(r) for r in doc.get("retired", [])]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FailedPreconditionError(f"the shared CA in etcd ({CONTROLPLANE_CA}) is unreadable: {exc!r}") from None


async def load(etcd: Any, certs_dir: Path) -> int:
    """Bring certs_dir in line with the shared CA at start; returns the document's mod revision.

    The first replica ever publishes its folder's CA (a single control plane upgraded keeps its CA). A folder whose
    signing root the document knows (a root of it, or one a finished rotation retired: a replica restarted with
    a stale Secret) adopts the document. A folder with a root the document never held is a new CA (`hivemesh
    certs init --force`): it replaces the shared one, as it replaced a lone control plane's before.
    """
    local = snapshot(certs_dir)
    t = etcd.transactions
    got = await etcd.get(_KEY)
    if got is None:
        ok, responses = await etcd.transaction(
            compare=[t.version(_KEY) == 0], success=[t.put(_KEY, _encode(local, ()))], failure=[],
        )
        if ok:
            log.info("published the CA (%s) for every control-plane replica", _signing_root(local)[:16])
            return int(responses[0].response_put.header.revision)
        got = await etcd.get(_KEY)
        if got is None:
            raise FailedPreconditionError(f"{CONTROLPLANE_CA} vanished while starting; start again")
    files, retired = _parse(got.value)
    if _signing_root(local) in {*roots_of(files), *retired}:
        if mirror(files, certs_dir):
            log.info("adopted the shared CA state (signing root %s) into %s", _signing_root(files)[:16], certs_dir)
        return int(got.mod_revision)
    log.warning("the CA in %s (root %s) is not the mesh's (root %s): it replaces the shared CA for every replica",
                certs_dir, _signing_root(local)[:16], _signing_root(files)[:16])
    ok, responses = await etcd.transaction(
        compare=[t.mod(_KEY) == int(got.mod_revision)], success=[t.put(_KEY, _encode(local, ()))], failure=[],
    )
    if not ok:
        raise FailedPreconditionError(f"{CONTROLPLANE_CA} changed while starting; start again")
    return int(responses[0].response_put.header.revision)


async def refresh(etcd: Any, certs_dir: Path, seen_revision: int) -> int | None:
    """Mirror the document into certs_dir when it changed since seen_revision: its new revision, else None."""
    got = await etcd.get(_KEY)
    if got is None or int(got.mod_revision) == seen_revision:
        return None
    files, _ = _parse(got.value)
    mirror(files, certs_dir)
    return int(got.mod_revision)


def _run_step(files: Files, work_dir: Path, name: str) -> Files:
    mirror(files, work_dir)
    CaRotation(work_dir).step(name)
    return snapshot(work_dir)


async def step(etcd: Any, certs_dir: Path, name: str, *, revision: int) -> int:
    """Run one rotation step on the shared CA as of revision (what the caller checked, e.g. for stragglers), then
    compare-and-swap the result in; mirror it into certs_dir. Returns the new revision.

    The step runs on a scratch copy inside certs_dir, so nothing in the folder changes unless etcd took the
    result. CaRotationRaceError when the document moved past revision (another replica ran a step);
    FailedPreconditionError (from the step) when the step is out of order.
    """
    got = await etcd.get(_KEY)
    if got is None or int(got.mod_revision) != revision:
        raise CaRotationRaceError(
            f"cannot {name}: the CA rotation changed on another control-plane replica meanwhile; check "
            "`hivemesh ca status` and run the step again if it is still due"
        )
    files, retired = _parse(got.value)
    with tempfile.TemporaryDirectory(prefix=".rotation-", dir=certs_dir) as scratch:
        new = await asyncio.to_thread(_run_step, files, Path(scratch), name)
    dropped = [r for r in roots_of(files) if r not in roots_of(new)]
    t = etcd.transactions
    ok, responses = await etcd.transaction(
        compare=[t.mod(_KEY) == revision], success=[t.put(_KEY, _encode(new, [*retired, *dropped]))], failure=[],
    )
    if not ok:
        raise CaRotationRaceError(
            f"cannot {name}: another control-plane replica ran a CA rotation step at the same time and won; check "
            "`hivemesh ca status` and run the step again if it is still due"
        )
    mirror(new, certs_dir)
    return int(responses[0].response_put.header.revision)


def _issued_by(cert_path: Path, root: x509.Certificate) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        pub = root.public_key()
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
        return True
    except (OSError, ValueError, InvalidSignature):
        return False


@contextlib.contextmanager
def _reissue_lock(certs_dir: Path) -> Iterator[None]:
    """Serialise re-issues among processes sharing one folder (replicas on one host), so two replicas writing a
    key and a certificate at once cannot leave one's key beside the other's certificate."""
    fd = os.open(Path(certs_dir) / ".reissue.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def follow_local(certs_dir: Path, hosts: Sequence[str]) -> tuple[CertificateAuthority, tuple[bytes, bytes]]:
    """The CA now in certs_dir and the control plane's (certificate, key) PEMs, with this folder's own
    certificates (the control plane's, for hosts, and the operator's, when present) issued by its signing root,
    so they stay valid once the old root is dropped."""
    with _reissue_lock(certs_dir):
        ca = load_ca(certs_dir)
        ensure_controlplane_cert(ca, certs_dir, hosts=hosts)
        files = CaFiles.in_dir(Path(certs_dir))
        if files.operator_cert.exists() and not _issued_by(files.operator_cert, ca.certificate):
            op_cert, op_key = ca.issue_operator_cert()
            _write_atomic(files.operator_key, op_key, 0o600)
            _write_atomic(files.operator_cert, op_cert, 0o644)
            log.info("re-issued the operator certificate in %s from the signing root", certs_dir)
        return ca, (files.controlplane_cert.read_bytes(), files.controlplane_key.read_bytes())

"""A workload's identity kept in its state folder, so a restart needs no new join token.

    <HIVEMESH_HOME>/identity/<kind>-<name>/    0700, owned by the workload's user
        key.pem      0600  the private key (it never leaves this folder)
        cert.pem           the current certificate (rewritten at every renewal)
        bundle.pem         the trust bundle the workload verifies peers with (follows CA rotations)
        .identity-commit   only while a save renames its staged files (.<name>.tmp) into place; a load
                           finds it after a crash and finishes the save (`tls.finish_save`)
        trust-floor.json   the newest trust bundle generation and key set issue time adopted: a restarted
                           node takes nothing older from etcd (`TrustFloor`)

A join writes the folder; every renewal and trust-bundle change rewrites it. On restart the node reuses it and
renews at once while the certificate is still valid; only an expired certificate, a revoked identity or one
from a CA the mesh no longer trusts needs a new join token, and the error says which. Like ssh with its keys,
a folder or key that other users could read, or that another user owns, is refused rather than used.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from hivemesh.mesh import json_depth
from hivemesh.mesh.errors import JoinTokenRequiredError, StoredIdentityMismatchError
from hivemesh.mesh.pki import load_certs
from hivemesh.mesh.tls import Workload, finish_save, save_pending
from hivemesh.mesh.trustdoc import fingerprint, issued_by

log = logging.getLogger(__name__)

_LOCK = ".lock"
_FLOOR_MAX_BYTES: Final = 4096
"""A kept trust floor is ~60 bytes: a larger file is not one, and is not read further."""
_INT64_MAX: Final = 2**63 - 1
"""The range of a bundle generation (int64, as CaStatusResponse carries it) and of a key set's ns issue time."""
_JWKS_AHEAD_NS: Final = 24 * 3600 * 10**9
"""A kept key set issue time further ahead of this clock than this was never adopted: as a floor it would refuse
every key set the control plane publishes, and the node could not start."""


def join_hint(kind: str, name: str) -> str:
    """What to do when a workload needs a new join token."""
    return (f"ask an operator for a new join token (hivemesh join-token {name} --kind {kind}) "
            "and set HIVEMESH_JOIN_TOKEN")


@dataclass(frozen=True)
class TrustFloor:
    """What a node adopted last from etcd's signed trust documents: it never takes an older one, across restarts
    too. Kept in memory only, a restart forgot it, and anyone able to write etcd could replay an older signed
    bundle (one still trusting a retired root) or key set to a node while it restarted."""

    bundle_generation: int = 0
    jwks_issued_at_ns: int = 0


@dataclass(frozen=True)
class IdentityStore:
    """The identity folder of one workload (kind, name) under root (`<state folder>/identity`)."""

    root: Path
    name: str
    kind: str
    trust_domain: str

    @property
    def folder(self) -> Path:
        return self.root / f"{self.kind}-{self.name}"

    @property
    def key_path(self) -> Path:
        return self.folder / "key.pem"

    @property
    def cert_path(self) -> Path:
        return self.folder / "cert.pem"

    @property
    def bundle_path(self) -> Path:
        return self.folder / "bundle.pem"

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.trust_domain}/{self.kind}/{self.name}"

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        """Processes sharing a state folder (replicas of one agent) never read half of a renewal."""
        fd = os.open(self.folder / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _check_private(self) -> None:
        """Refuse a folder or key that another user owns or could read: someone else's key is not ours."""
        for path, what in ((self.folder, "folder"), (self.key_path, "private key")):
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                raise JoinTokenRequiredError(f"the identity {what} {path} is a symbolic link; refusing to use it")
            if st.st_uid != os.geteuid():
                raise JoinTokenRequiredError(
                    f"the identity {what} {path} belongs to uid {st.st_uid}, not to this process (uid "
                    f"{os.geteuid()}); refusing to use it"
                )
            if st.st_mode & 0o077:
                want = "0700" if what == "folder" else "0600"
                raise JoinTokenRequiredError(
                    f"the identity {what} {path} is open to other users (mode {stat.S_IMODE(st.st_mode):04o}); "
                    f"refusing to use it: chmod {want} it, or remove {self.folder} and join again"
                )

    def load(self, trusted_bundle_pem: bytes, *, now: float | None = None) -> Workload | None:
        """The stored identity, or None when nothing is stored.

        Raises StoredIdentityMismatchError when it names another workload, and JoinTokenRequiredError (saying
        why) when it cannot be used: unreadable, open to other users, expired, or issued by a CA that
        trusted_bundle_pem (the mesh's current trust anchor) shares no root with.
        """
        if save_pending(self.key_path):  # a save cut short by a crash: finish it first
            with self._locked(exclusive=True):
                finish_save(self.key_path)
        if not self.key_path.exists() and not self.cert_path.exists():
            return None
        self._check_private()
        with self._locked(exclusive=False):
            try:
                workload = Workload.from_pems(
                    self.cert_path.read_bytes(), self.key_path.read_bytes(), self.bundle_path.read_bytes()
                )
            except (OSError, ValueError) as exc:
                raise JoinTokenRequiredError(
                    f"the identity stored in {self.folder} is unusable ({exc}): {join_hint(self.kind, self.name)}"
                ) from None
        if workload.spiffe_id != self.spiffe_id:
            raise StoredIdentityMismatchError(
                f"the identity stored in {self.folder} is {workload.spiffe_id}, not {self.spiffe_id} that this "
                "workload asks for: give each workload its own state folder (HIVEMESH_HOME), or remove that "
                "folder and join with a join token",
                metadata={"stored": workload.spiffe_id, "requested": self.spiffe_id},
            )
        at = time.time() if now is None else now
        if workload.expires_at <= at:
            raise JoinTokenRequiredError(
                f"the stored certificate of {self.spiffe_id} ({self.cert_path}) expired at "
                f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(workload.expires_at))}, so it cannot be "
                f"renewed: {join_hint(self.kind, self.name)}",
                metadata={"spiffe_id": self.spiffe_id, "expired_at_unix": str(int(workload.expires_at))},
            )
        stored_roots = load_certs(workload.bundle_pem)
        trusted = {fingerprint(c) for c in load_certs(trusted_bundle_pem)}
        if not any(fingerprint(c) in trusted for c in stored_roots) or not any(
            issued_by(workload.cert_pem, c) for c in stored_roots
        ):
            raise JoinTokenRequiredError(
                f"the identity stored in {self.folder} was issued by a CA this mesh does not trust (none of its "
                f"roots is in the trust bundle HIVEMESH_CA): {join_hint(self.kind, self.name)}"
            )
        return workload

    @property
    def floor_path(self) -> Path:
        return self.folder / "trust-floor.json"

    def load_floor(self, *, now_ns: int | None = None) -> TrustFloor:
        """The floor kept here (zeros when none was kept). Never raises: the node must start whatever the file holds.

        A damaged or altered file is checked field by field: a field that is not a whole number in range (another
        type, negative, past int64, a key set issue time over a day ahead of this clock) is logged and read as 0
        and the other field kept, so a readable bundle generation still refuses older bundles. A field read as 0
        loses only the replay check, until the node adopts etcd's current document (signatures still hold)."""
        try:  # non-blocking: a FIFO put in its place must not hang the start
            fd = os.open(self.floor_path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            return TrustFloor()
        except OSError as exc:
            return self._damaged_floor(f"unreadable: {exc}")
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return self._damaged_floor("not a regular file")
            raw = os.read(fd, _FLOOR_MAX_BYTES + 1)
        except OSError as exc:
            return self._damaged_floor(f"unreadable: {exc}")
        finally:
            os.close(fd)
        if len(raw) > _FLOOR_MAX_BYTES:
            return self._damaged_floor(f"larger than {_FLOOR_MAX_BYTES} bytes")
        try:
            doc = json_depth.loads(raw)
        except (ValueError, RecursionError) as exc:  # RecursionError: '[' nested thousands deep
            return self._damaged_floor(f"not JSON: {type(exc).__name__}: {str(exc)[:100]}")
        if not isinstance(doc, dict):
            return self._damaged_floor(f"a JSON {type(doc).__name__}, not an object")
        at = time.time_ns() if now_ns is None else now_ns
        tops = {"bundle_generation": _INT64_MAX, "jwks_issued_at_ns": min(_INT64_MAX, at + _JWKS_AHEAD_NS)}
        kept: dict[str, int] = {}
        bad = []
        for name, top in tops.items():
            value = doc.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= top:
                kept[name] = value
            else:
                kept[name] = 0
                bad.append(f"{name}={_describe(value)}")
        if bad:
            self._damaged_floor(", ".join(bad), kept)
        return TrustFloor(kept["bundle_generation"], kept["jwks_issued_at_ns"])

    def _damaged_floor(self, why: str, kept: dict[str, int] | None = None) -> TrustFloor:
        """Log a damaged floor file once, saying what is lost; what is still read is kept (else zeros)."""
        floor = TrustFloor(**(kept or {}))
        log.error("the trust floor %s is damaged (%s): reading %s; until this node adopts etcd's current trust "
                  "documents it cannot refuse an older (replayed) one for the fields read as 0. It is rewritten at "
                  "the next adoption", self.floor_path, why, floor)
        return floor

    def save_floor(self, floor: TrustFloor) -> None:
        """Keep floor; a failure is logged, never fatal. Under the folder's lock, never lower than what is kept
        (replicas sharing the folder, one of them behind), each field the higher; written to a temporary file of
        its own and synced before the rename, so a crash or power loss leaves the old floor or the new one."""
        if not self.folder.is_dir():
            return
        try:
            with self._locked(exclusive=True):
                kept = self.load_floor()
                merged = TrustFloor(max(floor.bundle_generation, kept.bundle_generation),
                                    max(floor.jwks_issued_at_ns, kept.jwks_issued_at_ns))
                if merged == kept and self.floor_path.is_file():
                    return
                fd, tmp = tempfile.mkstemp(prefix=".trust-floor.", suffix=".tmp", dir=self.folder)
                try:
                    with os.fdopen(fd, "wb") as out:
                        out.write(json.dumps({"bundle_generation": merged.bundle_generation,
                                              "jwks_issued_at_ns": merged.jwks_issued_at_ns}).encode())
                        out.flush()
                        os.fsync(out.fileno())
                    os.replace(tmp, self.floor_path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
        except OSError as exc:
            log.error("cannot keep the trust floor in %s: %s", self.floor_path, exc)

    def save(self, workload: Workload) -> None:
        """Write the identity (folder 0700, key 0600), each file replaced atomically, under the folder lock."""
        if workload.spiffe_id != self.spiffe_id:
            raise ValueError(f"refusing to store {workload.spiffe_id} as {self.spiffe_id}")
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.folder, 0o700)  # mkdir's mode is masked by the umask, and an older folder may be wider
        with self._locked(exclusive=True):
            workload.save(self.cert_path, self.key_path, self.bundle_path)


def _describe(value: Any) -> str:
    """A field's value for the log, short whatever it is (never a repr of a nested or huge value)."""
    if value is None:
        return "missing or null"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, bool | int | float):
        return repr(value)
    if isinstance(value, str):
        return repr(value[:40])
    return f"a JSON {type(value).__name__}"


__all__ = ["IdentityStore", "TrustFloor", "join_hint"]

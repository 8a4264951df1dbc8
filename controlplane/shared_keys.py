"""The token signing keys every control-plane replica signs with, held in etcd under a key only root reads.

Why etcd and not a shared state folder: the keys change at run time (a rotation adds one, retirement removes
one), and a Kubernetes Secret mounted as a folder is read-only, while a writable shared volume would need file
locking across hosts. etcd already carries the mesh's shared state, orders writes (compare-and-swap on the
document's mod revision) and is reached by the control plane as root over mutual TLS; `keyspace.CONTROLPLANE_KEYS`
lies outside every prefix a workload role may read (`hivemesh.mesh.etcd_roles`). Protect etcd's data and backups
as you would the CA key (docs/controlplane.md).

The replica's `<state_dir>/keys/` stays the format `SigningKeys` reads: it is a mirror of the etcd document,
rewritten whenever the document changes, so a token issued by any replica verifies everywhere.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from hivemesh.controlplane.issuer import SigningKey, SigningKeys
from hivemesh.mesh import json_depth
from hivemesh.mesh.errors import FailedPreconditionError
from hivemesh.mesh.files import write_atomic
from hivemesh.mesh.keyspace import CONTROLPLANE_KEYS

log = logging.getLogger(__name__)

_KEY = CONTROLPLANE_KEYS.encode()
_CAS_TRIES = 10


def _entry(key: SigningKey) -> dict[str, Any]:
    pem = key.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    created_ns = int(key.path.name[len("es256-"):-len(".pem")]) if key.path is not None else int(key.created_at * 1e9)
    return {"kid": key.kid, "created_ns": created_ns, "activates_at": key.activates_at, "pem": pem.decode()}


def document(keys: SigningKeys) -> dict[str, dict[str, Any]]:
    """The keys as the etcd document holds them: kid -> entry (private PEM, creation, activation)."""
    return {k.kid: _entry(k) for k in keys.every}


def _parse(raw: bytes) -> dict[str, dict[str, Any]]:
    try:
        doc = json_depth.loads(raw)
        parsed = {str(e["kid"]): e for e in doc["keys"]}
        if not parsed:
            raise ValueError("no keys")  # a replica must never sign with a key only it holds
        return parsed
    except (ValueError, KeyError, TypeError) as exc:
        raise FailedPreconditionError(f"the shared signing keys in etcd ({CONTROLPLANE_KEYS}) are unreadable: "
                                      f"{exc!r}") from None


def _encode(entries: dict[str, dict[str, Any]]) -> bytes:
    return json.dumps({"keys": sorted(entries.values(), key=lambda e: e["created_ns"])}, sort_keys=True).encode()


def mirror(entries: dict[str, dict[str, Any]], state_dir: Path) -> SigningKeys:
    """Make `<state_dir>/keys/` hold exactly entries (files 0600, schedule.json) and load it."""
    keys_dir = Path(state_dir) / "keys"
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    wanted = {f"es256-{int(e['created_ns'])}.pem": e for e in entries.values()}
    for path in keys_dir.glob("es256-*.pem"):
        if path.name not in wanted:
            path.unlink(missing_ok=True)
    for name, e in wanted.items():
        path = keys_dir / name
        if path.exists():
            continue
        write_atomic(path, str(e["pem"]).encode(), 0o600)
    schedule = {kid: float(e["activates_at"]) for kid, e in entries.items()}
    tmp = keys_dir / ".schedule.json.tmp"
    tmp.write_text(json.dumps(schedule, sort_keys=True))
    os.replace(tmp, keys_dir / "schedule.json")
    return SigningKeys.load_or_create(state_dir)


async def load(etcd: Any, state_dir: Path) -> tuple[SigningKeys, int]:
    """The shared keys (and the document's mod revision), mirrored into state_dir.

    The first replica ever to start publishes the keys it finds in its state folder (a single control plane's,
    upgraded) or a new one; a replica losing that race adopts the winner's.
    """
    got = await etcd.get(_KEY)
    if got is None:
        local = SigningKeys.load_or_create(state_dir)
        t = etcd.transactions
        ok, responses = await etcd.transaction(
            compare=[t.version(_KEY) == 0],
            success=[t.put(_KEY, _encode(document(local)))],
            failure=[t.get(_KEY)],
        )
        if ok:
            log.info("published %d token signing key(s) for every control-plane replica", len(document(local)))
            return local, int(responses[0].response_put.header.revision)
        got = await etcd.get(_KEY)
        if got is None:
            raise FailedPreconditionError(f"{CONTROLPLANE_KEYS} vanished while starting; start again")
    return mirror(_parse(got.value), state_dir), int(got.mod_revision)


async def refresh(etcd: Any, state_dir: Path, seen_revision: int) -> tuple[SigningKeys, int] | None:
    """The shared keys again when the document changed since seen_revision; None when it did not."""
    got = await etcd.get(_KEY)
    if got is None or int(got.mod_revision) == seen_revision:
        return None
    return mirror(_parse(got.value), state_dir), int(got.mod_revision)


async def update(etcd: Any, add: SigningKey | None = None, drop: tuple[str, ...] = (),
                 fence: list[Any] | None = None) -> int:
    """Add a key to and/or drop kids from the shared document (compare-and-swap, retried on a concurrent
    change); fence: extra compares (a leader's term). Returns the new mod revision (0: the fence failed)."""
    t = etcd.transactions
    for _ in range(_CAS_TRIES):
        got = await etcd.get(_KEY)
        entries = _parse(got.value) if got is not None else {}
        if add is not None:
            entries[add.kid] = _entry(add)
        for kid in drop:
            entries.pop(kid, None)
        compare = [t.mod(_KEY) == int(got.mod_revision)] if got is not None else [t.version(_KEY) == 0]
        ok, responses = await etcd.transaction(
            compare=[*compare, *(fence or [])], success=[t.put(_KEY, _encode(entries))], failure=[],
        )
        if ok:
            return int(responses[0].response_put.header.revision)
        if fence and not await _fence_holds(etcd, fence):
            return 0
    raise FailedPreconditionError(f"{CONTROLPLANE_KEYS} kept changing; try again")


async def _fence_holds(etcd: Any, fence: list[Any]) -> bool:
    ok, _ = await etcd.transaction(compare=fence, success=[], failure=[])
    return bool(ok)

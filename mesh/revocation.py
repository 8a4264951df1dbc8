"""Token revocation: entries in etcd under /hivemesh/revoked/, mirrored into every node's RevocationList.

    /hivemesh/revoked/jti/<jti>            one token
    /hivemesh/revoked/sub/<sha256(id)>     every token naming the SPIFFE id (principal or actor) issued until then

Each entry lives under an etcd lease at least as long as any token it covers can live (the longest token
lifetime plus the verifiers' clock leeway); a subject's at least as long as any credential it holds could get it
new ones (its certificates, unused join tokens minted for it: the control plane refuses those only while the entry
lasts; `hivemesh.controlplane.trust_service.subject_ttl_s`). So the list stays small: it only ever holds
revocations that still matter. Nodes watch the prefix (`PrefixCache`, ~1 ms delivery on loopback) and swap the
in-memory list the verifier consults on every call, so a revocation takes effect everywhere within a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from hivemesh.mesh import json_depth
from hivemesh.mesh.etcd import PREFIX, Endpoints
from hivemesh.mesh.tokens import RevocationList
from hivemesh.mesh.watch import PrefixCache, WatchOptions

log = logging.getLogger(__name__)

REVOKED_PREFIX: Final = PREFIX + "revoked/"
_JTI: Final = REVOKED_PREFIX + "jti/"
_SUB: Final = REVOKED_PREFIX + "sub/"


@dataclass(frozen=True)
class Revocation:
    """One revocation entry."""

    jti: str = ""
    subject: str = ""
    revoked_at: float = 0.0
    expires_at: float = 0.0
    by: str = ""
    note: str = ""

    def key(self) -> str:
        if self.jti:
            return _JTI + self.jti
        return _SUB + hashlib.sha256(self.subject.encode()).hexdigest()

    def to_json(self) -> bytes:
        doc = {"jti": self.jti, "subject": self.subject, "revoked_at": self.revoked_at,
               "expires_at": self.expires_at, "by": self.by, "note": self.note}
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_json(cls, value: bytes) -> Revocation:
        doc = json_depth.loads(value)
        if not isinstance(doc, dict):
            raise ValueError("a revocation must be a JSON object")
        rev = cls(
            jti=str(doc.get("jti", "")), subject=str(doc.get("subject", "")),
            revoked_at=float(doc.get("revoked_at", 0)), expires_at=float(doc.get("expires_at", 0)),
            by=str(doc.get("by", "")), note=str(doc.get("note", "")),
        )
        if bool(rev.jti) == bool(rev.subject):
            raise ValueError("a revocation names exactly one of jti or subject")
        return rev


async def revoke(etcd: Any, rev: Revocation, ttl_s: int) -> None:
    """Store rev under a lease of ttl_s (it disappears once nothing it covers can still be valid)."""
    lease = await etcd.lease(max(int(ttl_s), 1))
    await etcd.put(rev.key().encode(), rev.to_json(), lease=lease)


async def list_revocations(etcd: Any) -> list[Revocation]:
    out: list[Revocation] = []
    for kv in await etcd.get_prefix(REVOKED_PREFIX.encode()):
        try:
            out.append(Revocation.from_json(kv.value))
        except (ValueError, TypeError):
            log.warning("ignoring an invalid revocation at %s", kv.key.decode(errors="replace"))
    return sorted(out, key=lambda r: r.revoked_at)


async def subject_revoked(etcd: Any, subject: str) -> Revocation | None:
    """The revocation of subject still in force, if any (the control plane refuses it new tokens meanwhile)."""
    kv = await etcd.get(Revocation(subject=subject).key().encode())
    if kv is None:
        return None
    try:
        return Revocation.from_json(kv.value)
    except (ValueError, TypeError):
        return None


async def any_revoked(etcd: Any, jti: str, identities: Sequence[str]) -> Revocation | None:
    """The revocation covering a token (by jti, or any identity of its chain), if any, read from etcd."""
    kv = await etcd.get(Revocation(jti=jti).key().encode()) if jti else None
    if kv is not None:
        try:
            return Revocation.from_json(kv.value)
        except (ValueError, TypeError):
            pass
    for ident in identities:
        found = await subject_revoked(etcd, ident)
        if found is not None:
            return found
    return None


def _decode(_key: bytes, value: bytes) -> Revocation:
    return Revocation.from_json(value)


class RevocationWatch:
    """Keeps a RevocationList in sync with etcd (the verifier reads the list; this task writes it)."""

    def __init__(
        self, etcd_endpoints: Endpoints, revocations: RevocationList, *, options: WatchOptions | None = None
    ) -> None:
        self.revocations = revocations
        self._cache: PrefixCache[Revocation] = PrefixCache(
            etcd_endpoints, REVOKED_PREFIX, decode=_decode, on_change=self._apply, options=options
        )

    def _apply(self) -> None:
        self.apply(self._cache.snapshot())

    def apply(self, snapshot: Mapping[str, Revocation]) -> None:
        jtis = [r.jti for r in snapshot.values() if r.jti]
        subjects: dict[str, float] = {}
        for r in snapshot.values():
            if r.subject:
                subjects[r.subject] = max(subjects.get(r.subject, 0.0), r.revoked_at)
        self.revocations.replace(jtis, subjects)

    async def start(self, timeout: float = 10.0) -> None:
        await self._cache.start(timeout)
        self._apply()

    async def stop(self) -> None:
        await self._cache.stop()

    @property
    def loaded(self) -> bool:
        return self._cache.loaded

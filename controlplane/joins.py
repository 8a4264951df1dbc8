"""One-time join tokens: how a workload with no certificate yet earns its first one.

Only the SHA-256 of a token is stored (`/hivemesh/join/<hex>`), under an etcd lease of the token's TTL, so
a leaked etcd snapshot yields no usable token and unused tokens disappear by themselves. Consuming is a
compare-and-delete transaction on the key's mod_revision: of two concurrent uses, exactly one wins.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Final

from hivemesh.mesh import json_depth
from hivemesh.mesh.errors import InvalidInputError, JoinTokenInvalidError
from hivemesh.mesh.pki import validate_name

JOIN_PREFIX: Final = b"/hivemesh/join/"
JOIN_KINDS: Final = frozenset({"agent", "client"})
DEFAULT_TTL_S: Final = 600
MAX_TTL_S: Final = 7 * 86400
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{32,128}")


def _key(token: str) -> bytes:
    return JOIN_PREFIX + hashlib.sha256(token.encode("ascii")).hexdigest().encode("ascii")


def validate_request(name: str, kind: str, ttl_s: int) -> None:
    """InvalidInputError naming the bad field when a join token could not be created for these values."""
    try:
        validate_name(name)
    except ValueError as exc:
        raise InvalidInputError(str(exc), field_violations={"name": str(exc)}) from None
    if kind not in JOIN_KINDS:
        msg = f"kind must be one of {', '.join(sorted(JOIN_KINDS))}, got {kind!r}"
        raise InvalidInputError(msg, field_violations={"kind": msg})
    if not isinstance(ttl_s, int) or not 1 <= ttl_s <= MAX_TTL_S:
        msg = f"ttl must be 1..{MAX_TTL_S} s, got {ttl_s!r}"
        raise InvalidInputError(msg, field_violations={"ttl_seconds": msg})


async def create(etcd: Any, name: str, kind: str = "agent", ttl_s: int = DEFAULT_TTL_S) -> str:
    """Mint a one-time token letting `name` join as `kind` within ttl_s; returns it (shown once)."""
    validate_request(name, kind, ttl_s)
    token = secrets.token_urlsafe(32)
    doc = {"name": name, "kind": kind, "expires_at": time.time() + ttl_s}
    lease = await etcd.lease(ttl_s)
    await etcd.put(_key(token), json.dumps(doc).encode("utf-8"), lease=lease)
    return token


@dataclass(frozen=True)
class Checked:
    """A join token found good for its name and kind, not yet used (`use` spends it)."""

    name: str
    kind: str
    key: bytes
    mod_revision: int


async def check(etcd: Any, token: str, name: str, kind: str) -> Checked:
    """Whether a join token may make `kind` `name`, without spending it: a join does its other work (the
    workload's etcd user, the certificate) between `check` and `use`, so a failure there (etcd a moment away)
    leaves the token for the retry, while a caller with no good token gets nothing done for it.

    Raises JoinTokenInvalidError when the token is malformed, unknown or expired, and says so when it was minted
    for another name or another kind: an agent token never makes a client, nor the reverse.
    """
    invalid = JoinTokenInvalidError()
    minted = await _minted(etcd, token)
    if minted is None:
        raise invalid
    stored_name, stored_kind, expires_at, key, kv = minted
    if (stored_name, stored_kind) != (name, kind):
        # Naming what the token is for tells its holder nothing it could not do with it anyway.
        raise JoinTokenInvalidError(
            f"this join token was minted for {stored_kind} {stored_name!r}, not {kind} {name!r}: "
            f"ask for a join token for {kind} {name!r} (hivemesh join-token {name} --kind {kind})",
            metadata={"token_name": stored_name, "token_kind": stored_kind},
        )
    if expires_at <= time.time():
        # The lease may lag by up to a second; the stored expiry is authoritative.
        await etcd.delete(key)
        raise invalid
    return Checked(stored_name, stored_kind, key, kv.mod_revision)


async def minted_for(etcd: Any, token: str) -> tuple[str, str] | None:
    """(name, kind) a live join token was minted for, spending nothing; None when it is malformed, unknown or
    expired (the join refuses it then anyway). The revocation guard asks, so only a good token's holder learns
    that its identity is revoked."""
    minted = await _minted(etcd, token)
    return (minted[0], minted[1]) if minted is not None and minted[2] > time.time() else None


async def _minted(etcd: Any, token: str) -> tuple[str, str, float, bytes, Any] | None:
    """(name, kind, expiry, key, stored entry) of a join token as stored, expired or not; None when it is
    malformed, unknown or its entry unreadable."""
    if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
        return None
    key = _key(token)
    kv = await etcd.get(key)
    if kv is None:
        return None
    try:
        doc = json_depth.loads(kv.value)
        return str(doc["name"]), str(doc["kind"]), float(doc["expires_at"]), key, kv
    except (ValueError, KeyError, TypeError):
        return None


async def use(etcd: Any, checked: Checked) -> None:
    """Spend a checked token, once: JoinTokenInvalidError if it was used (or replaced) since `check`."""
    succeeded, _ = await etcd.transaction(
        compare=[etcd.transactions.mod(checked.key) == checked.mod_revision],
        success=[etcd.transactions.delete(checked.key)],
        failure=[],
    )
    if not succeeded:
        raise JoinTokenInvalidError()


async def consume(etcd: Any, token: str, name: str, kind: str) -> tuple[str, str]:
    """Use a join token for `kind` `name`, once (`check`, then `use`); returns (name, kind). A name or kind
    mismatch does not burn the token."""
    checked = await check(etcd, token, name, kind)
    await use(etcd, checked)
    return checked.name, checked.kind

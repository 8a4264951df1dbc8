"""The capability-token issuer: ES256 signing keys on disk, their JWKS in etcd, and short-lived JWTs.

Tokens name one audience (an agent), the capabilities granted there (`scope`, RFC 8693 style) and are bound
to the caller's certificate (`cnf.x5t#S256`, RFC 8705), so a stolen token is useless without the key of the
certificate it was issued to. Lifetimes are capped at 5 minutes, as SPIRE does for JWT-SVIDs: revocation is
mostly a matter of not renewing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hivemesh.mesh import json_depth
from hivemesh.mesh.errors import FailedPreconditionError, InvalidInputError
from hivemesh.mesh.files import write_atomic
from hivemesh.mesh.pki import controlplane_id
from hivemesh.mesh.tokens import JWKS_KEY
from hivemesh.mesh.trustdoc import Signer, sign_jwks

log = logging.getLogger(__name__)

DEFAULT_TTL_S: Final = 300
MAX_TTL_S: Final = 300
_KEY_FILE_RE = re.compile(r"es256-(\d+)\.pem")
DEFAULT_ACTIVATE_AFTER_S: Final = 5.0
_SCOPE_RE = re.compile(r"[A-Za-z0-9._:/*-]{1,128}")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def public_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The RFC 7517 members of an EC P-256 public key (no kid)."""
    nums = key.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": _b64url(nums.x.to_bytes(32, "big")),
        "y": _b64url(nums.y.to_bytes(32, "big")),
    }


def jwk_thumbprint(key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 thumbprint: SHA-256 over the required members in lexicographic order, no whitespace."""
    canonical = json.dumps(public_jwk(key), sort_keys=True, separators=(",", ":")).encode("ascii")
    return _b64url(hashlib.sha256(canonical).digest())


@dataclass(frozen=True)
class SigningKey:
    kid: str
    created_at: float
    private_key: ec.EllipticCurvePrivateKey
    activates_at: float = 0.0
    """When it starts signing (published in the JWKS from creation, so every verifier knows it first)."""
    path: Path | None = None

    def jwk(self) -> dict[str, str]:
        pub = self.private_key.public_key()
        return {**public_jwk(pub), "kid": self.kid, "alg": "ES256", "use": "sig"}


class SigningKeys:
    """The issuer's ES256 keys in `<state_dir>/keys/` (0600) and their life cycle.

    A rotation adds a *pending* key: it is published in the JWKS at once but signs only from `activates_at`
    (default 5 s later), so every verifier has it before the first token it signs arrives. The key it replaces
    keeps verifying until every token it signed has expired (`retire_after_s`: the longest token lifetime plus
    the verifiers' clock leeway), then leaves the JWKS and its file is deleted. No token is ever signed by a
    key a verifier could not know, and no valid token loses its key: no call fails during a rotation.
    """

    def __init__(
        self,
        keys_dir: Path,
        keys: Sequence[SigningKey],
        *,
        retire_after_s: float = MAX_TTL_S + 30,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not keys:
            raise ValueError("SigningKeys needs at least one key")
        self.keys_dir = keys_dir
        self.retire_after_s = retire_after_s
        self._clock = clock
        self._keys = sorted(keys, key=lambda k: k.created_at)

    @classmethod
    def load_or_create(cls, state_dir: Path, *, retire_after_s: float = MAX_TTL_S + 30) -> SigningKeys:
        """Load every key in `<state_dir>/keys/`, creating the first one on first start."""
        keys_dir = Path(state_dir) / "keys"
        keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        schedule = _load_schedule(keys_dir)
        keys: list[SigningKey] = []
        for path in sorted(keys_dir.iterdir()):
            m = _KEY_FILE_RE.fullmatch(path.name)
            if not m:
                continue
            try:
                priv = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except ValueError as exc:
                raise FailedPreconditionError(f"unreadable signing key {path}: {exc}") from None
            if not isinstance(priv, ec.EllipticCurvePrivateKey) or not isinstance(priv.curve, ec.SECP256R1):
                raise FailedPreconditionError(f"signing key {path} is not an EC P-256 key")
            kid = jwk_thumbprint(priv.public_key())[:16]
            created = int(m.group(1)) / 1e9
            keys.append(SigningKey(kid, created, priv, schedule.get(kid, created), path))
        if not keys:
            keys = [cls._create(keys_dir, activate_after_s=0.0)]
        return cls(keys_dir, keys, retire_after_s=retire_after_s)

    @staticmethod
    def _create(keys_dir: Path, *, activate_after_s: float) -> SigningKey:
        priv = ec.generate_private_key(ec.SECP256R1())
        created_ns = time.time_ns()
        path = keys_dir / f"es256-{created_ns}.pem"
        pem = priv.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_atomic(path, pem, 0o600)
        created = created_ns / 1e9
        key = SigningKey(jwk_thumbprint(priv.public_key())[:16], created, priv, created + activate_after_s, path)
        log.info("created token signing key kid=%s (signs from %s)", key.kid, time.ctime(key.activates_at))
        return key

    def rotate(self, activate_after_s: float = DEFAULT_ACTIVATE_AFTER_S) -> SigningKey:
        """Add a new key: published now, signing after activate_after_s; the current one retires later."""
        if activate_after_s < 0:
            raise InvalidInputError("activate_after_s must not be negative")
        key = self._create(self.keys_dir, activate_after_s=activate_after_s)
        self._keys.append(key)  # created last, so the list stays in creation order
        self._save_schedule()
        return key

    def _save_schedule(self) -> None:
        doc = {k.kid: k.activates_at for k in self._keys}
        tmp = self.keys_dir / ".schedule.json.tmp"
        tmp.write_text(json.dumps(doc, sort_keys=True))
        os.replace(tmp, self.keys_dir / "schedule.json")

    @property
    def every(self) -> list[SigningKey]:
        """Every key held, retired ones not yet pruned included (what the replicas share)."""
        return list(self._keys)

    @property
    def active(self) -> SigningKey:
        """The key that signs now: the most recently *created* one whose activation time has come.

        Creation order, not activation order: after `rotate(60)` then `rotate(5)` the second rotation is the
        operator's latest word, so the first key, activating later, must not take over from it then.
        """
        now = self._clock()
        current = self._keys[0]
        for k in self._keys:  # in creation order
            if k.activates_at <= now:
                current = k
        return current

    def retires_at(self, key: SigningKey) -> float | None:
        """When key leaves the JWKS: retire_after_s after the first newer key started signing, which ends its
        own signing (None: no newer key)."""
        later = [k.activates_at for k in self._keys if k.created_at > key.created_at]
        return min(later) + self.retire_after_s if later else None

    def published(self) -> list[SigningKey]:
        """Keys in the JWKS now: pending, active and retiring ones (newest first)."""
        now = self._clock()
        out = []
        for k in self._keys:
            retire = self.retires_at(k)
            if retire is None or retire > now:
                out.append(k)
        return list(reversed(out))

    def state_of(self, key: SigningKey) -> str:
        now = self._clock()
        superseded = any(k.created_at > key.created_at and k.activates_at <= now for k in self._keys)
        if key.activates_at > now and not superseded:
            return "pending"
        return "active" if key is self.active else "retiring"  # a superseded pending key never signs

    def prune(self) -> list[str]:
        """Forget retired keys and delete their files; returns their kids."""
        keep = {k.kid for k in self.published()}
        gone = [k for k in self._keys if k.kid not in keep]
        for k in gone:
            if k.path is not None:
                k.path.unlink(missing_ok=True)
        if gone:
            self._keys = [k for k in self._keys if k.kid in keep]
            self._save_schedule()
            log.info("retired token signing key(s) %s", ", ".join(k.kid for k in gone))
        return [k.kid for k in gone]

    def jwks(self) -> dict[str, Any]:
        """The JWKS of the published keys (public members only)."""
        return {"keys": [k.jwk() for k in self.published()]}

    def jwks_json(self) -> str:
        return json.dumps(self.jwks(), sort_keys=True, separators=(",", ":"))

    async def publish(self, etcd: Any, signers: list[Signer]) -> None:
        """Write the JWKS to etcd (`/hivemesh/trust/jwks`), where every sidecar watches it, signed by the root
        CA keys given: nodes adopt only a key set a root they trust signed (`hivemesh.mesh.trustdoc`)."""
        await etcd.put(JWKS_KEY, sign_jwks(self.jwks_json(), time.time_ns(), signers))


def _load_schedule(keys_dir: Path) -> dict[str, float]:
    try:
        raw = json_depth.loads((keys_dir / "schedule.json").read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


@dataclass(frozen=True)
class IssuedToken:
    token: str
    jti: str
    expires_at: float
    scopes: tuple[str, ...]


class TokenIssuer:
    """Signs capability tokens: iss spiffe://<td>/controlplane, one audience, sorted space-separated scope."""

    def __init__(
        self,
        keys: SigningKeys,
        trust_domain: str,
        *,
        default_ttl_s: int = DEFAULT_TTL_S,
        max_ttl_s: int = MAX_TTL_S,
    ) -> None:
        if not 1 <= default_ttl_s <= max_ttl_s:
            raise ValueError("need 1 <= default_ttl_s <= max_ttl_s")
        self.keys = keys
        self.issuer = controlplane_id(trust_domain)
        self.default_ttl_s = default_ttl_s
        self.max_ttl_s = max_ttl_s

    def issue(
        self,
        subject: str,
        audience: str,
        scopes: Sequence[str],
        *,
        ttl_s: int | None = None,
        cnf_thumbprint: str | None = None,
        extra_claims: Mapping[str, Any] | None = None,
    ) -> IssuedToken:
        """Sign a token; a ttl_s above the maximum is capped (not refused), None or 0 means the default."""
        if not subject or not audience:
            raise InvalidInputError("a token needs a subject and an audience")
        wanted = sorted(set(scopes))
        if not wanted:
            raise InvalidInputError("a token must grant at least one capability")
        bad = [s for s in wanted if not _SCOPE_RE.fullmatch(s)]
        if bad:
            raise InvalidInputError(f"invalid scope name(s): {', '.join(map(repr, bad[:5]))}")
        if ttl_s is not None and ttl_s < 0:
            raise InvalidInputError(f"token ttl must not be negative, got {ttl_s}")
        ttl = min(ttl_s or self.default_ttl_s, self.max_ttl_s)
        now = int(time.time())
        jti = uuid.uuid4().hex
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience,
            "scope": " ".join(wanted),
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": jti,
        }
        if cnf_thumbprint:
            claims["cnf"] = {"x5t#S256": cnf_thumbprint}
        for name, value in (extra_claims or {}).items():
            if name in claims:
                raise ValueError(f"extra claim {name!r} would replace a registered claim")
            claims[name] = value
        key = self.keys.active
        token = jwt.encode(claims, key.private_key, algorithm="ES256", headers={"kid": key.kid, "typ": "JWT"})
        return IssuedToken(token=token, jti=jti, expires_at=float(now + ttl), scopes=tuple(wanted))

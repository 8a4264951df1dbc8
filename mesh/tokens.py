"""Capability-token verification for the data plane (runs on every call in every sidecar and SDK agent).

Tokens are compact JWS (JWT) signed by the control plane with ES256 (or EdDSA); the public keys come from the
JWKS the control plane publishes in etcd, so verification is offline. The rules follow RFC 8725: a fixed
algorithm allow-list, the header is read and judged before any key is chosen, no key material is taken from
the token, exact `iss`/`aud`, bounded lifetime, and tokens bound to the caller's certificate (RFC 8705 cnf).

Verifying an ES256 signature costs ~110 µs; a token is reused for many calls, so the signature and the
claims that do not change with time are checked once per token string and cached (keyed to the KeySet
generation, dropped at expiry). The per-call work is a dict lookup plus the exp/scope/cnf comparisons.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from hivemesh.mesh import json_depth
from hivemesh.mesh.errors import (
    AudienceMismatchError,
    ScopeMissingError,
    TokenExpiredError,
    TokenInvalidError,
    TokenMissingError,
    TokenRevokedError,
)

JWKS_KEY: Final = b"/hivemesh/trust/jwks"
"""etcd key of the published JWKS (JSON text)."""

ALLOWED_ALGS: Final = frozenset({"ES256", "EdDSA"})
_FORBIDDEN_HEADERS: Final = ("jwk", "jku", "x5u", "x5c", "crit")
_MAX_KID_LEN: Final = 64
_MAX_TOKEN_LEN: Final = 8192
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
MAX_DELEGATION_DEPTH: Final = 5
"""Most actors a delegation chain may name (RFC 8693 `act` nesting): bounds chains of agents calling agents."""
ACTIONS: Final = frozenset({"invoke", "stream", "describe"})
"""What a caller does with a capability; a scope entry `cap:action` grants only that action."""

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


@dataclass(frozen=True, slots=True)
class _Key:
    alg: str
    key: PublicKey


def _b64url_decode(part: str, what: str) -> bytes:
    # Strict: only the URL-safe alphabet, no padding, and a length base64 can produce.
    if not _B64URL_RE.fullmatch(part) or len(part) % 4 == 1:
        raise TokenInvalidError(f"the token {what} is not valid base64url (no padding allowed)")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise TokenInvalidError(f"the token {what} is not valid base64url") from None


def _b64url_int(value: Any, size: int, what: str) -> int:
    if not isinstance(value, str):
        raise ValueError(f"JWK member {what!r} must be a base64url string")
    if not _B64URL_RE.fullmatch(value) or len(value) % 4 == 1:
        raise ValueError(f"JWK member {what!r} is not valid base64url")
    raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    if len(raw) != size:
        raise ValueError(f"JWK member {what!r} must be {size} bytes, got {len(raw)}")
    return int.from_bytes(raw, "big")


def _jwk_to_key(jwk: Any) -> tuple[str, _Key]:
    if not isinstance(jwk, dict):
        raise ValueError("each JWKS key must be a JSON object")
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > _MAX_KID_LEN:
        raise ValueError(f"each JWKS key needs a string 'kid' of at most {_MAX_KID_LEN} characters")
    if "d" in jwk:
        raise ValueError(f"JWKS key {kid!r} carries private key material ('d'); publish public keys only")
    use = jwk.get("use", "sig")
    if use != "sig":
        raise ValueError(f"JWKS key {kid!r} has use={use!r}; only 'sig' keys verify tokens")
    kty, crv, alg = jwk.get("kty"), jwk.get("crv"), jwk.get("alg")
    if kty == "EC" and crv == "P-256" and alg in (None, "ES256"):
        x = _b64url_int(jwk.get("x"), 32, "x")
        y = _b64url_int(jwk.get("y"), 32, "y")
        try:
            key: PublicKey = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
        except ValueError as exc:
            raise ValueError(f"JWKS key {kid!r} is not a point on P-256: {exc}") from None
        return kid, _Key("ES256", key)
    if kty == "OKP" and crv == "Ed25519" and alg in (None, "EdDSA", "Ed25519"):
        x_raw = jwk.get("x")
        if not isinstance(x_raw, str) or not _B64URL_RE.fullmatch(x_raw):
            raise ValueError(f"JWKS key {kid!r}: 'x' must be a base64url string")
        raw = base64.urlsafe_b64decode(x_raw + "=" * (-len(x_raw) % 4))
        if len(raw) != 32:
            raise ValueError(f"JWKS key {kid!r}: an Ed25519 'x' must be 32 bytes")
        return kid, _Key("EdDSA", ed25519.Ed25519PublicKey.from_public_bytes(raw))
    raise ValueError(
        f"JWKS key {kid!r} (kty={kty!r}, crv={crv!r}, alg={alg!r}) is not an EC P-256/ES256 or "
        "Ed25519/EdDSA public key"
    )


class KeySet:
    """The token-verification public keys by kid, replaced atomically from a JWKS document.

    `generation` increases on every successful update, so verifier caches know when to drop entries.
    """

    def __init__(self) -> None:
        self._keys: dict[str, _Key] = {}
        self.generation = 0
        self._lock = threading.Lock()

    @classmethod
    def from_jwks(cls, json_text: str | bytes) -> KeySet:
        ks = cls()
        ks.update_from_jwks(json_text)
        return ks

    def update_from_jwks(self, json_text: str | bytes) -> None:
        """Replace every key with those of a JWKS document.

        Raises ValueError (keeping the old set) when the text is not JSON, has no keys, or holds any key
        that is not an EC P-256/ES256 or Ed25519/EdDSA public key.
        """
        try:
            doc = json_depth.loads(json_text)
        except (ValueError, TypeError, RecursionError) as exc:
            raise ValueError(f"the JWKS is not valid JSON: {exc!r}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list) or not doc["keys"]:
            raise ValueError('the JWKS must be an object {"keys": [...]} with at least one key')
        new: dict[str, _Key] = {}
        for jwk in doc["keys"]:
            kid, key = _jwk_to_key(jwk)
            if kid in new:
                raise ValueError(f"the JWKS holds kid {kid!r} twice")
            new[kid] = key
        with self._lock:
            self._keys = new
            self.generation += 1

    def get(self, kid: str) -> _Key | None:
        return self._keys.get(kid)

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """The verified claims of a capability token."""

    subject: str
    """`sub`: the principal the call is made for (the original caller when delegated)."""
    audience: str
    scopes: frozenset[str]
    jti: str
    expires_at: float
    issuer: str
    cnf_thumbprint: str | None
    raw: Mapping[str, Any] = field(repr=False, compare=False, hash=False)
    issued_at: float = 0.0
    actor: str | None = None
    """`act.sub`: who presents a delegated token (it must be the caller's certificate identity)."""
    delegation: tuple[str, ...] = ()
    """The whole chain in call order: principal, first actor, ..., current actor (just the subject if not
    delegated)."""
    delegable: frozenset[str] | None = None
    """`dlg`: capabilities the holder may delegate onward (None: the token carries no delegation ceiling)."""

    @property
    def presenter(self) -> str:
        """The identity that must present this token: the current actor, else the subject."""
        return self.actor or self.subject

    def allows(self, capability: str, action: str | None = None) -> bool:
        """True when the scope grants capability (wholly, or for this action via a `capability:action` entry)."""
        if capability in self.scopes:
            return True
        return action is not None and f"{capability}:{action}" in self.scopes


class RevocationList:
    """Revoked token ids and subjects, replaced atomically from the etcd watch; read on every call.

    A revoked subject invalidates every token issued before the revocation that names it anywhere in its chain
    (as principal or as an actor), so revoking a compromised agent also stops tokens delegated through it.
    """

    def __init__(self) -> None:
        self._state: tuple[frozenset[str], Mapping[str, float]] = (frozenset(), {})
        self.generation = 0

    def replace(self, jtis: Iterable[str], subjects: Mapping[str, float]) -> None:
        self._state = (frozenset(jtis), dict(subjects))
        self.generation += 1

    def reason(self, claims: TokenClaims) -> str | None:
        """Why claims are revoked, or None."""
        jtis, subjects = self._state
        if claims.jti in jtis:
            return f"token {claims.jti} has been revoked"
        if subjects:
            for ident in claims.delegation or (claims.subject,):
                before = subjects.get(ident)
                if before is not None and claims.issued_at <= before:
                    return f"every token issued to {ident} before {before:.0f} has been revoked"
        return None

    def __len__(self) -> int:
        return len(self._state[0]) + len(self._state[1])


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past a float's range
        return False


def _number(claims: Mapping[str, Any], name: str, *, required: bool) -> float | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise TokenInvalidError(f"the token has no {name!r} claim")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value):
        # NaN compares false with everything: an `exp` of NaN would never expire, an `iat` of NaN would
        # escape every subject revocation.
        raise TokenInvalidError(f"the token's {name!r} claim must be a finite number (seconds since the epoch)")
    return float(value)


class TokenVerifier:
    """Verifies capability tokens for one audience (this agent) against a KeySet.

    `verify` raises TokenInvalidError / TokenExpiredError / AudienceMismatchError (UNAUTHENTICATED) when
    the token cannot be trusted, and ScopeMissingError (PERMISSION_DENIED) when it is valid but does not
    grant the capability.
    """

    def __init__(
        self,
        keyset: KeySet,
        *,
        issuer: str,
        audience: str,
        leeway_s: float = 30,
        max_lifetime_s: float = 300,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
        revocations: RevocationList | None = None,
        require_binding: bool = True,
    ) -> None:
        if not issuer or not audience:
            raise ValueError("a TokenVerifier needs an issuer and an audience")
        if leeway_s < 0 or max_lifetime_s <= 0 or cache_size < 1:
            raise ValueError("leeway_s must be >= 0, max_lifetime_s > 0 and cache_size >= 1")
        self.keyset = keyset
        self.issuer = issuer
        self.audience = audience
        self.leeway_s = float(leeway_s)
        self.max_lifetime_s = float(max_lifetime_s)
        self._cache_size = cache_size
        self._clock = clock
        self._cache: dict[str, TokenClaims] = {}
        self.cache_hits = 0
        self.cache_misses = 0
        """Verifications answered from the cache, and not (read by the node's metrics at scrape)."""
        self._cache_generation = keyset.generation
        self.revocations = revocations
        self.require_binding = require_binding

    # --- the hot path ---------------------------------------------------------------------------------------
    def verify(
        self, token: str, *, capability: str, peer_thumbprint: str | None = None, action: str | None = None
    ) -> TokenClaims:
        """Verify token for capability, called by the peer whose certificate has peer_thumbprint."""
        claims = self.authenticate(token, peer_thumbprint=peer_thumbprint)
        self.check_scope(claims, capability, action)
        return claims

    def authenticate(self, token: str, *, peer_thumbprint: str | None = None) -> TokenClaims:
        """Everything but the scope: signature, claims, expiry, revocation and the certificate binding.

        Split from `check_scope` so the caller can record who a token speaks for even when it lacks the scope.
        """
        now = self._clock()
        if self._cache_generation != self.keyset.generation:
            self._cache = {}
            self._cache_generation = self.keyset.generation
        claims = self._cache.get(token)
        if claims is None:
            self.cache_misses += 1
            claims = self._verify_uncached(token, now)
            self._remember(token, claims, now)
        elif now > claims.expires_at + self.leeway_s:
            self._cache.pop(token, None)
            raise TokenExpiredError()
        else:
            self.cache_hits += 1
        cnf = claims.cnf_thumbprint
        if cnf != peer_thumbprint:
            if cnf is None:
                if self.require_binding:
                    raise TokenInvalidError("the token is not bound to a certificate (no 'cnf' claim)")
            elif peer_thumbprint is None:
                raise TokenInvalidError(
                    "the token is bound to a client certificate, but the call came without one"
                )
            else:
                raise TokenInvalidError("token bound to another certificate")
        revocations = self.revocations
        if revocations is not None:
            why = revocations.reason(claims)
            if why is not None:
                raise TokenRevokedError(why)
        return claims

    def verify_signed(self, token: str) -> TokenClaims:
        """Signature, issuer, audience, lifetime and structure only (no binding, revocation or scope, no cache):
        for the control plane judging the subject token of a token exchange."""
        return self._verify_uncached(token, self._clock())

    @staticmethod
    def check_scope(claims: TokenClaims, capability: str, action: str | None = None) -> None:
        if not claims.allows(capability, action):
            raise ScopeMissingError(
                f"the token does not grant capability {capability!r}"
                + (f" for {action}" if action else "")
                + f" (granted: {' '.join(sorted(claims.scopes)) or 'nothing'})"
            )

    def _remember(self, token: str, claims: TokenClaims, now: float) -> None:
        cache = self._cache
        if len(cache) >= self._cache_size:
            limit = now - self.leeway_s
            for key in [k for k, c in cache.items() if c.expires_at < limit]:
                del cache[key]
            if len(cache) >= self._cache_size:
                # Oldest insertions first (dict order): drop a tenth, so eviction is amortised.
                for key in list(cache)[: max(1, self._cache_size // 10)]:
                    del cache[key]
        cache[token] = claims

    def clear_cache(self) -> None:
        self._cache = {}

    @property
    def cached_count(self) -> int:
        """How many verified tokens are cached now (for metrics and tests)."""
        return len(self._cache)

    # --- full verification (cache miss) ---------------------------------------------------------------------
    def _verify_uncached(self, token: str, now: float) -> TokenClaims:
        if not isinstance(token, str) or not token:
            raise TokenMissingError()
        if len(token) > _MAX_TOKEN_LEN:
            raise TokenInvalidError(f"the token is {len(token)} bytes; tokens longer than {_MAX_TOKEN_LEN} are refused")
        if not token.isascii():
            raise TokenInvalidError("the token is not a compact JWS (it must be ASCII base64url)")
        parts = token.split(".")
        if len(parts) != 3:
            raise TokenInvalidError("the token is not a compact JWS (header.payload.signature)")
        h64, p64, s64 = parts
        header = self._json_object(_b64url_decode(h64, "header"), "header")
        key = self._check_header(header)
        signature = _b64url_decode(s64, "signature")
        self._check_signature(key, f"{h64}.{p64}".encode("ascii"), signature)
        claims = self._json_object(_b64url_decode(p64, "payload"), "payload")
        return self._check_claims(claims, now)

    @staticmethod
    def _json_object(raw: bytes, what: str) -> dict[str, Any]:
        try:
            value = json_depth.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):  # nested past what json reads: not JSON either
            raise TokenInvalidError(f"the token {what} is not valid JSON") from None
        if not isinstance(value, dict):
            raise TokenInvalidError(f"the token {what} must be a JSON object")
        return value

    def _check_header(self, header: Mapping[str, Any]) -> _Key:
        alg = header.get("alg")
        if alg is None:
            raise TokenInvalidError("the token header names no algorithm ('alg')")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGS:
            shown = alg if isinstance(alg, str) and len(alg) <= 16 else "<invalid>"
            raise TokenInvalidError(
                f"token algorithm {shown!r} is not allowed (only {', '.join(sorted(ALLOWED_ALGS))})"
            )
        for name in _FORBIDDEN_HEADERS:
            if name in header:
                raise TokenInvalidError(
                    f"the token header carries {name!r}; keys and critical extensions are never taken "
                    "from a token"
                )
        typ = header.get("typ")
        if typ is not None and typ not in ("JWT", "at+jwt"):
            raise TokenInvalidError("the token header 'typ' must be JWT")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > _MAX_KID_LEN:
            raise TokenInvalidError("the token header needs a short string key id ('kid')")
        key = self.keyset.get(kid)
        if key is None:
            raise TokenInvalidError(
                "the token was signed with an unknown key (kid not in the JWKS; this verifier's keys may be "
                "stale, or the token is forged)"
            )
        if key.alg != alg:
            raise TokenInvalidError(f"the token algorithm {alg} does not match its key ({key.alg})")
        return key

    @staticmethod
    def _check_signature(key: _Key, signing_input: bytes, signature: bytes) -> None:
        if len(signature) != 64:
            raise TokenInvalidError("the token signature has the wrong length (truncated or not ES256/EdDSA)")
        try:
            if key.alg == "ES256":
                r = int.from_bytes(signature[:32], "big")
                s = int.from_bytes(signature[32:], "big")
                key.key.verify(encode_dss_signature(r, s), signing_input, _ECDSA_SHA256)  # type: ignore[call-arg]
            else:
                key.key.verify(signature, signing_input)  # type: ignore[call-arg]
        except InvalidSignature:
            raise TokenInvalidError("the token signature does not verify") from None

    def _check_claims(self, claims: Mapping[str, Any], now: float) -> TokenClaims:
        leeway = self.leeway_s
        iss = claims.get("iss")
        if iss != self.issuer:
            raise TokenInvalidError(f"the token issuer is not {self.issuer}")
        aud = claims.get("aud")
        if aud is None:
            raise TokenInvalidError("the token has no audience ('aud')")
        if isinstance(aud, list):
            if aud != [self.audience]:
                raise AudienceMismatchError(
                    f"the token is for {len(aud)} audience(s); only a token for exactly "
                    f"{self.audience} is accepted"
                )
        elif not isinstance(aud, str):
            raise TokenInvalidError("the token audience ('aud') must be a string")
        elif aud != self.audience:
            raise AudienceMismatchError(f"the token was issued for another audience, not {self.audience}")
        exp = _number(claims, "exp", required=True)
        iat = _number(claims, "iat", required=True)
        nbf = _number(claims, "nbf", required=False)
        assert exp is not None and iat is not None
        if now > exp + leeway:
            raise TokenExpiredError()
        if iat > now + leeway:
            raise TokenInvalidError("the token was issued in the future ('iat'); check the clocks")
        if nbf is not None and nbf > now + leeway:
            raise TokenInvalidError("the token is not valid yet ('nbf' in the future)")
        if exp - iat > self.max_lifetime_s + leeway:
            raise TokenInvalidError(
                f"the token lifetime ({exp - iat:.0f} s) exceeds the maximum of {self.max_lifetime_s:.0f} s"
            )
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise TokenInvalidError("the token has no subject ('sub')")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise TokenInvalidError("the token has no id ('jti')")
        scope = claims.get("scope", "")
        if not isinstance(scope, str):
            raise TokenInvalidError("the token 'scope' must be a space-separated string")
        cnf_thumb: str | None = None
        cnf = claims.get("cnf")
        if cnf is not None:
            thumb = cnf.get("x5t#S256") if isinstance(cnf, dict) else None
            if not isinstance(thumb, str) or not thumb:
                raise TokenInvalidError("the token 'cnf' claim must hold an 'x5t#S256' thumbprint")
            cnf_thumb = thumb
        scopes = frozenset(scope.split())
        delegable = _space_set(claims.get("dlg"), "dlg")
        actors, ceilings = parse_act(claims.get("act"))
        if ceilings:
            _check_narrowing(scopes, delegable, ceilings)
        return TokenClaims(
            subject=sub,
            audience=self.audience,
            scopes=scopes,
            jti=jti,
            expires_at=exp,
            issuer=iss,
            cnf_thumbprint=cnf_thumb,
            raw=dict(claims),
            issued_at=iat,
            actor=actors[0] if actors else None,
            delegation=(sub, *reversed(actors)),
            delegable=delegable,
        )


def _space_set(value: Any, name: str) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TokenInvalidError(f"the token {name!r} claim must be a space-separated string")
    return frozenset(value.split())


def parse_act(act: Any) -> tuple[list[str], list[frozenset[str] | None]]:
    """The actors of an RFC 8693 `act` claim, outermost (current) first, and each level's `dlg` ceiling."""
    actors: list[str] = []
    ceilings: list[frozenset[str] | None] = []
    node = act
    while node is not None:
        if not isinstance(node, dict):
            raise TokenInvalidError("the token 'act' claim must be a JSON object")
        sub = node.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > 2048:
            raise TokenInvalidError("every level of the token 'act' claim needs a 'sub'")
        actors.append(sub)
        ceilings.append(_space_set(node.get("dlg"), "act.dlg"))
        if len(actors) > MAX_DELEGATION_DEPTH:
            raise TokenInvalidError(f"the delegation chain is deeper than {MAX_DELEGATION_DEPTH} actors")
        node = node.get("act")
    return actors, ceilings


def _check_narrowing(
    scopes: frozenset[str], delegable: frozenset[str] | None, ceilings: Sequence[frozenset[str] | None]
) -> None:
    """Scopes only narrow along a chain: the token stays inside the ceiling its exchange was bounded by, and
    each hop's ceiling inside the one before it (the issuer enforces this; checked again here in depth)."""
    known = [c for c in ceilings if c is not None]
    if not known:
        return
    outer = known[0]
    if not scopes <= outer or (delegable is not None and not delegable <= outer):
        raise TokenInvalidError("the delegated token's scope is wider than the chain it derives from allows")
    for inner_ceiling in known[1:]:
        if not outer <= inner_ceiling:
            raise TokenInvalidError("the delegation chain widens scopes at a later hop")
        outer = inner_ceiling


def bearer_from_metadata(metadata: Mapping[str, Any] | Iterable[tuple[str, Any]] | None) -> str:
    """The JWT from `authorization: Bearer <jwt>` metadata (a mapping or gRPC's (key, value) pairs).

    Raises TokenMissingError when there is none or it is not a Bearer credential, and TokenInvalidError when
    more than one authorization header was sent (ambiguous).
    """
    values: list[Any] = []
    if metadata is None:
        pass
    elif isinstance(metadata, dict | Mapping):  # dict first: the inbound chain's case, and the cheap check
        value = metadata.get("authorization")
        if isinstance(value, tuple | list):
            values.extend(value)  # the header was sent more than once
        elif value is not None:
            values.append(value)
    else:
        values = [v for k, v in metadata if k == "authorization"]
    if not values:
        raise TokenMissingError()
    if len(values) > 1:
        raise TokenInvalidError("more than one 'authorization' header was sent")
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str) or value[:7].lower() != "bearer ":
        raise TokenMissingError("the 'authorization' metadata must be 'Bearer <jwt>'")
    token = value[7:].strip()
    if not token:
        raise TokenMissingError("the 'authorization' metadata carries an empty Bearer token")
    return token

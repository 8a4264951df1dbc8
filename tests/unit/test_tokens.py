"""The data-plane token verifier: the RFC 8725 negative corpus (T1), clock skew (T2), scope (T4), lifetime
cap (T6), certificate binding, the KeySet and the verification cache."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from hivemesh.controlplane.issuer import SigningKeys, TokenIssuer, public_jwk
from hivemesh.mesh.errors import (
    AudienceMismatchError,
    HivemeshError,
    ScopeMissingError,
    TokenExpiredError,
    TokenInvalidError,
    TokenMissingError,
)
from hivemesh.mesh.tokens import KeySet, TokenVerifier, bearer_from_metadata

ISS = "spiffe://hivemesh.local/controlplane"
AUD = "spiffe://hivemesh.local/agent/victim"
SUB = "spiffe://hivemesh.local/client/caller"
THUMB = "A" * 43
KID = "test-kid-1"
NOW = 1_800_000_000.0


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def enc(obj: Any) -> str:
    return b64(json.dumps(obj).encode())


class Signer:
    """Builds arbitrary (also malicious) compact JWS tokens."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.public_pem = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwks(self, kid: str = KID) -> str:
        jwk = {**public_jwk(self.key.public_key()), "kid": kid, "alg": "ES256", "use": "sig"}
        return json.dumps({"keys": [jwk]})

    def es256(self, signing_input: bytes, key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
        r, s = decode_dss_signature((key or self.key).sign(signing_input, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def token(
        self,
        header: dict[str, Any] | None = None,
        claims: dict[str, Any] | None = None,
        *,
        drop_header: tuple[str, ...] = (),
        drop_claims: tuple[str, ...] = (),
        sign: Callable[[bytes], bytes] | None = None,
    ) -> str:
        h: dict[str, Any] = {"alg": "ES256", "typ": "JWT", "kid": KID, **(header or {})}
        c: dict[str, Any] = {
            "iss": ISS, "sub": SUB, "aud": AUD, "scope": "extract summarize",
            "iat": int(NOW), "nbf": int(NOW),
            "exp": int(NOW) + 300, "jti": "j1", "cnf": {"x5t#S256": THUMB}, **(claims or {}),
        }
        for k in drop_header:
            h.pop(k, None)
        for k in drop_claims:
            c.pop(k, None)
        signing_input = f"{enc(h)}.{enc(c)}".encode()
        sig = (sign or self.es256)(signing_input)
        return f"{signing_input.decode()}.{b64(sig)}"


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def signer() -> Signer:
    return Signer()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verifier(signer: Signer, clock: Clock) -> TokenVerifier:
    return TokenVerifier(KeySet.from_jwks(signer.jwks()), issuer=ISS, audience=AUD, clock=clock)


def _rs256(signing_input: bytes) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())


def _corpus(s: Signer) -> dict[str, tuple[str, type[HivemeshError]]]:
    t = NOW
    good = s.token()
    h64, p64, sig64 = good.split(".")
    attacker = ec.generate_private_key(ec.SECP256R1())
    return {
        # alg
        "alg none": (s.token({"alg": "none"}, sign=lambda _: b""), TokenInvalidError),
        "alg None": (s.token({"alg": "None"}, sign=lambda _: b""), TokenInvalidError),
        "alg nOnE": (s.token({"alg": "nOnE"}, sign=lambda _: b""), TokenInvalidError),
        "HS256 with public key": (
            s.token({"alg": "HS256"}, sign=lambda m: hmac.new(s.public_pem, m, hashlib.sha256).digest()),
            TokenInvalidError,
        ),
        "RS256": (s.token({"alg": "RS256"}, sign=_rs256), TokenInvalidError),
        "ES384": (s.token({"alg": "ES384"}), TokenInvalidError),
        "EdDSA on an ES256 key": (s.token({"alg": "EdDSA"}), TokenInvalidError),
        "alg missing": (s.token(drop_header=("alg",)), TokenInvalidError),
        "alg not a string": (s.token({"alg": ["ES256"]}), TokenInvalidError),
        # kid
        "kid unknown": (s.token({"kid": "unknown"}), TokenInvalidError),
        "kid path traversal": (s.token({"kid": "../../etc/passwd"}), TokenInvalidError),
        "kid sql": (s.token({"kid": "' OR 1=1"}), TokenInvalidError),
        "kid 10 kB": (s.token({"kid": "k" * 10_000}), TokenInvalidError),
        "kid 100 chars": (s.token({"kid": "k" * 100}), TokenInvalidError),
        "kid non-string": (s.token({"kid": 1}), TokenInvalidError),
        "kid missing": (s.token(drop_header=("kid",)), TokenInvalidError),
        # key material or extensions in the header
        "embedded jwk": (
            s.token(
                {"kid": KID, "jwk": {**public_jwk(attacker.public_key()), "kid": KID}},
                sign=lambda m: s.es256(m, attacker),
            ),
            TokenInvalidError,
        ),
        "jku": (s.token({"jku": "https://evil.example/jwks.json"}), TokenInvalidError),
        "x5u": (s.token({"x5u": "https://evil.example/cert.pem"}), TokenInvalidError),
        "x5c": (s.token({"x5c": ["MIIB"]}), TokenInvalidError),
        "crit": (s.token({"crit": ["exp"]}), TokenInvalidError),
        "typ not JWT": (s.token({"typ": "JWE"}), TokenInvalidError),
        # time
        "exp past+31s": (
            s.token({}, {"iat": int(t) - 331, "nbf": int(t) - 331, "exp": int(t) - 31}), TokenExpiredError
        ),
        "exp missing": (s.token(drop_claims=("exp",)), TokenInvalidError),
        "exp a string": (s.token({}, {"exp": str(int(t) + 60)}), TokenInvalidError),
        "exp NaN (never expires)": (s.token({}, {"exp": float("nan")}), TokenInvalidError),
        "iat NaN (escapes revocation)": (s.token({}, {"iat": float("nan")}), TokenInvalidError),
        "exp past a float's range": (s.token({}, {"exp": 10**400}), TokenInvalidError),
        "nbf future+31s": (s.token({}, {"nbf": int(t) + 31}), TokenInvalidError),
        "iat future+31s": (s.token({}, {"iat": int(t) + 31, "exp": int(t) + 300}), TokenInvalidError),
        "iat missing": (s.token(drop_claims=("iat",)), TokenInvalidError),
        "lifetime 30 days": (s.token({}, {"exp": int(t) + 30 * 86400}), TokenInvalidError),
        # audience and issuer
        "aud missing": (s.token(drop_claims=("aud",)), TokenInvalidError),
        "aud wrong": (s.token({}, {"aud": "spiffe://hivemesh.local/agent/other"}), AudienceMismatchError),
        "aud list victim+other": (
            s.token({}, {"aud": [AUD, "spiffe://hivemesh.local/agent/other"]}), AudienceMismatchError
        ),
        "aud number": (s.token({}, {"aud": 7}), TokenInvalidError),
        "iss partial match": (s.token({}, {"iss": "spiffe://hivemesh.local/control"}), TokenInvalidError),
        "iss superstring": (s.token({}, {"iss": ISS + "/x"}), TokenInvalidError),
        "iss missing": (s.token(drop_claims=("iss",)), TokenInvalidError),
        "sub missing": (s.token(drop_claims=("sub",)), TokenInvalidError),
        "jti missing": (s.token(drop_claims=("jti",)), TokenInvalidError),
        "cnf malformed": (s.token({}, {"cnf": {"x5t": THUMB}}), TokenInvalidError),
        # structure and signature
        "bad padding": (good + "==", TokenInvalidError),
        "padding in header": (f"{h64}=.{p64}.{sig64}", TokenInvalidError),
        "truncated signature": (good[:-10], TokenInvalidError),
        "no signature": (f"{h64}.{p64}.", TokenInvalidError),
        "two parts": (f"{h64}.{p64}", TokenInvalidError),
        "four parts": (good + ".x", TokenInvalidError),
        "standard base64 alphabet": (good.replace("-", "+").replace("_", "/") + "+/", TokenInvalidError),
        "header not json": (f"{b64(b'nope')}.{p64}.{sig64}", TokenInvalidError),
        "payload tampered": (
            f"{h64}.{enc({'iss': ISS, 'aud': AUD, 'scope': 'admin'})}.{sig64}", TokenInvalidError
        ),
        "signed by another key": (s.token(sign=lambda m: s.es256(m, attacker)), TokenInvalidError),
        "empty": ("", TokenMissingError),
    }


_CASES = sorted(_corpus(Signer()))


@pytest.mark.parametrize("case", _CASES)
def test_negative_corpus_exact_error(case: str, signer: Signer, verifier: TokenVerifier) -> None:
    token, expected = _corpus(signer)[case]
    with pytest.raises(HivemeshError) as info:
        verifier.verify(token, capability="extract", peer_thumbprint=THUMB)
    assert type(info.value) is expected, f"{case}: {info.value!r}"
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert verifier.cached_count == 0


def test_valid_token_accepted(signer: Signer, verifier: TokenVerifier) -> None:
    claims = verifier.verify(signer.token(), capability="extract", peer_thumbprint=THUMB)
    assert claims.subject == SUB and claims.audience == AUD and claims.issuer == ISS
    assert claims.scopes == frozenset({"extract", "summarize"})
    assert claims.jti == "j1" and claims.expires_at == int(NOW) + 300 and claims.cnf_thumbprint == THUMB
    # aud as a list of exactly this audience is acceptable (RFC 7519 allows either form).
    verifier.verify(signer.token({}, {"aud": [AUD]}), capability="extract", peer_thumbprint=THUMB)


@pytest.mark.parametrize(
    ("claims", "ok"),
    [
        ({"iat": int(NOW) - 329, "nbf": int(NOW) - 329, "exp": int(NOW) - 29}, True),
        ({"iat": int(NOW) - 331, "nbf": int(NOW) - 331, "exp": int(NOW) - 31}, False),
        ({"nbf": int(NOW) + 29}, True),
        ({"nbf": int(NOW) + 31}, False),
        ({"iat": int(NOW) + 29, "nbf": int(NOW) + 29, "exp": int(NOW) + 300}, True),
        ({"iat": int(NOW) + 31, "nbf": int(NOW) + 31, "exp": int(NOW) + 300}, False),
    ],
)
def test_clock_skew_inside_and_outside_leeway(
    claims: dict[str, Any], ok: bool, signer: Signer, verifier: TokenVerifier
) -> None:
    token = signer.token({}, claims)
    if ok:
        verifier.verify(token, capability="extract", peer_thumbprint=THUMB)
    else:
        with pytest.raises((TokenExpiredError, TokenInvalidError)):
            verifier.verify(token, capability="extract", peer_thumbprint=THUMB)


def test_scope_missing_is_permission_denied(signer: Signer, verifier: TokenVerifier) -> None:
    with pytest.raises(ScopeMissingError) as info:
        verifier.verify(signer.token(), capability="delete-everything", peer_thumbprint=THUMB)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "extract summarize" in info.value.message


def test_certificate_binding(signer: Signer, verifier: TokenVerifier) -> None:
    token = signer.token()
    with pytest.raises(TokenInvalidError, match="bound to another certificate"):
        verifier.verify(token, capability="extract", peer_thumbprint="B" * 43)
    with pytest.raises(TokenInvalidError, match="without one"):
        verifier.verify(token, capability="extract", peer_thumbprint=None)
    # An unbound token needs no certificate match.
    unbound = signer.token(drop_claims=("cnf",))
    assert verifier.verify(unbound, capability="extract").cnf_thumbprint is None


def test_cache_returns_same_claims_and_keyset_change_invalidates(
    signer: Signer, verifier: TokenVerifier
) -> None:
    token = signer.token()
    first = verifier.verify(token, capability="extract", peer_thumbprint=THUMB)
    assert verifier.cached_count == 1
    assert verifier.verify(token, capability="summarize", peer_thumbprint=THUMB) is first
    # Per-call checks still run on a cache hit.
    with pytest.raises(ScopeMissingError):
        verifier.verify(token, capability="other", peer_thumbprint=THUMB)
    with pytest.raises(TokenInvalidError):
        verifier.verify(token, capability="extract", peer_thumbprint="B" * 43)
    # The key is rotated away: the cached verification must not outlive it.
    verifier.keyset.update_from_jwks(Signer().jwks(kid="new-kid"))
    with pytest.raises(TokenInvalidError, match="unknown key"):
        verifier.verify(token, capability="extract", peer_thumbprint=THUMB)


def test_expired_cached_token_is_refused_and_dropped(
    signer: Signer, verifier: TokenVerifier, clock: Clock
) -> None:
    token = signer.token()
    verifier.verify(token, capability="extract", peer_thumbprint=THUMB)
    clock.now = NOW + 300 + 29
    verifier.verify(token, capability="extract", peer_thumbprint=THUMB)
    clock.now = NOW + 300 + 31
    with pytest.raises(TokenExpiredError):
        verifier.verify(token, capability="extract", peer_thumbprint=THUMB)
    assert verifier.cached_count == 0


def test_cache_is_bounded(signer: Signer, clock: Clock) -> None:
    v = TokenVerifier(KeySet.from_jwks(signer.jwks()), issuer=ISS, audience=AUD, clock=clock, cache_size=10)
    for i in range(25):
        v.verify(signer.token({}, {"jti": f"j{i}"}), capability="extract", peer_thumbprint=THUMB)
        assert v.cached_count <= 10


def test_cache_hit_is_cheap(signer: Signer, verifier: TokenVerifier) -> None:
    token = signer.token()
    verifier.verify(token, capability="extract", peer_thumbprint=THUMB)
    n = 20_000
    best = float("inf")
    for _ in range(3):  # this thread's CPU time, not the wall clock: other processes on the machine do not count
        t0 = time.thread_time()
        for _ in range(n):
            verifier.verify(token, capability="extract", peer_thumbprint=THUMB)
        best = min(best, (time.thread_time() - t0) / n)
    # ~0.5 µs on a quiet machine; the bound leaves room for a slower CPU.
    assert best < 5e-6, f"cache hit took {best * 1e6:.2f} µs"


def test_issuer_tokens_verify_end_to_end(tmp_path: Path) -> None:
    keys = SigningKeys.load_or_create(tmp_path / "state")
    issuer = TokenIssuer(keys, "hivemesh.local")
    issued = issuer.issue(SUB, AUD, ["summarize", "extract", "extract"], ttl_s=3600, cnf_thumbprint=THUMB)
    assert issued.scopes == ("extract", "summarize")
    assert issued.expires_at - time.time() <= 300  # capped, not refused
    header = json.loads(base64.urlsafe_b64decode(issued.token.split(".")[0] + "=="))
    assert header == {"alg": "ES256", "typ": "JWT", "kid": keys.active.kid}
    v = TokenVerifier(KeySet.from_jwks(keys.jwks_json()), issuer=ISS, audience=AUD)
    claims = v.verify(issued.token, capability="extract", peer_thumbprint=THUMB)
    assert claims.raw["scope"] == "extract summarize" and claims.jti == issued.jti
    assert claims.raw["nbf"] == claims.raw["iat"]
    # Keys persist with 0600 and the same kid on reload; a rotation keeps the old key in the JWKS.
    key_files = list((tmp_path / "state" / "keys").glob("es256-*.pem"))
    assert len(key_files) == 1 and key_files[0].stat().st_mode & 0o777 == 0o600
    again = SigningKeys.load_or_create(tmp_path / "state")
    assert again.active.kid == keys.active.kid
    new = again.rotate()
    assert {k["kid"] for k in again.jwks()["keys"]} == {new.kid, keys.active.kid}


def test_eddsa_tokens_verify(signer: Signer, clock: Clock) -> None:
    ed = ed25519.Ed25519PrivateKey.generate()
    x = ed.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    jwks = json.dumps({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": b64(x), "kid": "ed", "alg": "EdDSA"}]})
    v = TokenVerifier(KeySet.from_jwks(jwks), issuer=ISS, audience=AUD, clock=clock)
    token = signer.token({"alg": "EdDSA", "kid": "ed"}, sign=ed.sign)
    assert v.verify(token, capability="extract", peer_thumbprint=THUMB).subject == SUB
    with pytest.raises(TokenInvalidError):
        v.verify(signer.token({"alg": "ES256", "kid": "ed"}), capability="extract", peer_thumbprint=THUMB)


@pytest.mark.parametrize(
    "jwks",
    [
        "not json",
        "[]",
        '{"keys": []}',
        '{"keys": [{"kty": "RSA", "kid": "r", "n": "AQAB", "e": "AQAB"}]}',
        '{"keys": [{"kty": "EC", "crv": "P-384", "kid": "p", "x": "AA", "y": "AA"}]}',
        '{"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]}',
        "private",
        "not on curve",
        "duplicate kid",
        "hs alg on ec key",
    ],
)
def test_keyset_refuses_bad_jwks_and_keeps_old_keys(jwks: str, signer: Signer) -> None:
    ks = KeySet.from_jwks(signer.jwks())
    good = json.loads(signer.jwks())["keys"][0]
    if jwks == "private":
        d = signer.key.private_numbers().private_value.to_bytes(32, "big")
        jwks = json.dumps({"keys": [{**good, "d": b64(d)}]})
    elif jwks == "not on curve":
        jwks = json.dumps({"keys": [{**good, "y": b64(b"\x01" * 32)}]})
    elif jwks == "duplicate kid":
        jwks = json.dumps({"keys": [good, good]})
    elif jwks == "hs alg on ec key":
        jwks = json.dumps({"keys": [{**good, "alg": "HS256"}]})
    generation = ks.generation
    with pytest.raises(ValueError):
        ks.update_from_jwks(jwks)
    assert ks.kids == frozenset({KID}) and ks.generation == generation


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"authorization": "Bearer abc.def.ghi"}, "abc.def.ghi"),
        ([("x-other", "1"), ("authorization", "Bearer t")], "t"),
        ([("authorization", b"bearer t2")], "t2"),
        ({}, TokenMissingError),
        (None, TokenMissingError),
        ({"authorization": "Basic dXNlcjpwYXNz"}, TokenMissingError),
        ({"authorization": "Bearer "}, TokenMissingError),
        ({"authorization": "abc.def.ghi"}, TokenMissingError),
        ([("authorization", "Bearer a"), ("authorization", "Bearer b")], TokenInvalidError),
    ],
)
def test_bearer_from_metadata(metadata: Any, expected: str | type[Exception]) -> None:
    if isinstance(expected, str):
        assert bearer_from_metadata(metadata) == expected
    else:
        with pytest.raises(expected):
            bearer_from_metadata(metadata)

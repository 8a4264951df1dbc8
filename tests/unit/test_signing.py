"""Detached JWS over payloads (hivemesh.mesh.signing): sign/verify, tampering, the time window, replays."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hivemesh.controlplane.ca import init_ca, load_ca
from hivemesh.mesh.errors import ReplayedError, SignatureInvalidError
from hivemesh.mesh.signing import (
    ANSWER,
    REQUEST,
    NonceCache,
    Signer,
    answer_digest,
    request_digest,
    verify,
)

TD = "hivemesh.local"
ALICE = f"spiffe://{TD}/agent/alice"
BOB = f"spiffe://{TD}/agent/bob"


def _issue(ca_dir: Path, uri: str) -> Signer:
    ca = load_ca(ca_dir)
    cert, key = ca.issue_with_new_key(uri, common_name=uri.rsplit("/", 1)[1], dns_names=[], ttl_s=3600)
    return Signer(key_pem=key, cert_pem=cert)


def test_sign_verify_tamper_window_and_replay(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca", TD)
    alice, bob = _issue(tmp_path / "ca", ALICE), _issue(tmp_path / "ca", BOB)
    d = request_digest("extract", "application/json", b'{"x":1}', BOB)
    jws = alice.sign(REQUEST, d, now=1000.0)
    assert jws.count(".") == 2 and ".." in jws  # detached: no payload travels

    nonces = NonceCache(window_s=60)
    ok = verify(jws, REQUEST, d, peer_cert=alice.cert_pem, nonces=nonces, now=1030.0)
    assert ok.signer == ALICE and ok.digest_hex == d.hex()
    with pytest.raises(ReplayedError):  # the same signed request again
        verify(jws, REQUEST, d, peer_cert=alice.cert_pem, nonces=nonces, now=1031.0)

    # Altered payload, another audience, a signature by someone else, the wrong kind, outside the window.
    for bad_digest in (request_digest("extract", "application/json", b'{"x":2}', BOB),
                       request_digest("extract", "application/json", b'{"x":1}', ALICE)):
        with pytest.raises(SignatureInvalidError, match="altered or forged"):
            verify(jws, REQUEST, bad_digest, peer_cert=alice.cert_pem, now=1000.0)
    with pytest.raises(SignatureInvalidError, match="peer's mesh certificate"):
        verify(jws, REQUEST, d, peer_cert=bob.cert_pem, now=1000.0)
    with pytest.raises(SignatureInvalidError, match="not a 'hivemesh-answer'"):
        verify(jws, ANSWER, d, peer_cert=alice.cert_pem, now=1000.0)
    for late in (1061.0, 939.0):
        with pytest.raises(SignatureInvalidError, match="outside"):
            verify(jws, REQUEST, d, peer_cert=alice.cert_pem, now=late)
    header, _, sig = jws.split(".")
    flipped = sig[:-2] + ("AA" if sig[-2:] != "AA" else "BB")
    for garbage in ("", "a.b.c", f"{header}.e30.{sig}", f"{header}..{flipped}", "x" * 20000):
        with pytest.raises(SignatureInvalidError):
            verify(garbage, REQUEST, d, peer_cert=alice.cert_pem, now=1000.0)


def test_answer_verified_by_its_x5c_against_the_mesh_ca(tmp_path: Path) -> None:
    now = time.time()
    init_ca(tmp_path / "ca", TD)
    init_ca(tmp_path / "other", TD)
    bundle = load_ca(tmp_path / "ca").bundle_pem()
    bob = _issue(tmp_path / "ca", BOB)
    d = answer_digest(b"req", b'{"ok":true}', "application/json", 2)
    jws = bob.sign(ANSWER, d, now=now)
    assert verify(jws, ANSWER, d, expect_id=BOB, bundle_pem=bundle, now=now).signer == BOB
    with pytest.raises(SignatureInvalidError, match=r"not spiffe://hivemesh\.local/agent/alice"):
        verify(jws, ANSWER, d, expect_id=ALICE, bundle_pem=bundle, now=now)
    with pytest.raises(SignatureInvalidError, match="altered"):
        verify(jws, ANSWER, answer_digest(b"req", b'{"ok":false}', "application/json", 2),
               expect_id=BOB, bundle_pem=bundle, now=now)
    # A certificate for the same name from a CA this mesh does not trust.
    mallory = _issue(tmp_path / "other", BOB)
    forged = mallory.sign(ANSWER, d, now=now)
    with pytest.raises(SignatureInvalidError, match="not issued by the mesh CA"):
        verify(forged, ANSWER, d, expect_id=BOB, bundle_pem=bundle, now=now)


def test_nonce_cache_is_bounded_and_never_forgets_into_a_replay() -> None:
    cache = NonceCache(window_s=60, max_entries=3)
    assert all(cache.add(k, 10, 10.0) for k in "abc")
    assert not cache.add("a", 10, 11.0)
    assert cache.add("d", 12, 12.0) and len(cache) == 3  # full: "a" (iat 10) forgotten, 10 is now the floor
    assert not cache.add("a", 10, 13.0)  # a replay of the forgotten nonce is still refused
    assert not cache.add("e", 9, 13.0)  # and so is anything signed before it
    assert cache.add("x", 500, 500.0) and len(cache) == 1  # expired entries are dropped


def test_an_iat_that_is_no_time_is_refused_as_an_invalid_signature(tmp_path: Path) -> None:
    """The header is the caller's, read before the signature is checked (its `kid` is the caller's own public
    thumbprint): an integer iat past a float's range raised OverflowError (the call refused INTERNAL), and one
    within it put a 309-digit number in the message. Each is SIGNATURE_INVALID, with a short message."""
    import base64
    import json

    from hivemesh.mesh.pki import cert_thumbprint_s256, load_cert

    init_ca(tmp_path / "ca", TD)
    alice = _issue(tmp_path / "ca", ALICE)
    d = request_digest("extract", "application/json", b'{"x":1}', BOB)
    kid = cert_thumbprint_s256(load_cert(alice.cert_pem))

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    for iat in (10**400, 10**308, 2**53, -1, True):
        header = {"alg": "ES256", "typ": REQUEST, "kid": kid, "iat": iat, "nonce": "abcdefghijkl"}
        jws = f"{b64(json.dumps(header).encode())}..{b64(bytes(64))}"
        with pytest.raises(SignatureInvalidError) as raised:
            verify(jws, REQUEST, d, peer_cert=alice.cert_pem, now=1000.0)
        assert len(raised.value.message) < 200, raised.value.message

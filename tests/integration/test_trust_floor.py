"""The trust floor (`trust-floor.json` beside a node's identity): a restarted node takes no trust bundle older than
the newest it adopted, and starts whatever a damaged floor file holds.

The key set's half of the floor is covered by test_trust.py
(test_a_node_restarted_over_an_older_signed_key_set_refuses_it); these cover the bundle generation, and the file.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hivemesh.mesh.identity_store import IdentityStore, TrustFloor
from hivemesh.mesh.pki import load_certs
from hivemesh.mesh.settings import MeshSettings
from hivemesh.mesh.trustdoc import TRUST_BUNDLE_KEY, TrustDoc, fingerprint, sign_trust_doc
from hivemesh.sdk import AgentServer, AgentServerConfig
from tests.support.agents_for_tests import EchoAgent
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv
from tests.support.waiting import until

NOW_NS = 1_700_000_000 * 10**9
DAY_NS = 24 * 3600 * 10**9
BUNDLE_KEY = TRUST_BUNDLE_KEY.encode()


def _root(name: str) -> bytes:
    """A self-signed root CA certificate (PEM): a root some bundle trusts besides the mesh's own."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def _roots(bundle_pem: bytes) -> set[str]:
    return {fingerprint(c) for c in load_certs(bundle_pem)}


class _Bundles:
    """Trust bundle documents of any generation, validly signed by the mesh's root (as the control plane signs
    them): what someone with etcd write access could have kept from earlier and put back."""

    def __init__(self, env: MeshEnv) -> None:
        self.mesh_root = env.certs.ca_cert.read_bytes()
        cert = x509.load_pem_x509_certificate(self.mesh_root)
        key = serialization.load_pem_private_key(env.certs.ca_key.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self._signer = (cert, key)

    def doc(self, generation: int, *extra_roots: bytes) -> bytes:
        bundle = self.mesh_root + b"".join(extra_roots)
        return sign_trust_doc(TrustDoc(generation, bundle, fingerprint(self._signer[0]), renew=False),
                              [self._signer])


async def _first_run(env: MeshEnv, etcd: Any, tmp_path: Path,
                     bundles: _Bundles) -> tuple[MeshSettings, AgentServerConfig, IdentityStore]:
    """Join an echo agent with a state folder while etcd holds bundle generation 5; it adopts it and keeps the
    floor. Returns what restarts it (settings, config) and its identity store."""
    settings = dataclasses.replace(await env.settings_for("echo"), identity_dir=tmp_path / "identity")
    config = AgentServerConfig(audit_dir=tmp_path / "a")
    store = IdentityStore(tmp_path / "identity", "echo", "agent", TRUST_DOMAIN)
    await etcd.put(BUNDLE_KEY, bundles.doc(5))
    async with AgentServer(EchoAgent(), settings, config):
        pass
    assert _kept(store)["bundle_generation"] == 5 and _kept(store)["jwks_issued_at_ns"] > 0
    return settings, config, store


def _kept(store: IdentityStore) -> dict[str, int]:
    """The floor file as written (read as JSON, not through load_floor)."""
    doc: dict[str, int] = json.loads(store.floor_path.read_bytes())
    return doc


async def test_a_node_restarted_over_an_older_signed_trust_bundle_refuses_it(
    mesh_env: MeshEnv, etcd: Any, tmp_path: Path
) -> None:
    """A node that adopted bundle generation 5 is restarted while etcd holds generation 4, validly signed but
    still trusting a root since retired (a replay): it keeps what it trusts, and adopts generation 6 (the
    control plane's current one) once that is back. Without the floor kept on disk it would take generation 4:
    a restart knows no generation until told one."""
    bundles = _Bundles(mesh_env)
    settings, config, store = await _first_run(mesh_env, etcd, tmp_path, bundles)
    retired, prepared = _root("retired root"), _root("prepared root")
    await etcd.put(BUNDLE_KEY, bundles.doc(4, retired))
    async with AgentServer(EchoAgent(), settings, config) as again:  # the stored identity: no join token needed
        node = again.node  # start() returns once the bundle etcd holds was judged
        trusted = _roots(node.workload.bundle_pem)
        assert not _roots(retired) & trusted, "the older bundle was adopted: its retired root is trusted again"
        assert trusted == _roots(bundles.mesh_root)
        assert not _roots(retired) & _roots(store.bundle_path.read_bytes())
        assert _kept(store)["bundle_generation"] == 5
        assert node.bundle_rejections == 1, "the refusal of the older bundle was not counted"

        await etcd.put(BUNDLE_KEY, bundles.doc(6, prepared))  # the current bundle, back
        assert await until(lambda: _roots(prepared) <= _roots(node.workload.bundle_pem), 10), \
            "the current bundle was not adopted"
        assert not _roots(retired) & _roots(node.workload.bundle_pem)
        assert _kept(store)["bundle_generation"] == 6
        assert _roots(prepared) <= _roots(store.bundle_path.read_bytes())
        assert node.bundle_rejections == 1


# --- a damaged or altered trust-floor.json ---------------------------------------------------------------------

def _write(store: IdentityStore, raw: bytes) -> None:
    store.folder.mkdir(parents=True, exist_ok=True)
    store.floor_path.write_bytes(raw)


def _doc(bundle: Any, jwks: Any) -> bytes:
    """A floor file with the given field values, as JSON text (NaN and Infinity as Python's json writes them)."""
    return json.dumps({"bundle_generation": bundle, "jwks_issued_at_ns": jwks}).encode()


_DAMAGED: list[tuple[str, bytes, TrustFloor]] = [
    # (what, file content, floor read): a field that is not a whole number in range reads 0, the other is kept
    ("as kept", _doc(7, NOW_NS - DAY_NS), TrustFloor(7, NOW_NS - DAY_NS)),
    ("not JSON", b"garbage{", TrustFloor()),
    ("empty (a save cut short)", b"", TrustFloor()),
    ("not UTF-8", bytes(range(256)), TrustFloor()),
    ("a list", b"[7, 8]", TrustFloor()),
    ("nested thousands deep", b"[" * 3000 + b"]" * 3000, TrustFloor()),
    ("larger than a floor file", b" " * 100_000 + _doc(7, 8), TrustFloor()),
    ("a field missing", b'{"bundle_generation": 7}', TrustFloor(7, 0)),
    ("NaN", _doc(7, float("nan")), TrustFloor(7, 0)),
    ("Infinity", _doc(float("inf"), NOW_NS), TrustFloor(0, NOW_NS)),
    ("-Infinity", _doc(7, float("-inf")), TrustFloor(7, 0)),
    ("1e400 (a float past any int)", b'{"bundle_generation": 7, "jwks_issued_at_ns": 1e400}', TrustFloor(7, 0)),
    ("negative", _doc(-5, NOW_NS), TrustFloor(0, NOW_NS)),
    ("past int64", _doc(2**63, NOW_NS), TrustFloor(0, NOW_NS)),
    ("huge", _doc(7, 10**40), TrustFloor(7, 0)),
    ("an issue time years ahead of the clock", _doc(7, NOW_NS + 365 * DAY_NS), TrustFloor(7, 0)),
    ("strings", _doc("7", str(NOW_NS)), TrustFloor()),
    ("booleans", _doc(True, True), TrustFloor()),
    ("floats", _doc(7.5, float(NOW_NS)), TrustFloor()),
    ("objects", _doc({"n": 7}, [NOW_NS]), TrustFloor()),
]


def test_a_damaged_trust_floor_file_is_read_field_by_field_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever trust-floor.json holds, load_floor returns a floor of whole numbers in range (never NaN, negative
    or past int64, which would let every document in or none), keeps each field that reads right, and logs an
    error naming the file and the fields read as 0; a file as save_floor writes it logs nothing."""
    store = IdentityStore(tmp_path / "identity", "echo", "agent", TRUST_DOMAIN)
    wrong = []
    for what, raw, want in _DAMAGED:
        _write(store, raw)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="hivemesh.mesh.identity_store"):
            try:
                got = store.load_floor(now_ns=NOW_NS)
            except Exception as exc:  # noqa: BLE001 - the finding
                wrong.append(f"{what}: raised {type(exc).__name__}: {exc}")
                continue
        if got != want or not all(type(v) is int for v in dataclasses.astuple(got)):
            wrong.append(f"{what}: read {got}, want {want}")
        logged = caplog.text
        if what == "as kept":
            if logged:
                wrong.append(f"{what}: logged {logged!r}")
        elif str(store.floor_path) not in logged or "damaged" not in logged:
            wrong.append(f"{what}: no error naming the file ({logged!r})")
    store.floor_path.unlink()
    store.floor_path.mkdir()  # a directory in its place
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="hivemesh.mesh.identity_store"):
        if store.load_floor(now_ns=NOW_NS) != TrustFloor() or str(store.floor_path) not in caplog.text:
            wrong.append("a directory: not read as zeros with an error")
    assert not wrong, "\n".join(wrong)


def test_a_fifo_in_place_of_the_trust_floor_does_not_block_the_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A FIFO named trust-floor.json (nothing writes it) is read as a damaged floor at once: a plain open() of it
    waits for a writer for ever, and the node with it."""
    store = IdentityStore(tmp_path / "identity", "echo", "agent", TRUST_DOMAIN)
    store.folder.mkdir(parents=True)
    os.mkfifo(store.floor_path)
    read: list[TrustFloor] = []
    with caplog.at_level(logging.ERROR, logger="hivemesh.mesh.identity_store"):
        reader = threading.Thread(target=lambda: read.append(store.load_floor()), daemon=True)
        reader.start()
        reader.join(10)
        if reader.is_alive():  # open a writer so the blocked open() returns, then fail
            os.close(os.open(store.floor_path, os.O_WRONLY | os.O_NONBLOCK))
            reader.join(10)
            pytest.fail("load_floor blocked on a FIFO")
    assert read == [TrustFloor()]
    assert str(store.floor_path) in caplog.text and "not a regular file" in caplog.text, caplog.text


@pytest.mark.parametrize("jwks", ["Infinity", "NaN", "1e400", str(10**40), str(NOW_NS + 10**18)],
                         ids=["Infinity", "NaN", "1e400", "huge", "years-ahead"])
async def test_a_node_with_a_damaged_trust_floor_starts_and_still_refuses_an_older_bundle(
    mesh_env: MeshEnv, etcd: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, jwks: str
) -> None:
    """A node restarted over a floor file whose key set field was damaged (by a crash, a bad restore, a hand)
    starts, says so in its log, still refuses an older bundle (the bundle generation read right is kept), takes
    etcd's current key set and writes a sound floor again."""
    bundles = _Bundles(mesh_env)
    settings, config, store = await _first_run(mesh_env, etcd, tmp_path, bundles)
    kept = store.load_floor()
    _write(store, b'{"bundle_generation": 5, "jwks_issued_at_ns": %s}' % jwks.encode())
    retired = _root("retired root")
    await etcd.put(BUNDLE_KEY, bundles.doc(4, retired))
    with caplog.at_level(logging.ERROR, logger="hivemesh.mesh.identity_store"):
        async with AgentServer(EchoAgent(), settings, config) as again:
            assert again.node.keyset.kids, "no key set adopted"
            assert not _roots(retired) & _roots(again.node.workload.bundle_pem), "the older bundle was adopted"
    assert str(store.floor_path) in caplog.text and "jwks_issued_at_ns" in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="hivemesh.mesh.identity_store"):
        assert store.load_floor() == kept  # rewritten when the current key set was adopted
    assert not caplog.text


async def test_a_node_with_an_unreadable_trust_floor_starts(
    mesh_env: MeshEnv, etcd: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A floor file nothing can be read from (JSON nested past the parser's recursion limit) costs the replay
    check, logged, never the start: the node takes etcd's current documents and keeps a sound floor again."""
    bundles = _Bundles(mesh_env)
    settings, config, store = await _first_run(mesh_env, etcd, tmp_path, bundles)
    kept = store.load_floor()
    _write(store, b"[" * 3000)
    with caplog.at_level(logging.ERROR, logger="hivemesh.mesh.identity_store"):
        async with AgentServer(EchoAgent(), settings, config) as again:
            assert again.node.keyset.kids
    assert str(store.floor_path) in caplog.text and "not JSON" in caplog.text, caplog.text
    assert store.load_floor() == kept


def test_replicas_sharing_a_folder_never_lower_the_kept_floor(tmp_path: Path) -> None:
    """Two replicas of one agent share its state folder, one of them behind: each save keeps, field by field, the
    higher of what it adopted and what is kept, through a synced temporary file of its own (none left over), so
    neither a lagging replica nor two saves at once lower the floor or leave it half written."""
    ahead = IdentityStore(tmp_path / "identity", "echo", "agent", TRUST_DOMAIN)
    behind = IdentityStore(tmp_path / "identity", "echo", "agent", TRUST_DOMAIN)
    ahead.folder.mkdir(parents=True)
    ahead.save_floor(TrustFloor(5, NOW_NS))
    behind.save_floor(TrustFloor(3, NOW_NS + 1))
    assert _kept(ahead) == {"bundle_generation": 5, "jwks_issued_at_ns": NOW_NS + 1}

    def saves(store: IdentityStore, first: int) -> None:
        for n in range(first, first + 200, 2):
            store.save_floor(TrustFloor(n, NOW_NS + n))

    threads = [threading.Thread(target=saves, args=(ahead, 10)), threading.Thread(target=saves, args=(behind, 11))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert _kept(ahead) == {"bundle_generation": 209, "jwks_issued_at_ns": NOW_NS + 209}
    assert sorted(p.name for p in ahead.folder.iterdir() if p.name != ".lock") == ["trust-floor.json"]

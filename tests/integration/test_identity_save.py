"""A stored identity survives a save that fails part-way (a full disk) or is cut short (a crash among the renames):
a key beside a certificate it does not belong to is an identity lost, and the next start would need a join token."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hivemesh.controlplane.ca import load_ca
from hivemesh.mesh.identity_store import IdentityStore
from hivemesh.mesh.pki import new_key_and_csr
from hivemesh.mesh.tls import Workload
from tests.conftest import SessionCa

TD = "hivemesh.local"
REPO = Path(__file__).resolve().parents[2]

_SAVE_WITH_A_FULL_DISK = """
import resource, signal, sys
from pathlib import Path
from hivemesh.mesh.identity_store import IdentityStore
from hivemesh.mesh.tls import Workload

src, root = Path(sys.argv[1]), Path(sys.argv[2])
renewed = Workload.from_pems(*((src / n).read_bytes() for n in ("cert.pem", "key.pem", "bundle.pem")))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (len(renewed.key_pem) + 16,) * 2)  # the key fits, the certificate not
try:
    IdentityStore(root, "a", "agent", sys.argv[3]).save(renewed)
except OSError as exc:
    print("save failed:", exc.errno)
"""


def _workload(session_ca: SessionCa) -> Workload:
    sid = f"spiffe://{TD}/agent/a"
    key, csr = new_key_and_csr(sid)
    return Workload.from_pems(load_ca(session_ca.files.certs_dir).sign_csr(csr, sid), key,
                              session_ca.files.ca_cert.read_bytes())


def test_a_save_that_fails_part_way_leaves_the_old_identity_whole(tmp_path: Path, session_ca: SessionCa) -> None:
    bundle = session_ca.files.ca_cert.read_bytes()
    store = IdentityStore(tmp_path / "identity", "a", "agent", TD)
    old = _workload(session_ca)
    store.save(old)
    renewed = _workload(session_ca)  # a renewal: a new key and its certificate
    src = tmp_path / "renewed"
    src.mkdir()
    for name, data in (("cert.pem", renewed.cert_pem), ("key.pem", renewed.key_pem), ("bundle.pem", bundle)):
        (src / name).write_bytes(data)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _SAVE_WITH_A_FULL_DISK, str(src), str(tmp_path / "identity"), TD],
                          capture_output=True, text=True, timeout=60, env=env, check=False)
    assert "save failed: 27" in done.stdout, (done.stdout, done.stderr)  # EFBIG
    loaded = store.load(bundle)
    assert loaded is not None and loaded.cert_pem == old.cert_pem and loaded.key_pem == old.key_pem
    assert sorted(p.name for p in store.folder.iterdir()) == [".lock", "bundle.pem", "cert.pem", "key.pem"]


def test_a_save_cut_short_among_its_renames_is_finished_at_the_next_load(
    tmp_path: Path, session_ca: SessionCa
) -> None:
    bundle = session_ca.files.ca_cert.read_bytes()
    store = IdentityStore(tmp_path / "identity", "a", "agent", TD)
    store.save(_workload(session_ca))
    renewed = _workload(session_ca)
    # What a save leaves when the process dies after renaming the key: the others staged, the marker present.
    renewed.save(store.cert_path, store.key_path, store.bundle_path)
    for path in (store.cert_path, store.bundle_path):
        path.rename(path.with_name(f".{path.name}.tmp"))
    (store.folder / ".identity-commit").write_text("key.pem\ncert.pem\nbundle.pem")
    store.cert_path.write_bytes(_workload(session_ca).cert_pem)  # the old certificate: not the new key's
    store.bundle_path.write_bytes(bundle)
    loaded = store.load(bundle)
    assert loaded is not None and loaded.cert_pem == renewed.cert_pem and loaded.key_pem == renewed.key_pem
    assert not (store.folder / ".identity-commit").exists()

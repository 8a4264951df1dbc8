"""`hivemesh certs init` makes its CA whole or not at all, under the same marker-and-lock protocol as `hivemesh up`
(`hivemesh.controlplane.ca.CA_PENDING`): killed mid-way, it left part of a CA (keys without ca.pem, ca.pem without
operator.pem), after which it refused without --force, and `up` refused or failed later; with --force over what a
killed `up` left, it kept that `up`'s marker, so the next `up` threw the new CA away and made another.

The state a kill leaves is made here file by file (no timing races): real keys and certificates from a CA made
elsewhere, and a marker nobody holds. Each test runs the real CLI in a child process; a made CA is checked by
signature and by a mutual TLS call (gRPC health on 127.0.0.1, a free port) between its two identities.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from hivemesh.controlplane.ca import CaFiles, init_ca, load_ca
from hivemesh.mesh.tls import channel_credentials, server_credentials
from tests.support.rlimits import limited

TD = "hivemesh.local"
CA_PENDING = ".ca-in-progress"
"""The marker a CA is made under (ca.CA_PENDING), spelled out: it is what earlier versions left on disk."""
KEYS_ONLY = ("ca.key", "operator.key", ".controlplane.key.tmp")
"""Killed among the keys: no ca.pem."""
NO_OPERATOR_PEM = ("ca.key", "operator.key", "controlplane.key", "ca.pem", ".operator.pem.tmp")
"""Killed among the certificates: ca.pem, no operator.pem."""


def _certs_init(certs: Path, *args: str, max_file_bytes: int = 0) -> subprocess.CompletedProcess[str]:
    """`hivemesh --certs-dir certs certs init ARGS` in a child process; max_file_bytes > 0 limits the size of each
    file it writes (RLIMIT_FSIZE: a write past it fails with EFBIG, as on a disk that fills up)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMESH_")}
    command = [sys.executable, "-m", "hivemesh.controlplane.cli", "--home", str(certs.parent / "home"),
               "--certs-dir", str(certs), "certs", "init", *args]
    return subprocess.run(
        limited(command, file_bytes=max_file_bytes), capture_output=True, text=True,
        env={**env, "COLUMNS": "4000"}, timeout=120, check=False,
    )


def _leave(certs: Path, whole: Path, names: tuple[str, ...], marker: str | None) -> dict[str, bytes]:
    """Lay out in certs what a maker killed mid-way leaves: names copied from the CA in whole (a temp file cut
    short) and, unless marker is None, the marker with that text, its lock gone with its maker."""
    certs.mkdir(mode=0o700)
    for name in names:
        source = whole / name.removeprefix(".").removesuffix(".tmp")
        (certs / name).write_bytes(source.read_bytes()[: 40 if name.endswith(".tmp") else None])
    if marker is not None:
        (certs / CA_PENDING).write_text(marker)
    return {p.name: p.read_bytes() for p in certs.iterdir()}


@contextlib.contextmanager
def _serving(files: CaFiles) -> Iterator[int]:
    """A gRPC health server with the control plane's certificate, requiring a client certificate of the CA."""
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    creds = server_credentials(files.controlplane_cert.read_bytes(), files.controlplane_key.read_bytes(),
                               files.ca_cert.read_bytes())
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        yield port
    finally:
        server.stop(None).wait(10)


def _ca_is_whole(certs: Path) -> None:
    """Every file of a CA is there, no marker or temp file is, each certificate is signed by ca.pem and its key
    is the one beside it, and the operator's identity calls the control plane's over mutual TLS."""
    files = CaFiles.in_dir(certs)
    names = {p.name for p in certs.iterdir()}
    assert names == {p.name for p in files.all()}, names  # no marker, no temp file
    ca = load_ca(certs)  # ca.key is ca.pem's
    for cert_path, key_path in ((files.operator_cert, files.operator_key),
                                (files.controlplane_cert, files.controlplane_key)):
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(ca.certificate)
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert cert.public_key() == key.public_key()
    with _serving(files) as port:
        creds = channel_credentials(files.ca_cert.read_bytes(), files.operator_cert.read_bytes(),
                                    files.operator_key.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{port}", creds,
                                 options=[("grpc.ssl_target_name_override", f"controlplane.{TD}")]) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def whole(tmp_path: Path) -> Path:
    """A CA made elsewhere: the source of the pieces a killed maker leaves (real keys and certificates)."""
    return init_ca(tmp_path / "whole", TD).certs_dir


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("left", "marker", "killed", "force"), [
    (KEYS_ONLY, "4242\n", "hivemesh up", False),  # an `up`'s marker as up wrote it before (no name in it)
    (NO_OPERATOR_PEM, "4242 hivemesh certs init\n", "hivemesh certs init", False),
    (KEYS_ONLY, "4242 hivemesh certs init\n", "hivemesh certs init", True),
    (NO_OPERATOR_PEM, "4242\n", "hivemesh up", True),
], ids=["keys-only-up", "no-operator-pem-certs-init", "keys-only-certs-init-force", "no-operator-pem-up-force"])
def test_certs_init_makes_anew_a_ca_a_killed_certs_init_or_up_left_half_made(
        tmp_path: Path, whole: Path, left: tuple[str, ...], marker: str, killed: str, force: bool) -> None:
    """Without --force it refused ("already holds CA material (ca.key, operator.key) ... use --force"); with it,
    it made a CA but kept the killed `up`'s marker, which the next `up` took for its own leftovers: it removed
    that CA and made another, orphaning what the first had signed. Now the leftovers are removed, said so, and a
    whole CA is made, with no marker left."""
    certs = tmp_path / "certs"
    before = _leave(certs, whole, left, marker)

    done = _certs_init(certs, *(["--force"] if force else []))
    assert done.returncode == 0, done.stderr
    removed = ", ".join(n for n in (p.name for p in CaFiles.in_dir(certs).all()) for n in (n, f".{n}.tmp")
                        if n in before)
    assert done.stdout.splitlines() == [
        f"a previous `{killed}` was stopped while it made the CA in {certs}: removed what it left ({removed}); "
        "making a new one",
        f"CA for spiffe://{TD} in {certs} (private keys are 0600; never commit them)",
    ], done.stdout + done.stderr
    _ca_is_whole(certs)
    assert all((certs / name).read_bytes() != before[name] for name in left if not name.startswith("."))


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_certs_init_refuses_while_another_live_process_holds_the_marker(
        tmp_path: Path, whole: Path, force: bool) -> None:
    """A marker whose lock is held is a live maker's (an `up` or a `certs init` making the CA in this folder right
    now): its files must not be removed, nor a CA made beside it. `certs init` refused without --force with
    "already holds CA material" (as if the files were a finished CA's), and with --force wrote its own CA over
    the other's files."""
    certs = tmp_path / "certs"
    _leave(certs, whole, ("ca.key", "operator.key"), None)
    fd = os.open(certs / CA_PENDING, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the maker holds it while it writes
        os.write(fd, f"{os.getpid()} hivemesh up\n".encode())
        before = {p.name: p.read_bytes() for p in certs.iterdir()}

        done = _certs_init(certs, *(["--force"] if force else []))
        assert done.returncode == 1, done.stdout + done.stderr
        assert done.stderr.strip() == (
            f"error: another `hivemesh up` (pid {os.getpid()}) is making a CA in {certs} right now: nothing there "
            "was changed; run this again once that one has finished"), done.stderr
        assert done.stdout == "" and "Traceback" not in done.stderr
        assert {p.name: p.read_bytes() for p in certs.iterdir()} == before  # the marker too, as its maker wrote it
    finally:
        os.close(fd)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("force", [False, True], ids=["new", "force-over-a-ca"])
def test_a_write_failing_part_way_leaves_no_part_of_a_ca(tmp_path: Path, whole: Path, force: bool) -> None:
    """A file size limit of 400 bytes lets the keys (241 bytes) be written and not ca.pem (725), as a disk that
    fills up would: the keys stayed ("[Errno 27] File too large: '.../.ca.pem.tmp'"), and with --force over a
    CA, new keys stood beside the old CA's certificates. Now nothing of a new CA is left, the error says what
    failed, and --force leaves the CA it was replacing whole: every file is written beside its place before any is
    renamed (a reviewer found the old CA deleted though none of it had been replaced)."""
    certs = tmp_path / "certs"
    before: dict[str, bytes] = {}
    if force:
        before = _leave(certs, whole, tuple(p.name for p in CaFiles.in_dir(whole).all()), None)

    done = _certs_init(certs, *(["--force"] if force else []), max_file_bytes=400)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.strip() == f"error: could not create a CA in {certs}: File too large", done.stderr
    if force:
        assert {p.name: p.read_bytes() for p in certs.iterdir()} == before  # the old CA, untouched
        _ca_is_whole(certs)
    else:
        assert not certs.exists()

    again = _certs_init(certs, *(["--force"] if force else []))
    assert again.returncode == 0, again.stderr
    _ca_is_whole(certs)

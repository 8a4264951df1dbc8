"""`hivemesh up` where a review found it left things behind or said the wrong thing, with real processes: etcd
failing at start was reported by the last lines of its log (Go stack frames, not the reason), a CA left half-made
by a killed `up` made every later `up` refuse, a hang-up sent to `up`'s process group (a terminal closing) killed
the children under it, and "stopped: agents, sidecar, control plane and etcd" was said whatever had started.

Each test runs `up` on 127.0.0.1 (free ports: etcd's and the control plane's are chosen at start) with its own
home, certificates and user state folder under tmp_path, and ends every process it started, also when it fails.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import signal
from pathlib import Path

import pytest
from cryptography import x509

from hivemesh.controlplane.ca import CaFiles, init_ca, load_ca
from hivemesh.mesh.settings import STATE_FILE
from tests.support.up_process import Up, ours
from tests.support.waiting import until

CA_PENDING = ".ca-in-progress"
"""The marker `up` makes (and locks) in the certificates folder while it makes a CA (launcher.CA_PENDING)."""


def _ca_is_whole(certs: Path) -> None:
    """Every file of the CA is there, no marker or temp file is, and each certificate is the CA's own."""
    files = CaFiles.in_dir(certs)
    names = {p.name for p in certs.iterdir()}
    assert {p.name for p in files.all()} <= names, names
    assert not {n for n in names if n.endswith(".tmp")} and CA_PENDING not in names, names
    ca = load_ca(certs)
    for cert in (files.operator_cert, files.controlplane_cert):
        assert x509.load_pem_x509_certificate(cert.read_bytes()).issuer == ca.certificate.subject


def _corrupt(data: Path, what: str) -> None:
    """Damage etcd's data folder the way a disk or a hand can (etcd then exits while it starts)."""
    wal, snap = data / "member" / "wal", data / "member" / "snap"
    for folder in (data, data / "member", wal, snap):
        folder.mkdir(mode=0o700, exist_ok=True)
    if what == "db":  # the backend's database: etcd logs a panic (JSON), then Go prints its panic and the stack
        (snap / "db").write_bytes(b"not a bolt database\n" * 1000)
    elif what == "wal-zeros":  # a zeroed write-ahead log: Go's own panic only, no JSON line for it
        (wal / "0000000000000000-0000000000000000.wal").write_bytes(bytes(65536))
    else:  # a write-ahead log of text: a fatal JSON line with the error
        (wal / "0000000000000000-0000000000000000.wal").write_bytes(b"not a wal\n" * 6554)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("damage", "reason"), [
    ("db", r"failed to open database: invalid database \(path {data}/member/snap/db\)"),
    ("wal-zeros", r"panic: cannot use none as id"),
    ("wal-text", r"discovery failed: wal: \S.*"),
], ids=["corrupt-db", "zeroed-wal", "text-wal"])
def test_etcd_failing_at_start_is_reported_by_its_reason_and_nothing_is_said_stopped(
        tmp_path: Path, up_runs: list[Up], damage: str, reason: str) -> None:
    """The error ended with the log's last five lines: after a panic, Go stack frames ("backend.go:55 +0x1f8"),
    the reason some dozen lines above. And "stopped: agents, sidecar, control plane and etcd" came before it,
    though nothing had started (etcd never answered)."""
    data = tmp_path / "home" / "etcd"
    data.parent.mkdir()
    _corrupt(data, damage)
    up = Up(tmp_path, "--once", "--demo", "none")
    up_runs.append(up)
    assert up.wait(90) == 1, up.text[-3000:]
    log = tmp_path / "home" / "logs" / "etcd.log"
    expected = (rf"error: etcd could not start: {reason.format(data=re.escape(str(data)))} \(it exited with code "
                rf"\d+; data in {re.escape(str(data))}, log: {re.escape(str(log))}\)$")
    assert re.match(expected, up.error()), up.text[-3000:]  # was: "... exited with code 2 (log: ...)", then frames
    assert "goroutine" not in up.text and ".go:" not in up.text and "Traceback" not in up.text, up.text[-3000:]
    assert "stopped:" not in up.text, up.text[-3000:]  # was: "stopped: agents, sidecar, control plane and etcd"
    assert "created a development CA" in up.text  # what it did do, it says


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("left", [
    ("ca.key", "operator.key", ".controlplane.key.tmp"),  # killed among the keys: no ca.pem
    ("ca.key", "operator.key", "controlplane.key", "ca.pem", ".operator.pem.tmp"),  # ca.pem, no operator.pem
], ids=["keys-only", "no-operator-pem"])
def test_a_ca_left_half_made_by_a_killed_up_is_made_again_by_the_next_up(
        tmp_path: Path, up_runs: list[Up], left: tuple[str, ...]) -> None:
    """A SIGKILL while `init_ca` writes the CA (no cleanup runs) left some of its files: the next `up`, finding keys
    without ca.pem, refused ("already holds CA material ... use --force", an option `up` has not), and one finding
    ca.pem without operator.pem failed in the control plane, each time. A marker made before the first file and
    removed after the last now tells the next `up` that what it finds is a killed `up`'s: removed and made again.

    The state is made here, file by file, as such a kill leaves it (from a CA made elsewhere: real keys)."""
    certs, whole = tmp_path / "certs", tmp_path / "whole"
    init_ca(whole, "hivemesh.local")
    certs.mkdir(mode=0o700)
    for name in left:
        source = whole / name.removeprefix(".").removesuffix(".tmp")
        (certs / name).write_bytes(source.read_bytes()[: 40 if name.endswith(".tmp") else None])
    (certs / CA_PENDING).write_text("4242\n")  # written by the killed `up`, its lock gone with it

    up = Up(tmp_path, "--once", "--demo", "none")
    up_runs.append(up)
    assert up.wait(120) == 0, up.text[-3000:]
    assert (f"a previous `hivemesh up` was stopped while it made the development CA in {certs}: removed what it "
            f"left (") in up.text, up.text[-3000:]
    assert f"created a development CA in {certs}" in up.text
    _ca_is_whole(certs)
    assert (certs / "ca.key").read_bytes() != (whole / "ca.key").read_bytes()  # a new CA, not the pieces
    # What was started, and only that (was: "stopped: agents, sidecar, control plane and etcd").
    assert re.search(r"stopped: control plane and etcd$", up.text), up.text[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_ca_up_cannot_tell_as_its_own_or_another_up_is_making_is_left_alone_saying_what_to_do(
        tmp_path: Path, up_runs: list[Up]) -> None:
    """Keys without ca.pem and without the marker (an older `up` killed mid-way, or files put there by hand): `up`
    said "use force / --force", an option it has not. And a marker another live `up` holds (it is making the CA
    right now in a shared certificates folder) must not be taken for a killed one's: its files would be removed
    under it."""
    certs, whole = tmp_path / "certs", tmp_path / "whole"
    init_ca(whole, "hivemesh.local")
    certs.mkdir(mode=0o700)
    for name in ("ca.key", "operator.key"):
        (certs / name).write_bytes((whole / name).read_bytes())
    before = {p.name: p.read_bytes() for p in certs.iterdir()}

    up = Up(tmp_path, "--once", "--demo", "none")
    up_runs.append(up)
    assert up.wait(90) == 1, up.text[-3000:]
    assert up.error().startswith(
        f"error: {certs} holds part of a CA (ca.key, operator.key) but no ca.pem, and no marker says an `up` was "
        f"stopped while making it, so `up` leaves it alone. If nothing uses these keys, remove them (cd {certs} && "
        f"rm ca.key operator.key) and run `hivemesh up` again, or make a new CA over them: hivemesh --certs-dir "
        f"{certs} certs init --force"), up.text[-3000:]  # was: "... (use force / --force ...)"
    assert {p.name: p.read_bytes() for p in certs.iterdir()} == before  # untouched, no marker left either

    for name in before:
        (certs / name).unlink()
    marker = certs / CA_PENDING
    fd = os.open(marker, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the `up` making the CA holds it
        busy = Up(tmp_path, "--once", "--demo", "none")
        up_runs.append(busy)
        assert busy.wait(90) == 1, busy.text[-3000:]  # was: made a CA beside the other's, and ran the mesh
        assert busy.error() == (f"error: another `hivemesh up` is making the development CA in {certs} right now: "
                                "run this one again once that one says it created it"), busy.text[-3000:]
        assert [p.name for p in certs.iterdir()] == [CA_PENDING]  # nothing of the other's removed or added
    finally:
        os.close(fd)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_hangup_to_ups_process_group_reaches_up_alone_which_stops_the_mesh_in_order(
        tmp_path: Path, up_runs: list[Up]) -> None:
    """Closing the terminal hangs up its foreground process group: `up` and, sharing its group, the control plane,
    the agents and the sidecar. None of these handles SIGHUP: they died on the spot, `up` reported each as a crash
    ("controlplane (pid N) was killed by SIGHUP ... Restarting it in 0.5 s") while it stopped, and the sidecar's
    socket file stayed in <home>/run. Now they run in sessions of their own and `up` stops them as on Ctrl-C."""
    home = tmp_path / "home"
    up = Up(tmp_path, "--demo", "pipeline", own_group=True)  # agents and a sidecar; then it stays up
    up_runs.append(up)
    up.wait_for("mesh is up", 180)
    pids = up.pids()
    assert len(pids) >= 7 and list((home / "run").glob("*.sock")), up.text[-3000:]  # etcd, cp, 4 agents, sidecar

    os.killpg(up.proc.pid, signal.SIGHUP)
    assert up.wait(90) == 0, up.text[-3000:]
    assert "SIGHUP" not in up.text and "Restarting" not in up.text, up.text[-3000:]
    assert re.search(r"stopped: agents, sidecar, control plane and etcd$", up.text), up.text[-3000:]
    assert list((home / "run").iterdir()) == []  # was: sidecar-<pid>.sock, its sidecar killed before it cleaned up
    assert not (home / STATE_FILE).exists()
    assert asyncio.run(until(lambda: not any(ours(p, tmp_path) for p in pids), 30, 0.1))

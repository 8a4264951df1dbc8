"""`hivemesh up` through a CA rotation and through a stop request while it restarts etcd, with real processes.

The three documented steps (`hivemesh ca rotate --step prepare|activate|finish`) run through the real CLI against a
running `up` with one agent of its own: after each one `hivemesh agents` reads the registry from etcd, a call
reaches the agent, and after `finish` a control plane killed is restarted and serves again. `up` used to leave etcd
as it started: it refused every certificate from the new root after `activate` ("Tls handshake failed") and,
after `finish`, presented a certificate from the dropped root (CERTIFICATE_VERIFY_FAILED), so the restarted
control plane crash-looped.

At `prepare` and `finish` `up` restarts etcd only: the control plane is the same process throughout (its etcd client
rereads its credentials when it reconnects), and once `up` says etcd follows the step, it answers at once (a policy
list and a join token, each on the first try). `up` used to restart the control plane at both steps as well.

A SIGTERM while `up` waits for a restarted etcd that cannot become healthy (its database file locked by the test,
as a stuck disk would leave it) stops everything within seconds: the wait blocked `up`'s event loop for 60 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from hivemesh.mesh.trustdoc import fingerprint
from tests.support.cli_zygote import run_hivemesh
from tests.support.up_process import Up, ours
from tests.support.waiting import until

INVOICE = '{"text": "INVOICE #7 TOTAL: $5.00"}'


class Mesh:
    """The CLI (as an operator runs it, in a process of its own) against one `up`'s home and certificates."""

    def __init__(self, tmp_path: Path) -> None:
        self.home, self.certs = tmp_path / "home", tmp_path / "certs"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMESH_")}
        self.env["XDG_STATE_HOME"] = str(tmp_path / "xdg")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        code, out, err = asyncio.run(run_hivemesh(
            ["--home", str(self.home), "--certs-dir", str(self.certs), *args], self.env, timeout=60))
        return subprocess.CompletedProcess(args, code, out, err)

    def works(self, step: str, limit_s: float = 30.0) -> None:
        """The registry is read from etcd (the agent listed) and a call reaches the agent, within limit_s (`up`
        restarts etcd and the control plane at `prepare` and `finish`: the CLI may find them restarting)."""
        failed: list[str] = []

        def both() -> bool:
            agents = self.cli("agents", "--json")
            if agents.returncode != 0 or "extractor" not in agents.stdout:
                failed[:] = [f"hivemesh agents: {agents.stdout[-500:]} {agents.stderr[-1500:]}"]
                return False
            call = self.cli("call", "extract", "--data", INVOICE)
            if call.returncode != 0 or "5.0" not in call.stdout:
                failed[:] = [f"hivemesh call: {call.stdout[-500:]} {call.stderr[-1500:]}"]
                return False
            return True

        assert _eventually(both, limit_s), f"after {step}, for {limit_s:g} s: {failed}"

    def roots(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates((self.certs / "ca.pem").read_bytes())


def _eventually(cond: Callable[[], bool], limit_s: float) -> bool:
    """cond() polled until it holds (True) or limit_s passed (False); for conditions that run the CLI, which runs
    an event loop of its own (`until` runs cond inside one)."""
    deadline = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def _followed(up: Up, generation: int) -> bool:
    """Whether `up` says, within 30 s, that etcd follows the rotation step that made generation (the next step is
    run either way: without that, what the operator meets next is what the test checks)."""
    try:
        up.wait_for(rf"etcd follows the CA rotation \(generation {generation}\)", 30)
    except AssertionError:
        return False
    return True


def _issued_by(cert_path: Path, root: x509.Certificate) -> bool:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = root.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return cert.issuer == root.subject


def _etcd_pids(data: Path) -> list[int]:
    """The etcd processes running on data (this test's: their command line names it)."""
    return [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if ours(pid, data)]


def _ready_lines(log: Path) -> int:
    return len(re.findall(r"ready controlplane=", log.read_text(errors="replace")))


def _same_controlplane(up: Up, mesh: Mesh, pid: int, step: str) -> None:
    """After step: the control plane `up` started first still runs (never restarted) and answers calls that read and
    write etcd on the first try (a policy list, a join token)."""
    assert ours(pid, mesh.home), f"after {step}: the control plane (pid {pid}) is gone\n{up.text[-3000:]}"
    assert f"control plane carried on (pid {pid})" in up.text.rpartition("etcd follows the CA rotation")[2], (
        f"after {step}: {up.text[-3000:]}")
    assert _ready_lines(mesh.home / "logs" / "controlplane.log") == 1, f"after {step}: the control plane restarted"
    policies = mesh.cli("policy", "list", "--json")
    assert policies.returncode == 0, f"after {step}: {policies.stderr[-1500:]}"
    assert "demo" in {d["name"] for d in json.loads(policies.stdout)}, policies.stdout  # `up`'s own grants
    token = mesh.cli("join-token", f"after-{step}", "--json")
    assert token.returncode == 0 and json.loads(token.stdout)["token"], f"after {step}: {token.stderr[-1500:]}"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ca_rotation_under_up_keeps_etcd_and_calls_working(tmp_path: Path, up_runs: list[Up]) -> None:
    up = Up(tmp_path, "--demo", "none")
    up_runs.append(up)
    up.wait_for("mesh is up", 90)
    cp = int(up.wait_for(r"control plane \S+ \(joins on \S+, pid (\d+)\)", 1).group(1))
    mesh = Mesh(tmp_path)
    token = mesh.cli("join-token", "extractor", "--json")
    assert token.returncode == 0, token.stderr
    agent = subprocess.Popen(
        [sys.executable, "-m", "hivemesh.agents.run", "extractor"], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env={**mesh.env, "HIVEMESH_HOME": str(mesh.home),
                                        "HIVEMESH_JOIN_TOKEN": json.loads(token.stdout)["token"]})
    try:
        assert _eventually(lambda: "extractor" in mesh.cli("agents").stdout, 60), "the agent never registered"
        old_root = fingerprint(mesh.roots()[0])

        assert mesh.cli("ca", "rotate", "--step", "prepare").returncode == 0
        followed = [_followed(up, 2)]  # `up` restarted etcd: the next step waits for it
        _same_controlplane(up, mesh, cp, "prepare")
        mesh.works("prepare")

        assert mesh.cli("ca", "rotate", "--step", "activate").returncode == 0
        followed.append(_followed(up, 3))
        mesh.works("activate")  # the operator's certificate is from the new root now: etcd accepts it

        # finish refuses until the new root has signed for 5 s and the agent renewed: asked again until it passes.
        deadline = time.monotonic() + 60
        while (finish := mesh.cli("ca", "rotate", "--step", "finish")).returncode != 0:
            assert "FAILED_PRECONDITION" in finish.stderr, finish.stderr
            assert time.monotonic() < deadline, finish.stderr
            time.sleep(0.5)
        followed.append(_followed(up, 4))
        _same_controlplane(up, mesh, cp, "finish")
        mesh.works("finish")  # etcd's certificate is from the new root: the CLI, trusting only that, verifies it
        assert followed == [True] * 3, up.text[-3000:]
        assert "it trusts 1 root" in up.text.rpartition("(generation 4)")[2], up.text[-3000:]
        new_root = mesh.roots()
        assert [fingerprint(c) for c in new_root] != [old_root] and len(new_root) == 1
        for issued in ("etcd.pem", "etcd-root.pem", "controlplane.pem", "operator.pem"):  # all chain to it
            assert _issued_by(mesh.certs / issued, new_root[0]), issued

        # A control plane killed now comes back (it crash-looped: etcd's certificate was from the dropped root).
        log = mesh.home / "logs" / "controlplane.log"
        before = _ready_lines(log)
        os.kill(cp, signal.SIGKILL)
        up.wait_for(rf"controlplane \(pid {cp}\) was killed by SIGKILL", 15)
        assert asyncio.run(until(lambda: _ready_lines(log) > before, 30, 0.1)), log.read_text()[-2000:]
        joined = mesh.cli("join-token", "worker")
        assert joined.returncode == 0, joined.stderr
        mesh.works("a control-plane restart")

        # So does an etcd killed now (it never became healthy: `up` checks it with the root identity).
        [etcd] = _etcd_pids(mesh.home / "etcd")
        os.kill(etcd, signal.SIGKILL)
        up.wait_for(rf"etcd \(pid {etcd}\) was killed by SIGKILL", 15)
        up.wait_for(r"etcd restarted \(pid \d+\)", 30)
        mesh.works("an etcd restart")
        # What `up` said itself, not the last lines of a child's log it quotes (the control plane killed above logged
        # its etcd requests refused while etcd restarted at `finish`, which it lived through).
        said = re.sub(r"last lines: .*?\. (Restarting it|It was restarted)", "", up.text)
        assert "could not" not in said, up.text[-3000:]
    finally:
        agent.terminate()
        agent.wait(30)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigterm_ends_a_restarted_etcds_health_wait_at_once(tmp_path: Path, up_runs: list[Up]) -> None:
    up = Up(tmp_path, "--demo", "none")
    up_runs.append(up)
    up.wait_for("mesh is up", 90)
    etcd = int(up.wait_for(r"etcd \S+ \(pid (\d+)", 1).group(1))
    data = tmp_path / "home" / "etcd"
    fd = os.open(data / "member" / "snap" / "db", os.O_RDWR)
    try:
        os.kill(etcd, signal.SIGKILL)

        def locked() -> bool:  # etcd's database, held as its own lock: a restarted etcd waits on it for ever
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        assert asyncio.run(until(locked, 10, 0.01)), "the killed etcd's lock was never released"
        up.wait_for(rf"etcd \(pid {etcd}\) was killed by SIGKILL; .*Restarting it in 0\.5 s", 15)

        assert asyncio.run(until(lambda: bool(set(_etcd_pids(data)) - {etcd}), 15, 0.05)), "etcd was not restarted"
        t0 = time.monotonic()
        up.proc.send_signal(signal.SIGTERM)
        code = up.wait(60)
        took = time.monotonic() - t0
        assert code == 0, up.text[-3000:]
        assert took < 15, f"up took {took:.1f} s to stop"  # was ~60 s: it heard SIGTERM once the wait ran out
        assert "stopped: control plane and etcd" in up.text, up.text[-3000:]
        assert not _etcd_pids(data)
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

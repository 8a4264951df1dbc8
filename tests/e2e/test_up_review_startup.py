"""`hivemesh up` when start-up goes wrong, with real processes: a stale state whose pid was reused, a signal that
cuts `--once` short, a child that dies while the mesh starts, a disk that fills while the CA is made. Each test
starts `up` on 127.0.0.1 with its own home, certificates and user state folder under tmp_path, and ends every
process it started, also when it fails."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hivemesh.controlplane.cli import localmesh
from hivemesh.controlplane.cli.uplock import UpLock
from hivemesh.mesh.settings import STATE_FILE
from tests.support.up_process import HIVEMESH, Up, left_running
from tests.support.waiting import until


def test_a_crashed_ups_pid_reused_by_a_later_hivemesh_process_is_not_that_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pid_max is 32768 here: the pid a SIGKILLed `up` left in mesh.json and in its note comes back, often as
    another hivemesh process (an agent, a CLI call). `up` refused to start ("a mesh is already running ... kill
    <pid>", naming a process that is no `up`) and the CLI elsewhere went on using the dead mesh."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    home = tmp_path / "home"
    home.mkdir()
    crashed_at = time.time() - 30  # the `up` that wrote the state started, then was SIGKILLed
    # The pid's new owner: a live process started after that, whose command line says hivemesh.
    later = subprocess.Popen(["hivemesh-agent-stand-in", "60"], executable="sleep")
    try:
        assert asyncio.run(until(lambda: b"hivemesh" in Path(f"/proc/{later.pid}/cmdline").read_bytes(), 10))
        state = {"pid": later.pid, "started_at": crashed_at, "controlplane": "127.0.0.1:7443",
                 "join": "127.0.0.1:7444", "etcd": "127.0.0.1:2379"}
        (home / STATE_FILE).write_text(json.dumps(state))
        localmesh.register(localmesh.LocalMesh(home=home, certs_dir=tmp_path / "certs", pid=later.pid,
                                               started_at=crashed_at, controlplane="127.0.0.1:7443",
                                               etcd="127.0.0.1:2379"))
        assert localmesh.running() == []  # the CLI in another folder does not take the dead mesh for a live one
        lock = UpLock(home)
        try:
            note = lock.acquire()  # was: MeshAlreadyRunningError(... kill <the stand-in's pid> ...)
        finally:
            lock.release()
        assert note is not None and f"(pid {later.pid}," in note and "did not stop cleanly" in note
        assert not (home / STATE_FILE).exists()

        # The `up` that wrote a state still running (its process older than the state): still refused.
        state["started_at"] = time.time()
        (home / STATE_FILE).write_text(json.dumps(state))
        with pytest.raises(RuntimeError, match=rf"already running in {re.escape(str(home))}: `hivemesh up` pid "
                                               rf"{later.pid}"):
            UpLock(home).acquire()
    finally:
        later.kill()
        later.wait(10)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_once_cut_short_by_a_signal_is_no_success(tmp_path: Path, up_runs: list[Up], sig: signal.Signals) -> None:
    """`--once` exits with the demo's verdict; stopped by Ctrl-C or SIGTERM (a CI job's timeout) before the demo
    ran, it exited 0 as if the demo had passed."""
    up = Up(tmp_path, "--once", "--demo", "pipeline")
    up_runs.append(up)
    up.wait_for(r"control plane \S+ \(joins on \S+, pid \d+\)", 120)  # the demo has not started yet
    up.proc.send_signal(sig)
    code = up.wait(60)
    assert code == 128 + sig, up.text[-3000:]  # was 0
    assert f"stopping ({sig.name} received before the demo finished)" in up.text
    # What stopped is what had started: how far the start got when the signal came.
    assert re.search(r"stopped: (agents, )?(sidecar, )?control plane and etcd", up.text), up.text[-3000:]
    assert "Traceback" not in up.text


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_child_that_dies_while_the_mesh_starts_fails_up_at_once(tmp_path: Path, up_runs: list[Up]) -> None:
    """Nothing restarts a child before the mesh is up: one that died there never registers, and `up` waited the
    whole 60 s registration timeout, silent, before saying which child it was."""
    up = Up(tmp_path, "--once", "--demo", "research")
    up_runs.append(up)
    pid = int(up.wait_for(r"research demo \(pid (\d+)\)", 120).group(1))
    os.kill(pid, signal.SIGKILL)  # just spawned: its agents cannot have registered yet
    killed = time.monotonic()
    code = up.wait(50)  # was: subprocess.TimeoutExpired (60 s and more)
    assert code == 1, up.text[-3000:]
    assert time.monotonic() - killed < 30, up.text[-3000:]
    assert f"error: demo-research (pid {pid}) was killed by SIGKILL while the mesh was starting" in up.text
    assert "Traceback" not in up.text and "stopped: agents, control plane and etcd" in up.text  # no sidecar


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_write_failing_while_the_ca_is_made_leaves_nothing_that_breaks_the_next_up(
        tmp_path: Path, up_runs: list[Up]) -> None:
    """The first `up` makes the development CA, and its writes fail part-way (a file size limit here; a disk
    filling up alike). A key cut short was renamed into place as if whole (one os.write, its count unread), and the
    files already written were left: every later `up` refused ("already holds CA material (ca.key, ...);
    refusing to overwrite it (use force / --force ...)", an option `up` has not), or the control plane failed on a
    missing operator.pem. Now the failure says what could not be made, and the next `up` makes it."""
    certs = tmp_path / "certs"
    full = Up(tmp_path, "--once", "--demo", "none", certs=certs, max_file_bytes=200)
    up_runs.append(full)
    assert full.wait(120) == 1, full.text[-3000:]
    assert f"error: could not create a development CA in {certs}: File too large" in full.text, full.text[-3000:]
    assert "Traceback" not in full.text
    assert not certs.exists() or not list(certs.iterdir()), list(certs.iterdir())  # nothing cut short left

    again = Up(tmp_path, "--once", "--demo", "none", certs=certs)
    up_runs.append(again)
    assert again.wait(120) == 0, again.text[-3000:]
    assert f"created a development CA in {certs}" in again.text


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_closing_the_terminal_stops_the_mesh_as_ctrl_c_does(tmp_path: Path) -> None:
    """`up` in a real terminal (a pty it has as its controlling terminal), then the terminal is closed: the kernel
    hangs it up (SIGHUP to `up` and its foreground children). `up` died on the spot, without its shutdown: the
    children went down unordered and mesh.json, the note for the CLI elsewhere and the Prometheus targets of the
    dead nodes stayed behind."""
    import pty

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMESH_")}
    env.update(XDG_STATE_HOME=str(tmp_path / "xdg"), PYTHONUNBUFFERED="1", COLUMNS="4000")
    master, slave = pty.openpty()
    up = subprocess.Popen(  # setsid --ctty: a session of its own, the pty its controlling terminal
        ["setsid", "--ctty", *HIVEMESH, "--home", str(home), "--certs-dir", str(tmp_path / "certs"), "up",
         "--demo", "none"], stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    seen = bytearray()
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while b"mesh is up" not in seen:
            assert time.monotonic() < deadline and up.poll() is None, seen.decode(errors="replace")[-3000:]
            if select.select([master], [], [], 1.0)[0]:
                with contextlib.suppress(OSError):
                    seen += os.read(master, 65536)
        text = " ".join(seen.decode(errors="replace").split())
        pids = [int(p) for p in re.findall(r"pid (\d+)", text)]
        assert len(pids) == 2 and (home / STATE_FILE).exists(), text  # etcd and the control plane
    finally:
        os.close(master)  # the terminal goes away: SIGHUP
        try:
            code = up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait(10)
            raise
        left = left_running(pids, tmp_path)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left running after the terminal closed: {left}"
    assert code == 0
    assert not (home / STATE_FILE).exists()  # was: left, as after a crash
    assert not list((tmp_path / "xdg" / "hivemesh" / "running").iterdir())
    assert json.loads((home / "prometheus" / "nodes.json").read_text()) == []
    assert json.loads((home / "prometheus" / "controlplane.json").read_text()) == []

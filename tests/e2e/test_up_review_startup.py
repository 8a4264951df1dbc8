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
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hivemesh.controlplane.cli import localmesh
from hivemesh.controlplane.cli.uplock import UpLock
from hivemesh.mesh.settings import STATE_FILE
from tests.support.waiting import until

HIVEMESH = [sys.executable, "-m", "hivemesh.controlplane.cli"]


_LIMITED = (
    "import os, resource, signal, sys\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"  # the write past the limit fails instead of killing
    "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)
"""Runs argv[2:] with every file it writes limited to argv[1] bytes (the ignored SIGXFSZ is inherited by exec)."""


class Up:
    """One `hivemesh up` child: its merged output read by a thread, so every wait on it is bounded."""

    def __init__(self, tmp_path: Path, *args: str, certs: Path | None = None, max_file_bytes: int = 0) -> None:
        """max_file_bytes: the most bytes any file `up` writes may hold (RLIMIT_FSIZE: a write past it fails
        with EFBIG, as a disk filling up fails one); 0: no limit."""
        self.tmp_path = tmp_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMESH_")}
        env.update(XDG_STATE_HOME=str(tmp_path / "xdg"), PYTHONUNBUFFERED="1", COLUMNS="4000")
        command = [*HIVEMESH, "--home", str(tmp_path / "home"), "--certs-dir", str(certs or tmp_path / "certs"),
                   "up", *args]
        if max_file_bytes:  # set in a small exec wrapper (not preexec_fn: this process runs reader threads)
            command = [sys.executable, "-c", _LIMITED, str(max_file_bytes), *command]
        self.proc = subprocess.Popen(command, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    @property
    def text(self) -> str:
        with self._changed:
            return " ".join(" ".join(self.lines).split())  # rich may wrap a long line

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while not (m := rx.search(" ".join(" ".join(self.lines).split()))):
                left = deadline - time.monotonic()
                assert left > 0 and self.proc.poll() is None, f"no {pattern!r} in the output:\n{self.text[-3000:]}"
                self._changed.wait(min(left, 0.5))
            return m

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"pid (\d+)", self.text)]

    def stop(self) -> None:
        """However the test went: `up` ends (SIGTERM, then SIGKILL), then every process it started is gone."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        left = _left_running(self.pids(), self.tmp_path)
        for pid in left:  # only processes of this test (their command line or environment name tmp_path)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left running after hivemesh up ended: {left}"


def _ours(pid: int, tmp_path: Path) -> bool:
    """pid is alive (not a zombie) and one of this test's: pids are reused, someone else's is never touched."""
    try:
        if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
            return False
        seen = Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return str(tmp_path).encode() in seen


def _left_running(pids: list[int], tmp_path: Path, timeout: float = 30.0) -> list[int]:
    asyncio.run(until(lambda: not any(_ours(p, tmp_path) for p in pids), timeout, 0.1))
    return [p for p in pids if _ours(p, tmp_path)]


@pytest.fixture
def up_runs(tmp_path: Path) -> Iterator[list[Up]]:
    """The `up` children a test starts; each is stopped, and checked to leave nothing behind, at the end."""
    runs: list[Up] = []
    try:
        yield runs
    finally:
        for run in runs:
            run.stop()


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
        left = _left_running(pids, tmp_path)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left running after the terminal closed: {left}"
    assert code == 0
    assert not (home / STATE_FILE).exists()  # was: left, as after a crash
    assert not list((tmp_path / "xdg" / "hivemesh" / "running").iterdir())
    assert json.loads((home / "prometheus" / "nodes.json").read_text()) == []
    assert json.loads((home / "prometheus" / "controlplane.json").read_text()) == []

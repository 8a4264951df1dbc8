"""`hivemesh up`'s life cycle without processes: the restart backoff, the one-`up`-per-folder lock with its
stale-state detection, and finding a local mesh from another folder."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from hivemesh.controlplane.cli import localmesh
from hivemesh.controlplane.cli.restarts import Backoff, RestartPolicy, describe_exit
from hivemesh.controlplane.cli.uplock import MeshAlreadyRunningError, UpLock
from hivemesh.mesh.settings import STATE_FILE, user_state_dir

# The kernel hands out pids below pid_max: this one is never a live process.
DEAD_PID = int(Path("/proc/sys/kernel/pid_max").read_text())


def test_backoff_doubles_from_half_a_second_caps_resets_after_a_stable_run_and_gives_up() -> None:
    b = Backoff(RestartPolicy())
    b.started(0.0)
    now, delays = 0.0, []
    for _ in range(7):  # each run dies within a second of starting
        now += 1.0
        delays.append(b.exited(now))
        b.started(now)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, None]  # six restarts, then it stays down

    b = Backoff(RestartPolicy())
    b.started(0.0)
    assert [b.exited(1.0), b.exited(2.0), b.exited(3.0)] == [0.5, 1.0, 2.0]
    b.started(3.0)
    assert b.exited(3.0 + 30.0) == 0.5  # it ran 30 s: healthy, the backoff starts over

    capped = Backoff(RestartPolicy(initial_s=10.0, max_s=30.0, max_quick_failures=10))
    capped.started(0.0)
    assert [capped.exited(0.1) for _ in range(4)] == [10.0, 20.0, 30.0, 30.0]

    for bad in ({"initial_s": 0.0}, {"initial_s": 5.0, "max_s": 1.0}, {"factor": 0.5}, {"max_quick_failures": 0}):
        with pytest.raises(ValueError, match="restart policy out of range"):
            RestartPolicy(**bad)  # type: ignore[arg-type]
    assert describe_exit(-9) == "was killed by SIGKILL" and describe_exit(3) == "exited with code 3"


def _mesh_json(home: Path, pid: int, started_at: float) -> dict[str, object]:
    state = {"etcd": "127.0.0.1:2379", "controlplane": "127.0.0.1:7443", "join": "127.0.0.1:7444",
             "ca_bundle": "/x/ca.pem", "trust_domain": "hivemesh.local", "pid": pid, "started_at": started_at}
    (home / STATE_FILE).write_text(json.dumps(state))
    return state


def test_a_second_up_in_the_same_folder_is_refused_at_once_and_touches_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = UpLock(home)
    assert first.acquire() is None
    state = _mesh_json(home, os.getpid(), first.started_at)
    before = (home / STATE_FILE).read_bytes()

    t0 = time.monotonic()
    with pytest.raises(MeshAlreadyRunningError) as refused:
        UpLock(home).acquire()  # another open of the lock file: flock refuses it even in this process
    assert time.monotonic() - t0 < 1.0
    message = str(refused.value)
    assert f"a mesh is already running in {home}" in message
    assert f"`hivemesh up` pid {os.getpid()}, started {localmesh.when(first.started_at)}" in message
    assert f"control plane {state['controlplane']}, joins on {state['join']}, etcd {state['etcd']}" in message
    assert f"kill {os.getpid()}" in message and "Nothing of it was touched" in message
    assert (home / STATE_FILE).read_bytes() == before

    first.release()
    (home / STATE_FILE).unlink()  # as a clean shutdown leaves it
    again = UpLock(home)
    assert again.acquire() is None  # the folder is free again, and nothing stale was found
    again.release()


def test_a_crashed_ups_state_is_reported_and_replaced(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    _mesh_json(home, DEAD_PID, 1_700_000_000.0)
    lock = UpLock(home)
    note = lock.acquire()
    try:
        assert note is not None
        assert f"a previous `hivemesh up` in {home} (pid {DEAD_PID}, started 2023-11-14 22:13:20 UTC)" in note
        assert "did not stop cleanly: replacing its state" in note
        assert not (home / STATE_FILE).exists()
        assert json.loads((home / "up.lock").read_text())["pid"] == os.getpid()
        # While this one starts (no mesh.json yet), a second up says so and still names the pid from the lock.
        with pytest.raises(MeshAlreadyRunningError, match=rf"pid {os.getpid()}, .*still starting \(no ports yet\)"):
            UpLock(home).acquire()
    finally:
        lock.release()


def test_finding_the_mesh_from_another_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert user_state_dir() == tmp_path / "xdg" / "hivemesh"
    here, here_certs = tmp_path / "elsewhere" / ".hivemesh", tmp_path / "elsewhere" / "certs"
    assert localmesh.running() == [] and localmesh.where_hint() is None  # then `certs init` is the right advice

    home = tmp_path / "proj" / ".hivemesh"
    home.mkdir(parents=True)
    _mesh_json(home, DEAD_PID, 1.0)
    gone = localmesh.LocalMesh(home=home, certs_dir=home.parent / "certs", pid=DEAD_PID, started_at=1.0,
                               controlplane="127.0.0.1:7443", etcd="127.0.0.1:2379")
    note = localmesh.register(gone)
    assert note.parent == tmp_path / "xdg" / "hivemesh" / "running" and oct(note.stat().st_mode & 0o777) == "0o600"
    assert json.loads(note.read_text())["home"] == str(home)
    # Its `up` is gone (SIGKILLed): the note is ignored, nothing is guessed.
    assert localmesh.running() == []
    assert localmesh.locate("agents", here, here_certs, home_given=False, certs_given=False) == (here, here_certs)
    localmesh.unregister(home, pid=12345)  # another up's note is left alone
    assert note.exists()
    localmesh.unregister(home, pid=DEAD_PID)
    assert not note.exists()


@pytest.mark.parametrize("started_at", [["a", "list"], 1e300, float("nan"), "yesterday", True])
def test_a_crashed_ups_state_with_an_odd_start_time_is_still_replaced(tmp_path: Path, started_at: object) -> None:
    """A state file left by a crash (or edited by hand) whose start time is not one: a note without it, never a
    traceback (a list raised TypeError, 1e300 OverflowError)."""
    home = tmp_path / "home"
    home.mkdir()
    state = {"pid": DEAD_PID, "started_at": started_at, "controlplane": "x", "join": "y", "etcd": "z"}
    (home / STATE_FILE).write_text(json.dumps(state))
    lock = UpLock(home)
    try:
        note = lock.acquire()
        assert note is not None and f"(pid {DEAD_PID})" in note and not (home / STATE_FILE).exists()
    finally:
        lock.release()

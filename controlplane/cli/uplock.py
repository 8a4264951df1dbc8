"""One `hivemesh up` per state folder.

`up` holds an exclusive flock on `<home>/up.lock` for as long as it runs (the kernel drops it when the process
dies, however it dies) and writes its pid and start time into it. A second `up` of the same folder fails at
once, naming the running one (pid, start, addresses from `mesh.json`), and touches nothing of it. A `mesh.json`
found while the lock is free is a crashed `up`'s: it is reported and replaced.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from hivemesh.controlplane.cli.localmesh import up_alive, when
from hivemesh.mesh import json_depth
from hivemesh.mesh.settings import STATE_FILE

LOCK_FILE = "up.lock"


class MeshAlreadyRunningError(RuntimeError):
    """Another `hivemesh up` runs in this state folder."""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        raw = json_depth.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def _since(started_at: Any) -> str:
    """", started <when>" for a start time read from a state file, or "" when it is not one (a file left by a
    crash, or written by hand, must not turn the message into a traceback)."""
    if isinstance(started_at, bool) or not isinstance(started_at, int | float):
        return ""
    try:
        return f", started {when(float(started_at))}"
    except (ValueError, OverflowError, OSError):  # NaN, or past what a calendar holds
        return ""


def _start(state: dict[str, Any] | None) -> float | None:
    """The start time a state file records, when it is a real one (for telling a reused pid from its `up`)."""
    started_at = (state or {}).get("started_at")
    if isinstance(started_at, bool) or not isinstance(started_at, int | float) or not math.isfinite(started_at):
        return None
    return float(started_at)


def running_message(home: Path, owner: dict[str, Any] | None, state: dict[str, Any] | None) -> str:
    """What a refused second `up` says: who runs here, since when, on which ports, and what to do instead."""
    info = {**(owner or {}), **{k: v for k, v in (state or {}).items() if k in ("pid", "started_at")}}
    who = f"`hivemesh up` pid {info['pid']}" if "pid" in info else "another `hivemesh up`"
    who += _since(info.get("started_at"))
    if state and {"controlplane", "join", "etcd"} <= state.keys():
        where = f"control plane {state['controlplane']}, joins on {state['join']}, etcd {state['etcd']}"
    else:
        where = "still starting (no ports yet)"
    stop = f"kill {info['pid']}" if "pid" in info else "stop it"
    return (f"a mesh is already running in {home}: {who}; {where}. Nothing of it was touched. Use it as it is "
            f"(hivemesh agents), stop it first (Ctrl-C in its terminal, or {stop}), or start another mesh in "
            "another folder or with --home")


class UpLock:
    """The claim of one `up` on its state folder; `acquire` before anything is written there."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = home / LOCK_FILE
        self.started_at = time.time()
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the folder or raise MeshAlreadyRunningError. Returns a note to show when a crashed `up`'s
        state was found and replaced, else None."""
        self.home.mkdir(parents=True, exist_ok=True)
        state_path = self.home / STATE_FILE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MeshAlreadyRunningError(
                running_message(self.home, _read_json(self.path), _read_json(state_path))) from None
        state = _read_json(state_path)
        pid = state.get("pid") if state else None
        if isinstance(pid, int) and pid != os.getpid() and up_alive(pid, _start(state)):
            os.close(fd)  # a live `up` that holds no lock: one from before the lock; leave it be
            raise MeshAlreadyRunningError(running_message(self.home, None, state))
        note = None
        if state_path.exists():
            since = _since(state.get("started_at")) if state else ""
            who = f"pid {pid}{since}" if pid is not None else "it left no pid"
            note = (f"a previous `hivemesh up` in {self.home} ({who}) did not stop cleanly: replacing its state "
                    f"(logs of that run stay in {self.home / 'logs'})")
            state_path.unlink()
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "started_at": self.started_at}).encode())
        self._fd = fd
        return note

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

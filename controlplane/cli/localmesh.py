"""Finding the local mesh from any folder.

Every running `hivemesh up` leaves a note in this user's state folder (`user_state_dir()/running/`, one file per
mesh home: its home, certificates folder, pid, start time and addresses) and takes it away when it stops. A CLI
command run elsewhere, with no --home or HIVEMESH_HOME and no mesh in ./.hivemesh, uses the one mesh running;
errors name the meshes found instead of advising `hivemesh certs init`, which would make a second CA.
A note whose `up` is gone (it was SIGKILLed) is ignored: the pid must still be a live hivemesh process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hivemesh.mesh.settings import STATE_FILE, user_state_dir

RUNNING_DIR = "running"
HERE_ONLY = frozenset({"up", "certs", "controlplane", "sidecar"})
"""Commands that act on the folder they are given or run in, never on a mesh found elsewhere."""


_CLOCK_SLACK_S = 10.0
"""How much later than the recorded start /proc may put an `up`'s start: its boot time is whole seconds, and a wall
clock stepped forward since (NTP, a resumed VM) moves it later still. A pid is reused long after, not seconds."""


def _start_time(pid: int) -> float | None:
    """When pid started (Unix time), from /proc; None where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        ticks = int(stat.rpartition(")")[2].split()[19])  # field 22, starttime; the name before ")" may hold spaces
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def up_alive(pid: int, started_at: float | None = None) -> bool:
    """Whether pid is a live process that looks like hivemesh (a reused pid of another program is not) and,
    given the start time the `up` recorded, one that began before it: a pid reused by a later hivemesh process
    (an agent of another mesh, a CLI call) is not that `up` either. pid_max is often 32768: reuse happens."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: /proc still tells what it runs and since when
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: liveness is all we can tell
    if b"hivemesh" not in cmdline:
        return False
    if started_at is None or (began := _start_time(pid)) is None:
        return True
    return began <= started_at + _CLOCK_SLACK_S


def when(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix))


@dataclass(frozen=True)
class LocalMesh:
    """A mesh `hivemesh up` runs on this machine."""

    home: Path
    certs_dir: Path
    pid: int
    started_at: float
    controlplane: str
    etcd: str

    def describe(self) -> str:
        return (f"{self.home} (`hivemesh up` pid {self.pid}, started {when(self.started_at)}, control plane "
                f"{self.controlplane}, etcd {self.etcd}, certificates in {self.certs_dir})")

    def pointing(self) -> str:
        """How to point a shell at this mesh."""
        return f"HIVEMESH_HOME={self.home} HIVEMESH_CERTS={self.certs_dir}"


def _note(home: Path) -> Path:
    key = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:16]
    return user_state_dir() / RUNNING_DIR / f"{key}.json"


def register(mesh: LocalMesh) -> Path:
    """Leave the note for this mesh (private to this user; written whole, never half)."""
    path = _note(mesh.home)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**asdict(mesh), "home": str(mesh.home), "certs_dir": str(mesh.certs_dir)}))
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


def unregister(home: Path, pid: int) -> None:
    """Take the note away, if it is still this `up`'s (a later `up` of the same home owns it otherwise)."""
    path = _note(home)
    with contextlib.suppress(OSError, ValueError, TypeError):
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()


def running() -> list[LocalMesh]:
    """The meshes whose `up` still runs, oldest first."""
    folder = user_state_dir() / RUNNING_DIR
    found: list[LocalMesh] = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            raw = json.loads(path.read_text())
            mesh = LocalMesh(home=Path(raw["home"]), certs_dir=Path(raw["certs_dir"]), pid=int(raw["pid"]),
                             started_at=float(raw["started_at"]), controlplane=str(raw["controlplane"]),
                             etcd=str(raw["etcd"]))
        except (OSError, ValueError, TypeError, KeyError):
            continue  # half a note from another version: not a mesh we can use
        if up_alive(mesh.pid, mesh.started_at) and (mesh.home / STATE_FILE).is_file():
            found.append(mesh)
    return sorted(found, key=lambda m: m.started_at)


def locate(command: str | None, home: Path, certs_dir: Path, *, home_given: bool,
           certs_given: bool) -> tuple[Path, Path]:
    """The home and certificates folder a command uses: what it was given, else ./.hivemesh if a mesh runs
    there, else the one local mesh running (several: none is guessed; the errors list them)."""
    if command in HERE_ONLY or home_given or (home / STATE_FILE).is_file():
        return home, certs_dir
    meshes = running()
    if len(meshes) != 1:
        return home, certs_dir
    return meshes[0].home, certs_dir if certs_given else meshes[0].certs_dir


def where_hint() -> str | None:
    """For an error that cannot find the mesh or its operator: the meshes running here and how to use one;
    None when no mesh runs (then `hivemesh up` or `hivemesh certs init` are the right advice)."""
    meshes = running()
    if not meshes:
        return None
    listed = "; ".join(m.describe() for m in meshes)
    newest = meshes[-1]
    there = newest.home.parent
    also = f" or run the command in {there}" if newest.home == there / ".hivemesh" and newest.certs_dir == there / \
        "certs" else ""
    return f"a local mesh is running: {listed}. Point at it with {newest.pointing()}{also}"

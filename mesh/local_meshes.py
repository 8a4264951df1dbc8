"""The meshes `hivemesh up` runs on this machine for this user, found from any folder.

Every running `hivemesh up` leaves a note in this user's state folder (`user_state_dir()/running/`, one file per
mesh home: its home, certificates folder, pid, start time and addresses) and takes it away when it stops. The CLI
(`hivemesh.controlplane.cli.localmesh`) and `MeshSettings.resolve` (SDK agents, `MeshClient`) read the same
notes, so a program finds the mesh from any folder exactly as the CLI does. Here, in the data plane, because the
data plane imports neither the control plane nor its CLI.
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

from hivemesh.mesh import json_depth

STATE_FILE = "mesh.json"
"""What `hivemesh up` writes in its home: where its mesh is (`MeshSettings.to_json`)."""
RUNNING_DIR = "running"


def user_state_dir() -> Path:
    """This user's hivemesh state, whatever the folder: $XDG_STATE_HOME/hivemesh, else ~/.local/state/hivemesh
    (the XDG base directory rule). `hivemesh up` records there which local meshes run, so the CLI and the SDK
    find one from any folder."""
    base = os.environ.get("XDG_STATE_HOME")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "state"
    return root / "hivemesh"


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
        if json_depth.loads(path.read_text()).get("pid") == pid:
            path.unlink()


def running() -> list[LocalMesh]:
    """The meshes whose `up` still runs, oldest first."""
    folder = user_state_dir() / RUNNING_DIR
    found: list[LocalMesh] = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            raw = json_depth.loads(path.read_text())
            mesh = LocalMesh(home=Path(raw["home"]), certs_dir=Path(raw["certs_dir"]), pid=int(raw["pid"]),
                             started_at=float(raw["started_at"]), controlplane=str(raw["controlplane"]),
                             etcd=str(raw["etcd"]))
        except (OSError, ValueError, TypeError, KeyError):
            continue  # half a note from another version: not a mesh we can use
        if up_alive(mesh.pid, mesh.started_at) and (mesh.home / STATE_FILE).is_file():
            found.append(mesh)
    return sorted(found, key=lambda m: m.started_at)

"""`hivemesh up`'s life cycle as an operator meets it, with real processes: a second `up` in the same folder is
refused at once and leaves the first mesh alone, the CLI finds the mesh from another folder, and a control
plane or etcd that dies is reported and restarted so the next CLI call works. It runs with `--advertise`, so
the addresses `up` hands out are the advertised ones."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

HIVEMESH = [sys.executable, "-m", "hivemesh.controlplane.cli"]


class Output:
    """A child's merged output, read by a thread, so every wait on it is bounded."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def close(self, proc: subprocess.Popen[str]) -> None:
        """Once proc has exited: let the reader reach the end of its output, then close the pipe."""
        self._thread.join(10)
        if proc.stdout is not None and not self._thread.is_alive():
            proc.stdout.close()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first match of pattern in the output so far or to come (a message rich wrapped still matches)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                if m := rx.search(" ".join(line.rstrip("\n") for line in self.lines)):
                    return m
                left = deadline - time.monotonic()
                assert left > 0, f"no line matched {pattern!r} in {timeout} s:\n" + "".join(self.lines)[-3000:]
                self._changed.wait(left)


def _wait_for_file_line(path: Path, pattern: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(re.findall(pattern, path.read_text(errors="replace"))) < count:
        assert time.monotonic() < deadline, f"{path} has not {count} lines matching {pattern!r}"
        time.sleep(0.05)


@pytest.mark.slow
def test_second_up_refused_mesh_found_from_anywhere_and_dead_children_restarted(tmp_path: Path) -> None:
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMESH_")}
    env.update(XDG_STATE_HOME=str(tmp_path / "xdg"), PYTHONUNBUFFERED="1", COLUMNS="4000")

    def cli(*args: str, cwd: Path = elsewhere) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*HIVEMESH, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)

    # Bound on 127.0.0.1, advertised by name: mesh.json, etcd and the control plane must say `localhost`.
    up = subprocess.Popen([*HIVEMESH, "up", "--demo", "none", "--advertise", "localhost"], cwd=project, env=env,
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = Output(up)
    try:
        out.wait_for("mesh is up", 60)
        etcd_pid = int(out.wait_for(r"etcd \S+ \(pid (\d+)", 1).group(1))
        cp_pid = int(out.wait_for(r"control plane \S+ \(joins on \S+, pid (\d+)\)", 1).group(1))
        state = project / ".hivemesh" / "mesh.json"
        before = state.read_bytes()
        noted = json.loads(before)
        assert noted["etcd"].startswith("localhost:") and noted["controlplane"].startswith("localhost:"), noted
        assert noted["join"].startswith("localhost:"), noted

        # A second up in the same folder, while the first one's children die and come back (in parallel, to
        # save time): refused at once, naming the running one; nothing of the running mesh is touched.
        t0 = time.monotonic()
        second = subprocess.Popen([*HIVEMESH, "up", "--demo", "none"], cwd=project, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        # The control plane dies: reported with how it died and its last lines, restarted on its ports.
        os.kill(cp_pid, signal.SIGKILL)
        out.wait_for(rf"controlplane \(pid {cp_pid}\) was killed by SIGKILL; last lines: .*Restarting it in 0\.5 s", 15)
        new_cp = int(out.wait_for(r"controlplane restarted \(pid (\d+)\)", 15).group(1))
        _wait_for_file_line(project / ".hivemesh" / "logs" / "controlplane.log", r"ready controlplane=", 2, 30)
        # etcd dies: restarted on its ports and data.
        os.kill(etcd_pid, signal.SIGKILL)
        out.wait_for(rf"etcd \(pid {etcd_pid}\) was killed by SIGKILL; .*Restarting it in 0\.5 s", 15)
        new_etcd = int(out.wait_for(r"etcd restarted \(pid (\d+)\)", 30).group(1))

        _, refusal = second.communicate(timeout=60)
        refused_s = time.monotonic() - t0
        said = " ".join(refusal.split())
        assert second.returncode == 1, refusal
        assert f"a mesh is already running in {project / '.hivemesh'}: `hivemesh up` pid {up.pid}, started" in said
        assert f"control plane {json.loads(before)['controlplane']}" in said and "Traceback" not in said
        assert refused_s < 20, refused_s  # an interpreter's start on a busy machine; not 30 s waiting for etcd
        assert state.read_bytes() == before and up.poll() is None  # the same addresses all along

        # From another folder, with no HIVEMESH_HOME: the CLI finds this mesh and its operator certificates, and
        # the restarted control plane issues a join token (stored in the restarted etcd).
        token = cli("join-token", "worker", "--json")
        assert token.returncode == 0, token.stderr
        assert json.loads(token.stdout)["name"] == "worker"
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
        code = up.wait(60)
        out.close(up)  # also when the test failed: the reader has read everything once up exited
    out.wait_for("stopped: control plane and etcd", 5)  # --demo none: no agent ran
    assert code == 0, "".join(out.lines)[-3000:]
    assert not state.exists() and not list((tmp_path / "xdg" / "hivemesh" / "running").iterdir())
    for pid in (new_cp, new_etcd):  # the restarted children are stopped with the rest
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"

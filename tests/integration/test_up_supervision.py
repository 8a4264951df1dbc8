"""`hivemesh up`'s supervisor with real child processes (tiny shell ones), and finding a running local mesh
through a live process, without starting a mesh: a child that dies is reported with its exit code and last
lines and restarted with backoff, one that keeps dying is left down with a plain message, and the CLI names a
mesh running elsewhere instead of advising a second CA."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hivemesh.controlplane.cli import localmesh
from hivemesh.controlplane.cli.app import cli
from hivemesh.controlplane.cli.procs import Supervisor
from hivemesh.controlplane.cli.restarts import RestartPolicy
from hivemesh.mesh.settings import STATE_FILE


async def _until(said: list[str], pattern: str, timeout: float = 15.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in said:
            if m := re.search(pattern, line):
                return m
        await asyncio.sleep(0.02)
    raise AssertionError(f"nothing matched {pattern!r} within {timeout} s; said:\n" + "\n".join(said))


async def test_a_dead_child_is_reported_restarted_with_backoff_and_left_down_when_it_keeps_dying(
        tmp_path: Path) -> None:
    said: list[str] = []
    starts = tmp_path / "starts"
    sup = Supervisor(tmp_path / "logs", RestartPolicy(initial_s=0.05, max_s=0.2, stable_s=10.0, max_quick_failures=3))
    try:
        flaky = await sup.spawn("flaky", ["sh", "-c", f'echo start >> {starts}; echo "boom: disk on fire"; exit 3'])
        steady = await sup.spawn("steady", ["sh", "-c", "echo ready; exec sleep 60"])
        await steady.wait_for_line("ready", 10.0)
        first_flaky, first_steady = flaky.pid, steady.pid
        sup.supervise(said.append)

        await _until(said, rf"flaky \(pid {first_flaky}\) exited with code 3; last lines: boom: disk on fire\. "
                           r"Restarting it in 0\.05 s \(log: .*flaky\.log\)")
        await _until(said, r"flaky \(pid \d+\) exited with code 3; .*It was restarted 3 times and died each time "
                           r"within 10 s, so it stays down: see .*flaky\.log")
        assert [float(x) for x in re.findall(r"flaky .*Restarting it in ([\d.]+) s", "\n".join(said))] == [
            0.05, 0.1, 0.2]
        assert starts.read_text().count("start") == 4  # the first start and three restarts, no more

        os.kill(steady.pid, signal.SIGKILL)
        await _until(said, rf"steady \(pid {first_steady}\) was killed by SIGKILL; last lines: ready\. Restarting")
        await _until(said, r"steady restarted \(pid \d+\)")
        await steady.wait_for_line("ready", 10.0)  # the new process, not the old one's line
        assert steady.pid != first_steady and steady.proc.returncode is None
    finally:
        await sup.stop_all()
    assert steady.proc.returncode is not None  # stopped for good: stop_all ends the supervision first
    assert len([line for line in said if line.startswith("steady restarted")]) == 1


def _stand_in_up(tmp_path: Path, name: str) -> tuple[subprocess.Popen[bytes], localmesh.LocalMesh]:
    """A live process whose command line says hivemesh (as `up`'s does), and the note `up` leaves for it."""
    proc = subprocess.Popen(["hivemesh-up-stand-in", "60"], executable="sleep")
    deadline = time.monotonic() + 10
    while b"hivemesh" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():  # until the exec is done
        assert time.monotonic() < deadline, "the stand-in did not start"
        time.sleep(0.01)
    home = tmp_path / name / ".hivemesh"
    home.mkdir(parents=True)
    (home / STATE_FILE).write_text(json.dumps({"pid": proc.pid}))
    mesh = localmesh.LocalMesh(home=home, certs_dir=tmp_path / name / "certs", pid=proc.pid,
                               started_at=time.time(), controlplane="127.0.0.1:7443", etcd="127.0.0.1:2379")
    localmesh.register(mesh)
    return proc, mesh


def test_the_cli_finds_the_running_mesh_from_another_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("HIVEMESH_HOME", raising=False)
    monkeypatch.delenv("HIVEMESH_CERTS", raising=False)
    monkeypatch.chdir(tmp_path)
    here, certs = (tmp_path / ".hivemesh").resolve(), (tmp_path / "certs").resolve()
    started: list[subprocess.Popen[bytes]] = []

    def invoke(*args: str) -> str:
        unset = CliRunner(env={"HIVEMESH_HOME": None, "HIVEMESH_CERTS": None})  # the root group sets HIVEMESH_HOME
        result = unset.invoke(cli, list(args), prog_name="hivemesh")
        assert result.exit_code == 1, result.output
        return " ".join(result.output.split())

    def locate(command: str = "agents", **given: bool) -> tuple[Path, Path]:
        return localmesh.locate(command, here, certs, home_given=given.get("home", False),
                                certs_given=given.get("certs", False))

    try:
        a_proc, a = _stand_in_up(tmp_path, "a")
        started.append(a_proc)
        assert localmesh.running() == [a]
        assert locate() == (a.home, a.certs_dir)  # the one mesh running, with its certificates
        assert locate(certs=True) == (a.home, certs)
        assert locate(home=True) == (here, certs)
        assert locate("up") == (here, certs) and locate("certs") == (here, certs)  # they act on this folder
        # Its operator certificates are missing here: the error names the mesh, never `hivemesh certs init`.
        error = invoke("--home", str(here), "agents")
        assert f"no operator identity in {certs}" in error and "certs init" not in error
        assert f"a local mesh is running: {a.home} (`hivemesh up` pid {a.pid}" in error
        assert f"Point at it with HIVEMESH_HOME={a.home} HIVEMESH_CERTS={a.certs_dir} or run the command in " \
               f"{a.home.parent}" in error
        # With no --home, the CLI went to that mesh's folders by itself.
        assert f"no operator identity in {a.certs_dir}" in invoke("agents")

        b_proc, b = _stand_in_up(tmp_path, "b")
        started.append(b_proc)
        assert localmesh.running() == [a, b]
        assert locate() == (here, certs)  # two meshes: none is guessed, the error lists both
        error = invoke("agents")
        assert str(a.home) in error and str(b.home) in error and "certs init" not in error

        a_proc.kill()
        a_proc.wait(10)
        assert localmesh.running() == [b]  # a SIGKILLed up's note no longer counts
    finally:
        for proc in started:
            proc.kill()
            proc.wait(10)
    assert localmesh.running() == []
    assert "hivemesh certs init" in invoke("agents")  # nothing runs: now that is the right advice


async def test_stop_all_stops_the_later_children_together_then_the_first(tmp_path: Path) -> None:
    """One by one, each given its own wait, a dozen slow-to-stop children outlasted a 60 s SIGTERM wait on a loaded
    machine. The later children all get SIGTERM before any of them has exited; the first (the control plane they
    report to) only once they are gone."""
    events = tmp_path / "events"
    sup = Supervisor(tmp_path / "logs")
    script = ('trap \'echo "term {name} $(date +%s%N)" >> {events}; sleep {linger}; '
              'echo "exit {name} $(date +%s%N)" >> {events}; exit 0\' TERM; echo ready; '
              'while true; do sleep 0.05; done')
    children = []
    for name, linger in (("core", 0), ("a", 1), ("b", 1), ("c", 1)):
        child = await sup.spawn(name, ["sh", "-c", script.format(name=name, events=events, linger=linger)])
        await child.wait_for_line("ready", 10.0)
        children.append(child)
    await sup.stop_all()
    assert all(c.proc.returncode is not None for c in children)
    seen = [line.split() for line in events.read_text().splitlines()]
    when = {(kind, name): int(at) for kind, name, at in seen}
    leaves = ("a", "b", "c")
    assert max(when["term", n] for n in leaves) < min(when["exit", n] for n in leaves)  # together
    assert when["term", "core"] >= max(when["exit", n] for n in leaves)  # the first one last

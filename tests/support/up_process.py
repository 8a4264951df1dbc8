"""One `hivemesh up` run as a child process, for the tests of `up` itself: its merged output read by a thread, so
every wait on it is bounded, and every process it started checked gone when it stops (also when the test failed).
Each run has its own home, certificates and user state folder under the test's tmp_path."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests.support.rlimits import limited
from tests.support.waiting import until

HIVEMESH = [sys.executable, "-m", "hivemesh.controlplane.cli"]

class Up:
    """One `hivemesh up` child."""

    def __init__(self, tmp_path: Path, *args: str, certs: Path | None = None, max_file_bytes: int = 0,
                 own_group: bool = False, program: Sequence[str] = HIVEMESH, cwd: Path | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        """max_file_bytes: the most bytes any file `up` writes may hold (RLIMIT_FSIZE: a write past it fails with
        EFBIG, as a disk filling up fails one); 0: no limit. own_group: `up` leads a process group of its own, as a
        shell's job does (what a terminal's hang-up reaches). program: the `hivemesh` command to run (default this
        interpreter's, on the checkout's editable install), from the folder cwd (default the test's), in the environment
        environ (default this process's)."""
        self.tmp_path = tmp_path
        env = {k: v for k, v in (os.environ if environ is None else environ).items() if not k.startswith("HIVEMESH_")}
        env.update(XDG_STATE_HOME=str(tmp_path / "xdg"), PYTHONUNBUFFERED="1", COLUMNS="4000")
        command = [*program, "--home", str(tmp_path / "home"), "--certs-dir", str(certs or tmp_path / "certs"),
                   "up", *args]
        if max_file_bytes:
            command = limited(command, file_bytes=max_file_bytes)
        self.proc = subprocess.Popen(command, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     process_group=0 if own_group else None, cwd=cwd)
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

    def error(self) -> str:
        """The first line of the error `up` ended with."""
        with self._changed:
            return next((line.strip() for line in self.lines if line.startswith("error:")), "")

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
        left = left_running(self.pids(), self.tmp_path)
        for pid in left:  # only processes of this test (their command line or environment name tmp_path)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left running after hivemesh up ended: {left}"


def ours(pid: int, tmp_path: Path) -> bool:
    """pid is alive (not a zombie) and one of this test's: pids are reused, someone else's is never touched."""
    try:
        if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
            return False
        seen = Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return str(tmp_path).encode() in seen


def left_running(pids: list[int], tmp_path: Path, timeout: float = 30.0) -> list[int]:
    """Those of pids still running (this test's) once they had timeout seconds to end."""
    asyncio.run(until(lambda: not any(ours(p, tmp_path) for p in pids), timeout, 0.1))
    return [p for p in pids if ours(p, tmp_path)]


@pytest.fixture
def up_runs() -> Iterator[list[Up]]:
    """The `up` children a test starts; each is stopped, and checked to leave nothing behind, at the end."""
    runs: list[Up] = []
    try:
        yield runs
    finally:
        for run in runs:
            run.stop()

"""`hivemesh top` as an operator sees it: the real CLI in a pseudo-terminal, scraping real MetricsServers that a
helper child process serves. It draws the capability and instance rows, re-sorts on a key press, and leaves on
'q' or SIGINT with exit code 0 and the terminal as it found it (alternate screen left, cbreak mode undone)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_ANSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][A-Z0-9]|[=>78])")


@pytest.fixture
def metrics_nodes() -> Iterator[dict[str, str]]:
    """Two nodes' metrics ports served by a child process (it stops when its stdin closes)."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.metrics_nodes"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        ready, _w, _x = select.select([proc.stdout], [], [], 60)
        assert ready, "the metrics nodes did not start within 60 s"
        yield json.loads(proc.stdout.readline())["nodes"]
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


class Terminal:
    """`hivemesh top` on the slave side of a pty; the test reads the screen from the master side."""

    def __init__(self, *args: str) -> None:
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        self.modes = termios.tcgetattr(self.slave)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMESH_") and k not in ("COLUMNS", "LINES")}
        env["TERM"] = "xterm-256color"
        self.proc = subprocess.Popen([sys.executable, "-m", "hivemesh.controlplane.cli", "top", *args],
                                     stdin=self.slave, stdout=self.slave, stderr=self.slave, env=env, cwd=REPO)
        self.raw = ""

    def screen(self) -> str:
        return _ANSI.sub("", self.raw)

    def read_until(self, *texts: str, timeout: float = 60) -> str:
        """Everything drawn so far, once all texts are on it (fails after timeout seconds)."""
        deadline = time.monotonic() + timeout
        while not all(t in self.screen() for t in texts):
            left = deadline - time.monotonic()
            assert left > 0, f"not on screen within {timeout} s: {texts}\n{self.screen()[-3000:]}"
            self._pump(min(left, 0.5))
        return self.screen()

    def read_until_grows(self, seen: int, timeout: float = 60) -> None:
        """Until more than `seen` characters were drawn (the next frame has begun)."""
        deadline = time.monotonic() + timeout
        while len(self.raw) <= seen:
            left = deadline - time.monotonic()
            assert left > 0, f"nothing more drawn within {timeout} s\n{self.screen()[-3000:]}"
            self._pump(min(left, 0.5))

    def _pump(self, timeout: float) -> None:
        ready, _w, _x = select.select([self.master], [], [], timeout)
        if ready:
            try:
                self.raw += os.read(self.master, 65536).decode("utf-8", "replace")
            except OSError:  # EIO: the slave side is closed
                time.sleep(timeout)

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def wait(self, timeout: float = 30) -> int:
        """Exit code, draining the screen meanwhile (a full pty would block the program's last writes)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, "hivemesh top did not exit"
            self._pump(0.1)
        self._pump(0.1)
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def terminal() -> Iterator[list[Terminal]]:
    opened: list[Terminal] = []
    try:
        yield opened
    finally:
        for t in opened:
            t.close()


def test_top_draws_rows_sorts_on_a_key_and_quits_on_q(metrics_nodes: dict[str, str],
                                                      terminal: list[Terminal]) -> None:
    term = Terminal("--endpoint", metrics_nodes["a"], "--endpoint", metrics_nodes["b"], "--interval", "0.5")
    terminal.append(term)
    screen = term.read_until("2/2 targets up", "echo/i-a", "echo/i-b", "summarize", "sorted by calls")
    assert "\x1b[?1049h" in term.raw  # drawn on the alternate screen, like top
    assert "half-open" in screen and "keys: c e p $ sort" in screen
    # Rates appear once two scrapes were diffed: echo's row carries a calls/s figure and its error share.
    term.read_until("25.0%")
    term.type("p")
    term.read_until("sorted by p99")
    term.type("q")
    assert term.wait() == 0
    assert "\x1b[?1049l" in term.raw[-200:]  # the alternate screen left
    assert "Traceback" not in term.screen()
    restored = termios.tcgetattr(term.slave)
    assert restored[3] & (termios.ICANON | termios.ECHO) == term.modes[3] & (termios.ICANON | termios.ECHO)


def test_top_leaves_cleanly_on_sigint(metrics_nodes: dict[str, str], terminal: list[Terminal]) -> None:
    term = Terminal("--endpoint", metrics_nodes["b"], "--interval", "0.5", "--sort", "errors")
    terminal.append(term)
    term.read_until("1/1 targets up", "summarize", "sorted by errors", "100.0%")
    term.proc.send_signal(signal.SIGINT)
    assert term.wait() == 0
    assert "\x1b[?1049l" in term.raw[-200:] and "Traceback" not in term.screen()
    restored = termios.tcgetattr(term.slave)
    assert restored[3] & termios.ICANON and restored[3] & termios.ECHO


@pytest.fixture
def stuck_target() -> Iterator[str]:
    """A metrics port that takes the connection and never answers: every scrape of it waits out its 2 s timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


def _sigint_while_scraping(term: Terminal) -> None:
    """SIGINT after a frame is drawn and the 0.2 s key wait has passed: while the next scrape waits on the stuck
    target (the 2 s after it), where a KeyboardInterrupt would have landed inside the scrape pool."""
    term.read_until("1/2 targets up", "summarize")
    drawn = len(term.raw)
    term.read_until_grows(drawn)
    waited_until = time.monotonic() + 0.6
    while (left := waited_until - time.monotonic()) > 0:
        term._pump(left)
    term.proc.send_signal(signal.SIGINT)


def test_a_sigint_during_a_scrape_leaves_once_the_scrape_ends(metrics_nodes: dict[str, str], stuck_target: str,
                                                              terminal: list[Terminal]) -> None:
    term = Terminal("--endpoint", metrics_nodes["b"], "--endpoint", stuck_target, "--interval", "0.2")
    terminal.append(term)
    _sigint_while_scraping(term)
    assert term.wait() == 0
    assert "\x1b[?1049l" in term.raw[-200:] and "Traceback" not in term.screen() and "Aborted" not in term.screen()
    restored = termios.tcgetattr(term.slave)
    assert restored[3] & termios.ICANON and restored[3] & termios.ECHO


"""The stderr tee: passes every byte that is not the handshaker tracer's, reports the failures, keeps a dying
process's last words, and gives stderr back if it dies itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from hivemesh.mesh.audit.handshake.tee import run_tee
from tests.integration.test_handshake_log import FAILED

REPO = Path(__file__).resolve().parents[2]


class _Tee:
    """run_tee on real pipes, in a thread: write to `source`, read what reached `sink` and `events`."""

    def __init__(self) -> None:
        self.src_r, self.source = os.pipe()
        self.sink_r, self.sink_w = os.pipe()
        self.events_r, self.events_w = os.pipe()
        self.thread = threading.Thread(target=run_tee, args=(self.src_r, self.sink_w, self.events_w), daemon=True)
        self.thread.start()

    def write(self, data: bytes) -> None:
        os.write(self.source, data)

    def finish(self) -> tuple[bytes, list[dict[str, str]]]:
        os.close(self.source)
        self.thread.join(10)
        assert not self.thread.is_alive(), "run_tee did not return at end of input"
        for fd in (self.src_r, self.sink_w, self.events_w):
            os.close(fd)
        out, events = _read_all(self.sink_r), _read_all(self.events_r)
        os.close(self.sink_r)
        os.close(self.events_r)
        lines = [json.loads(x) for x in events.split(b"\n") if x]
        assert lines[0] == {"ready": True}
        return out, lines[1:]


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_everything_but_the_tracer_passes_unchanged_and_failures_are_reported() -> None:
    tee = _Tee()
    mine = b"line one\nW1125 18:00:48.1 1 chttp2_transport.cc:1] a warning\n\n  indented\n"
    tee.write(mine[:7])  # a line split across writes
    tee.write(mine[7:] + FAILED)
    tee.write(b"after the entry\nno newline at the end")
    out, events = tee.finish()
    assert out == mine + b"after the entry\nno newline at the end"
    assert events == [{"local": "ipv4:127.0.0.1:34423", "peer": "ipv4:127.0.0.1:41366",
                       "error": events[0]["error"]}]
    assert "certificate has expired" in events[0]["error"]


def test_a_partial_line_is_let_through_when_nothing_more_comes() -> None:
    tee = _Tee()
    tee.write(b"Password: ")
    deadline = time.monotonic() + 10
    got = b""
    os.set_blocking(tee.sink_r, False)
    while got != b"Password: " and time.monotonic() < deadline:
        try:
            got += os.read(tee.sink_r, 100)
        except BlockingIOError:
            time.sleep(0.01)
    os.set_blocking(tee.sink_r, True)
    assert got == b"Password: "
    out, _ = tee.finish()
    assert out == b""


def _child(code: str, tmp: Path) -> tuple[int, bytes]:
    """Run code in a child whose stderr is a file; (exit status, that file's bytes once the tee is done)."""
    err = tmp / "child.err"
    with err.open("wb") as f:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, stderr=f,
                              stdout=subprocess.PIPE, timeout=60, check=False)
    # The tee outlives an aborted child by the moment it takes to copy the rest: wait for its last words.
    deadline = time.monotonic() + 10
    while b"END" not in err.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc.returncode, err.read_bytes()


def test_a_crashing_process_keeps_its_last_words(tmp_path: Path) -> None:
    code, err = _child(f"""
        import os
        from hivemesh.mesh.audit.handshake.tee import StderrTee
        assert StderrTee.shared().running
        os.write(2, {FAILED!r})
        os.write(2, b"fatal: the last words END\\n")
        os.abort()
    """, tmp_path)
    assert code == -6  # SIGABRT
    assert b"fatal: the last words END\n" in err
    assert b"handshaker.cc" not in err


def test_stderr_comes_back_when_the_tee_dies(tmp_path: Path) -> None:
    code, err = _child("""
        import os, signal, time
        from hivemesh.mesh.audit.handshake.tee import StderrTee
        tee = StderrTee.shared()
        os.kill(tee._proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while tee.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not tee.running and tee.error == "the stderr tee exited"
        os.write(2, b"straight to stderr END\\n")
    """, tmp_path)
    assert code == 0, err
    assert b"straight to stderr END\n" in err


def test_the_tee_outlives_signals_meant_for_its_process(tmp_path: Path) -> None:
    """Ctrl-C or SIGTERM to the group must not silence the process's last words: the tee ends at EOF only."""
    code, err = _child("""
        import os, signal, time
        from hivemesh.mesh.audit.handshake.tee import StderrTee
        tee = StderrTee.shared()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            os.kill(tee._proc.pid, sig)
        time.sleep(0.3)  # give a (wrongly) dying tee the time to die
        assert tee.running and tee._proc.poll() is None
        os.write(2, b"shutting down END\\n")
    """, tmp_path)
    assert code == 0, err
    assert b"shutting down END\n" in err

"""The real `hivemesh` CLI in a child process, without paying its ~1 s of imports per run.

Tests run the CLI as an operator does, in a process of its own (click's CliRunner in the test process is no
option: the CLI runs its own grpc.aio event loop, and two such loops in one process can crash grpc). Most of a
run's cost is importing what the CLI imports, so a helper process (the zygote, one per test process) imports it
once, without creating anything of gRPC, and forks a child per run: the child takes the run's argv, environment,
working folder and stdin/stdout/stderr, imports the CLI's own modules (they read the environment and stdio when
imported), calls `hivemesh.controlplane.cli.main` as `python -m hivemesh.controlplane.cli` does, and exits with
its code. `hivemesh sidecar`/`controlplane` must set up gRPC's tracer before gRPC loads (`owned_server_command`):
those still start a fresh interpreter.

Run as a script (`python -m tests.support.cli_zygote SOCKET`), this module is the zygote: it serves one run per
connection on the Unix socket SOCKET and exits when its stdin closes (its test process is gone).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

REPO = Path(__file__).resolve().parents[2]
CLI_MODULE = "hivemesh.controlplane.cli"


# --- the zygote (its own process) ---

def _exit_code(exc: SystemExit) -> int:
    """The exit status the interpreter gives for exc (None: 0; a message: printed, 1)."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _child(conn: socket.socket, request: dict[str, Any]) -> NoReturn:
    """One CLI run in the forked child: its stdio, environment, folder and argv, then main(); never returns."""
    code = 1
    try:
        conn.sendall(f"{os.getpid()}\n".encode())  # first, so the test process never reads an exit code as a pid
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the zygote's auto-reaping is not the CLI's
        for fd, path, flags in ((0, request["stdin"], os.O_RDONLY),
                                (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            opened = os.open(path, flags, 0o600)
            os.dup2(opened, fd)
            os.close(opened)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        import hivemesh.controlplane.cli as cli

        sys.argv = [str(Path(cli.__file__).with_name("__main__.py")), *request["args"]]
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc)
        except BaseException:  # noqa: BLE001 - reported as the interpreter would: traceback, status 1
            traceback.print_exc()
            code = 1
        with contextlib.suppress(Exception):
            atexit._run_exitfuncs()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            conn.sendall(f"{code}\n".encode())
        os._exit(code)


def _preload() -> None:
    """Import what the CLI imports, then forget the CLI's own modules: they decide things from the environment
    and stdio when imported (`output`'s consoles size themselves to COLUMNS and whether stdout is a terminal), so
    each child imports them afresh; what they import (gRPC, protobuf, the mesh) nothing imports the CLI back."""
    import hivemesh.controlplane.cli.app  # noqa: F401 - the imports every run would pay, paid once

    for name in [m for m in sys.modules if m == CLI_MODULE or m.startswith(CLI_MODULE + ".")]:
        del sys.modules[name]


def _serve(sock_path: str) -> None:
    _preload()

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(64)
    sel = selectors.DefaultSelector()
    sel.register(server, selectors.EVENT_READ)
    sel.register(0, selectors.EVENT_READ)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        for key, _ in sel.select():
            if key.fileobj == 0:
                if not os.read(0, 4096):
                    return  # the test process is gone
                continue
            conn, _ = server.accept()
            with conn.makefile("rb") as f:
                request = json.loads(f.readline())
            if os.fork() == 0:
                sel.close()
                server.close()
                _child(conn, request)
            conn.close()


# --- the test process's side ---

class _Zygote:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hivemesh-cli-"))
        self.socket = str(self.dir / "zygote.sock")
        env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMESH_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.cli_zygote", self.socket],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, env=env,
        )
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline()  # bounded: the zygote says ready or exits after its imports
        if ready != b"ready\n":
            self.proc.kill()
            raise RuntimeError(f"the CLI zygote did not start (exit {self.proc.wait()})")
        atexit.register(self.close)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # the zygote exits on EOF
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for p in self.dir.iterdir():
            p.unlink()
        self.dir.rmdir()


_zygote: _Zygote | None = None
_starting = threading.Lock()


def _started() -> _Zygote:
    """The zygote, started on first use (in a thread: its ~1 s start must not stall the test's event loop)."""
    global _zygote
    with _starting:
        if _zygote is None:
            _zygote = _Zygote()
        return _zygote


async def _spawned(args: Sequence[str], env: Mapping[str, str], cwd: Path, stdin: bytes | None,
                   timeout: float) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", CLI_MODULE, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=dict(env), cwd=cwd,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(), err.decode()


async def run_hivemesh(args: Sequence[str], env: Mapping[str, str], *, cwd: Path = REPO,
                       stdin: bytes | None = None, timeout: float = 60.0) -> tuple[int, str, str]:
    """`python -m hivemesh.controlplane.cli *args` with exactly env: (exit code, stdout, stderr); the child is
    killed and TimeoutError raised when it runs past timeout seconds."""
    from hivemesh.controlplane.cli import owned_server_command

    if owned_server_command(args):
        return await _spawned(args, env, cwd, stdin, timeout)
    zygote = _zygote if _zygote is not None else await asyncio.to_thread(_started)
    paths = _run_files(zygote.dir, stdin or b"")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    reader, writer = await asyncio.open_unix_connection(zygote.socket)
    pid = 0
    try:
        writer.write(json.dumps({"args": list(args), "env": dict(env), "cwd": str(cwd), **paths}).encode() + b"\n")
        await writer.drain()
        pid = int(await asyncio.wait_for(reader.readline(), timeout))
        line = await asyncio.wait_for(reader.readline(), max(deadline - loop.time(), 0.0))
        code = int(line) if line.strip() else -signal.SIGKILL  # no code: the child was killed
        return code, _read(paths["stdout"]), _read(paths["stderr"])
    except TimeoutError:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        raise
    finally:
        writer.close()
        for p in paths.values():
            os.unlink(p)


def _run_files(folder: Path, stdin: bytes) -> dict[str, str]:
    """Fresh files for one run's stdin (holding stdin), stdout and stderr."""
    paths = {}
    for name in ("stdin", "stdout", "stderr"):
        fd, paths[name] = tempfile.mkstemp(dir=folder, suffix=f".{name}")
        os.write(fd, stdin if name == "stdin" else b"")
        os.close(fd)
    return paths


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode()

if __name__ == "__main__":
    _serve(sys.argv[1])

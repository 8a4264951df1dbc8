"""Mesh workloads as real child processes (a sidecar through the `hivemesh` CLI, an SDK agent), for tests
that need a process of their own: SIGKILL, or gRPC's tracer, which is read once at a process's start."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.meshenv import MeshEnv

REPO = Path(__file__).resolve().parents[2]


async def child_env(env: MeshEnv, name: str, home: Path, kind: str = "agent", **extra: str) -> dict[str, str]:
    """The environment of a workload joining env's mesh as `kind` `name` (a fresh one-time join token)."""
    join = await env.operator.create_join_token(name, kind, 120)
    s = env.base_settings()
    out = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMESH_")}
    out.update(
        HIVEMESH_HOME=str(home), HIVEMESH_ETCD=s.etcd, HIVEMESH_CONTROLPLANE=s.controlplane, HIVEMESH_JOIN=s.join,
        HIVEMESH_CA=str(s.ca_bundle), HIVEMESH_TRUST_DOMAIN=s.trust_domain, HIVEMESH_JOIN_TOKEN=join.token,
    )
    out.update(extra)
    return out


async def _spawn(args: list[str], env: dict[str, str] | None, log: Path, *, stdin: int | None = None,
                 ) -> asyncio.subprocess.Process:
    log_file = log.open("ab")  # the child keeps its own copy of the descriptor
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, *args, cwd=REPO, env=env, stdin=stdin, stdout=asyncio.subprocess.PIPE, stderr=log_file,
            start_new_session=True,
        )
    finally:
        log_file.close()


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


async def _first_line(proc: asyncio.subprocess.Process, log: Path, timeout: float) -> str:
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    except TimeoutError:
        raise AssertionError(f"no ready line within {timeout:.0f} s; log {log}:\n{_tail(log)}") from None
    return line.decode()


async def start_sidecar(
    env: MeshEnv, agent: str, home: Path, log: Path, *args: str, timeout: float = 30.0, **extra: str
) -> tuple[asyncio.subprocess.Process, str]:
    """`hivemesh sidecar --agent AGENT` as agent 'plain'; (process, its mTLS endpoint) once it is ready."""
    proc, ready = await start_sidecar_ready(env, agent, home, log, *args, timeout=timeout, **extra)
    return proc, ready["inbound"]


async def start_sidecar_ready(
    env: MeshEnv, agent: str, home: Path, log: Path, *args: str, timeout: float = 30.0, name: str = "plain",
    **extra: str,
) -> tuple[asyncio.subprocess.Process, dict[str, str]]:
    """Like start_sidecar, joined as agent `name`; (process, its ready line's fields: inbound=<mTLS endpoint>,
    mesh=<Mesh address>)."""
    proc = await _spawn(["-m", "hivemesh.controlplane.cli", "sidecar", "--agent", agent, *args],
                        await child_env(env, name, home, **extra), log)
    return proc, await _sidecar_ready(proc, log, timeout)


async def start_client_sidecar(
    env: MeshEnv, name: str, home: Path, log: Path, *args: str, timeout: float = 30.0, **extra: str
) -> tuple[asyncio.subprocess.Process, dict[str, str]]:
    """`hivemesh sidecar --client NAME` (caller only, joined as client NAME); (process, ready fields: mesh=)."""
    proc = await _spawn(["-m", "hivemesh.controlplane.cli", "sidecar", "--client", name, *args],
                        await child_env(env, name, home, "client", **extra), log)
    return proc, await _sidecar_ready(proc, log, timeout)


async def _sidecar_ready(proc: asyncio.subprocess.Process, log: Path, timeout: float) -> dict[str, str]:
    line = await _first_line(proc, log, timeout)
    if not line.startswith("sidecar ready "):
        await stop(proc)
        raise AssertionError(f"sidecar said {line!r}; log {log}:\n{_tail(log)}")
    return dict(field.split("=", 1) for field in line.split()[2:])


async def start_replica(
    env: MeshEnv, tag: str, home: Path, log: Path, *, timeout: float = 30.0, **extra: str
) -> tuple[asyncio.subprocess.Process, str]:
    """`python -m tests.support.replica_main` (an SDK EchoAgent) as agent 'echo'; (process, endpoint) once ready."""
    proc = await _spawn(["-m", "tests.support.replica_main"],
                        await child_env(env, "echo", home, HIVEMESH_REPLICA_TAG=tag, **extra), log)
    line = await _first_line(proc, log, timeout)
    if not line.startswith("ready "):
        await stop(proc)
        raise AssertionError(f"replica said {line!r}; log {log}:\n{_tail(log)}")
    return proc, line.split()[1]


async def start_plain_agent(log: Path, *args: str, timeout: float = 30.0) -> tuple[asyncio.subprocess.Process, str]:
    """`python -m tests.support.plain_agent` (a `PlainAgent`, no mesh); (process, endpoint) once it serves. Close
    its stdin to stop it: it then prints how many calls reached it (`plain_agent_calls`)."""
    proc = await _spawn(["-m", "tests.support.plain_agent", *args], None, log, stdin=asyncio.subprocess.PIPE)
    try:
        port = int(await _first_line(proc, log, timeout))
    except BaseException:
        await stop(proc, kill=True)
        raise
    return proc, f"127.0.0.1:{port}"


async def plain_agent_calls(proc: asyncio.subprocess.Process, log: Path, timeout: float = 30.0) -> int:
    """Stop a `start_plain_agent` process by closing its stdin; the calls that reached it."""
    assert proc.stdin is not None
    proc.stdin.close()
    calls = int(await _first_line(proc, log, timeout))
    await asyncio.wait_for(proc.wait(), timeout)
    return calls


async def stop(proc: asyncio.subprocess.Process, *, kill: bool = False, timeout: float = 10.0) -> None:
    """Stop proc (SIGTERM, or SIGKILL with kill=True; SIGKILL anyway after timeout) and reap it."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill() if kill else proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.wait_for(proc.wait(), timeout)


def _states(pid: int) -> list[str]:
    """The scheduler state of each of pid's threads ('T' stopped, 'R' running, ...), from /proc."""
    states = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that just ended
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
    return states


def freeze(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP pid and return once every thread of it has stopped.

    kill() only queues the stop and wakes one thread; the stop reaches the others once that one has run, and
    until then they run on. Measured with etcd on this 2-core machine, a busy loop beside it: 71 of 300 stops were
    not complete when kill() returned (for up to 5.5 ms), and 70 of 200 gets sent right after kill() were
    answered, 0 of 200 after freeze(). So a wait that had to time out against a stopped etcd returned, once in
    a full run (test_cli_etcd_stopped)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while not all(state in "TtZX" for state in _states(pid)):
        if time.monotonic() > deadline:
            states = _states(pid)
            os.kill(pid, signal.SIGCONT)  # not left half-stopped for the caller to find
            raise AssertionError(f"process {pid} not stopped within {timeout:.0f} s of SIGSTOP: {states}")
        time.sleep(0.001)


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """The process stopped (SIGSTOP, `freeze`) for the block: its kernel still accepts TCP and takes bytes,
    nothing answers them; continued (SIGCONT) after, even when the block fails."""
    try:
        freeze(pid)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)

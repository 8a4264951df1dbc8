"""Child processes for `hivemesh up`: start, tee output to a log, wait for a ready line, restart one that dies
(once `supervise` is on; `restarts.py` holds the policy), stop them all.

Every child asks for PR_SET_PDEATHSIG on Linux (`hivemesh.mesh.lifeline.die_with_parent_if_asked`), so even
a SIGKILLed `hivemesh up` leaves nothing behind. Each runs in a session of its own, as etcd does: what a terminal
sends `up`'s process group (a hang-up when it closes, Ctrl-C, Ctrl-Z) reaches `up` alone, which stops the children
in order. Sharing the group, they died of the hang-up (none handles SIGHUP) without their own shutdown (a
sidecar's socket file left behind), and `up` reported each as a crash it would restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hivemesh.controlplane.cli.restarts import Planned, Restartable, RestartPolicy, Say, keep_alive
from hivemesh.mesh.lifeline import PARENT_ENV


@dataclass
class Child:
    """One supervised process."""

    name: str
    proc: asyncio.subprocess.Process
    log_path: Path
    args: list[str] = field(default_factory=list)
    """How it is started again after it died: the launcher may pin what the first start chose (its ports)."""
    env: dict[str, str] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    _pump: asyncio.Task[None] | None = None
    _matched: dict[str, asyncio.Future[Any]] = field(default_factory=dict)
    _start: Callable[[Child], Awaitable[None]] | None = None
    before_restart: Callable[[Child], None] | None = None
    """Called before each restart: may set args and env again (a port it had, asked for only while free)."""
    after_restart: Callable[[Child], Awaitable[None]] | None = None
    """Awaited after each restart, as part of it: e.g. read the ports its ready line reports, so what others were
    told of it (the Prometheus targets) follows a port that changed."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def wait_exit(self) -> int | None:
        code = await self.proc.wait()
        if self._pump is not None:  # its last lines, for the report
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._pump), 2.0)
        return code

    def tail(self, n: int) -> list[str]:
        return self.lines[-n:]

    async def restart(self) -> None:
        """Start it again; a no-op while it runs (started again by someone else meanwhile: never two of one)."""
        assert self._start is not None
        if self.proc.returncode is None:
            return
        self.lines.clear()  # a ready line of the old process must not answer wait_for_line for the new one
        if self.before_restart is not None:
            self.before_restart(self)
        await self._start(self)
        if self.after_restart is not None:
            await self.after_restart(self)

    async def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait (bounded) until the child prints a line matching pattern; fail fast if it exits."""
        rx = re.compile(pattern)
        for line in self.lines:
            m = rx.search(line)
            if m:
                return m
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._matched[pattern] = fut
        exited: asyncio.Future[Any] = asyncio.ensure_future(self.proc.wait())
        try:
            done, _ = await asyncio.wait({fut, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if fut in done:
            match: re.Match[str] = fut.result()
            return match
        tail = "\n    ".join(self.lines[-8:])
        if exited in done or self.proc.returncode is not None:
            raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}; last output:\n    {tail}")
        raise TimeoutError(f"{self.name} was not ready within {timeout:.0f} s (log: {self.log_path}):\n    {tail}")

    def _feed(self, line: str) -> None:
        self.lines.append(line)
        if len(self.lines) > 500:
            del self.lines[:250]
        for pattern, fut in list(self._matched.items()):
            m = re.search(pattern, line)
            if m and not fut.done():
                fut.set_result(m)
                del self._matched[pattern]


class Supervisor:
    """Starts children, restarts those that die once `supervise` is called, and stops them (`stop_all`):
    SIGTERM, a bounded wait, then SIGKILL."""

    def __init__(self, log_dir: Path, policy: RestartPolicy | None = None) -> None:
        self.log_dir = log_dir
        self.policy = policy or RestartPolicy()
        self.children: list[Child] = []
        self.stopping = asyncio.Event()
        self.planned = Planned()
        """Children stopped and started again on purpose (`Planned.hold`), which `keep_alive` leaves alone."""
        self._say: Say | None = None
        self._watchers: list[asyncio.Task[None]] = []

    async def spawn(self, name: str, args: Sequence[str], env: Mapping[str, str] | None = None) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        child = Child(name=name, proc=await self._exec(args, env or {}), log_path=self.log_dir / f"{name}.log",
                      args=list(args), env=dict(env or {}), _start=self._restart)
        child._pump = asyncio.get_running_loop().create_task(self._pump(child))
        self.children.append(child)
        if self._say is not None:
            self.watch(child)
        return child

    @staticmethod
    async def _exec(args: Sequence[str], env: Mapping[str, str]) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())},
            start_new_session=True,  # setsid in the child: still vfork + exec (no fork() for gRPC to see)
        )

    async def _restart(self, child: Child) -> None:
        child.proc = await self._exec(child.args, child.env)
        child._pump = asyncio.get_running_loop().create_task(self._pump(child))

    def supervise(self, say: Say) -> None:
        """From now on, report every child that dies (with say) and restart it under the policy."""
        self._say = say
        for child in self.children:
            self.watch(child)

    def watch(self, unit: Restartable) -> None:
        """Keep unit alive too (a process this supervisor did not spawn, e.g. etcd); after `supervise`."""
        assert self._say is not None, "call supervise first"
        task = asyncio.get_running_loop().create_task(
            keep_alive(unit, self.policy, self._say, self.stopping, self.planned))
        self._watchers.append(task)

    @staticmethod
    async def _pump(child: Child) -> None:
        assert child.proc.stdout is not None
        with open(child.log_path, "a", encoding="utf-8") as log:  # noqa: ASYNC230 - local log file, line writes
            while True:
                raw = await child.proc.stdout.readline()
                if not raw:
                    return
                line = raw.decode(errors="replace").rstrip("\n")
                log.write(line + "\n")
                log.flush()
                child._feed(line)

    async def stop_all(self, timeout: float = 10.0, *, last: int = 1) -> None:
        """Stop every child; nothing is left running when this returns. The `last` children spawned first (the
        control plane the others report to) stop after the rest, newest first; the rest stop together. One by
        one, each given up to `timeout`, a dozen children on a loaded 2-core machine took over a minute to stop
        (a test's 60 s SIGTERM wait ran out); together the slowest one bounds it."""
        self.stopping.set()  # no restarts from here on
        for task in self._watchers:
            task.cancel()
        for task in self._watchers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._watchers.clear()
        first, rest = self.children[:last], self.children[last:]
        await asyncio.gather(*(self._stop(child, timeout) for child in reversed(rest)))
        for child in reversed(first):
            await self._stop(child, timeout)
        self.children.clear()

    async def stop_child(self, child: Child, timeout: float = 10.0) -> None:
        """Stop one child as `stop_all` does (SIGTERM: it finishes what it is answering; SIGKILL after timeout),
        to start it again (`Child.restart`) under `planned.hold(child.name)`."""
        await self._stop(child, timeout)

    @staticmethod
    async def _stop(child: Child, timeout: float) -> None:
        if child.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(child.proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                await child.proc.wait()
        if child._pump is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(child._pump, 2.0)

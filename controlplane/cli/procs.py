"""Child processes for `hivemesh up`: start, tee output to a log, wait for a ready line, stop them all.

Every child asks for PR_SET_PDEATHSIG on Linux (`hivemesh.mesh.lifeline.die_with_parent_if_asked`), so even
a SIGKILLed `hivemesh up` leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hivemesh.mesh.lifeline import PARENT_ENV


@dataclass
class Child:
    """One supervised process."""

    name: str
    proc: asyncio.subprocess.Process
    log_path: Path
    lines: list[str] = field(default_factory=list)
    _pump: asyncio.Task[None] | None = None
    _matched: dict[str, asyncio.Future[Any]] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

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
    """Starts children and stops them in reverse order: SIGTERM, a bounded wait, then SIGKILL."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []

    async def spawn(self, name: str, args: Sequence[str], env: Mapping[str, str] | None = None) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())}
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=full_env,
        )
        child = Child(name=name, proc=proc, log_path=log_path)
        child._pump = asyncio.get_running_loop().create_task(self._pump(child))
        self.children.append(child)
        return child

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

    async def stop_all(self, timeout: float = 10.0) -> None:
        """Stop every child, newest first; nothing is left running when this returns."""
        for child in reversed(self.children):
            await self._stop(child, timeout)
        self.children.clear()

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

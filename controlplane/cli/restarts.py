"""Keeping `hivemesh up`'s children alive: report a child that died, restart it with exponential backoff, and
give up plainly on one that keeps dying.

A child that ran for `stable_s` before it died starts over at `initial_s`; one that dies sooner waits twice as
long as the time before (up to `max_s`), and after `max_quick_failures` quick deaths in a row it stays down: a
child that cannot start would otherwise fill the terminal and the log for ever.

A restart `up` makes on purpose (`Planned.hold`: a CA rotation step restarts etcd, and the control plane only when
it cannot follow by itself) is no death: nothing is reported or restarted for it. A stop request ends any wait here
at once, a restart's included: `up` waited out a restarted etcd's whole health wait (60 s) before it heard SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

Say = Callable[[str], None]


@dataclass(frozen=True)
class RestartPolicy:
    """How soon and how often a child that died is started again."""

    initial_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0
    stable_s: float = 30.0
    """A run at least this long counts as healthy: the next death starts the backoff over."""
    max_quick_failures: int = 6
    """Deaths in a row, each after less than stable_s, before the child is left down."""

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s or self.factor < 1 or self.max_quick_failures < 1:
            raise ValueError(f"restart policy out of range: {self}")


class Backoff:
    """One child's restart state under a policy (no clock of its own: callers pass monotonic times)."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.quick_failures = 0
        self._started_at: float | None = None

    def started(self, now: float) -> None:
        self._started_at = now

    def exited(self, now: float) -> float | None:
        """The delay before the next start, or None: it died too often too quickly, leave it down."""
        p = self.policy
        ran = now - self._started_at if self._started_at is not None else 0.0
        self.quick_failures = 1 if ran >= p.stable_s else self.quick_failures + 1
        if self.quick_failures > p.max_quick_failures:
            return None
        return float(min(p.initial_s * p.factor ** (self.quick_failures - 1), p.max_s))


class Restartable(Protocol):
    """A child process `keep_alive` can watch and start again."""

    name: str
    log_path: Path

    @property
    def pid(self) -> int | None: ...

    async def wait_exit(self) -> int | None:
        """Wait until the process has exited; its exit code (negative: killed by that signal)."""
        ...

    def tail(self, n: int) -> list[str]:
        """Its last n lines of output."""
        ...

    async def restart(self) -> None:
        """Start it again, as it was started the first time (same ports, same identity). Cancelling it (a stop
        request) ends any wait for it to be ready at once."""
        ...


class Planned:
    """The units being stopped and started again on purpose: while one is held, its exit is no crash, so
    `keep_alive` neither reports nor restarts it; it watches the unit again once the hold ends (as the holder left
    it: started again, or down and then restarted as any dead unit)."""

    def __init__(self) -> None:
        self._held: dict[str, asyncio.Event] = {}

    @contextlib.asynccontextmanager
    async def hold(self, *names: str) -> AsyncIterator[None]:
        """Hold the units named (one holder at a time: `up` makes its planned restarts under one lock)."""
        events = {name: asyncio.Event() for name in names}
        self._held.update(events)
        try:
            yield
        finally:
            for name, event in events.items():
                if self._held.get(name) is event:
                    del self._held[name]
                event.set()

    def held(self, name: str) -> asyncio.Event | None:
        """Set once the hold on name ends; None when name is not held."""
        return self._held.get(name)


async def _first(work: asyncio.Future[Any], stopping: asyncio.Event) -> bool:
    """Wait for work or a stop request, whichever comes first: True when work finished (its result or exception is
    left in it), False when a stop came first (work is then cancelled, and waited for)."""
    stop: asyncio.Future[Any] = asyncio.ensure_future(stopping.wait())
    try:
        done, _ = await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
    return work in done


def _clip(line: str, width: int = 160) -> str:
    return line if len(line) <= width else line[: width - 1] + "…"


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exited"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


async def keep_alive(unit: Restartable, policy: RestartPolicy, say: Say, stopping: asyncio.Event,
                     planned: Planned | None = None) -> None:
    """Watch unit until `stopping` is set; report every death and restart it under the policy. An exit while
    planned holds the unit, or after someone else started it again, is no death."""
    backoff = Backoff(policy)
    backoff.started(time.monotonic())
    while True:
        pid = unit.pid
        code = await unit.wait_exit()
        if stopping.is_set():
            return
        hold = planned.held(unit.name) if planned is not None else None
        if hold is not None:
            await _first(asyncio.ensure_future(hold.wait()), stopping)
            if stopping.is_set():
                return
        if hold is not None or unit.pid != pid:
            backoff.started(time.monotonic())
            continue
        tail = " | ".join(_clip(line.strip()) for line in unit.tail(3) if line.strip()) or "(no output)"
        delay = backoff.exited(time.monotonic())
        what = f"{unit.name} (pid {pid}) {describe_exit(code)}; last lines: {tail}"
        if delay is None:
            say(f"{what}. It was restarted {policy.max_quick_failures} times and died each time within "
                f"{policy.stable_s:g} s, so it stays down: see {unit.log_path}")
            return
        say(f"{what}. Restarting it in {delay:g} s (log: {unit.log_path})")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), delay)
        if stopping.is_set():
            return
        if (planned is not None and planned.held(unit.name) is not None) or unit.pid != pid:
            continue  # started again on purpose meanwhile: watch that run
        restart: asyncio.Future[None] = asyncio.ensure_future(unit.restart())
        if not await _first(restart, stopping):
            return  # a stop request: the half-started unit is stopped with the rest
        if (exc := restart.exception()) is not None:  # a failed start is one more death, reported the same way
            say(f"{unit.name} could not be started again: {type(exc).__name__}: {exc}")
        else:
            say(f"{unit.name} restarted (pid {unit.pid})")
        backoff.started(time.monotonic())

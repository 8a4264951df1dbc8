"""`keep_alive` (what keeps `hivemesh up`'s children running) around the restarts a CA rotation makes on purpose and
around a stop request, with a stand-in unit (the real processes: tests/e2e/test_up_ca_rotation.py).

A unit `up` stops and starts again under `Planned.hold` (etcd and the control plane at `prepare` and `finish`) is no
crash: nothing is reported or restarted for it, and a later real crash still is. A stop request ends a restart that
waits for a unit that never becomes ready at once: `up` went on waiting out etcd's 60 s health wait after SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from hivemesh.controlplane.cli.restarts import Planned, RestartPolicy, keep_alive
from tests.support.waiting import until


class Unit:
    """A stand-in child: exits when told to; its restart can be made to hang (never ready)."""

    def __init__(self) -> None:
        self.name = "etcd"
        self.log_path = Path("/dev/null")
        self.pid: int | None = 100
        self.restarts = 0
        self.hang = False
        self.cancelled = False
        self._exited = asyncio.Event()

    async def wait_exit(self) -> int | None:
        await self._exited.wait()
        return -9

    def tail(self, n: int) -> list[str]:
        return ["last words"]

    def die(self) -> None:
        self._exited.set()

    def started_again(self) -> None:
        assert self.pid is not None
        self.pid += 1
        self._exited = asyncio.Event()

    async def restart(self) -> None:
        self.restarts += 1
        if self.hang:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        self.started_again()


POLICY = RestartPolicy(initial_s=0.05, max_s=0.1)


async def test_a_held_unit_stopped_and_started_on_purpose_is_no_crash() -> None:
    unit, planned, stopping, said = Unit(), Planned(), asyncio.Event(), []
    watcher = asyncio.create_task(keep_alive(unit, POLICY, said.append, stopping, planned))
    try:
        async with planned.hold("etcd", "controlplane"):
            unit.die()  # the rotation stops it ...
            await asyncio.sleep(POLICY.initial_s * 4)  # a crash would have been restarted within this window
            unit.started_again()  # ... and starts it again itself
        await asyncio.sleep(POLICY.initial_s * 4)
        assert said == [] and unit.restarts == 0

        unit.die()  # a real crash afterwards: reported and restarted, the new run watched
        assert await until(lambda: unit.restarts == 1 and len(said) == 2, 5), said
        assert said[0].startswith("etcd (pid 101) was killed by SIGKILL; last lines: last words. Restarting it")
        assert said[1] == "etcd restarted (pid 102)"
    finally:
        stopping.set()
        watcher.cancel()  # as `Supervisor.stop_all` ends its watchers
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def test_a_stop_request_ends_a_restart_that_waits_for_a_unit_never_ready() -> None:
    unit, stopping, said = Unit(), asyncio.Event(), []
    unit.hang = True
    watcher = asyncio.create_task(keep_alive(unit, POLICY, said.append, stopping, Planned()))
    unit.die()
    assert await until(lambda: unit.restarts == 1, 5)  # waiting for the restarted unit
    stopping.set()
    await asyncio.wait_for(watcher, 1)  # was: until the restart's own wait ran out (etcd's: 60 s)
    assert unit.cancelled  # the wait itself is cancelled, so `up` stops the half-started unit with the rest
    assert not [line for line in said if "restarted" in line or "could not" in line], said

"""The caller of the multi-host test: a mesh client (`caller`) on host 1, driven by lines on stdin.

`python -m tests.support.multihost_caller`, with the mesh location and a join token in HIVEMESH_* variables.
Commands, one per line; every answer is one JSON line on stdout:

- `probe`: wait until `echo` has two instances and `pecho` one, then call `echo` 20 times and `pecho` once;
  answers which replicas served, the registered endpoints, and what the plain agent saw as its caller.
- `load MAX_CALLS MAX_S WORKERS MARK_AFTER`: start a bounded load of `echo` calls (paced, at most MAX_CALLS and
  MAX_S seconds); answers `started`, later `mark` once MARK_AFTER calls completed (the test cuts a link then).
- `until-on-host HOST COUNT MAX_S`: wait until exactly COUNT instances of `echo` and `pecho` are registered on
  HOST (as this caller's registry cache sees etcd); answers how many and when.
- `stop-when-served TAG MAX_S`: end the load as soon as a call served by TAG completes after this command (or
  after MAX_S); answers `done` with every call: start and end (time.monotonic, the machine's clock, which the
  test shares), ok, served_by, error.
- `quit`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from hivemesh.mesh.errors import HivemeshError
from hivemesh.sdk import MeshClient

_PACE_S = 0.08
"""Each worker's pause between calls: four workers make at most ~50 calls/s on a 2-core machine."""


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Load:
    def __init__(self, client: MeshClient, max_calls: int, max_s: float, workers: int, mark_after: int) -> None:
        self.client = client
        self.max_calls, self.max_s, self.workers, self.mark_after = max_calls, max_s, workers, mark_after
        self.calls: list[dict[str, Any]] = []
        self.started = 0
        self.stop = asyncio.Event()
        self.stop_when: str | None = None
        self.stop_after = 0.0
        self.task: asyncio.Task[None] | None = None

    async def _worker(self, deadline: float) -> None:
        while not self.stop.is_set() and self.started < self.max_calls and time.monotonic() < deadline:
            self.started += 1
            t0 = time.monotonic()
            record: dict[str, Any] = {"start": t0}
            try:
                out = await self.client.call("echo", {"text": f"call {self.started}"}, timeout=10.0)
                record.update(ok=True, served_by=out.get("served_by"))
            except HivemeshError as exc:
                record.update(ok=False, error=f"{exc.reason}: {exc.message}")
            except Exception as exc:  # noqa: BLE001 - any failure is a failed call, reported, never hidden
                record.update(ok=False, error=f"{type(exc).__name__}: {exc}")
            record["end"] = time.monotonic()
            self.calls.append(record)
            if len(self.calls) == self.mark_after:
                _say({"event": "mark", "done": len(self.calls), "at": record["end"]})
            if self.stop_when is not None and record.get("served_by") == self.stop_when and t0 >= self.stop_after:
                self.stop.set()
            await asyncio.sleep(_PACE_S)

    async def run(self) -> None:
        deadline = time.monotonic() + self.max_s
        await asyncio.gather(*(self._worker(deadline) for _ in range(self.workers)))


async def _probe(client: MeshClient) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while len(client.instances("echo")) < 2 or not client.instances("pecho"):
        if time.monotonic() > deadline:
            return {"event": "probe", "error": "echo x2 and pecho not all registered within 30 s",
                    "echo": [i.endpoint for i in client.instances("echo")]}
        await asyncio.sleep(0.1)
    served = Counter()
    for n in range(20):
        out = await client.call("echo", {"text": f"probe {n}"}, timeout=10.0)
        served[out["served_by"]] += 1
    plain = await client.call("pecho", {"text": "across hosts"}, timeout=10.0)
    return {"event": "probe", "served_by": dict(served), "plain": plain,
            "echo": sorted(i.endpoint for i in client.instances("echo")),
            "pecho": sorted(i.endpoint for i in client.instances("pecho"))}


async def _until_on_host(client: MeshClient, host: str, count: int, max_s: float) -> dict[str, Any]:
    """Wait until exactly count instances are registered on host, as this caller's registry cache sees etcd: a
    lease expiring or a new registration is a write the etcd majority agreed on."""
    t0 = time.monotonic()

    def on_host(snapshot: Mapping[str, Any]) -> int:
        return sum(i.endpoint.startswith(host + ":") for i in snapshot.values())

    cache = client.node.registry.cache
    await cache.wait_for(lambda snap: on_host(snap) == count, max_s)
    now = time.monotonic()
    return {"event": "instances", "on_host": on_host(cache.snapshot()), "after_s": now - t0, "at": now}


async def _main() -> None:
    loop = asyncio.get_running_loop()
    async with MeshClient.connect(name="caller") as client:
        _say({"event": "ready"})
        load: Load | None = None
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            cmd, *args = line.split() or ["quit"]
            if cmd == "probe":
                _say(await _probe(client))
            elif cmd == "load":
                max_calls, max_s, workers, mark_after = int(args[0]), float(args[1]), int(args[2]), int(args[3])
                load = Load(client, max_calls, max_s, workers, mark_after)
                load.task = asyncio.create_task(load.run())
                _say({"event": "started"})
            elif cmd == "until-on-host":
                _say(await _until_on_host(client, args[0], int(args[1]), float(args[2])))
            elif cmd == "stop-when-served" and load is not None and load.task is not None:
                load.stop_when, load.stop_after = args[0], time.monotonic()
                try:
                    await asyncio.wait_for(asyncio.shield(load.task), float(args[1]))
                except TimeoutError:
                    load.stop.set()
                    await load.task
                _say({"event": "done", "calls": load.calls})
            else:
                _say({"event": "bye"})
                return


if __name__ == "__main__":
    asyncio.run(_main())

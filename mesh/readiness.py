"""Whether a node can do its job, decided in one place and told to every health service it answers on.

`grpc.health.v1` used to say SERVING from start to stop, so a sidecar whose agent had died, a node whose registry
entry was gone or whose certificate had expired kept passing every probe. Here each part that knows a reason the
node cannot serve reports it under a cause ("agent", "registration", "certificate", "etcd", ...) and clears it
when the reason is gone; the node is SERVING exactly while no cause is reported and it is not draining. Causes
are either pushed by the part that notices (`report`) or pulled on a bounded interval (`watch`, a check that
returns what is wrong or None). Draining (SIGTERM, `stop()`) is final.

Every health servicer attached (the mutual-TLS port's, the plaintext health port's) answers the same: "" (the
node as a whole) and each service it names.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Final

from grpc_health.v1 import health, health_pb2

from hivemesh.mesh.watch import cancel_and_wait

log = logging.getLogger(__name__)

SERVING: Final = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: Final = health_pb2.HealthCheckResponse.NOT_SERVING
STARTING: Final = "starting"
"""The cause every node starts with: it serves once its owner says start-up is complete (`ready()`)."""
DEFAULT_INTERVAL_S: Final = 2.0
"""How often a pulled check runs: a dead agent or a lost entry shows within this plus the check's timeout."""

Check = Callable[[], Awaitable[str | None]]
"""A pulled check: what is wrong now (a sentence for the log and `problems`), or None when all is well."""


class Readiness:
    """A node's serving state: the causes that keep it from serving, and the health servicers that say so."""

    def __init__(self) -> None:
        self._problems: dict[str, str] = {STARTING: "starting up"}
        self._targets: list[tuple[health.aio.HealthServicer, tuple[str, ...]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._draining = False

    @property
    def serving(self) -> bool:
        return not self._problems and not self._draining

    @property
    def status(self) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
        return SERVING if self.serving else NOT_SERVING

    @property
    def problems(self) -> Mapping[str, str]:
        """Cause -> what is wrong, for every reason the node does not serve now (draining included)."""
        return {**self._problems, **({"draining": "shutting down"} if self._draining else {})}

    async def attach(self, servicer: health.aio.HealthServicer, services: Sequence[str]) -> None:
        """Let servicer answer for "" and services from now on (it says the current state at once)."""
        names = ("", *services)
        self._targets.append((servicer, names))
        for name in names:
            await servicer.set(name, self.status)
        if self._draining:
            await servicer.enter_graceful_shutdown()

    async def ready(self) -> None:
        """Start-up is complete: serve unless another cause says otherwise."""
        await self.report(STARTING, None)

    async def report(self, cause: str, problem: str | None) -> None:
        """Set (problem given) or clear (None) one cause, and tell every servicer if the status changed."""
        before = self.serving
        if problem is None:
            if self._problems.pop(cause, None) is not None and cause != STARTING:
                log.warning("health: %s is fine again%s", cause, "" if self._problems else "; serving")
        elif self._problems.get(cause) != problem:
            if cause not in self._problems:
                log.warning("health: not serving: %s", problem)
            self._problems[cause] = problem
        if self.serving != before:
            await self._publish()

    def watch(self, cause: str, check: Check, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        """Run check every interval_s until `close()`, reporting what it finds under cause. A check that raises
        reports its exception (a probe that cannot even run is no proof of health)."""

        async def loop() -> None:
            while True:
                try:
                    problem = await check()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - any failure of the check is the cause's problem
                    problem = f"{cause} check failed: {exc!r}"
                await self.report(cause, problem)
                await asyncio.sleep(interval_s)

        self._tasks.append(asyncio.get_running_loop().create_task(loop(), name=f"hivemesh-readiness:{cause}"))

    async def drain(self) -> None:
        """Say NOT_SERVING for good (SIGTERM, stop()): balancers and probes stop sending before the drain."""
        if self._draining:
            return
        self._draining = True
        await self.close()
        for servicer, _ in self._targets:
            await servicer.enter_graceful_shutdown()

    async def close(self) -> None:
        """Stop the pulled checks (the state stays as it is)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            await cancel_and_wait(task)

    async def _publish(self) -> None:
        # The status is read afresh at each set: a report landing between two sets is not overwritten by a
        # stale value, because the last write for every name reads the latest state.
        for servicer, names in list(self._targets):
            for name in names:
                await servicer.set(name, self.status)

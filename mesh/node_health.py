"""A serving node's health, put together: its `Readiness`, the checks that feed it, its plaintext health port.

The sidecar and the SDK's in-process server (and a caller-only sidecar, with fewer checks) wire it the same way:
`NodeHealth(listen, interval_s)` before the servers are built (they share `.readiness`), `follow(node,
registration)` once registered, `open(services)` when serving, `drain()` first thing in `stop()`, `close()` last.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc

from hivemesh.mesh.cert_presence import follow_certificate
from hivemesh.mesh.health_port import HealthPort, health_listen
from hivemesh.mesh.readiness import Readiness
from hivemesh.mesh.readiness_checks import agent_answers, registration_held

if TYPE_CHECKING:
    from hivemesh.mesh.node import MeshNode
    from hivemesh.mesh.registry import Registration


class NodeHealth:
    """Readiness plus its checks and the optional plaintext health port of one serving node."""

    def __init__(self, listen: str | None, interval_s: float) -> None:
        """listen: the health port's HOST:PORT (None: $HIVEMESH_HEALTH_LISTEN, else off); interval_s: how often
        the pulled checks run."""
        chosen = health_listen(listen)
        self.readiness = Readiness()
        self.port = HealthPort(chosen) if chosen is not None else None
        self.interval_s = interval_s

    @property
    def address(self) -> str | None:
        """The plaintext health port's HOST:PORT once open (None: off)."""
        return self.port.address if self.port is not None and self.port.port else None

    def follow(self, node: MeshNode, registration: Registration) -> None:
        """Not serving while the node's registry entry is lost or its certificate expired beyond renewal."""
        follow_certificate(node, registration, self.readiness)
        self.readiness.watch("registration", registration_held(registration, node.registry,
                                                               min(1.0, self.interval_s)), self.interval_s)

    def watch_agent(self, channel: grpc.aio.Channel, address: str) -> None:
        """Not serving while the agent behind a sidecar does not answer on its plaintext link."""
        self.readiness.watch("agent", agent_answers(channel, address, min(1.0, self.interval_s)), self.interval_s)

    async def open(self, services: Sequence[str]) -> None:
        """Start-up is complete: open the health port (answering for services too) and serve."""
        if self.port is not None:
            await self.port.start(self.readiness, services)
        await self.readiness.ready()

    async def drain(self) -> None:
        """NOT_SERVING for good, before deregistering and draining."""
        await self.readiness.drain()

    async def close(self) -> None:
        await self.readiness.close()
        if self.port is not None:
            await self.port.stop()

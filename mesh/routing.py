"""Capability routing: pick a live instance for a capability, round robin, skipping recently failed ones.

Reads only the registry's in-memory index (swapped atomically on each watch event), so routing never waits
on etcd and keeps working on the last-known state while etcd is down.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from hivemesh.mesh.errors import NoLiveInstanceError, UnknownCapabilityError
from hivemesh.v1 import mesh_pb2

_SUSPECT_S = 2.0


class InstanceSource(Protocol):
    """What routing needs from the registry view."""

    def instances(self, capability: str) -> Sequence[mesh_pb2.AgentInstance]: ...

    def knows_capability(self, capability: str) -> bool: ...


class RoundRobinRouter:
    """Round robin per capability over live instances.

    An instance whose connection just failed is 'suspect' for a couple of seconds and is skipped while any
    other instance is available: a killed instance stops receiving calls at once, not only when its lease
    expires. Suspicion is local and short-lived; the registry stays the source of truth.
    """

    def __init__(self, source: InstanceSource, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._source = source
        self._next: dict[str, int] = {}
        self._suspect_until: dict[str, float] = {}
        self._clock = clock

    def live(self, capability: str) -> Sequence[mesh_pb2.AgentInstance]:
        """Live instances for capability (registry order); UnknownCapabilityError / NoLiveInstanceError if none."""
        instances = self._source.instances(capability)
        if not instances:
            self.candidates(capability)  # raises the right error
        return instances

    def is_suspect(self, instance_id: str) -> bool:
        """True while instance_id recently could not be reached (see mark_failed)."""
        return bool(self._suspect_until) and self._suspect_until.get(instance_id, 0.0) > self._clock()

    def candidates(self, capability: str) -> list[mesh_pb2.AgentInstance]:
        """Live instances for capability in the order to try them (next in the rotation first)."""
        instances = self._source.instances(capability)
        if not instances:
            if self._source.knows_capability(capability):
                raise NoLiveInstanceError(
                    f"capability {capability!r} has no live instance right now",
                    metadata={"capability": capability[:128]},
                )
            raise UnknownCapabilityError(
                f"no agent in the mesh offers capability {capability!r}",
                metadata={"capability": capability[:128]},
            )
        n = len(instances)
        start = self._next.get(capability, 0) % n
        self._next[capability] = start + 1
        ordered = [instances[(start + i) % n] for i in range(n)]
        if self._suspect_until:
            now = self._clock()
            healthy = [i for i in ordered if self._suspect_until.get(i.instance_id, 0.0) <= now]
            suspect = [i for i in ordered if self._suspect_until.get(i.instance_id, 0.0) > now]
            ordered = healthy + suspect
        return ordered

    def pick(self, capability: str) -> mesh_pb2.AgentInstance:
        """The instance the next call for capability goes to."""
        return self.candidates(capability)[0]

    def mark_failed(self, instance_id: str) -> None:
        """Note that instance_id could not be reached, so routing prefers the others for a while."""
        self._suspect_until[instance_id] = self._clock() + _SUSPECT_S
        if len(self._suspect_until) > 1024:
            now = self._clock()
            self._suspect_until = {k: v for k, v in self._suspect_until.items() if v > now}

    def mark_ok(self, instance_id: str) -> None:
        if self._suspect_until:
            self._suspect_until.pop(instance_id, None)

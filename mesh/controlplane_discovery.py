"""A node follows the control-plane replicas' adverts in etcd, so its control-plane client can fail over to
replicas it was not configured with (and forgets discovered ones that went away; configured ones stay)."""

from __future__ import annotations

from collections.abc import Callable

from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.controlplane_endpoints import Advert
from hivemesh.mesh.etcd import Endpoints
from hivemesh.mesh.keyspace import CONTROLPLANES
from hivemesh.mesh.watch import PrefixCache


def _decode(_key: bytes, value: bytes) -> Advert:
    advert = Advert.from_json(value)
    if advert is None:
        raise ValueError("not a control-plane advert")
    return advert


class ReplicaDiscovery:
    """Watches `keyspace.CONTROLPLANES` and hands every change to the current control-plane client."""

    def __init__(self, etcd: Endpoints, client: Callable[[], ControlPlaneClient | None]) -> None:
        self._client = client
        self._cache: PrefixCache[Advert] = PrefixCache(etcd, CONTROLPLANES, decode=_decode,
                                                      on_change=self._changed)

    async def start(self) -> None:
        """Start watching without waiting: discovery only adds to the configured addresses, it is never needed
        to start."""
        await self._cache.start(wait=False)

    async def stop(self) -> None:
        await self._cache.stop()

    def _changed(self) -> None:
        cp = self._client()
        if cp is not None:
            cp.learn([a.controlplane for a in self._cache.snapshot().values()])

"""One control-plane replica among several: its leadership, its advert, and its copy of the shared signing keys.

Every replica serves the whole API; what must happen once (retention sweeps, retiring signing keys) asks
`is_leader(core)` first. Each replica advertises its addresses under a lease (`keyspace.CONTROLPLANES`), so
nodes find the others and a dead replica leaves the list within the TTL. Signing keys added or retired by any
replica reach the others within `sync_s` (`hivemesh.controlplane.shared_keys`); a new key signs only after its
activation delay (5 s by default), so every replica knows it before any of them signs with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from typing import TYPE_CHECKING, Any, Final

from hivemesh.controlplane import shared_keys
from hivemesh.controlplane.leader import LeaderElection
from hivemesh.mesh.controlplane_endpoints import Advert, advert_key
from hivemesh.mesh.watch import cancel_and_wait

if TYPE_CHECKING:
    from hivemesh.controlplane.server import Core

log = logging.getLogger(__name__)

EXTENSION: Final = "replicas"


def default_replica_id() -> str:
    """host-pid-random: unique per process, readable in logs and in `etcdctl get`."""
    host = socket.gethostname().split(".")[0] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def is_leader(core: Core) -> bool:
    """Whether this process should run the once-per-mesh duties now (a core without replicas: always)."""
    replicas = core.extensions.get(EXTENSION)
    return True if replicas is None else bool(replicas.election.is_leader)


def leader_fence(core: Core) -> list[Any]:
    """etcd compares that fail once another replica leads (empty without replicas)."""
    replicas = core.extensions.get(EXTENSION)
    return [] if replicas is None else list(replicas.election.fence())


class Replica:
    """This process's part in the replica set; `start()` before the duties start, `advertise()` once serving."""

    def __init__(self, core: Core, replica_id: str, *, ttl_s: int, keys_revision: int, sync_s: float = 1.0) -> None:
        self.core = core
        self.replica_id = replica_id
        self.ttl_s = ttl_s
        self.election = LeaderElection(core.etcd, replica_id, ttl_s=ttl_s, members=core.hedged.endpoints)
        self._keys_revision = keys_revision
        self._sync_s = sync_s
        self._advert: Advert | None = None
        self._advert_lease: int | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.election.start()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._sync_keys(), name="hivemesh-signing-key-sync"))

    async def advertise(self, controlplane: str, join: str) -> None:
        """Keep a leased advert of these addresses in etcd from now on (first put before returning)."""
        self._advert = Advert(self.replica_id, controlplane, join)
        with contextlib.suppress(Exception):
            await self._put_advert()
        self._tasks.append(asyncio.get_running_loop().create_task(self._keep_advert(), name="hivemesh-advert"))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            await cancel_and_wait(task)
        await self.election.stop()
        lease, self._advert_lease = self._advert_lease, None
        if lease is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self.core.etcd.revoke_lease(lease)

    async def _put_advert(self) -> None:
        assert self._advert is not None
        etcd = self.core.etcd
        async with asyncio.timeout(2.0):
            lease = await etcd.lease(self.ttl_s)
            await etcd.put(advert_key(self.replica_id), self._advert.to_json(), lease=lease.id)
        self._advert_lease = lease.id

    async def _keep_advert(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                if self._advert_lease is None:
                    await self._put_advert()
                    continue
                async with asyncio.timeout(2.0):
                    reply = await self.core.etcd.refresh_lease(self._advert_lease)
                if reply is None or reply.TTL <= 0:
                    log.warning("the advert of replica %s expired; advertising again", self.replica_id)
                    self._advert_lease = None
                    await self._put_advert()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - etcd trouble: try again next round
                log.debug("advert keepalive failed: %r", exc)

    async def _sync_keys(self) -> None:
        """Follow the shared signing keys: a key another replica added or retired replaces this one's set."""
        core = self.core
        while True:
            await asyncio.sleep(self._sync_s)
            try:
                fresh = await shared_keys.refresh(core.etcd, core.config.state_dir, self._keys_revision)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep the keys held; etcd may come back
                log.debug("could not read the shared signing keys: %r", exc)
                continue
            if fresh is not None:
                keys, self._keys_revision = fresh
                keys.retire_after_s = core.issuer.keys.retire_after_s
                core.issuer.keys = keys
                log.info("signing keys now %s (shared by every replica)", ", ".join(k.kid for k in keys.published()))

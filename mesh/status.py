"""Publishing a node's traffic status to etcd for `hivemesh status`, off the call path.

Every ~2 s a background task puts the node's `NodeTraffic` (breaker states, limiter use, in-flight calls,
recent error rates) at `/hivemesh/status/<kind>/<name>/<instance>`, bound to a short lease: a node that dies
disappears from the report within the TTL, and a clean stop revokes the lease at once. While etcd is
unreachable the task keeps trying quietly; calls never wait on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Final

import aetcd

from hivemesh.mesh.etcd import PREFIX, Endpoints
from hivemesh.mesh.etcd import client as etcd_client
from hivemesh.mesh.pki import parse_spiffe_id
from hivemesh.mesh.watch import cancel_and_wait
from hivemesh.v1 import policy_pb2

log = logging.getLogger(__name__)

STATUS_PREFIX: Final = PREFIX + "status/"


def status_key(kind: str, name: str, instance: str) -> str:
    return f"{STATUS_PREFIX}{kind}/{name}/{instance}"


MAX_WARNED: Final = 1024
"""Mismatched status entries remembered as warned about (then forgotten all at once): one warning per entry, not
one per `hivemesh status`, and a workload writing many keys cannot grow the set without bound."""
_warned: set[tuple[str, str]] = set()


async def read_status(etcd: Any, trust_domain: str | None = None) -> list[policy_pb2.NodeTraffic]:
    """Every node's last published status, sorted by identity then instance.

    An entry is skipped when it does not decode, or when its identity is not the workload its key belongs to
    (`status/<kind>/<name>/...`, which only that workload and operators may write): any workload may write
    anything under its own key, and it was shown as whatever identity it named (a fake open breaker of another
    agent). Skipped rather than shown under the key's owner: `NodeTraffic` has no field to flag it with, and
    numbers shown as the writer's own would still be made up. With trust_domain (the control plane's), the identity
    must also be in it: the owner `foo` could otherwise show itself as `spiffe://other.example/agent/foo`. The control
    plane logs a warning once per entry."""
    out: list[policy_pb2.NodeTraffic] = []
    for kv in await etcd.get_prefix(STATUS_PREFIX.encode()):
        key = kv.key.decode(errors="replace")
        try:
            node = policy_pb2.NodeTraffic.FromString(kv.value)
        except Exception:  # noqa: BLE001 - a bad entry must not hide the others
            log.warning("skipping undecodable status at %s", key)
            continue
        owner = status_owner(key)
        if owner is None or _kind_name(node.identity, trust_domain) != owner:
            _warn_once(key, node.identity, owner)
            continue
        out.append(node)
    return sorted(out, key=lambda n: (n.identity, n.instance))


def status_owner(key: str) -> tuple[str, str] | None:
    """(kind, name) of the workload a status key belongs to (`status/<kind>/<name>/<instance>`), or None."""
    parts = key[len(STATUS_PREFIX):].split("/") if key.startswith(STATUS_PREFIX) else []
    return (parts[0], parts[1]) if len(parts) >= 3 and parts[0] and parts[1] and parts[2] else None


def _kind_name(identity: str, trust_domain: str | None = None) -> tuple[str, str] | None:
    """(kind, name) of identity, or None when it is no SPIFFE id (or is one of another trust domain)."""
    try:
        sid = parse_spiffe_id(identity)
    except ValueError:
        return None
    if trust_domain is not None and sid.trust_domain != trust_domain:
        return None
    return sid.kind, sid.name


def _warn_once(key: str, identity: str, owner: tuple[str, str] | None) -> None:
    if (key, identity) in _warned:
        return
    if len(_warned) >= MAX_WARNED:
        _warned.clear()
    _warned.add((key, identity))
    if owner is None:
        log.warning("skipping the status at %s (naming %r): the key is not status/<kind>/<name>/<instance>", key,
                    identity[:256])
    else:
        log.warning("skipping the status at %s: it names %r, but the key belongs to %s/%s (written by that workload "
                    "or an operator)", key, identity[:256], *owner)


class StatusPublisher:
    """Puts snapshot() at key every interval_s under a lease of ttl_s; see the module docstring."""

    def __init__(
        self,
        etcd_endpoints: Endpoints,
        key: str,
        snapshot: Callable[[], policy_pb2.NodeTraffic],
        *,
        interval_s: float = 2.0,
        ttl_s: int = 6,
    ) -> None:
        if interval_s <= 0 or ttl_s < 2 or ttl_s <= interval_s:
            raise ValueError("need interval_s > 0 and ttl_s >= 2, longer than the interval")
        self._endpoints = etcd_endpoints
        self.key = key
        self._snapshot = snapshot
        self._interval = interval_s
        self._ttl = ttl_s
        self._client: aetcd.Client | None = None
        self._lease: int | None = None
        self._task: asyncio.Task[None] | None = None
        self.published = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"hivemesh-status:{self.key}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        lease, self._lease = self._lease, None
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    if lease is not None:
                        await client.revoke_lease(lease)
                    await client.close()

    async def publish_once(self) -> None:
        """One put (granting a lease first if needed); raises on etcd trouble."""
        if self._client is None:
            self._client = etcd_client(self._endpoints, timeout=2)
            await self._client.connect()
        c = self._client
        async with asyncio.timeout(3.0):
            if self._lease is not None:
                reply = await c.refresh_lease(self._lease)
                if reply is None or reply.TTL <= 0:
                    self._lease = None
            if self._lease is None:
                self._lease = (await c.lease(self._ttl)).id
            await c.put(self.key.encode(), self._snapshot().SerializeToString(), lease=self._lease)
        self.published += 1

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self.publish_once()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - status is best effort: keep trying, never disturb calls
                log.log(logging.DEBUG if failures else logging.INFO, "status publish failed: %r", exc)
                failures += 1
                client, self._client, self._lease = self._client, None, None
                if client is not None:
                    with contextlib.suppress(Exception):
                        await client.close()
            await asyncio.sleep(self._interval)

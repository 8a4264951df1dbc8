"""A lease keepalive sent to every etcd member at once, each over a fresh channel of its own.

The registry's keepalive goes over one round-robin channel. When the member it picked cannot answer (it is
rejoining after a partition and has no leader yet, or it is frozen), the keepalive times out, and a retry after
backoff on a new channel can still land there: the lease expired although the other members were healthy
(docs/multihost.md). `refresh_on_members` is the retry that cannot make that mistake: it asks every member in
parallel and takes the first answer, bounded by the time the lease has left.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import aetcd

from hivemesh.mesh.etcd import Endpoints, EtcdAccess, client, parse_endpoints


def member_clients(endpoints: Endpoints, timeout_s: float) -> list[aetcd.Client]:
    """One client per member; over TLS each checks the name a multi-endpoint client checks (the first host)."""
    pairs = parse_endpoints(endpoints)
    tls = endpoints.material() if isinstance(endpoints, EtcdAccess) else None
    if tls is not None and tls.server_name is None:
        tls = dataclasses.replace(tls, server_name=pairs[0][0])
    seconds = max(1, round(timeout_s))
    return [client(f"{host}:{port}", tls=tls, timeout=seconds) for host, port in pairs]


async def _refresh(c: aetcd.Client, lease_id: int) -> int:
    await c.connect()
    reply = await c.refresh_lease(lease_id)
    return int(reply.TTL) if reply is not None else 0


async def refresh_on_members(endpoints: Endpoints, lease_id: int, timeout_s: float) -> int:
    """Keep lease_id alive through whichever member answers first; the TTL it reports (<= 0: the lease is gone).

    Raises TimeoutError when no member answers within timeout_s, or the last member's error when all failed.
    Every channel is closed before returning; the unanswered keepalives are cancelled.
    """
    clients = member_clients(endpoints, timeout_s)
    tasks = [asyncio.create_task(_refresh(c, lease_id)) for c in clients]
    error: BaseException | None = None
    try:
        async with asyncio.timeout(timeout_s):
            for next_done in asyncio.as_completed(tasks):
                try:
                    return await next_done
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - this member failed: wait for the others
                    error = exc
        raise error if error is not None else RuntimeError("no etcd member given")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in clients:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await c.close()

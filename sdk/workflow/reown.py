"""Owning a run again after its owner lease was lost (etcd paused, or this host cut off, for longer than the TTL).

The owner keeps trying while etcd is unreachable, because giving up would strand the run until someone runs
`workflows resume`; it stops only when another process holds the run (a clean hand-over) or etcd refuses it.
"""

from __future__ import annotations

import asyncio
import logging

from aetcd.exceptions import ConnectionFailedError, ConnectionTimeoutError

from hivemesh.mesh.errors import FailedPreconditionError, PermissionDeniedError, RegistryUnavailableError
from hivemesh.sdk.workflow.store import LockLostError, OwnerLock, WorkflowStore, owner_key

log = logging.getLogger(__name__)

_FIRST_RETRY_S = 0.25
_MAX_RETRY_S = 5.0


def etcd_unreachable(exc: BaseException) -> bool:
    """etcd did not answer (down, paused or cut off): a run that met this is replayed, not failed. Besides the etcd
    client's own errors, the mesh's RegistryUnavailableError: a run's event watch that cannot start within its
    timeout raises it, as a host just back from a network cut may (seen in the multi-host test)."""
    return isinstance(exc, ConnectionFailedError | ConnectionTimeoutError | RegistryUnavailableError)


async def reown(store: WorkflowStore, workflow_id: str, owner: str, ttl_s: int, previous: bytes) -> OwnerLock:
    """A fresh owner lock on the run, retried with backoff for as long as etcd cannot be reached.

    previous is the owner value this process held: while the owner key still holds it (revoking the old lease
    failed), wait up to TTL + 2 s for that lease to expire. Raises LockLostError naming the holder at once if
    another process owns the run.
    """
    delay = _FIRST_RETRY_S
    while True:
        try:
            # acquire's own etcd calls time out; the outer bound covers a lease grant that never answers.
            return await asyncio.wait_for(_acquire(store, workflow_id, owner, ttl_s, previous), ttl_s + 12.0)
        except PermissionDeniedError:
            raise
        except FailedPreconditionError as exc:
            raise LockLostError(f"workflow {workflow_id}: handed over ({exc.message})",
                                metadata={"workflow_id": workflow_id}) from None
        except Exception as exc:  # noqa: BLE001 - etcd unreachable or timing out: keep trying, it comes back
            log.warning("workflow %s: cannot own it again yet (%s: %s); retrying in %.1f s",
                        workflow_id, type(exc).__name__, exc, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, _MAX_RETRY_S)


async def _acquire(store: WorkflowStore, workflow_id: str, owner: str, ttl_s: int, previous: bytes) -> OwnerLock:
    try:
        return await store.acquire(workflow_id, owner, ttl_s=ttl_s, wait_s=0.0)
    except FailedPreconditionError:
        current = await store.etcd.get(owner_key(workflow_id))
        if current is not None and current.value != previous:
            raise  # another process owns it: a hand-over
    return await store.acquire(workflow_id, owner, ttl_s=ttl_s, wait_s=ttl_s + 2.0)

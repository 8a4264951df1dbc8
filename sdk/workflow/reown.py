"""Owning a run again after its owner lease was lost (etcd paused, or this host cut off, for longer than the TTL).

The owner keeps trying while etcd is unreachable, because giving up would strand the run until someone runs
`workflows resume`; it stops only when another process holds the run (a clean hand-over) or etcd refuses it.
"""

from __future__ import annotations

import asyncio
import logging

from aetcd.exceptions import ConnectionFailedError, ConnectionTimeoutError

from hivemesh.mesh.errors import FailedPreconditionError, PermissionDeniedError
from hivemesh.sdk.workflow.store import LockLostError, OwnerLock, WorkflowStore

log = logging.getLogger(__name__)

_FIRST_RETRY_S = 0.25
_MAX_RETRY_S = 5.0


def etcd_unreachable(exc: BaseException) -> bool:
    """etcd did not answer (down, paused or cut off): a run that met this is replayed, not failed."""
    return isinstance(exc, ConnectionFailedError | ConnectionTimeoutError)


async def reown(store: WorkflowStore, workflow_id: str, owner: str, ttl_s: int) -> OwnerLock:
    """A fresh owner lock on the run, retried with backoff for as long as etcd cannot be reached.

    Waits up to TTL + 2 s for a lease still on the owner key (this process's own old lease, if revoking it
    failed) to expire. Raises LockLostError naming the holder if another process owns the run by then.
    """
    delay = _FIRST_RETRY_S
    while True:
        try:
            # acquire's own etcd calls time out; the outer bound covers a lease grant that never answers.
            return await asyncio.wait_for(store.acquire(workflow_id, owner, ttl_s=ttl_s, wait_s=ttl_s + 2.0),
                                          ttl_s + 12.0)
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

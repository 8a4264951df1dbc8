"""Queued delivery: a call held durably in etcd while no instance serves its capability, delivered when one does.

Opt-in per call (`CallOptions(queue_for=60)`, or `MeshClient.enqueue` + `queued(id)` to poll by id). An entry
lives at `keyspace.QUEUE<kind>-<name>/<id>` (only its caller's etcd role reads or writes there), leased to its
max wait plus a minute to collect the answer, so etcd itself enforces the age bound; the count bound
(`max_held`) is checked when a call is enqueued. The caller's node delivers: each pass, it claims every held call
whose capability has a live instance (a compare-and-swap from `queued` to `delivering`), runs it through the
ordinary outbound pipeline with a fresh token (authz, grants, budgets apply at delivery, as the caller is then),
and stores the answer or the error on the entry. A caller that restarts resumes its held calls
(`resume()`); one it crashed in the middle of delivering is marked failed, outcome unknown, never resent blind.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import grpc

from hivemesh.mesh.errors import HivemeshError, InvalidInputError, NoLiveInstanceError, NotFoundError
from hivemesh.mesh.keyspace import QUEUE
from hivemesh.mesh.watch import cancel_and_wait

log = logging.getLogger(__name__)

MAX_WAIT_S: Final = 3600
KEEP_ANSWER_S: Final = 60
POLL_S: Final = 0.2
QUEUED, DELIVERING, DONE, FAILED = "queued", "delivering", "done", "failed"


class QueueFullError(HivemeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "QUEUE_FULL"
    default_message = "too many calls are held for this caller already"


@dataclass(frozen=True)
class HeldCall:
    """One held call as stored: its state and, once delivered, the response bytes or the error."""

    id: str
    capability: str
    state: str
    enqueued_at_unix_ms: int
    expires_at_unix_ms: int
    response: bytes = b""
    error: HivemeshError | None = None


def _encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _held(doc: dict[str, Any]) -> HeldCall:
    err = doc.get("error")
    return HeldCall(
        id=doc["id"], capability=doc["capability"], state=doc["state"],
        enqueued_at_unix_ms=doc["enqueued_at_unix_ms"], expires_at_unix_ms=doc["expires_at_unix_ms"],
        response=base64.b64decode(doc.get("response", "")),
        error=None if err is None else HivemeshError(
            err["message"], code=grpc.StatusCode[err["code"]], reason=err["reason"]),
    )


class CallQueue:
    """One caller's held calls. invoke(raw, capability, idempotency_key) sends one call (the node's pipeline);
    live(capability) says whether an instance serves it now."""

    def __init__(self, etcd: Any, owner: str, invoke: Callable[[bytes, str, str], Any],
                 live: Callable[[str], bool], *, max_held: int = 100, poll_s: float = POLL_S) -> None:
        self.etcd = etcd
        self.prefix = f"{QUEUE}{owner}/"
        self._invoke = invoke
        self._live = live
        self.max_held = max_held
        self.poll_s = poll_s
        self._task: asyncio.Task[None] | None = None

    def _key(self, call_id: str) -> bytes:
        return (self.prefix + call_id).encode()

    async def _docs(self) -> list[tuple[dict[str, Any], int, int]]:
        """(document, mod revision, lease) of every held call of this caller."""
        out = []
        for kv in await self.etcd.get_prefix(self.prefix.encode()):
            with contextlib.suppress(ValueError, KeyError):
                out.append((json.loads(kv.value), int(kv.mod_revision), int(kv.lease)))
        return out

    async def held(self) -> list[HeldCall]:
        """Every call of this caller still held or its answer still kept, oldest first."""
        calls = [_held(doc) for doc, _, _ in await self._docs()]
        return sorted(calls, key=lambda c: c.enqueued_at_unix_ms)

    async def enqueue(self, capability: str, raw: bytes, idempotency_key: str, max_wait: float) -> str:
        """Hold one call (raw: its serialized InvokeRequest) for at most max_wait seconds; its id."""
        if not 0 < max_wait <= MAX_WAIT_S:
            msg = f"must be in (0, {MAX_WAIT_S}] seconds"
            raise InvalidInputError(f"the queue wait {msg}, got {max_wait}", field_violations={"max_wait": msg})
        held = sum(1 for c in await self.held() if c.state in (QUEUED, DELIVERING))
        if held >= self.max_held:
            raise QueueFullError(f"{held} calls are held already (at most {self.max_held}); try again later",
                                 metadata={"max_held": str(self.max_held)})
        now = int(time.time() * 1000)
        call_id = f"q-{secrets.token_hex(8)}"
        lease = await self.etcd.lease(math.ceil(max_wait) + KEEP_ANSWER_S)
        doc = {"id": call_id, "capability": capability, "state": QUEUED, "idempotency_key": idempotency_key,
               "enqueued_at_unix_ms": now, "expires_at_unix_ms": now + int(max_wait * 1000),
               "request": base64.b64encode(raw).decode()}
        await self.etcd.put(self._key(call_id), _encode(doc), lease=lease.id)
        self.start()
        return call_id

    async def get(self, call_id: str) -> HeldCall:
        kv = await self.etcd.get(self._key(call_id))
        if kv is None:
            raise NotFoundError(f"no held call {call_id!r} (never held by this caller, or older than its wait "
                                f"plus {KEEP_ANSWER_S} s)", metadata={"id": call_id})
        return _held(json.loads(kv.value))

    async def wait(self, call_id: str, timeout: float) -> HeldCall:
        """The call once delivered (done or failed), or as it stands after timeout."""
        end = time.monotonic() + timeout
        while True:
            held = await self.get(call_id)
            if held.state in (DONE, FAILED) or time.monotonic() >= end:
                return held
            await asyncio.sleep(min(self.poll_s, max(0.0, end - time.monotonic())))

    def start(self) -> None:
        """Deliver held calls from now on (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="hivemesh-call-queue")

    async def resume(self) -> int:
        """After a restart: mark calls caught mid-delivery failed, deliver the rest; how many are held."""
        count = 0
        for doc, rev, lease in await self._docs():
            if doc.get("state") == DELIVERING:
                err = NoLiveInstanceError("the caller restarted while delivering it: outcome unknown, not resent")
                await self._finish(doc, rev, lease, b"", err)
            elif doc.get("state") == QUEUED:
                count += 1
        self.start()
        return count

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)

    async def _loop(self) -> None:
        while True:
            try:
                if not await self.run_once():
                    return  # nothing held: the next enqueue starts the loop again
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - etcd trouble: try again
                log.warning("call queue pass failed: %s", exc)
            await asyncio.sleep(self.poll_s)

    async def run_once(self) -> int:
        """Deliver what can be delivered now; how many calls are still held."""
        waiting = 0
        now = int(time.time() * 1000)
        for doc, rev, lease in await self._docs():
            if doc.get("state") != QUEUED:
                continue
            if doc["expires_at_unix_ms"] <= now:
                err = NoLiveInstanceError(f"no instance of {doc['capability']!r} went live while it was held")
                await self._finish(doc, rev, lease, b"", err)
                continue
            if not self._live(doc["capability"]):
                waiting += 1
                continue
            claimed = {**doc, "state": DELIVERING}
            tx = self.etcd.transactions
            key = self._key(doc["id"])
            ok, _ = await self.etcd.transaction(compare=[tx.mod(key) == rev],
                                                success=[tx.put(key, _encode(claimed), lease=lease)], failure=[])
            if not ok:
                continue
            kv = await self.etcd.get(key)
            response, error = b"", None
            try:
                response = await self._invoke(base64.b64decode(doc["request"]), doc["capability"],
                                              doc.get("idempotency_key", ""))
            except HivemeshError as err:
                error = err
            if kv is not None:
                await self._finish(claimed, int(kv.mod_revision), lease, response, error)
        return waiting

    async def _finish(self, doc: dict[str, Any], rev: int, lease: int, response: bytes,
                      error: HivemeshError | None) -> None:
        done = {**doc, "state": FAILED if error else DONE, "request": ""}
        if error is not None:
            done["error"] = {"code": error.code.name, "reason": error.reason, "message": error.message}
        else:
            done["response"] = base64.b64encode(response).decode()
        tx = self.etcd.transactions
        key = self._key(doc["id"])
        await self.etcd.transaction(compare=[tx.mod(key) == rev],
                                    success=[tx.put(key, _encode(done), lease=lease)], failure=[])

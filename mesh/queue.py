"""Queued delivery: a call held durably in etcd while no instance serves its capability, delivered when one does.

Opt-in per call (`CallOptions(queue_for=60)`, `MeshClient.enqueue` + `queued(id)`; through a sidecar,
`InvokeRequest.queue_for_ms` on `Mesh.Call`/`Mesh.Enqueue` and `Mesh.GetQueued`). An entry lives at
`keyspace.QUEUE<kind>-<name>/<id>` (only its caller's etcd role reads or writes there) and holds everything
needed to send it: the serialized request, capability, idempotency key and wait. It is leased to its wait plus a
minute to collect the answer, so etcd itself enforces the age bound; the count bound (`max_held`), the size
bound (`MAX_ENTRY_BYTES`, stored form) and the capability's name are checked when a call is enqueued, before
anything is written. The prefix is read in pages (`etcd.read_prefix`), so any number of held calls stays readable.
Held calls are listed in the order etcd stored them (each entry's create revision: ids are random, so key order is
not that order), which is also the stable position a listing page resumes after.

Who delivers: any running node of the caller's identity (the caller's own process, or the sidecar of a plain
agent, which outlives the agent's process). Each pass it claims every held call whose capability has a live
instance: a compare-and-swap from `queued` to `delivering` that also writes a claim key on a short lease the
claimer keeps alive while it sends. It runs the call through the ordinary outbound pipeline with a fresh token
(authz, grants and budgets judged at delivery, as the caller is then) and stores the answer or the error on the
entry. A claim whose lease lapsed (its node died mid-call) is failed OUTCOME_UNKNOWN by the next pass of any
node of that identity, never resent blind. No other party (the control plane included) ever sends as the caller.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import aetcd
import grpc

from hivemesh.mesh import json_depth
from hivemesh.mesh.errors import (
    DeadlineExceededError,
    DeliveryOutcomeUnknownError,
    HivemeshError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    QueueExpiredError,
    QueueFullError,
    RegistryUnavailableError,
    typed_error,
)
from hivemesh.mesh.etcd import MAX_READ_BYTES, read_prefix, too_large
from hivemesh.mesh.keyspace import QUEUE
from hivemesh.mesh.registry import NAME_RE
from hivemesh.mesh.watch import cancel_and_wait

log = logging.getLogger(__name__)

MAX_WAIT_S: Final = 3600
KEEP_ANSWER_S: Final = 60
POLL_S: Final = 0.2
CLAIM_TTL_S: Final = 6
"""A delivering node's claim lapses this long after it stops refreshing it (it refreshes every third of it)."""
CLAIM_SUFFIX: Final = ".claim"
QUEUED, DELIVERING, DONE, FAILED = "queued", "delivering", "done", "failed"
MAX_ENTRY_BYTES: Final = 1024 * 1024
"""One held call as stored (its request base64-encoded, ~4/3 of its bytes; later its answer): under etcd's request
limit (MAX_REQUEST_BYTES) with room for the key and the claim's transaction. Larger is refused at enqueue
(PAYLOAD_TOO_LARGE, naming `input`); an answer larger than this is kept as that error instead."""
READ_PAGE: Final = max(1, MAX_READ_BYTES // 2 // MAX_ENTRY_BYTES)
"""Held calls per read: a page of the largest entries stays well under the etcd client's receive limit."""
ID_RE: Final = re.compile(r"q-[0-9a-f]{16}")
"""A held call's id as enqueue makes it: `q-` and 8 random bytes in hex."""

@dataclass(frozen=True)
class HeldCall:
    """One held call as stored: its state and, once delivered, the response bytes or the error. revision: the
    etcd revision that created its entry, unique and growing in the order calls were held (any node of the
    identity), and unchanged as the call is delivered: the queue's stable order, which a listing resumes by."""

    id: str
    capability: str
    state: str
    enqueued_at_unix_ms: int
    expires_at_unix_ms: int
    response: bytes = b""
    error: HivemeshError | None = None
    call_id: str = ""
    idempotency_key: str = ""
    revision: int = 0


def _encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


@contextlib.contextmanager
def _etcd_errors(what: str) -> Iterator[None]:
    """etcd's failures as typed errors: a message too large for etcd can never succeed (PAYLOAD_TOO_LARGE, not
    retried); anything else is etcd trouble (REGISTRY_UNAVAILABLE). Never aetcd's text as UNKNOWN."""
    try:
        yield
    except aetcd.exceptions.ClientError as exc:
        if too_large(exc):
            raise PayloadTooLargeError(f"etcd refused {what} for its size (a held call keeps at most "
                                       f"{MAX_ENTRY_BYTES} bytes)",
                                       metadata={"max_entry_bytes": str(MAX_ENTRY_BYTES)}) from None
        raise RegistryUnavailableError(f"the registry (etcd) failed {what}: {type(exc).__name__}") from None


def _held(doc: dict[str, Any], revision: int) -> HeldCall:
    err = doc.get("error")
    return HeldCall(
        id=doc["id"], capability=doc["capability"], state=doc["state"], revision=revision,
        enqueued_at_unix_ms=doc["enqueued_at_unix_ms"], expires_at_unix_ms=doc["expires_at_unix_ms"],
        response=base64.b64decode(doc.get("response", "")),
        call_id=doc.get("call_id", ""), idempotency_key=doc.get("idempotency_key", ""),
        error=None if err is None else typed_error(grpc.StatusCode[err["code"]], err["reason"], err["message"]),
    )


class CallQueue:
    """One caller identity's held calls. invoke(raw, capability, idempotency_key, timeout) sends one call (the
    node's pipeline; timeout None: the node's own default); live(capability) says whether an instance serves it
    now."""

    def __init__(self, etcd: Any, owner: str, invoke: Callable[[bytes, str, str, float | None], Any],
                 live: Callable[[str], bool], *, max_held: int = 100, poll_s: float = POLL_S) -> None:
        self.etcd = etcd
        self.prefix = f"{QUEUE}{owner}/"
        self._invoke = invoke
        self._live = live
        self.max_held = max_held
        self.poll_s = poll_s
        self._task: asyncio.Task[None] | None = None
        self._enqueueing = asyncio.Lock()  # count check and write as one step, within this node
        self._enqueued = 0  # bumped after each held call is written: the loop ends only on a pass that saw it

    def _key(self, call_id: str) -> bytes:
        return (self.prefix + call_id).encode()

    async def _docs(self) -> tuple[list[tuple[dict[str, Any], int, int, int]], set[str]]:
        """(document, mod revision, lease, create revision) of every held call of this identity, and the ids with
        a live claim."""
        out, claimed = [], set()
        with _etcd_errors("reading the held calls"):
            kvs, _ = await read_prefix(self.etcd, self.prefix.encode(), page=READ_PAGE)
        for kv in kvs:
            key = kv.key.decode()
            if key.endswith(CLAIM_SUFFIX):
                claimed.add(key[len(self.prefix):-len(CLAIM_SUFFIX)])
                continue
            with contextlib.suppress(ValueError, KeyError, RecursionError):
                out.append((json_depth.loads(kv.value), int(kv.mod_revision), int(kv.lease), int(kv.create_revision)))
        return out, claimed

    async def held(self) -> list[HeldCall]:
        """Every call of this identity still held or its answer still kept, oldest first: in the order etcd
        stored them (by revision, not by enqueued_at_unix_ms, which is a node's clock and ties within a
        millisecond), so the order is total and a call held later always comes after every call listed before."""
        docs, _ = await self._docs()
        calls = [_held(doc, created) for doc, _, _, created in docs]
        return sorted(calls, key=lambda c: c.revision)

    async def enqueue(self, capability: str, raw: bytes, idempotency_key: str, max_wait: float, *,
                      call_id: str = "", deadline_s: float | None = None) -> str:
        """Hold one call (raw: its serialized InvokeRequest) for at most max_wait seconds; its id. Refused
        (InvalidInputError, QueueFullError) before anything is written; a failed write leaves nothing behind.
        deadline_s: the call's own deadline, from now (a caller waiting for it): it is held no longer than that,
        and delivered with only the time left, never past it."""
        if not NAME_RE.fullmatch(capability):
            msg = "must be a capability name ([a-z0-9][a-z0-9._-]{0,62}), as agents register them"
            raise InvalidInputError(f"capability {msg}; got {capability[:80]!r}: a call for it could never be "
                                    "delivered", field_violations={"capability": msg})
        if deadline_s is not None:
            max_wait = min(max_wait, deadline_s)
        if not 0 < max_wait <= MAX_WAIT_S:
            msg = f"must be in (0, {MAX_WAIT_S}] seconds"
            raise InvalidInputError(f"the queue wait {msg}, got {max_wait}", field_violations={"max_wait": msg})
        now = int(time.time() * 1000)
        held_id = f"q-{secrets.token_hex(8)}"
        doc = {"id": held_id, "capability": capability, "state": QUEUED, "idempotency_key": idempotency_key,
               "call_id": call_id, "enqueued_at_unix_ms": now, "expires_at_unix_ms": now + int(max_wait * 1000),
               "request": base64.b64encode(raw).decode()}
        if deadline_s is not None:
            doc["deadline_at_unix_ms"] = now + int(deadline_s * 1000)
        encoded = _encode(doc)
        if len(encoded) > MAX_ENTRY_BYTES:
            msg = f"a held call is stored in at most {MAX_ENTRY_BYTES} bytes (its request base64-encoded)"
            raise PayloadTooLargeError(
                f"the call ({len(raw)} bytes, {len(encoded)} stored) is too large to hold: {msg}; send it live or "
                "make its input smaller", field_violations={"input": msg},
                metadata={"max_entry_bytes": str(MAX_ENTRY_BYTES), "stored_bytes": str(len(encoded))})
        async with self._enqueueing:
            held = sum(1 for c in await self.held() if c.state in (QUEUED, DELIVERING))
            if held >= self.max_held:
                raise QueueFullError(f"{held} calls are held already (at most {self.max_held}); try again later",
                                     metadata={"max_held": str(self.max_held)})
            with _etcd_errors("holding the call"):
                lease = await self.etcd.lease(math.ceil(max_wait) + KEEP_ANSWER_S)
                try:
                    await self.etcd.put(self._key(held_id), encoded, lease=lease.id)
                except BaseException:
                    with contextlib.suppress(Exception):
                        await self.etcd.revoke_lease(lease.id)  # the put may have landed: take it back too
                    raise
            self._enqueued += 1
        self.start()
        return held_id

    async def get(self, call_id: str) -> HeldCall:
        if not ID_RE.fullmatch(call_id):
            raise InvalidInputError(f"{call_id[:40]!r} is not a held call id (q- and 16 hex digits)",
                                    field_violations={"id": "q-<16 hex digits>, as Enqueue returned it"})
        with _etcd_errors("reading the held call"):
            kv = await self.etcd.get(self._key(call_id))
        if kv is None:
            raise NotFoundError(f"no held call {call_id!r} (never held by this caller, or older than its wait "
                                f"plus {KEEP_ANSWER_S} s)", metadata={"id": call_id})
        return _held(json_depth.loads(kv.value), int(kv.create_revision))

    async def wait(self, call_id: str, timeout: float) -> HeldCall:
        """The call once delivered (done or failed), or as it stands after timeout."""
        end = time.monotonic() + timeout
        while True:
            held = await self.get(call_id)
            if held.state in (DONE, FAILED) or time.monotonic() >= end:
                return held
            await asyncio.sleep(min(self.poll_s, max(0.0, end - time.monotonic())))

    def start(self) -> None:
        """Deliver held calls from now on (idempotent). The loop runs in a fresh context: a delivery never
        inherits the enqueuing call's delegation (`on_behalf_of`) or trace."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name="hivemesh-call-queue", context=contextvars.Context())

    async def resume(self) -> int:
        """After a (re)start: deliver what this identity still holds; how many calls are waiting. A call some
        node of this identity was delivering when it died is failed OUTCOME_UNKNOWN once its claim lapses."""
        docs, _ = await self._docs()
        self.start()
        return sum(1 for doc, _, _, _ in docs if doc.get("state") in (QUEUED, DELIVERING))

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)

    async def _loop(self) -> None:
        while True:
            seen = self._enqueued
            try:
                # Nothing held, and nothing enqueued since this pass read etcd: the next enqueue starts the loop
                # again. A call enqueued mid-pass found the loop running (start() did nothing), and the pass had
                # read the prefix before it was written: ending then left it held, undelivered, until another
                # enqueue came along.
                if not await self.run_once() and self._enqueued == seen:
                    return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - etcd trouble: try again
                log.warning("call queue pass failed: %s", exc)
            await asyncio.sleep(self.poll_s)

    async def run_once(self) -> int:
        """Deliver what can be delivered now; how many calls are still held (waiting or being delivered)."""
        pending = 0
        now = int(time.time() * 1000)
        docs, claimed = await self._docs()
        for doc, rev, lease, _ in docs:
            state = doc.get("state")
            if state == DELIVERING:
                if doc["id"] in claimed:
                    pending += 1  # some node of this identity is sending it now
                else:
                    await self._finish(doc, rev, lease, b"", DeliveryOutcomeUnknownError())
                continue
            if state != QUEUED:
                continue
            if doc["expires_at_unix_ms"] <= now:
                err = QueueExpiredError(f"no instance of {doc['capability']!r} went live while it was held")
                await self._finish(doc, rev, lease, b"", err)
            elif not self._live(doc["capability"]):
                pending += 1
            else:
                await self._deliver(doc, rev, lease)
        return pending

    async def _deliver(self, doc: dict[str, Any], rev: int, lease: int) -> None:
        """Claim one held call (so it is sent once, and a crash mid-call shows), send it, store the outcome."""
        claim = await self.etcd.lease(CLAIM_TTL_S)
        claimed = {**doc, "state": DELIVERING}
        tx = self.etcd.transactions
        key = self._key(doc["id"])
        claim_key = key + CLAIM_SUFFIX.encode()
        try:
            ok, _ = await self.etcd.transaction(
                compare=[tx.mod(key) == rev],
                success=[tx.put(key, _encode(claimed), lease=lease), tx.put(claim_key, b"", lease=claim.id)],
                failure=[])
            if not ok:
                return  # another node of this identity claimed it, or it changed: the next pass sees
            keepalive = asyncio.get_running_loop().create_task(self._keep(claim), name="hivemesh-queue-claim")
            try:
                kv = await self.etcd.get(key)
                response, error = b"", None
                deadline_at = doc.get("deadline_at_unix_ms")
                left = (deadline_at - time.time() * 1000) / 1000 if isinstance(deadline_at, int) else None
                try:
                    if left is not None and left <= 0:
                        raise DeadlineExceededError("the call's deadline passed while it was held")
                    response = await self._invoke(base64.b64decode(doc["request"]), doc["capability"],
                                                  doc.get("idempotency_key", ""), left)
                except HivemeshError as err:
                    error = err
                if kv is not None:
                    await self._finish(claimed, int(kv.mod_revision), lease, response, error)
            finally:
                await cancel_and_wait(keepalive)
        finally:
            with contextlib.suppress(Exception):
                await self.etcd.revoke_lease(claim.id)  # the claim key goes with it

    async def _keep(self, claim: Any) -> None:
        while True:
            await asyncio.sleep(CLAIM_TTL_S / 3)
            with contextlib.suppress(Exception):  # a missed refresh: the next one may land in time
                await claim.refresh()

    async def _finish(self, doc: dict[str, Any], rev: int, lease: int, response: bytes,
                      error: HivemeshError | None) -> None:
        """Store the outcome, unless the entry changed since rev (then whoever changed it decided)."""
        done = {**doc, "state": FAILED if error else DONE, "request": ""}
        if error is None:
            done["response"] = base64.b64encode(response).decode()
            if len(_encode(done)) > MAX_ENTRY_BYTES:  # etcd would refuse it and the call would look lost
                del done["response"]
                done["state"] = FAILED
                error = PayloadTooLargeError(f"the answer ({len(response)} bytes) was larger than a held call keeps "
                                             f"({MAX_ENTRY_BYTES} bytes stored): send the call live to get it")
        if error is not None:
            done["error"] = {"code": error.code.name, "reason": error.reason, "message": error.message[:1000]}
        tx = self.etcd.transactions
        key = self._key(doc["id"])
        await self.etcd.transaction(compare=[tx.mod(key) == rev],
                                    success=[tx.put(key, _encode(done), lease=lease)], failure=[])

"""Where runs live in etcd: the event log (appends fenced on the owner), the `list` read model, run ownership.

A run's id starts with the workload that owns it (`<kind>-<name>/<local>`, `hivemesh.mesh.run_ids`), and so do
its keys: etcd lets only that workload (and operators, and the control plane) read or write them. A refusal
from etcd is reported as PERMISSION_DENIED naming the run, never as an etcd error.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import grpc

from hivemesh.mesh import json_depth
from hivemesh.mesh.errors import (
    FailedPreconditionError,
    HivemeshError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
)
from hivemesh.mesh.etcd import is_permission_denied, read_prefix
from hivemesh.mesh.keyspace import WORKFLOW_INDEX as INDEX
from hivemesh.mesh.keyspace import WORKFLOWS
from hivemesh.mesh.run_ids import FORMAT, parse_run_id
from hivemesh.sdk.escalation import WITHDRAW_S, EscalationClient, EscalationInfo
from hivemesh.sdk.workflow.state import WorkflowState

log = logging.getLogger(__name__)

MAX_EVENT_BYTES: Final = 512 * 1024
MAX_JOURNAL_BYTES: Final = 32 * 1024 * 1024
"""The bound on a run's journal (its events' encoded bytes), so it stays readable and replayable: an event that
would take the journal past it is refused (JournalFullError) and the run fails. Only the events that end a run
are let past it (`created`, `started`, `cancel_requested` and the final one, each at most MAX_EVENT_BYTES), so a
full run still ends: its journal never holds more than this plus those few."""
ENDING_EVENTS: Final = frozenset({"created", "started", "cancel_requested", "completed", "rejected", "failed",
                                  "canceled"})
"""Events exempt from MAX_JOURNAL_BYTES: without them a run at the bound could neither start nor end."""


def events_prefix(workflow_id: str) -> str:
    return f"{WORKFLOWS}{workflow_id}/events/"


def owner_key(workflow_id: str) -> bytes:
    return f"{WORKFLOWS}{workflow_id}/owner".encode()


def event_key(workflow_id: str, seq: int) -> bytes:
    return f"{events_prefix(workflow_id)}{seq:010d}".encode()


def validate_workflow_id(workflow_id: str) -> str:
    """A full run id, `<kind>-<name>/<local>` (its owner first); InvalidInputError otherwise."""
    try:
        parse_run_id(workflow_id)
    except ValueError as exc:
        raise InvalidInputError(str(exc), field_violations={"workflow_id": f"must be {FORMAT}"}) from None
    return workflow_id


@contextlib.asynccontextmanager
async def owned(what: str) -> AsyncIterator[None]:
    """etcd's "permission denied" on a run's keys as PERMISSION_DENIED: the run belongs to another identity."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, PermissionDeniedError) or not is_permission_denied(exc):
            raise
        raise PermissionDeniedError(
            f"{what}: this identity may not read or write it (a run is readable and writable only by the workload "
            "its id starts with, operators and the control plane)") from exc


class JournalFullError(HivemeshError):
    """A run's journal would pass its bound (MAX_JOURNAL_BYTES): the run fails instead of growing without end."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "WORKFLOW_JOURNAL_FULL"
    default_message = "the workflow run's journal is full"


class LockLostError(FailedPreconditionError):
    reason = "WORKFLOW_OWNER_LOST"
    default_message = "this process no longer owns the workflow run (its lease expired)"


@dataclass
class OwnerLock:
    workflow_id: str
    value: bytes
    lease: Any
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    _keepalive: asyncio.Task[None] | None = None


def check_wait(value: float, name: str) -> float:
    """A wait in seconds: finite and not negative (NaN would make every deadline comparison false: a wait for ever)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise InvalidInputError(f"{name} must be a finite number of seconds >= 0, not {value!r}",
                                field_violations={name: "must be finite and >= 0"})
    return float(value)


async def withdraw_asked(client: EscalationClient, creations: list[asyncio.Future[EscalationInfo]]) -> None:
    """Cancel what each creation the run's cancellation cut off created, once answered (bounded, best effort):
    unrecorded, `withdraw_escalations` would not know it, and a person would be asked for nothing."""
    for create in creations:
        with contextlib.suppress(HivemeshError, TimeoutError):
            info = await asyncio.wait_for(asyncio.shield(create), WITHDRAW_S)
            await client.cancel(info.id, note="the workflow run was cancelled")


async def withdraw_escalations(client: EscalationClient, state: WorkflowState) -> None:
    """Cancel every escalation of the run that has no resolution (the run ended; nobody will read an answer)."""
    for rec in state.escalations.values():
        if rec.get("resolution") or not rec.get("escalation_id"):
            continue
        with contextlib.suppress(HivemeshError):
            await client.cancel(str(rec["escalation_id"]), note="the workflow run was cancelled")


_PLAIN: Final = "plain JSON: text keys, finite numbers"


def _not_plain(data: Any) -> tuple[str, str] | None:
    """(path, what is wrong) of the first value in data that JSON would not hold as it is, or None: a key that
    is not text (json.dumps writes 1 as "1", so a replay would not find it) or NaN or an infinity (not JSON:
    `workflows show --json` printed a bare NaN). Iterative, each container once: any depth, cycles end here
    (json.dumps refuses those)."""
    seen: set[int] = set()
    todo: list[tuple[Any, tuple[Any, ...]]] = [(data, ())]  # (value, (parent's link, key)): paths built on demand
    while todo:
        value, link = todo.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return _path(link), f"is {value}"
        if not isinstance(value, dict | list | tuple) or id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, dict):
            for key in value:
                if not isinstance(key, str):
                    return _path(link), f"has the key {key!r:.80} ({type(key).__name__}), not text"
            items: list[tuple[Any, Any]] = list(value.items())
        else:
            items = list(enumerate(value))
        todo.extend((item, (link, key)) for key, item in reversed(items))
    return None


def _path(link: tuple[Any, ...]) -> str:
    """`input.items[2].price` for a link chain of keys (dict keys dotted, list indexes bracketed)."""
    parts: list[str] = []
    while link:
        link, key = link
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    path = "".join(reversed(parts)).lstrip(".")
    return path if len(path) <= 200 else path[:90] + "…" + path[-90:]


def _encode(event: Mapping[str, Any]) -> bytes:
    """The event as stored; InvalidInputError for what JSON cannot hold as it is (an object, a key that is not
    text, NaN or an infinity, a lone surrogate), naming where, never a str() of it or a key turned to text that
    would come back as another value on replay."""
    kind = event.get("type", "")
    problem = _not_plain(event.get("data"))
    if problem is not None:
        where, what = problem
        raise InvalidInputError(f"a workflow {kind} event cannot be stored: {where or 'its data'} {what}; a run holds "
                                f"{_PLAIN}", field_violations={where or "data": f"{what}; must be {_PLAIN}"})
    try:
        data = json.dumps(event, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidInputError(f"a workflow {kind} event cannot be stored: its data is not plain "
                                f"JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if len(data) > MAX_EVENT_BYTES:
        raise InvalidInputError(f"a workflow event is {len(data)} bytes; the limit is {MAX_EVENT_BYTES} "
                                "(keep large payloads out of step inputs and outputs: store them and pass ids)")
    return data


_SUMMARY_FIELDS: Final[dict[str, tuple[type, ...]]] = {
    "state": (str,), "definition": (str,), "owner": (str,), "steps": (int,), "tokens": (int,),
    "created_at": (int, float), "updated_at": (int, float),
}
"""The fields of a run's index summary readers use, and their types (`WorkflowState.summary`)."""
_LAST_TIME: Final = 253_402_300_799
"""9999-12-31 as a unix time, the last one datetime shows: 1e308 is finite, and no date."""


def summary_problem(wid: str, summary: Any) -> str:
    """Why an index entry is not the summary of run wid ("" when it is one): a JSON object whose `id` is wid,
    with a text `state`, a `created_at` time, and the other fields of their types. Each workload writes its own
    runs' entries, so an entry may hold anything, and may name another workload's run."""
    if not isinstance(summary, dict):
        return "not a JSON object"
    if summary.get("id") != wid:
        return "its id is not the run it is stored under"
    if not isinstance(summary.get("state"), str):
        return "no state"
    if summary.get("created_at") is None:
        return "no created_at"
    for name, types in _SUMMARY_FIELDS.items():
        value = summary.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            return f"{name} is not {'a number' if float in types else 'text' if str in types else 'a whole number'}"
        if isinstance(value, int | float) and float in types and not 0 <= value <= _LAST_TIME:  # NaN fails too
            return f"{name} is not a time"
    return ""


class WorkflowStore:
    """Events in etcd: append (compare-and-create on the sequence key, fenced on the owner value), read, list."""

    def __init__(self, etcd: Any, *, max_journal_bytes: int = MAX_JOURNAL_BYTES) -> None:
        if isinstance(max_journal_bytes, bool) or not isinstance(max_journal_bytes, int) or max_journal_bytes < 1:
            raise ValueError("max_journal_bytes must be a positive int")
        self.etcd = etcd
        self.max_journal_bytes = max_journal_bytes

    async def _read(self, workflow_id: str, after: int) -> list[tuple[dict[str, Any], int]]:
        """(event, stored bytes) after seq `after`, in order; read in pages, so a long journal stays readable."""
        async with owned(f"workflow {workflow_id}"):
            kvs, _ = await read_prefix(self.etcd, events_prefix(workflow_id).encode())
        out = []
        for kv in kvs:
            try:
                event = json_depth.loads(kv.value)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                log.warning("skipping unparsable workflow event %s", bytes(kv.key).decode(errors="replace"))
                continue
            if isinstance(event, dict) and int(event.get("seq", 0)) > after:
                out.append((event, len(kv.value)))
        out.sort(key=lambda e: int(e[0].get("seq", 0)))
        return out

    async def events(self, workflow_id: str, after: int = 0) -> list[dict[str, Any]]:
        return [event for event, _ in await self._read(workflow_id, after)]

    async def catch_up(self, state: WorkflowState) -> None:
        """Fold the events written after state.seq into state (counting their bytes against the journal bound)."""
        for event, size in await self._read(state.id, state.seq):
            state.apply(event)
            state.journal_bytes += size

    async def load(self, workflow_id: str) -> WorkflowState:
        validate_workflow_id(workflow_id)
        state = WorkflowState(workflow_id)
        await self.catch_up(state)
        if not state.seq:
            raise NotFoundError(f"no workflow {workflow_id!r}", metadata={"workflow_id": workflow_id})
        return state

    async def create(self, state: WorkflowState, data: Mapping[str, Any]) -> dict[str, Any]:
        """Write a new run's `created` event, only if the run has none: one transaction, no catch-up, so of two
        submits of one id exactly one wins; the other gets FailedPreconditionError naming the id."""
        event = {"seq": 1, "type": "created", "at": time.time(), "data": dict(data)}
        raw = _encode(event)
        projected = WorkflowState(state.id)
        projected.apply(event)
        index = json.dumps(projected.summary(), separators=(",", ":"), default=str).encode()
        tx = self.etcd.transactions
        key = event_key(state.id, 1)
        async with owned(f"workflow {state.id}"):
            ok, _ = await self.etcd.transaction(
                compare=[tx.version(key) == 0],
                success=[tx.put(key, raw), tx.put(f"{INDEX}{state.id}".encode(), index)], failure=[])
        if not ok:
            raise FailedPreconditionError(f"workflow {state.id} exists already", metadata={"workflow_id": state.id})
        state.apply(event)
        state.journal_bytes += len(raw)
        return event

    async def append(self, state: WorkflowState, kind: str, data: Mapping[str, Any], *,
                     fence: bytes | None = None) -> dict[str, Any]:
        """Append one event after state.seq and fold it into state; on a sequence conflict, catch up and retry."""
        for _ in range(50):
            seq = state.seq + 1
            event = {"seq": seq, "type": kind, "at": time.time(), "data": dict(data)}
            raw = _encode(event)
            if kind not in ENDING_EVENTS and state.journal_bytes + len(raw) > self.max_journal_bytes:
                raise JournalFullError(
                    f"workflow {state.id}: its journal holds {state.journal_bytes} bytes; a {kind} event of "
                    f"{len(raw)} bytes would pass the bound of {self.max_journal_bytes} (keep large data out of "
                    "the run: store it and pass ids)", metadata={"workflow_id": state.id})
            # The read model is written in the same transaction, so `list` never shows what the events do not.
            projected = copy.deepcopy(state)
            projected.apply(event)
            index = json.dumps(projected.summary(), separators=(",", ":"), default=str).encode()
            tx = self.etcd.transactions
            key = event_key(state.id, seq)
            compare = [tx.version(key) == 0]
            if fence is not None:
                compare.append(tx.value(owner_key(state.id)) == fence)
            async with owned(f"workflow {state.id}"):
                ok, _ = await self.etcd.transaction(
                    compare=compare, success=[tx.put(key, raw), tx.put(f"{INDEX}{state.id}".encode(), index)],
                    failure=[])
            if ok:
                state.apply(event)
                state.journal_bytes += len(raw)
                return event
            if fence is not None:
                owner = await self.etcd.get(owner_key(state.id))
                if owner is None or owner.value != fence:
                    raise LockLostError(f"workflow {state.id}: another process owns it now")
            await self.catch_up(state)
        raise FailedPreconditionError(f"workflow {state.id}: could not append an event (too much contention)")

    async def index(self, owner: str | None = None) -> list[tuple[str, Any]]:
        """The run index as stored, in key order: (run id, its entry parsed as JSON, None when it is not JSON).
        Each workload writes its own runs' entries, so an entry may hold anything (`summary_problem`)."""
        prefix = f"{INDEX}{owner}/" if owner else INDEX
        async with owned(f"the runs under {prefix}"):
            kvs, _ = await read_prefix(self.etcd, prefix.encode())  # in pages: any number of runs stays listable
        out: list[tuple[str, Any]] = []
        for kv in kvs:
            wid = bytes(kv.key)[len(INDEX):].decode(errors="replace")
            try:
                out.append((wid, json_depth.loads(kv.value) if kv.value else None))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                out.append((wid, None))
        return out

    async def list(self, owner: str | None = None) -> list[dict[str, Any]]:
        """Summaries of the runs of owner (`<kind>-<name>`), or of every run (operators and the control plane),
        newest first. An entry that is not a run's summary (`summary_problem`) is replaced by the summary rebuilt
        from the run's journal, or left out when that fails too (logged once per list, with the count). One bad
        entry never fails everyone's listing."""

        async def from_journal(wid: str) -> dict[str, Any] | None:
            # The journal is its workload's writing too: one that does not fold into a run is no run to list.
            try:
                summary = (await self.load(wid)).summary()
            except (NotFoundError, InvalidInputError):
                return None
            except (ArithmeticError, AttributeError, KeyError, TypeError, ValueError, RecursionError) as exc:
                log.info("workflow %s: its journal does not read as a run (%s)", wid, type(exc).__name__)
                return None
            return None if summary_problem(wid, summary) else summary

        out: list[dict[str, Any]] = []
        skipped = 0
        for wid, summary in await self.index(owner):
            if summary is None or summary_problem(wid, summary):
                summary = await from_journal(wid)
            if summary is None:
                skipped += 1
            else:
                out.append(summary)
        if skipped:
            log.warning("%d workflow index entr%s under %s: not a run's summary, and no run's journal behind it "
                        "(its workload wrote it so, or it is damaged); left out of the list", skipped,
                        "y" if skipped == 1 else "ies", f"{INDEX}{owner}/" if owner else INDEX)
        out.sort(key=lambda s: (-s["created_at"], s["id"]))
        return out

    async def resolve(self, given: str) -> str:
        """A full run id for what an operator typed: the id itself, or a bare local id that exactly one owner
        uses (NotFoundError if none; InvalidInputError naming the candidates if several)."""
        if "/" in given:
            return validate_workflow_id(given)
        async with owned("the run index"):
            kvs, _ = await read_prefix(self.etcd, INDEX.encode(), keys_only=True)
        ids = (kv.key.decode(errors="replace")[len(INDEX):] for kv in kvs)
        found: list[str] = sorted(wid for wid in ids if wid.endswith(f"/{given}"))
        if not found:
            raise NotFoundError(f"no workflow {given!r}", metadata={"workflow_id": given})
        if len(found) > 1:
            raise InvalidInputError(f"workflow id {given!r} is used by several owners: {', '.join(found[:10])}; "
                                    "give the full id", field_violations={"workflow_id": "ambiguous"})
        return found[0]

    async def owner(self, workflow_id: str) -> dict[str, Any] | None:
        async with owned(f"workflow {workflow_id}"):
            kv = await self.etcd.get(owner_key(workflow_id))
        if kv is None:
            return None
        try:
            value = json_depth.loads(kv.value)
            return value if isinstance(value, dict) else None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            return {"owner": "?"}

    async def acquire(self, workflow_id: str, owner: str, *, ttl_s: int, wait_s: float) -> OwnerLock:
        """Own the run: create the owner key under a fresh lease, waiting up to wait_s for a previous owner's
        lease to expire. FailedPreconditionError names the current owner when it does not."""
        value = json.dumps({"owner": owner, "pid": os.getpid(), "host": socket.gethostname(),
                            "token": uuid.uuid4().hex, "since": time.time()}).encode()
        key = owner_key(workflow_id)
        deadline = time.monotonic() + wait_s
        while True:
            lease = await self.etcd.lease(ttl_s)
            tx = self.etcd.transactions
            try:
                async with owned(f"workflow {workflow_id}"):
                    ok, _ = await self.etcd.transaction(compare=[tx.version(key) == 0],
                                                        success=[tx.put(key, value, lease=lease)], failure=[])
            except PermissionDeniedError:
                with contextlib.suppress(Exception):
                    await lease.revoke()
                raise
            if ok:
                lock = OwnerLock(workflow_id, value, lease)
                lock._keepalive = asyncio.get_running_loop().create_task(self._keep(lock, ttl_s))
                return lock
            with contextlib.suppress(Exception):
                await lease.revoke()
            if time.monotonic() >= deadline:
                current = await self.owner(workflow_id) or {}
                who = f"{current.get('owner', '?')} (pid {current.get('pid', '?')} on {current.get('host', '?')})"
                raise FailedPreconditionError(
                    f"workflow {workflow_id} is being run by {who}; it can be resumed once that process stops and "
                    "its lease expires",
                    metadata={"workflow_id": workflow_id, "owner": str(current.get("owner", ""))},
                )
            await asyncio.sleep(min(0.25, max(deadline - time.monotonic(), 0.01)))

    async def _keep(self, lock: OwnerLock, ttl_s: int) -> None:
        """Refresh the owner lease every TTL/3; declare it lost once ttl_s passed since the last answered refresh.

        Every wait is bounded by the time the lease has left, so the loss is noticed at the TTL, not up to two
        more intervals later (a cut host's owner noticed ~10 s after the cut with a 5 s lease: docs/multihost.md).
        """
        interval = max(ttl_s / 3, 0.3)
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(min(interval, max(0.0, last_ok + ttl_s - time.monotonic())))
            try:
                left = last_ok + ttl_s - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no refresh was answered within the lease's {ttl_s} s")
                reply = await asyncio.wait_for(lock.lease.refresh(), min(interval, left))
                if reply is None or int(getattr(reply, "TTL", 0)) <= 0:
                    log.warning("workflow %s: the owner lease expired", lock.workflow_id)
                    lock.lost.set()
                    return
                last_ok = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - etcd trouble: the lease may still be alive; retry until TTL
                # Counted in time, not tries: a refresh that hangs costs more than one interval.
                if time.monotonic() - last_ok >= ttl_s:
                    log.warning("workflow %s: lost the owner lease (%s: %s)", lock.workflow_id,
                                type(exc).__name__, exc)
                    lock.lost.set()
                    return

    async def release(self, lock: OwnerLock) -> None:
        if lock._keepalive is not None:
            lock._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await lock._keepalive
        if lock.lost.is_set():
            return  # gone or out of reach: a revoke would only hang (the owner would report the loss seconds later)
        with contextlib.suppress(Exception):
            await lock.lease.revoke()

    async def request_cancel(self, workflow_id: str, *, by: str, reason: str = "",
                             escalations: EscalationClient | None = None) -> WorkflowState:
        """Append cancel_requested; if no live owner drives the run, record canceled as well, and withdraw the
        run's unresolved escalations (with `escalations`): nobody else is left to, so a person is not asked on."""
        state = await self.load(workflow_id)
        if state.terminal:
            return state
        if state.cancel_requested is None:
            await self.append(state, "cancel_requested", {"by": by, "reason": reason})
        if await self.owner(workflow_id) is None:
            # Nobody drives it: take the owner key briefly so no resumer starts while we finish it.
            try:
                lock = await self.acquire(workflow_id, by, ttl_s=5, wait_s=0.0)
            except FailedPreconditionError:
                # A resumer took it in between: it reads the cancel_requested just written and ends the run
                # canceled itself. The cancel took; saying otherwise would be wrong.
                return await self.load(workflow_id)
            try:
                state = await self.load(workflow_id)
                if not state.terminal:
                    await self.append(state, "canceled", {"by": by, "reason": reason or "cancelled"},
                                      fence=lock.value)
                    if escalations is not None:
                        await withdraw_escalations(escalations, state)
            finally:
                await self.release(lock)
        return await self.load(workflow_id)

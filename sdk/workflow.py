"""Durable workflows: a pattern (or any async function) run with every step recorded as an event in etcd.

    async with WorkflowEngine(mesh) as engine:
        handle = await engine.submit("hivemesh.agents.research:RESEARCH", {"query": "leases"})
        state = await handle.result()        # WorkflowState: state, steps, output, tokens
        # elsewhere, after the orchestrator died:  hivemesh workflows resume <id>

**Event sourcing.** A run is the events under `/hivemesh/workflows/<id>/events/<seq>`; its state is rebuilt
by replaying them (`WorkflowState.replay`). `/hivemesh/workflow-index/<id>` is a read model (summary for
`list`), written in the same transaction as each event.

**Resume.** The definition is recorded as an import reference (`module:attr`, a pattern object or an async
function `(run, input)`), so any process with the code can resume a run: it replays the events and runs the
definition again. A step that completed returns its recorded result without calling; a step that failed
raises its recorded error; memoized decisions come back as recorded, so the run takes the same path. A step
that had started but not finished is sent again *with the same idempotency key*: an idempotent capability
just runs again, and the SDK server of a non-idempotent one joins or replays the first attempt, so its
effect happens once (`hivemesh.sdk.idempotency`).

**One owner.** A run is driven by whoever holds `/hivemesh/workflows/<id>/owner`, a key bound to a lease
(default TTL 5 s) that the owner keeps alive. A killed orchestrator's lease expires and another process may
resume; every event the owner writes is fenced on its owner value, so an owner that lost its lease cannot
write again.

**Cancel.** `cancel_requested` is an event anyone may append; the owner watches its run's events, cancels
the body (which cancels its in-flight gRPC calls, and so the calls those agents made), withdraws its open
escalations, and records `canceled`. A run with no live owner is cancelled directly.

Task states are A2A's: SUBMITTED → WORKING ⇄ INPUT_REQUIRED → COMPLETED | FAILED | CANCELED | REJECTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import importlib
import inspect
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from hivemesh.mesh.errors import (
    CancelledError,
    FailedPreconditionError,
    HivemeshError,
    InvalidInputError,
    NotFoundError,
    TaskRejectedError,
)
from hivemesh.mesh.etcd import PREFIX
from hivemesh.mesh.etcd import client as etcd_client
from hivemesh.mesh.pki import NAME_RE
from hivemesh.mesh.watch import PrefixCache
from hivemesh.sdk.escalation import EscalationClient, EscalationInfo, OnDeadline
from hivemesh.sdk.patterns.base import (
    TERMINAL,
    PatternResult,
    StepResult,
    error_from_json,
    error_to_json,
    maybe_await,
)
from hivemesh.v1 import agent_pb2, mesh_pb2

if TYPE_CHECKING:
    from hivemesh.mesh.registry import CapabilityInfo
    from hivemesh.sdk.client import MeshClient

log = logging.getLogger(__name__)

WORKFLOWS: Final = PREFIX + "workflows/"
INDEX: Final = PREFIX + "workflow-index/"
MAX_EVENT_BYTES: Final = 512 * 1024
Body = Callable[[Any, Any], Awaitable[Any]]


def events_prefix(workflow_id: str) -> str:
    return f"{WORKFLOWS}{workflow_id}/events/"


def owner_key(workflow_id: str) -> bytes:
    return f"{WORKFLOWS}{workflow_id}/owner".encode()


def _event_key(workflow_id: str, seq: int) -> bytes:
    return f"{events_prefix(workflow_id)}{seq:010d}".encode()


def validate_workflow_id(workflow_id: str) -> str:
    if not NAME_RE.fullmatch(workflow_id):
        msg = "must match [a-z0-9][a-z0-9._-]{0,62}"
        raise InvalidInputError(f"workflow id {workflow_id[:80]!r} {msg}", field_violations={"workflow_id": msg})
    return workflow_id


# --- the state, rebuilt from events -------------------------------------------------------------------------------
@dataclass
class StepInfo:
    """One step as the events tell it: for `workflows show` and for replay."""

    step: str
    capability: str
    key: str = ""
    idempotent: bool = False
    status: str = "WORKING"  # WORKING, COMPLETED, FAILED, INPUT_REQUIRED
    attempts: int = 0
    started_at: float = 0.0
    ended_at: float | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        r = self.result or {}
        return {
            "step": self.step, "capability": self.capability, "status": self.status, "attempts": self.attempts,
            "agent": r.get("agent", ""), "instance": r.get("instance", ""), "idempotent": self.idempotent,
            "started_at": self.started_at, "ended_at": self.ended_at,
            "elapsed_ms": r.get("elapsed_ms") if r else (
                round((self.ended_at - self.started_at) * 1000, 2) if self.ended_at else None),
            "usage": r.get("usage"), "error": self.error,
        }


@dataclass
class WorkflowState:
    """A run's state: the fold of its events (`replay`)."""

    id: str
    definition: str = ""
    input: Any = None
    owner: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    state: str = "SUBMITTED"
    created_at: float = 0.0
    updated_at: float = 0.0
    seq: int = 0
    steps: dict[str, StepInfo] = field(default_factory=dict)
    memos: dict[str, Any] = field(default_factory=dict)
    notes: list[dict[str, Any]] = field(default_factory=list)
    escalations: dict[str, dict[str, Any]] = field(default_factory=dict)
    """step id → {"escalation_id", "reason", "resolution"?}."""
    output: Any = None
    error: dict[str, Any] | None = None
    reason: str = ""
    cancel_requested: dict[str, Any] | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)
    """Each time an orchestrator started or resumed the run: {"owner", "pid", "host", "at"}."""

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def tokens(self) -> int:
        total = 0
        for s in self.steps.values():
            u = (s.result or {}).get("usage") or {}
            total += int(u.get("input_tokens", 0)) + int(u.get("output_tokens", 0))
        return total

    def apply(self, event: Mapping[str, Any]) -> None:
        """Fold one event into the state (the only place state changes)."""
        kind, data, at = event["type"], event.get("data") or {}, float(event.get("at", 0.0))
        self.seq = max(self.seq, int(event.get("seq", 0)))
        self.updated_at = max(self.updated_at, at)
        if self.terminal and kind not in ("note",):
            return  # nothing changes a finished run (a late event from a fenced-out owner is ignored)
        if kind == "created":
            self.definition = str(data.get("definition", ""))
            self.input = data.get("input")
            self.owner = str(data.get("owner", ""))
            self.labels = dict(data.get("labels") or {})
            self.created_at = at
            self.state = "SUBMITTED"
        elif kind == "started":
            self.runs.append({**dict(data), "at": at})
            self.state = "WORKING"
        elif kind == "step_started":
            step = str(data["step"])
            info = self.steps.get(step) or StepInfo(step, str(data.get("capability", "")))
            info.key = str(data.get("key", info.key))
            info.idempotent = bool(data.get("idempotent", info.idempotent))
            info.attempts = int(data.get("attempt", info.attempts + 1))
            info.status = "WORKING"
            info.started_at = info.started_at or at
            info.error = None
            self.steps[step] = info
        elif kind == "step_completed":
            info = self.steps.setdefault(str(data["step"]), StepInfo(str(data["step"]), ""))
            info.result = dict(data.get("result") or {})
            info.capability = info.capability or str(info.result.get("capability", ""))
            info.status = "COMPLETED" if info.result.get("state", "COMPLETED") != "INPUT_REQUIRED" else "INPUT_REQUIRED"
            info.ended_at = at
        elif kind == "step_failed":
            info = self.steps.setdefault(str(data["step"]), StepInfo(str(data["step"]), ""))
            info.status = "FAILED"
            info.error = dict(data.get("error") or {})
            info.ended_at = at
        elif kind == "memo":
            self.memos[str(data["key"])] = data.get("value")
        elif kind == "note":
            self.notes.append({"key": data.get("key"), "data": data.get("data"), "at": at})
        elif kind == "input_required":
            self.escalations[str(data["step"])] = {"escalation_id": data.get("escalation_id"),
                                                   "reason": data.get("reason", "")}
            self.state = "INPUT_REQUIRED"
        elif kind == "input_received":
            esc = self.escalations.setdefault(str(data["step"]), {})
            esc["resolution"] = data.get("escalation")
            self.state = "WORKING"
        elif kind == "cancel_requested":
            self.cancel_requested = {**dict(data), "at": at}
        elif kind == "completed":
            self.output, self.state = data.get("output"), "COMPLETED"
        elif kind == "rejected":
            self.output, self.reason, self.state = data.get("output"), str(data.get("reason", "")), "REJECTED"
        elif kind == "failed":
            self.error, self.state = dict(data.get("error") or {}), "FAILED"
            self.reason = str(self.error.get("message", ""))
        elif kind == "canceled":
            self.reason, self.state = str(data.get("reason", "")), "CANCELED"
        else:
            log.warning("workflow %s: ignoring unknown event type %r", self.id, kind)

    @classmethod
    def replay(cls, workflow_id: str, events: Sequence[Mapping[str, Any]]) -> WorkflowState:
        state = cls(workflow_id)
        for event in events:
            state.apply(event)
        return state

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id, "definition": self.definition, "state": self.state, "owner": self.owner,
            "created_at": self.created_at, "updated_at": self.updated_at, "steps": len(self.steps),
            "labels": self.labels, "tokens": self.tokens,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "input": self.input, "output": self.output, "reason": self.reason, "error": self.error,
            "step_list": [s.to_json() for s in self.steps.values()],
            "notes": self.notes, "escalations": self.escalations, "runs": self.runs,
            "cancel_requested": self.cancel_requested, "events": self.seq,
        }


# --- the event store ------------------------------------------------------------------------------------------------
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


def _encode(event: Mapping[str, Any]) -> bytes:
    data = json.dumps(event, separators=(",", ":"), sort_keys=True, default=str).encode()
    if len(data) > MAX_EVENT_BYTES:
        raise InvalidInputError(f"a workflow event is {len(data)} bytes; the limit is {MAX_EVENT_BYTES} "
                                "(keep large payloads out of step inputs and outputs: store them and pass ids)")
    return data


class WorkflowStore:
    """Events in etcd: append (compare-and-create on the sequence key, fenced on the owner value), read, list."""

    def __init__(self, etcd: Any) -> None:
        self.etcd = etcd

    async def events(self, workflow_id: str, after: int = 0) -> list[dict[str, Any]]:
        kvs = await self.etcd.get_prefix(events_prefix(workflow_id).encode(), sort_order="ascend")
        out = []
        for kv in kvs:
            try:
                event = json.loads(kv.value)
            except (UnicodeDecodeError, json.JSONDecodeError):
                log.warning("skipping unparsable workflow event %s", kv.key.decode(errors="replace"))
                continue
            if int(event.get("seq", 0)) > after:
                out.append(event)
        out.sort(key=lambda e: int(e.get("seq", 0)))
        return out

    async def load(self, workflow_id: str) -> WorkflowState:
        validate_workflow_id(workflow_id)
        events = await self.events(workflow_id)
        if not events:
            raise NotFoundError(f"no workflow {workflow_id!r}", metadata={"workflow_id": workflow_id})
        return WorkflowState.replay(workflow_id, events)

    async def append(self, state: WorkflowState, kind: str, data: Mapping[str, Any], *,
                     fence: bytes | None = None) -> dict[str, Any]:
        """Append one event after state.seq and fold it into state; on a sequence conflict, catch up and retry."""
        for _ in range(50):
            seq = state.seq + 1
            event = {"seq": seq, "type": kind, "at": time.time(), "data": dict(data)}
            raw = _encode(event)
            # The read model is written in the same transaction, so `list` never shows what the events do not.
            projected = copy.deepcopy(state)
            projected.apply(event)
            index = json.dumps(projected.summary(), separators=(",", ":"), default=str).encode()
            tx = self.etcd.transactions
            key = _event_key(state.id, seq)
            compare = [tx.version(key) == 0]
            if fence is not None:
                compare.append(tx.value(owner_key(state.id)) == fence)
            ok, _ = await self.etcd.transaction(
                compare=compare, success=[tx.put(key, raw), tx.put(f"{INDEX}{state.id}".encode(), index)], failure=[]
            )
            if ok:
                state.apply(event)
                return event
            if fence is not None:
                owner = await self.etcd.get(owner_key(state.id))
                if owner is None or owner.value != fence:
                    raise LockLostError(f"workflow {state.id}: another process owns it now")
            for missed in await self.events(state.id, after=state.seq):
                state.apply(missed)
        raise FailedPreconditionError(f"workflow {state.id}: could not append an event (too much contention)")

    async def list(self) -> list[dict[str, Any]]:
        out = []
        for kv in await self.etcd.get_prefix(INDEX.encode()):
            wid = kv.key.decode()[len(INDEX):]
            try:
                summary = json.loads(kv.value) if kv.value else None
            except (UnicodeDecodeError, json.JSONDecodeError):
                summary = None
            if not summary:
                with contextlib.suppress(NotFoundError):
                    summary = (await self.load(wid)).summary()
            if summary:
                out.append(summary)
        out.sort(key=lambda s: (-float(s.get("created_at", 0.0)), s.get("id", "")))
        return out

    async def owner(self, workflow_id: str) -> dict[str, Any] | None:
        kv = await self.etcd.get(owner_key(workflow_id))
        if kv is None:
            return None
        try:
            value = json.loads(kv.value)
            return value if isinstance(value, dict) else None
        except (UnicodeDecodeError, json.JSONDecodeError):
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
            ok, _ = await self.etcd.transaction(compare=[tx.version(key) == 0],
                                                success=[tx.put(key, value, lease=lease)], failure=[])
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
        interval = max(ttl_s / 3, 0.3)
        failures = 0
        while True:
            await asyncio.sleep(interval)
            try:
                reply = await asyncio.wait_for(lock.lease.refresh(), interval)
                if reply is None or int(getattr(reply, "TTL", 0)) <= 0:
                    lock.lost.set()
                    return
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - etcd trouble: the lease may still be alive; retry until TTL
                failures += 1
                if failures * interval >= ttl_s:
                    log.error("workflow %s: lost the owner lease (%s)", lock.workflow_id, exc)
                    lock.lost.set()
                    return

    async def release(self, lock: OwnerLock) -> None:
        if lock._keepalive is not None:
            lock._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await lock._keepalive
        with contextlib.suppress(Exception):
            await lock.lease.revoke()

    async def request_cancel(self, workflow_id: str, *, by: str, reason: str = "") -> WorkflowState:
        """Append cancel_requested; if no live owner drives the run, record canceled as well."""
        state = await self.load(workflow_id)
        if state.terminal:
            return state
        if state.cancel_requested is None:
            await self.append(state, "cancel_requested", {"by": by, "reason": reason})
        if await self.owner(workflow_id) is None:
            # Nobody drives it: take the owner key briefly so no resumer starts while we finish it.
            lock = await self.acquire(workflow_id, by, ttl_s=5, wait_s=0.0)
            try:
                state = await self.load(workflow_id)
                if not state.terminal:
                    await self.append(state, "canceled", {"by": by, "reason": reason or "cancelled"},
                                      fence=lock.value)
            finally:
                await self.release(lock)
        return await self.load(workflow_id)


# --- definitions -----------------------------------------------------------------------------------------------------
def definition_ref(definition: Any) -> str:
    """The import reference recorded for a definition ('' when it has none: resumable only in-process)."""
    if isinstance(definition, str):
        return definition
    ref = getattr(definition, "ref", "")
    if isinstance(ref, str) and ref:
        return ref
    module, qualname = getattr(definition, "__module__", ""), getattr(definition, "__qualname__", "")
    if inspect.isfunction(definition) and module and qualname and "<locals>" not in qualname:
        return f"{module}:{qualname}"
    return ""


def resolve_definition(ref: str) -> Any:
    """Import 'package.module:attr' (a pattern object or an async function (run, input))."""
    module, sep, attr = ref.partition(":")
    if not sep or not module or not attr:
        raise InvalidInputError(f"workflow definition {ref!r} must be 'package.module:attribute'")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as exc:
        raise FailedPreconditionError(f"cannot import {module!r} for workflow definition {ref!r}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise FailedPreconditionError(f"workflow definition {ref!r}: {module} has no {attr!r}")
        obj = getattr(obj, part)
    return obj


def _body(definition: Any) -> Body:
    if hasattr(definition, "run") and callable(definition.run):
        return definition.run  # type: ignore[no-any-return]
    if callable(definition):
        return definition  # type: ignore[no-any-return]
    raise InvalidInputError(f"a workflow definition is a pattern or an async function, not {type(definition).__name__}")


def escalation_id_for(workflow_id: str, step_id: str) -> str:
    """Deterministic, so a resumed run finds the escalation it created instead of asking twice."""
    return "esc-" + hashlib.sha256(f"{workflow_id}/{step_id}".encode()).hexdigest()[:24]


# --- the run: a durable Runner -------------------------------------------------------------------------------------
class WorkflowRun:
    """The Runner a workflow's body runs on: every step, memo, note and escalation is an event."""

    def __init__(self, engine: WorkflowEngine, state: WorkflowState, lock: OwnerLock) -> None:
        self.engine = engine
        self.state = state
        self.workflow_id = state.id
        self._lock = lock
        self._append_lock = asyncio.Lock()

    async def _append(self, kind: str, data: Mapping[str, Any]) -> None:
        async with self._append_lock:
            await self.engine.store.append(self.state, kind, data, fence=self._lock.value)

    def _idempotent(self, capability: str) -> bool:
        for info in self.engine.mesh.capability_infos():
            if info.capability.name == capability:
                return bool(info.capability.idempotent)
        return False

    async def step(self, step_id: str, capability: str, payload: Any, *, timeout: float | None = None,
                   instance: mesh_pb2.AgentInstance | None = None) -> StepResult:
        rec = self.state.steps.get(step_id)
        if rec is not None and rec.status in ("COMPLETED", "INPUT_REQUIRED") and rec.result is not None:
            return StepResult.from_json(rec.result, replayed=True)
        if rec is not None and rec.status == "FAILED" and rec.error is not None:
            raise error_from_json(rec.error)
        key = rec.key if rec is not None and rec.key else f"{self.workflow_id}/{step_id}"
        idempotent = self._idempotent(capability)
        await self._append("step_started", {
            "step": step_id, "capability": capability, "key": key, "idempotent": idempotent,
            "attempt": (rec.attempts if rec else 0) + 1, "resent": rec is not None,
        })
        context = agent_pb2.CallContext(workflow_id=self.workflow_id, conversation_id=self.engine.conversation_id)
        started = time.perf_counter()
        mesh = self.engine.mesh
        try:
            if instance is not None:
                res = await mesh.call_on(instance, capability, payload, timeout=timeout, context=context,
                                         idempotency_key=key)
            else:
                res = await mesh.call_detailed(capability, payload, timeout=timeout, context=context,
                                               idempotency_key=key)
        except HivemeshError as err:
            await self._append("step_failed", {"step": step_id, "error": error_to_json(err)})
            raise
        result = StepResult.from_call(step_id, capability, res, started)
        await self._append("step_completed", {"step": step_id, "result": result.to_json()})
        self.engine._emit(self.workflow_id, "step", result.to_json())
        return result

    async def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        if key in self.state.memos:
            return self.state.memos[key]
        value = await maybe_await(compute())
        await self._append("memo", {"key": key, "value": value})
        return value

    async def note(self, key: str, data: Mapping[str, Any]) -> None:
        if any(n.get("key") == key for n in self.state.notes):
            return
        await self._append("note", {"key": key, "data": dict(data)})
        self.engine._emit(self.workflow_id, "note", {"key": key, **dict(data)})

    async def escalate(self, step_id: str, reason: str, context: Mapping[str, Any], *,
                       deadline_s: float | None = None, on_deadline: OnDeadline = "reject",
                       default_answer: Any = None, labels: Mapping[str, str] | None = None) -> EscalationInfo:
        rec = self.state.escalations.get(step_id)
        if rec is not None and rec.get("resolution"):
            return _info_from_json(rec["resolution"])
        client = self.engine.escalations
        escalation_id = str(rec["escalation_id"]) if rec else escalation_id_for(self.workflow_id, step_id)
        if rec is None:
            info = await client.create(reason, context, escalation_id=escalation_id, workflow_id=self.workflow_id,
                                       step_id=step_id, deadline_s=deadline_s, on_deadline=on_deadline,
                                       default_answer=default_answer, labels=labels)
            await self._append("input_required", {"step": step_id, "escalation_id": info.id, "reason": reason})
            self.engine._emit(self.workflow_id, "input_required", {"step": step_id, "escalation_id": info.id,
                                                                   "reason": reason})
        info = await client.wait(escalation_id)
        while info.pending:
            info = await client.wait(escalation_id)
        await self._append("input_received", {"step": step_id, "escalation": info.to_json()})
        self.engine._emit(self.workflow_id, "input_received", {"step": step_id, "status": info.status})
        return info

    def instances(self, capability: str) -> tuple[mesh_pb2.AgentInstance, ...]:
        return tuple(self.engine.mesh.instances(capability))

    def capability_infos(self) -> list[CapabilityInfo]:
        return list(self.engine.mesh.capability_infos())


def _info_from_json(d: Mapping[str, Any]) -> EscalationInfo:
    return EscalationInfo(
        id=str(d.get("id", "")), reason=str(d.get("reason", "")), context=dict(d.get("context") or {}),
        requested_by=str(d.get("requested_by", "")), workflow_id=str(d.get("workflow_id", "")),
        step_id=str(d.get("step_id", "")), created_at=float(d.get("created_at") or 0.0), deadline=d.get("deadline"),
        on_deadline="default" if d.get("on_deadline") == "default" else "reject",
        default_answer=d.get("default_answer"), status=str(d.get("status", "")), note=str(d.get("note", "")),
        answer=d.get("answer"), resolved_by=str(d.get("resolved_by", "")), resolved_at=d.get("resolved_at"),
        labels=dict(d.get("labels") or {}),
    )


@dataclass
class WorkflowHandle:
    """A run this process drives: `await handle.result()` for its final state."""

    id: str
    task: asyncio.Task[WorkflowState]
    engine: WorkflowEngine

    async def result(self, timeout: float | None = None) -> WorkflowState:
        return await asyncio.wait_for(asyncio.shield(self.task), timeout)

    async def cancel(self, reason: str = "") -> WorkflowState:
        return await self.engine.cancel(self.id, reason=reason)


class WorkflowEngine:
    """Starts, drives, resumes and cancels durable runs for one orchestrator (a MeshClient identity).

    Args:
        mesh: a started MeshClient; steps are called with its identity.
        owner: recorded as the run's owner (default: the mesh identity's SPIFFE id); `resume_all` resumes the
            unfinished runs whose owner is this.
        lock_ttl_s: lease TTL of run ownership (a killed owner's runs are resumable this long after it died).
        escalations: the Escalations client (default: over the mesh identity's control-plane connection).
        on_event: (workflow id, kind, data) for progress displays.
    """

    def __init__(
        self,
        mesh: MeshClient,
        *,
        owner: str | None = None,
        lock_ttl_s: int = 5,
        escalations: EscalationClient | None = None,
        on_event: Callable[[str, str, Mapping[str, Any]], None] | None = None,
        conversation_id: str = "",
    ) -> None:
        if lock_ttl_s < 2:
            raise ValueError("lock_ttl_s must be >= 2 (etcd leases shorter than that are not reliable)")
        self.mesh = mesh
        self._owner = owner
        self.lock_ttl_s = lock_ttl_s
        self._escalations = escalations
        self._on_event = on_event
        self.conversation_id = conversation_id
        self._etcd: Any = None
        self._store: WorkflowStore | None = None
        self._handles: dict[str, WorkflowHandle] = {}

    @property
    def owner(self) -> str:
        return self._owner or self.mesh.node.workload.spiffe_id

    @property
    def store(self) -> WorkflowStore:
        if self._store is None:
            raise RuntimeError("WorkflowEngine.start() has not run")
        return self._store

    @property
    def escalations(self) -> EscalationClient:
        if self._escalations is None:
            self._escalations = EscalationClient(self.mesh.node.controlplane)
        return self._escalations

    def _emit(self, workflow_id: str, kind: str, data: Mapping[str, Any]) -> None:
        if self._on_event is not None:
            try:
                self._on_event(workflow_id, kind, data)
            except Exception:
                log.exception("workflow progress callback failed")

    async def start(self) -> None:
        if self._store is None:
            self._etcd = etcd_client(self.mesh.node.etcd)
            self._store = WorkflowStore(self._etcd)

    async def close(self) -> None:
        for handle in list(self._handles.values()):
            handle.task.cancel()
        await asyncio.gather(*(h.task for h in self._handles.values()), return_exceptions=True)
        self._handles.clear()
        if self._etcd is not None:
            with contextlib.suppress(Exception):
                await self._etcd.close()
            self._etcd, self._store = None, None

    async def __aenter__(self) -> WorkflowEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- starting and resuming ------------------------------------------------------------------------------------
    async def submit(self, definition: Any, input: Any = None, *, workflow_id: str | None = None,
                     labels: Mapping[str, str] | None = None) -> WorkflowHandle:
        """Record a new run (SUBMITTED) and drive it in the background."""
        wid = validate_workflow_id(workflow_id or f"wf-{uuid.uuid4().hex[:16]}")
        body_source = resolve_definition(definition) if isinstance(definition, str) else definition
        _body(body_source)  # fail now on something that cannot run
        state = WorkflowState(wid)
        ok, _ = await self.store.etcd.transaction(
            compare=[self.store.etcd.transactions.version(_event_key(wid, 1)) == 0], success=[], failure=[])
        if not ok:
            raise FailedPreconditionError(f"workflow {wid} exists already", metadata={"workflow_id": wid})
        await self.store.append(state, "created", {
            "definition": definition_ref(definition), "input": input, "owner": self.owner,
            "labels": dict(labels or {}),
        })
        return self._drive(state, body_source)

    async def run(self, definition: Any, input: Any = None, **kwargs: Any) -> WorkflowState:
        """submit() and wait for the final state."""
        return await (await self.submit(definition, input, **kwargs)).result()

    async def resume(self, workflow_id: str, *, definition: Any = None, wait_s: float | None = None) -> WorkflowHandle:
        """Drive an unfinished run again from its events (waiting up to wait_s for its previous owner's lease)."""
        state = await self.store.load(workflow_id)
        if state.terminal:
            raise FailedPreconditionError(f"workflow {workflow_id} is {state.state}; there is nothing to resume")
        source = definition if definition is not None else state.definition
        if not source:
            raise FailedPreconditionError(
                f"workflow {workflow_id} was started from an object with no import reference; resume it in a "
                "process that passes definition=")
        body_source = resolve_definition(source) if isinstance(source, str) else source
        wait = self.lock_ttl_s + 2.0 if wait_s is None else wait_s
        lock = await self.store.acquire(workflow_id, self.owner, ttl_s=self.lock_ttl_s, wait_s=wait)
        return self._drive(state, body_source, lock=lock)

    async def resume_all(self, *, wait_s: float = 0.0) -> list[WorkflowHandle]:
        """Resume every unfinished run this owner started and nobody drives now (automatic resume on restart)."""
        handles = []
        for summary in await self.store.list():
            if summary.get("owner") != self.owner or summary.get("state") in TERMINAL:
                continue
            if summary["id"] in self._handles:
                continue
            try:
                handles.append(await self.resume(summary["id"], wait_s=wait_s))
            except FailedPreconditionError as exc:
                log.info("not resuming %s: %s", summary["id"], exc.message)
        return handles

    async def cancel(self, workflow_id: str, *, reason: str = "", wait_s: float = 10.0) -> WorkflowState:
        """Request cancellation and wait (bounded) for the run to reach CANCELED (or another final state)."""
        state = await self.store.request_cancel(workflow_id, by=self.owner, reason=reason)
        deadline = time.monotonic() + wait_s
        while not state.terminal and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            state = await self.store.load(workflow_id)
        return state

    async def get(self, workflow_id: str) -> WorkflowState:
        return await self.store.load(workflow_id)

    async def list(self) -> list[dict[str, Any]]:
        return await self.store.list()

    # --- driving ------------------------------------------------------------------------------------------------------
    def _drive(self, state: WorkflowState, definition: Any, *, lock: OwnerLock | None = None) -> WorkflowHandle:
        task = asyncio.get_running_loop().create_task(self._drive_run(state, definition, lock))
        handle = WorkflowHandle(state.id, task, self)
        self._handles[state.id] = handle
        task.add_done_callback(lambda _t: self._handles.pop(state.id, None))
        return handle

    async def _drive_run(self, state: WorkflowState, definition: Any, lock: OwnerLock | None) -> WorkflowState:
        store = self.store
        if lock is None:
            lock = await store.acquire(state.id, self.owner, ttl_s=self.lock_ttl_s, wait_s=0.0)
        cancel = asyncio.Event()
        watch: PrefixCache[str] = PrefixCache(
            self.mesh.node.etcd, events_prefix(state.id),
            decode=lambda _k, v: str(json.loads(v).get("type", "")),
            on_change=lambda: cancel.set() if "cancel_requested" in watch.snapshot().values() else None,
        )
        try:
            # Catch up with events written after the caller's copy (a resume reads them all again).
            state = await store.load(state.id)
            if state.terminal:
                return state
            run = WorkflowRun(self, state, lock)
            await watch.start(timeout=10.0)
            if state.cancel_requested is not None:
                cancel.set()
            await run._append("started", {"owner": self.owner, "pid": os.getpid(), "host": socket.gethostname(),
                                          "resume": bool(state.runs)})
            self._emit(state.id, "started", {"resume": len(state.runs) > 1})
            body = asyncio.ensure_future(_body(definition)(run, state.input))
            waiters = {body, asyncio.ensure_future(cancel.wait()), asyncio.ensure_future(lock.lost.wait())}
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    if w is not body:
                        w.cancel()
            if not body.done():
                body.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await body
                if lock.lost.is_set():
                    raise LockLostError(f"workflow {state.id}: lost ownership; another process may resume it")
                await self._withdraw_escalations(run)
                for missed in await store.events(state.id, after=run.state.seq):  # the cancel request itself
                    run.state.apply(missed)
                req = run.state.cancel_requested or {}
                await run._append("canceled", {"by": req.get("by", ""), "reason": req.get("reason") or "cancelled"})
            else:
                await self._finish(run, body)
            self._emit(state.id, run.state.state.lower(), {"state": run.state.state})
            return run.state
        finally:
            await watch.stop()
            await store.release(lock)

    async def _finish(self, run: WorkflowRun, body: asyncio.Future[Any]) -> None:
        exc = body.exception()
        if exc is None:
            result = body.result()
            if isinstance(result, PatternResult):
                data = result.to_json()
                if result.state == "REJECTED":
                    await run._append("rejected", {"output": data, "reason": result.reason})
                elif result.state == "FAILED":
                    await run._append("failed", {"error": {"code": "FAILED_PRECONDITION", "reason": "PATTERN_FAILED",
                                                           "message": result.reason}, "output": data})
                else:
                    await run._append("completed", {"output": data})
            else:
                await run._append("completed", {"output": result})
        elif isinstance(exc, TaskRejectedError):
            await run._append("rejected", {"reason": exc.message, "output": None})
        elif isinstance(exc, LockLostError):
            raise exc
        elif isinstance(exc, CancelledError | asyncio.CancelledError):
            await run._append("canceled", {"reason": str(exc) or "cancelled"})
        else:
            if not isinstance(exc, HivemeshError):
                log.error("workflow %s failed", run.workflow_id, exc_info=exc)
            await run._append("failed", {"error": error_to_json(exc)})

    async def _withdraw_escalations(self, run: WorkflowRun) -> None:
        for rec in run.state.escalations.values():
            if rec.get("resolution") or not rec.get("escalation_id"):
                continue
            with contextlib.suppress(HivemeshError):
                await self.escalations.cancel(str(rec["escalation_id"]), note="the workflow run was cancelled")

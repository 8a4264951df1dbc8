"""The durable Runner a workflow's body runs on: steps, memos, notes and escalations recorded as events, and
answered from them on replay."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from hivemesh.mesh import tracing
from hivemesh.mesh.errors import HivemeshError, InvalidInputError
from hivemesh.sdk.call_options import CallOptions
from hivemesh.sdk.escalation import EscalationInfo, OnDeadline
from hivemesh.sdk.patterns.base import StepResult, error_from_json, error_to_json, maybe_await
from hivemesh.sdk.workflow.state import WorkflowState
from hivemesh.sdk.workflow.store import OwnerLock
from hivemesh.v1 import agent_pb2, mesh_pb2

if TYPE_CHECKING:
    from hivemesh.mesh.registry import CapabilityInfo
    from hivemesh.sdk.workflow.engine import WorkflowEngine


def escalation_id_for(workflow_id: str, step_id: str) -> str:
    """Deterministic, so a resumed run finds the escalation it created instead of asking twice."""
    return "esc-" + hashlib.sha256(f"{workflow_id}/{step_id}".encode()).hexdigest()[:24]


class JournalError(Exception):
    """The run's journal could not record an event the body asked for (a value too large or not plain JSON, the
    journal full, the run's ownership lost): `error` says why. Not a HivemeshError on purpose: patterns take a
    HivemeshError from a step for the step's own failure and retry it under a new id (a non-idempotent effect
    happened twice) or record the branch failed, yet the effect happened. This passes every pattern, and the
    engine ends the run with `error` (or owns it again, for a lost lease)."""

    def __init__(self, error: HivemeshError) -> None:
        super().__init__(f"{error.code.name} {error.reason}: {error.message}")
        self.error = error


class WorkflowRun:
    """The Runner a workflow's body runs on: every step, memo, note and escalation is an event."""

    def __init__(self, engine: WorkflowEngine, state: WorkflowState, lock: OwnerLock) -> None:
        self.engine = engine
        self.state = state
        self.workflow_id = state.id
        self._lock = lock
        self._append_lock = asyncio.Lock()
        self._asked: dict[str, set[str]] = {"step": set(), "escalation": set()}
        """The step ids (and escalation step ids) this execution of the body has asked for: the second ask for one
        is refused (`_first_ask`), since the journal would answer it with the first one's outcome."""
        self.asking: list[asyncio.Future[EscalationInfo]] = []
        """Escalation creations the body's cancellation cut off before their answer was read (so unrecorded): the
        engine withdraws what they created when the run is cancelled on request; when its owner only stops, they
        stay for the run that resumes it, which asks under the same id (`escalation_id_for`)."""

    def _first_ask(self, kind: str, step_id: str) -> None:
        """Refuse a step (or escalation) id this execution already asked for: answered from the journal, the
        second would silently get the first's outcome (two same-kind patterns in one run, a loop reusing an id)."""
        asked = self._asked[kind]
        if step_id in asked:
            raise InvalidInputError(
                f"{kind} id {step_id!r} was already asked for in this run of workflow {self.workflow_id!r}: the second "
                "ask would be answered with the first one's recorded outcome. Two patterns of the same kind in one "
                "run (or one loop's passes) need a scope each: pattern.run(scoped(run, 'doc-2'), ...) "
                "(hivemesh.sdk.patterns.scoped); a body's own steps need distinct ids",
                field_violations={"step_id": "already used in this run"})
        asked.add(step_id)

    async def append(self, kind: str, data: Mapping[str, Any]) -> None:
        """Record one event of this run, fenced on its owner value (one append at a time: steps run concurrently).
        Its errors are the store's: the engine records its own events here; the body's go through `_record`."""
        async with self._append_lock:
            await self.engine.store.append(self.state, kind, data, fence=self._lock.value)
        metrics = self.engine.mesh.node.metrics
        if metrics is not None:
            metrics.workflow_event(self.state.definition, kind, data)

    async def _record(self, kind: str, data: Mapping[str, Any]) -> None:
        """append() for what the body asked for; its failure is raised as JournalError, never as the step's own."""
        try:
            await self.append(kind, data)
        except HivemeshError as err:
            raise JournalError(err) from err

    def _idempotent(self, capability: str) -> bool:
        for info in self.engine.mesh.capability_infos():
            if info.capability.name == capability:
                return bool(info.capability.idempotent)
        return False

    def recorded(self, step_id: str) -> bool:
        """Whether step answers step_id from the journal (its result, or the failure it raises) without a call."""
        rec = self.state.steps.get(step_id)
        if rec is None:
            return False
        return (rec.status in ("COMPLETED", "INPUT_REQUIRED") and rec.result is not None) or (
            rec.status == "FAILED" and rec.error is not None)

    @property
    def conversation_id(self) -> str:
        """The conversation id calls carry when a step names none: the engine's (none by default)."""
        return self.engine.conversation_id

    async def step(self, step_id: str, capability: str, payload: Any, *, timeout: float | None = None,
                   instance: mesh_pb2.AgentInstance | None = None, agent: str | None = None,
                   conversation_id: str | None = None) -> StepResult:
        """Call capability as step step_id, or answer its recorded outcome. agent pins the call (and its re-send
        after a restart, which the body makes with the same arguments) to that agent's instances with full
        failover (`CallOptions.agent`); instance sends it to that one alone. conversation_id is the call's
        `CallContext.conversation_id` (default: the engine's); like the payload it is the body's to give again on
        a re-send, and no part of the step id or its idempotency key, so runs recorded before it resume as they
        were."""
        self._first_ask("step", step_id)
        rec = self.state.steps.get(step_id)
        if rec is not None and rec.status in ("COMPLETED", "INPUT_REQUIRED") and rec.result is not None:
            return StepResult.from_json(rec.result, replayed=True)
        if rec is not None and rec.status == "FAILED" and rec.error is not None:
            raise error_from_json(rec.error)
        key = rec.key if rec is not None and rec.key else f"{self.workflow_id}/{step_id}"
        context = agent_pb2.CallContext(workflow_id=self.workflow_id,
                                        conversation_id=conversation_id or self.engine.conversation_id)
        options = CallOptions(timeout=timeout, context=context, idempotency_key=key, agent=agent)  # checked first
        idempotent = self._idempotent(capability)
        await self._record("step_started", {
            "step": step_id, "capability": capability, "key": key, "idempotent": idempotent,
            "attempt": (rec.attempts if rec else 0) + 1, "resent": rec is not None,
        })
        started = time.perf_counter()
        mesh = self.engine.mesh
        try:
            with tracing.span(f"step {step_id}", attributes={"hivemesh.workflow.step": step_id,
                                                             "hivemesh.capability": capability}):
                if instance is not None:
                    res = await mesh.call_on(instance, capability, payload, options=options)
                else:
                    res = await mesh.call_detailed(capability, payload, options=options)
        except HivemeshError as err:
            await self._record("step_failed", {"step": step_id, "error": error_to_json(err)})
            raise
        result = StepResult.from_call(step_id, capability, res, started)
        await self._record("step_completed", {"step": step_id, "result": result.to_json()})
        self.engine.emit(self.workflow_id, "step", result.to_json())
        return result

    async def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """compute() once per key for the run's life (its value is recorded and answered on replay). The key must
        be a str: the journal stores keys as JSON strings, so another type would never be found again."""
        if not isinstance(key, str):
            raise InvalidInputError(f"a memo key must be a str, not {type(key).__name__}",
                                    field_violations={"key": "must be a string"})
        if key in self.state.memos:
            return self.state.memos[key]
        value = await maybe_await(compute())
        await self._record("memo", {"key": key, "value": value})
        return value

    async def note(self, key: str, data: Mapping[str, Any]) -> None:
        if any(n.get("key") == key for n in self.state.notes):
            return
        await self._record("note", {"key": key, "data": dict(data)})
        self.engine.emit(self.workflow_id, "note", {"key": key, **dict(data)})

    async def escalate(self, step_id: str, reason: str, context: Mapping[str, Any], *,
                       deadline_s: float | None = None, on_deadline: OnDeadline = "reject",
                       default_answer: Any = None, labels: Mapping[str, str] | None = None,
                       answerer: str = "") -> EscalationInfo:
        self._first_ask("escalation", step_id)
        rec = self.state.escalations.get(step_id)
        if rec is not None and rec.get("resolution"):
            return info_from_json(rec["resolution"])
        client = self.engine.escalations
        escalation_id = str(rec["escalation_id"]) if rec else escalation_id_for(self.workflow_id, step_id)
        if rec is None:
            create = asyncio.ensure_future(client.create(
                reason, context, escalation_id=escalation_id, workflow_id=self.workflow_id, step_id=step_id,
                deadline_s=deadline_s, on_deadline=on_deadline, default_answer=default_answer, labels=labels,
                answerer=answerer))
            try:
                info = await asyncio.shield(create)  # cancelled, it still ends: only its answer gives the id
            except asyncio.CancelledError:
                create.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no asyncio warning
                self.asking.append(create)
                raise
            escalation_id = info.id  # the id it is stored under: scoped to this requester if another held it
            try:
                await self._record("input_required", {"step": step_id, "escalation_id": info.id, "reason": reason})
            except JournalError:
                # Unrecorded, nobody would withdraw it when the run ends: a person would be asked for nothing.
                with contextlib.suppress(HivemeshError):
                    await client.cancel(info.id, note="the workflow run could not record it")
                raise
            self.engine.emit(self.workflow_id, "input_required", {"step": step_id, "escalation_id": info.id,
                                                                   "reason": reason})
        info = await client.wait(escalation_id)
        while info.pending:
            info = await client.wait(escalation_id)
        await self._record("input_received", {"step": step_id, "escalation": info.to_json()})
        self.engine.emit(self.workflow_id, "input_received", {"step": step_id, "status": info.status})
        return info

    def instances(self, capability: str) -> tuple[mesh_pb2.AgentInstance, ...]:
        return tuple(self.engine.mesh.instances(capability))

    def capability_infos(self) -> list[CapabilityInfo]:
        return list(self.engine.mesh.capability_infos())


def info_from_json(d: Mapping[str, Any]) -> EscalationInfo:
    return EscalationInfo(
        id=str(d.get("id", "")), reason=str(d.get("reason", "")), context=dict(d.get("context") or {}),
        requested_by=str(d.get("requested_by", "")), workflow_id=str(d.get("workflow_id", "")),
        step_id=str(d.get("step_id", "")), created_at=float(d.get("created_at") or 0.0), deadline=d.get("deadline"),
        on_deadline="default" if d.get("on_deadline") == "default" else "reject",
        default_answer=d.get("default_answer"), status=str(d.get("status", "")), note=str(d.get("note", "")),
        answer=d.get("answer"), resolved_by=str(d.get("resolved_by", "")), resolved_at=d.get("resolved_at"),
        labels=dict(d.get("labels") or {}), answerer=str(d.get("answerer", "")),
        on_behalf_of=str(d.get("on_behalf_of", "")), on_behalf_of_claimed=d.get("on_behalf_of_claimed") is True,
    )

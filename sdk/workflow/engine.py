"""The orchestrator side of durable runs: submit, drive, resume and cancel them for one MeshClient identity."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hivemesh.mesh import json_depth, tracing
from hivemesh.mesh.errors import (
    CancelledError,
    FailedPreconditionError,
    HivemeshError,
    InvalidInputError,
    PermissionDeniedError,
    TaskRejectedError,
)
from hivemesh.mesh.etcd import client as etcd_client
from hivemesh.mesh.pki import NAME_RE
from hivemesh.mesh.run_ids import LOCAL_RULE, owner_segment, parse_run_id
from hivemesh.mesh.watch import PrefixCache
from hivemesh.sdk.escalation import EscalationClient
from hivemesh.sdk.patterns.base import TERMINAL, PatternResult, error_to_json
from hivemesh.sdk.workflow.definition import body_of, definition_ref, resolve_definition
from hivemesh.sdk.workflow.reown import etcd_unreachable, reown
from hivemesh.sdk.workflow.run import JournalError, WorkflowRun
from hivemesh.sdk.workflow.state import WorkflowState
from hivemesh.sdk.workflow.store import (
    MAX_JOURNAL_BYTES,
    LockLostError,
    OwnerLock,
    WorkflowStore,
    check_wait,
    events_prefix,
    withdraw_asked,
    withdraw_escalations,
)

if TYPE_CHECKING:
    from hivemesh.sdk.client import MeshClient

log = logging.getLogger(__name__)

MAX_LOCK_TTL_S = 3600
"""The longest run-ownership lease: a dead owner's runs wait this long before another process may resume them."""


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Mark a finished task's outcome as seen (a body stopped with its run: whatever it ended with is moot)."""
    if not task.cancelled():
        task.exception()


def _start_failure(state: WorkflowState, exc: Exception) -> HivemeshError:
    """Why a run's body could not start, as its recorded failure (its definition named, with the cause)."""
    if isinstance(exc, HivemeshError):
        return exc
    log.error("workflow %s: its body did not start", state.id, exc_info=exc)
    return InvalidInputError(f"workflow definition {state.definition or '(an object)'!r} could not start: "
                             f"{type(exc).__name__}: {exc}"[:2000], field_violations={"definition": "did not start"})


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

    Runs belong to the mesh identity: their ids are `<kind>-<name>/<local>` (`run_id_for`), and etcd lets only
    that identity (and operators) read or write them, so a restarted orchestrator of the same identity resumes
    its runs and another identity cannot. Methods taking a run id accept the local part for this identity's own.

    Args:
        mesh: a started MeshClient; steps are called with its identity.
        owner: recorded as the run's owner (default: the mesh identity's SPIFFE id); `resume_all` resumes this
            identity's unfinished runs whose recorded owner is this.
        lock_ttl_s: lease TTL of run ownership in whole seconds, 2..MAX_LOCK_TTL_S (a killed owner's runs are
            resumable this long after it died).
        escalations: the Escalations client (default: over the mesh identity's control-plane connection).
        on_event: (workflow id, kind, data) for progress displays.
        max_journal_bytes: the bound on each run's journal (`store.MAX_JOURNAL_BYTES`).
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
        max_journal_bytes: int = MAX_JOURNAL_BYTES,
    ) -> None:
        # An int: etcd leases are whole seconds, and NaN or 2.5 made every owner-key attempt fail (runs stuck).
        if isinstance(lock_ttl_s, bool) or not isinstance(lock_ttl_s, int) or not 2 <= lock_ttl_s <= MAX_LOCK_TTL_S:
            raise ValueError(f"lock_ttl_s must be an int of seconds in 2..{MAX_LOCK_TTL_S} (etcd leases are whole "
                             f"seconds; shorter than 2 they are not reliable), not {lock_ttl_s!r}")
        if isinstance(max_journal_bytes, bool) or not isinstance(max_journal_bytes, int) or max_journal_bytes < 1:
            raise ValueError(f"max_journal_bytes must be a positive int, not {max_journal_bytes!r}")
        self.max_journal_bytes = max_journal_bytes
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
    def owner_segment(self) -> str:
        """`<kind>-<name>` of the mesh identity: the prefix of every run id (and key) this engine creates."""
        me = self.mesh.node.workload.identity
        return owner_segment(me.kind, me.name)

    def run_id_for(self, workflow_id: str) -> str:
        """The full id of a run: a local id (no '/') is this identity's run; a full id is taken as it is."""
        if "/" in workflow_id:
            try:
                return str(parse_run_id(workflow_id))
            except ValueError as exc:
                raise InvalidInputError(str(exc), field_violations={"workflow_id": "not a run id"}) from None
        if not NAME_RE.fullmatch(workflow_id):
            msg = f"must match {LOCAL_RULE} (or be a full run id <kind>-<name>/<local id>)"
            raise InvalidInputError(f"workflow id {workflow_id[:80]!r} {msg}", field_violations={"workflow_id": msg})
        return f"{self.owner_segment}/{workflow_id}"

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

    def emit(self, workflow_id: str, kind: str, data: Mapping[str, Any]) -> None:
        """Tell the progress callback (a failing callback never fails the run)."""
        if self._on_event is not None:
            try:
                self._on_event(workflow_id, kind, data)
            except Exception:
                log.exception("workflow progress callback failed")

    async def start(self) -> None:
        if self._store is None:
            self._etcd = etcd_client(self.mesh.node.etcd)
            self._store = WorkflowStore(self._etcd, max_journal_bytes=self.max_journal_bytes)

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
        """Record a new run (SUBMITTED) and drive it in the background; its id is `<kind>-<name>/<local>` of this
        identity (workflow_id is the local part, or the full id; another owner's id is PERMISSION_DENIED)."""
        wid = self.run_id_for(workflow_id or f"wf-{uuid.uuid4().hex[:16]}")
        if parse_run_id(wid).owner != self.owner_segment:
            raise PermissionDeniedError(f"workflow {wid}: {self.mesh.node.workload.spiffe_id} creates runs only under "
                                        f"its own prefix {self.owner_segment}/", metadata={"workflow_id": wid})
        body_source = resolve_definition(definition) if isinstance(definition, str) else definition
        body_of(body_source)  # fail now on something that cannot run
        state = WorkflowState(wid)
        await self.store.create(state, {
            "definition": definition_ref(definition), "input": input, "owner": self.owner,
            "labels": dict(labels or {}),
        })
        return self._drive(state, body_source)

    async def run(self, definition: Any, input: Any = None, **kwargs: Any) -> WorkflowState:
        """submit() and wait for the final state."""
        return await (await self.submit(definition, input, **kwargs)).result()

    async def resume(self, workflow_id: str, *, definition: Any = None, wait_s: float | None = None) -> WorkflowHandle:
        """Drive an unfinished run again from its events (waiting up to wait_s for its previous owner's lease).
        Another identity's run is PERMISSION_DENIED (by etcd) unless this identity is an operator."""
        workflow_id = self.run_id_for(workflow_id)
        if wait_s is not None:
            check_wait(wait_s, "wait_s")
        if definition is not None:  # the caller's mistake, refused before anything (a recorded one: _drive_once)
            body_of(resolve_definition(definition) if isinstance(definition, str) else definition)
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
        for summary in await self.store.list(self.owner_segment):
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
        workflow_id = self.run_id_for(workflow_id)
        state = await self.store.request_cancel(workflow_id, by=self.owner, reason=reason,
                                                escalations=self.escalations)
        deadline = time.monotonic() + wait_s
        while not state.terminal and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            state = await self.store.load(workflow_id)
        return state

    async def get(self, workflow_id: str) -> WorkflowState:
        return await self.store.load(self.run_id_for(workflow_id))

    async def list(self) -> list[dict[str, Any]]:
        """This identity's runs (an operator lists every run with `WorkflowStore.list()`)."""
        return await self.store.list(self.owner_segment)

    # --- driving ------------------------------------------------------------------------------------------------------
    def _drive(self, state: WorkflowState, definition: Any, *, lock: OwnerLock | None = None) -> WorkflowHandle:
        task = asyncio.get_running_loop().create_task(self._drive_run(state, definition, lock))
        handle = WorkflowHandle(state.id, task, self)
        self._handles[state.id] = handle
        task.add_done_callback(lambda t: self._driven(state.id, t))
        return handle

    def _driven(self, workflow_id: str, task: asyncio.Task[WorkflowState]) -> None:
        """A run stopped being driven here. A hand-over to another process is an outcome, not a crash: it is
        logged and marked retrieved, so nobody awaiting the handle does not make it an unretrieved exception."""
        self._handles.pop(workflow_id, None)
        if not task.cancelled() and isinstance(exc := task.exception(), LockLostError):
            log.info("workflow %s: %s", workflow_id, exc.message)

    async def _drive_run(self, state: WorkflowState, definition: Any, lock: OwnerLock | None) -> WorkflowState:
        """Drive the run to a final state; an owner that loses its lease (etcd paused or cut off for longer than
        the TTL) owns the run again and replays it, so an answer that came meanwhile is applied. It stops, with
        LockLostError naming the new owner, only when another process took the run over."""
        if lock is None:
            lock = await self.store.acquire(state.id, self.owner, ttl_s=self.lock_ttl_s, wait_s=0.0)
        losses = 0
        while True:
            try:
                return await self._drive_once(state, definition, lock)
            except Exception as exc:
                if not isinstance(exc, LockLostError) and not etcd_unreachable(exc):
                    raise
                why = exc.message if isinstance(exc, LockLostError) else f"etcd unreachable ({exc})"
                log.warning("workflow %s: %s; owning it again", state.id, why)
                self.emit(state.id, "owner_lost", {"reason": why})
                losses += 1
                if losses > 1:  # a flapping etcd: do not replay the run in a tight loop
                    await asyncio.sleep(min(0.25 * 2 ** min(losses - 2, 5), 5.0))
                lock = await reown(self.store, state.id, self.owner, self.lock_ttl_s, lock.value)

    async def _drive_once(self, state: WorkflowState, definition: Any, lock: OwnerLock) -> WorkflowState:
        store = self.store
        cancel = asyncio.Event()
        span: tuple[tracing.Span, object] | None = None
        watch: PrefixCache[str] = PrefixCache(
            self.mesh.node.etcd, events_prefix(state.id),
            decode=lambda _k, v: str(json_depth.loads(v).get("type", "")),
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
            if tracing.TRACER is not None:  # one trace per run; a resumed run links to the run it continues
                first = state.runs[0] if state.runs else {}
                span = tracing.start(f"workflow {state.id}", tracing.SpanKind.INTERNAL,
                                     {"hivemesh.workflow.id": state.id, "hivemesh.workflow.resumed": bool(state.runs)},
                                     parent=tracing.root(),
                                     links=tracing.link_to(str(first.get("trace_id", "")),
                                                           str(first.get("span_id", ""))))
            ids = tracing.current_ids()
            await run.append("started", {"owner": self.owner, "pid": os.getpid(), "host": socket.gethostname(),
                                          "resume": bool(state.runs),
                                          **({"trace_id": ids[0], "span_id": ids[1]} if ids else {})})
            self.emit(state.id, "started", {"resume": len(state.runs) > 1})
            try:
                body = asyncio.ensure_future(body_of(definition)(run, state.input))
            except Exception as exc:  # noqa: BLE001 - recorded as the run's failure (with the cause), not lost
                # A body that cannot start (a recorded definition that is no longer async, an async function of
                # other arguments) ends the run: left WORKING, nobody would ever drive it.
                await run.append("failed", {"error": error_to_json(_start_failure(state, exc))})
                self.emit(state.id, "failed", {"state": run.state.state})
                return run.state
            waiters = {body, asyncio.ensure_future(cancel.wait()), asyncio.ensure_future(lock.lost.wait())}
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:
                # This run's own task is cancelled (the engine closes, a caller cancels it): its body must not go
                # on alone, calling agents for a run nobody drives; what it ends with is nobody's to report.
                body.cancel()
                body.add_done_callback(_retrieved)
                raise
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
                await withdraw_asked(self.escalations, run.asking)
                await withdraw_escalations(self.escalations, run.state)
                await store.catch_up(run.state)  # the cancel request itself
                req = run.state.cancel_requested or {}
                await run.append("canceled", {"by": req.get("by", ""), "reason": req.get("reason") or "cancelled"})
            else:
                await self._finish(run, body)
            self.emit(state.id, run.state.state.lower(), {"state": run.state.state})
            return run.state
        finally:
            if span is not None:
                tracing.finish(span)
            await watch.stop()
            await store.release(lock)

    async def _finish(self, run: WorkflowRun, body: asyncio.Future[Any]) -> None:
        """Record how the body ended. An ending the journal cannot hold (an output too large or not plain JSON)
        is recorded as `failed` INVALID_ARGUMENT instead, so the run ends rather than staying WORKING."""
        try:
            await self._record_end(run, body)
        except InvalidInputError as exc:
            if run.state.terminal:
                raise
            await run.append("failed", {"error": error_to_json(exc)})

    async def _record_end(self, run: WorkflowRun, body: asyncio.Future[Any]) -> None:
        exc = body.exception()
        if isinstance(exc, JournalError):  # the journal refused an event the body asked for: why is the run's end
            if isinstance(exc.error, LockLostError):
                raise exc.error  # not the run's failure: it is owned again and replayed (_drive_run)
            await run.append("failed", {"error": error_to_json(exc.error)})
            return
        if exc is None:
            result = body.result()
            if isinstance(result, PatternResult):
                data = result.to_json()
                if result.state == "REJECTED":
                    await run.append("rejected", {"output": data, "reason": result.reason})
                elif result.state == "FAILED":
                    await run.append("failed", {"error": {"code": "FAILED_PRECONDITION", "reason": "PATTERN_FAILED",
                                                           "message": result.reason}, "output": data})
                else:
                    await run.append("completed", {"output": data})
            else:
                await run.append("completed", {"output": result})
        elif isinstance(exc, TaskRejectedError):
            await run.append("rejected", {"reason": exc.message, "output": None})
        elif isinstance(exc, LockLostError) or etcd_unreachable(exc):
            raise exc  # not the run's failure: it is owned again and replayed (_drive_run)
        elif isinstance(exc, CancelledError | asyncio.CancelledError):
            await run.append("canceled", {"reason": str(exc) or "cancelled"})
        else:
            if not isinstance(exc, HivemeshError):
                log.error("workflow %s failed", run.workflow_id, exc_info=exc)
            await run.append("failed", {"error": error_to_json(exc)})

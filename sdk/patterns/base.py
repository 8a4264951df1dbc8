"""What every orchestration pattern is built on: a `Runner` that runs steps, and the results patterns return.

A pattern never calls the mesh directly. It asks its runner to run a *step* (one capability call with a
stable step id), to *memo* a value (a decision that must come out the same on replay), to *escalate* to a
person, or to *note* visible state. Two runners exist:

- `DirectRunner(caller)`: runs steps straight away over a `MeshClient` or, inside an agent, its `Context`;
- `hivemesh.sdk.workflow.WorkflowRun`: records every step as an event in etcd, so a run killed mid-way is
  resumed from its last completed step, non-idempotent steps are never run twice, and the run can be
  listed, shown and cancelled from the CLI.

So every pattern is durable when it runs under a workflow, and a plain one-liner otherwise:

    result = await FanOut(["search-web", "search-papers"]).run(mesh, {"query": "etcd"})
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, runtime_checkable

from hivemesh.mesh.errors import HivemeshError, InvalidInputError, TaskRejectedError, from_status_parts
from hivemesh.mesh.keyspace import TERMINAL_RUN_STATES
from hivemesh.sdk.call_options import CallOptions
from hivemesh.sdk.escalation import WITHDRAW_S, EscalationClient, EscalationInfo, OnDeadline
from hivemesh.v1 import agent_pb2, mesh_pb2

_T = TypeVar("_T")

if TYPE_CHECKING:
    from hivemesh.mesh.registry import CapabilityInfo
    from hivemesh.sdk.client import CallResult

StateName = Literal["SUBMITTED", "WORKING", "INPUT_REQUIRED", "COMPLETED", "FAILED", "CANCELED", "REJECTED"]
TERMINAL: frozenset[str] = TERMINAL_RUN_STATES


def state_name(value: int) -> str:
    """'WORKING' for agent_pb2.TASK_STATE_WORKING (A2A's names without the enum prefix)."""
    return agent_pb2.TaskState.Name(value).removeprefix("TASK_STATE_")  # type: ignore[arg-type]


def error_to_json(err: BaseException) -> dict[str, Any]:
    if isinstance(err, HivemeshError):
        out: dict[str, Any] = {"code": err.code.name, "reason": err.reason, "message": err.message}
        if err.field_violations:
            out["field_violations"] = dict(err.field_violations)
        return out
    return {"code": "INTERNAL", "reason": "AGENT_ERROR", "message": f"{type(err).__name__}: {err}"}


MAX_WHY_CHARS = 300
"""The most of a failure's message an all-failed error repeats (the whole is in its details)."""


def why_failed(error: BaseException | Mapping[str, Any]) -> str:
    """`CODE/REASON: message` of a failure (an error, or its `error_to_json` record), the message cut to
    MAX_WHY_CHARS: what a pattern's all-failed error says of why. The cause (a grant an operator must give with
    `hivemesh allow ...`, an input the capability refuses) was only in the details, behind a list of names."""
    data = error_to_json(error) if isinstance(error, BaseException) else error
    message = str(data.get("message", ""))
    if len(message) > MAX_WHY_CHARS:
        message = message[:MAX_WHY_CHARS - 1] + "…"
    return f"{data.get('code', 'UNKNOWN')}/{data.get('reason', '')}: {message}"


def error_from_json(data: Mapping[str, Any]) -> HivemeshError:
    """The typed error recorded by `error_to_json` (same class, code and reason)."""
    import grpc

    code = getattr(grpc.StatusCode, str(data.get("code", "INTERNAL")), grpc.StatusCode.INTERNAL)
    from google.rpc import error_details_pb2, status_pb2

    from hivemesh.mesh.errors import DOMAIN

    info = error_details_pb2.ErrorInfo(reason=str(data.get("reason", "")), domain=DOMAIN)
    status = status_pb2.Status(code=code.value[0], message=str(data.get("message", "")))
    status.details.add().Pack(info)
    if data.get("field_violations"):
        bad = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=k, description=v)
            for k, v in dict(data["field_violations"]).items()
        ])
        status.details.add().Pack(bad)
    trailing = (("grpc-status-details-bin", status.SerializeToString()),)
    return from_status_parts(code, str(data.get("message", "")), trailing)


@dataclass(frozen=True)
class StepResult:
    """One step's outcome: the capability's output plus who served it (recorded in workflow events)."""

    step: str
    capability: str
    output: Any
    state: str = "COMPLETED"
    agent: str = ""
    instance: str = ""
    packaging: str = ""
    hops: tuple[str, ...] = ()
    elapsed_ms: float = 0.0
    usage: dict[str, Any] | None = None
    replayed: bool = False
    """True when a workflow replayed this result from its events instead of calling again."""

    @property
    def tokens(self) -> int:
        return int((self.usage or {}).get("input_tokens", 0)) + int((self.usage or {}).get("output_tokens", 0))

    @classmethod
    def from_call(cls, step: str, capability: str, result: CallResult, started: float) -> StepResult:
        inst = result.instance
        usage = None
        if result.usage is not None:
            usage = {"input_tokens": int(result.usage.input_tokens), "output_tokens": int(result.usage.output_tokens),
                     "model": result.usage.model}
        return cls(
            step=step,
            capability=capability,
            output=result.output,
            state=state_name(result.state) if result.state else "COMPLETED",
            agent=inst.card.name,
            instance=inst.instance_id,
            packaging=inst.packaging,
            hops=tuple(f"{h.kind}:{h.identity.rsplit('/', 1)[-1]}" for h in result.hops),
            elapsed_ms=round((time.perf_counter() - started) * 1000, 2),
            usage=usage,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step, "capability": self.capability, "output": self.output, "state": self.state,
            "agent": self.agent, "instance": self.instance, "packaging": self.packaging, "hops": list(self.hops),
            "elapsed_ms": self.elapsed_ms, "usage": self.usage,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, replayed: bool = False) -> StepResult:
        return cls(
            step=str(data["step"]), capability=str(data["capability"]), output=data.get("output"),
            state=str(data.get("state", "COMPLETED")), agent=str(data.get("agent", "")),
            instance=str(data.get("instance", "")), packaging=str(data.get("packaging", "")),
            hops=tuple(data.get("hops") or ()), elapsed_ms=float(data.get("elapsed_ms", 0.0)),
            usage=data.get("usage"), replayed=replayed,
        )


@dataclass
class PatternResult:
    """What a pattern returns: the output, the A2A state it ended in, and every step it took."""

    output: Any
    state: str = "COMPLETED"
    steps: list[StepResult] = field(default_factory=list)
    reason: str = ""
    """Why the run stopped early (a validation step, a reviewer, a person), when it did."""
    details: dict[str, Any] = field(default_factory=dict)
    """Pattern-specific facts: failed branches, rounds, the route taken, escalations."""

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.steps)

    def to_json(self) -> dict[str, Any]:
        return {
            "output": self.output, "state": self.state, "reason": self.reason, "details": self.details,
            "steps": [s.to_json() for s in self.steps], "tokens": self.tokens,
        }


@runtime_checkable
class Caller(Protocol):
    """Anything that calls capabilities: a started `MeshClient`, or a capability's `Context`."""

    async def call_detailed(
        self, capability: str, payload: Any = None, *, options: CallOptions | None = None
    ) -> CallResult: ...

    async def call_on(
        self, instance: Any, capability: str, payload: Any = None, *, options: CallOptions | None = None
    ) -> CallResult: ...


class Runner(Protocol):
    """What patterns run on (see the module docstring)."""

    workflow_id: str

    async def step(
        self,
        step_id: str,
        capability: str,
        payload: Any,
        *,
        timeout: float | None = None,
        instance: mesh_pb2.AgentInstance | None = None,
        agent: str | None = None,
        conversation_id: str | None = None,
    ) -> StepResult:
        """Call capability as step step_id. agent pins the call to that agent's instances, with failover among
        them (`CallOptions.agent`); instance sends it to that one instance alone. conversation_id, when given,
        is this call's `CallContext.conversation_id` instead of the runner's own (a handoff's conversation); it is
        no part of the step's identity."""
        ...

    async def memo(self, key: str, compute: Callable[[], Any]) -> Any: ...

    def recorded(self, step_id: str) -> bool:
        """Whether step step_id has an outcome on record, which `step` answers without calling anything (a
        resumed run's finished step): it needs no live instance then."""
        ...

    async def escalate(
        self,
        step_id: str,
        reason: str,
        context: Mapping[str, Any],
        *,
        deadline_s: float | None = None,
        on_deadline: OnDeadline = "reject",
        default_answer: Any = None,
        labels: Mapping[str, str] | None = None,
    ) -> EscalationInfo: ...

    async def note(self, key: str, data: Mapping[str, Any]) -> None: ...

    def instances(self, capability: str) -> tuple[mesh_pb2.AgentInstance, ...]: ...

    def capability_infos(self) -> list[CapabilityInfo]: ...


def _mesh_of(caller: Any) -> Any:
    """The MeshClient behind a caller (a Context's `.mesh`), for registry reads."""
    mesh = getattr(caller, "mesh", None)
    return mesh if mesh is not None else caller


async def all_or_none(steps: Iterable[Awaitable[_T]]) -> list[_T]:
    """Every step's result, in order; on the first failure the others are cancelled and awaited (no call left
    running for nobody, no exception left unread) and that failure is raised as it was. asyncio.gather raised
    at once and left the siblings running."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except BaseException:  # this run was cancelled: its steps go with it
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    if pending:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    failures = [task.exception() for task in tasks if task in done and not task.cancelled()]
    first = next((exc for exc in failures if exc is not None), None)
    if first is not None:
        raise first
    return [task.result() for task in tasks]


async def maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class DirectRunner:
    """Runs steps immediately over a caller; nothing is recorded. Escalations go to the control plane.

    Args:
        caller: a started MeshClient, or a capability's Context (deadline and ids propagate).
        escalations: the Escalations client; default: over the caller's own control-plane connection.
        on_event: told (kind, data) about each step, note and escalation, for progress displays.
        conversation_id: carried on every call (handoffs, customer conversations).
    """

    def __init__(
        self,
        caller: Caller,
        *,
        escalations: EscalationClient | None = None,
        on_event: Callable[[str, Mapping[str, Any]], None] | None = None,
        conversation_id: str = "",
    ) -> None:
        self.caller = caller
        self.workflow_id = ""
        self._escalations = escalations
        self._on_event = on_event
        self._memos: dict[str, Any] = {}
        self.conversation_id = conversation_id

    def _emit(self, kind: str, data: Mapping[str, Any]) -> None:
        if self._on_event is not None:
            self._on_event(kind, data)

    def _context(self, conversation_id: str | None = None) -> agent_pb2.CallContext | None:
        conversation = conversation_id or self.conversation_id
        if not conversation and not self.workflow_id:
            return None
        return agent_pb2.CallContext(conversation_id=conversation, workflow_id=self.workflow_id)

    async def step(
        self,
        step_id: str,
        capability: str,
        payload: Any,
        *,
        timeout: float | None = None,
        instance: mesh_pb2.AgentInstance | None = None,
        agent: str | None = None,
        conversation_id: str | None = None,
    ) -> StepResult:
        # Built first: a bad agent pin is a ValueError before any step is announced.
        options = CallOptions(timeout=timeout, context=self._context(conversation_id), agent=agent)
        started = time.perf_counter()
        self._emit("step_started", {"step": step_id, "capability": capability})
        try:
            if instance is not None:
                result = await self.caller.call_on(instance, capability, payload, options=options)
            else:
                result = await self.caller.call_detailed(capability, payload, options=options)
        except HivemeshError as err:
            self._emit("step_failed", {"step": step_id, "capability": capability, "error": error_to_json(err)})
            raise
        out = StepResult.from_call(step_id, capability, result, started)
        self._emit("step_completed", out.to_json())
        return out

    async def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self._memos:
            self._memos[key] = await maybe_await(compute())
        return self._memos[key]

    def recorded(self, step_id: str) -> bool:
        return False  # nothing is recorded: every step calls

    def escalation_client(self) -> EscalationClient:
        if self._escalations is None:
            mesh = _mesh_of(self.caller)
            self._escalations = EscalationClient(mesh.node.controlplane)
        return self._escalations

    async def escalate(
        self,
        step_id: str,
        reason: str,
        context: Mapping[str, Any],
        *,
        deadline_s: float | None = None,
        on_deadline: OnDeadline = "reject",
        default_answer: Any = None,
        labels: Mapping[str, str] | None = None,
    ) -> EscalationInfo:
        client = self.escalation_client()
        # Shielded: cancelled while the question is being asked, the control plane may have created it already
        # (its answer not yet read), and only this request's answer says under which id.
        create = asyncio.ensure_future(client.create(
            reason, context, step_id=step_id, deadline_s=deadline_s, on_deadline=on_deadline,
            default_answer=default_answer, labels=labels))
        try:
            info = await asyncio.shield(create)
        except asyncio.CancelledError:
            await _withdraw(client, create)
            raise
        self._emit("input_required", {"step": step_id, "escalation_id": info.id, "reason": reason})
        try:
            info = await client.wait(info.id)
        except asyncio.CancelledError:
            await _withdraw(client, create)
            raise
        self._emit("input_received", {"step": step_id, "escalation": info.to_json()})
        return info

    async def note(self, key: str, data: Mapping[str, Any]) -> None:
        self._emit("note", {"key": key, **data})

    def instances(self, capability: str) -> tuple[mesh_pb2.AgentInstance, ...]:
        return tuple(_mesh_of(self.caller).instances(capability))

    def capability_infos(self) -> list[CapabilityInfo]:
        return list(_mesh_of(self.caller).capability_infos())


async def _withdraw(client: EscalationClient, created: asyncio.Future[EscalationInfo]) -> None:
    """A cancelled direct run's question: nobody will read the answer, so withdraw it, as a cancelled workflow run
    does, and no person is left to decide it. Once its creation is answered, if it was created. Shielded, bounded
    (WITHDRAW_S), best effort: the cancellation goes on either way, and a withdrawal still running then finishes
    on its own."""

    async def withdraw() -> None:
        info = await created
        await client.cancel(info.id, note="the caller waiting for this answer stopped waiting")

    task = asyncio.ensure_future(withdraw())
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: asyncio does not warn of it
    with contextlib.suppress(HivemeshError, TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(task), WITHDRAW_S)


def as_runner(target: Runner | Caller) -> Runner:
    """A Runner as it is, or a DirectRunner over a caller (MeshClient / Context)."""
    if hasattr(target, "step") and hasattr(target, "memo"):
        return target  # type: ignore[return-value]
    if isinstance(target, Caller):
        return DirectRunner(target)
    raise TypeError(f"run a pattern on a MeshClient, a capability Context or a Runner, not {type(target).__name__}")


async def call_with_escalation(
    runner: Runner,
    step_id: str,
    capability: str,
    payload: Any,
    *,
    timeout: float | None = None,
    deadline_s: float | None = None,
    on_deadline: OnDeadline = "reject",
    default_answer: Any = None,
) -> tuple[StepResult, EscalationInfo | None]:
    """Run a step; if the agent answers INPUT_REQUIRED, ask a person and re-call with their answer.

    The capability receives the person's verdict in its input as `"human": {"approved", "answer", "note"}`
    (so a capability that can ask must accept that optional field). A rejection raises TaskRejectedError.
    """
    first = await runner.step(step_id, capability, payload, timeout=timeout)
    if first.state != "INPUT_REQUIRED":
        return first, None
    ask = first.output if isinstance(first.output, dict) else {}
    info = await runner.escalate(
        step_id, str(ask.get("reason") or f"{capability} needs a person"),
        {"capability": capability, "input": payload, **(ask.get("context") or {})},
        deadline_s=deadline_s, on_deadline=on_deadline, default_answer=default_answer,
        labels={"capability": capability[:63]},
    )
    if not info.approved:
        raise TaskRejectedError(f"{capability}: a person rejected it ({info.note or info.resolved_by})",
                                metadata={"escalation": info.id})
    if not isinstance(payload, dict):
        raise InvalidInputError(f"{capability} asked for a person, but its input is not an object to answer in")
    answered = {**payload, "human": {"approved": True, "answer": info.answer, "note": info.note}}
    second = await runner.step(f"{step_id}/answered", capability, answered, timeout=timeout)
    return second, info

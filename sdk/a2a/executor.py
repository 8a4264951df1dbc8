"""A2A task execution on the mesh: each A2A task is a durable workflow run (`hivemesh.sdk.a2a.tasks`).

The capability is the `skill` named in the message's (or the request's) metadata, or the only skill of the
card the caller addressed. A task sent to one agent's card (`/agents/<agent>/`) is that agent's only: the
agent is recorded in the run's input and every call, streams included, is pinned to it (`tasks`). Input is
the first data part, else the text (JSON if it parses, otherwise `{"text": ...}`). Each call runs
`on_behalf_of` the caller's token: the control plane exchanges it for a delegated token, so the callee's authz,
rate limits and audit see the A2A caller as the principal and the gateway as the actor. A streaming
capability is called with InvokeStream: each item becomes an artifact chunk.

An agent that answers INPUT_REQUIRED makes the run open a control-plane escalation naming the A2A caller as
its answerer, and puts the task in A2A's input-required. The caller's next message on the task is the answer
(the gateway relays it to the escalation with the caller's token); an operator may answer the same escalation
with `hivemesh escalations approve|reject`. `tasks/cancel` cancels the run (and so its mesh call); `tasks/get`
reads the task as its run now stands, and resumes a run nobody drives (after a gateway restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from a2a.helpers import new_data_part, new_task_from_user_message, new_text_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.context import ServerCallContext
from a2a.server.events import EventQueue
from a2a.server.tasks import TaskUpdater
from a2a.types import Artifact, Message, Part, Role, Task, TaskState
from a2a.utils.errors import InvalidParamsError
from google.protobuf import json_format
from google.protobuf.json_format import MessageToDict, ParseDict
from google.protobuf.struct_pb2 import Struct

from hivemesh.mesh import json_depth
from hivemesh.mesh.errors import (
    FailedPreconditionError,
    HivemeshError,
    InvalidInputError,
    NotFoundError,
    ScopeMissingError,
)
from hivemesh.sdk.a2a.auth import AGENT_STATE_KEY, CALLER_STATE_KEY, A2ACaller, refusal
from hivemesh.sdk.a2a.tasks import A2A_CALL, A2A_STREAM, CHUNK, LABEL, TOKENS, open_ask
from hivemesh.sdk.a2a.taskstore import MAX_TASK_BYTES, STATUS_ROOM
from hivemesh.sdk.client import MeshClient
from hivemesh.sdk.workflow import WorkflowEngine, WorkflowHandle, WorkflowState

log = logging.getLogger(__name__)

FINAL: Final = frozenset({TaskState.TASK_STATE_COMPLETED, TaskState.TASK_STATE_FAILED, TaskState.TASK_STATE_CANCELED,
                          TaskState.TASK_STATE_REJECTED})
"""A2A task states that never change again."""
REFUSED: Final = frozenset({"PERMISSION_DENIED", "UNAUTHENTICATED"})
"""gRPC codes that end a task REJECTED (the mesh refused) rather than FAILED."""


MAX_ECHOED: Final = 80
"""Longest caller-given name (a skill) repeated in an error: the caller's own text, at any length, is not news."""


def _clip(text: str, limit: int) -> str:
    """text cut to limit characters, marked when cut."""
    return text if len(text) <= limit else text[:limit] + "..."


def _ints(value: Any) -> Any:
    """protobuf's Value holds every number as a double: give whole numbers back their integer type."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


_STRICT: Final = json.JSONEncoder(allow_nan=False, check_circular=False)
"""Raises ValueError on NaN or Infinity, which a protobuf Value holds but a2a-sdk's JSON writer then refuses."""
_ESCAPED: Final = json.JSONEncoder(check_circular=False)
"""JSON text in ASCII: a lone surrogate written as its escape (UTF-8, so a protobuf string, has no place for it)."""
_SIMPLE_KEY: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")
_MAX_PATH: Final = 300


def _lone(text: str) -> bool:
    """Whether text holds a lone surrogate (half of a UTF-16 pair, which no UTF-8 text, and so no protobuf string or
    A2A part, can hold; json reads one from a `\\ud800` escape, or from bytes UTF-8 has no place for)."""
    if text.isascii():
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def _path(links: list[tuple[int, str | int]], node: int) -> str:
    """The path to node (`parts[0].data.seconds[1]`), its keys clipped and escaped to ASCII."""
    segments: list[str] = []
    while node >= 0:
        parent, key = links[node]
        if isinstance(key, int):
            segments.append(f"[{key}]")
        elif _SIMPLE_KEY.fullmatch(key):
            segments.append(f".{key}")
        else:
            segments.append(f"[{_ESCAPED.encode(_clip(key, 40))}]")
        node = parent
    path = "".join(reversed(segments)).removeprefix(".")
    return path if len(path) <= _MAX_PATH else "..." + path[-_MAX_PATH:]


def _where(path: str) -> str:
    """A path `uncarried` found, as said in a message: `.text`, `[0].n`, or "the top"."""
    return "the top" if not path else path if path.startswith(("[", "...")) else "." + path


def uncarried(value: Any, *, numbers: bool = True) -> tuple[str, str] | None:
    """(where, what) of the first thing in value (a parsed JSON value) that an A2A part cannot carry: a lone surrogate
    (in a string or a key), and with numbers, NaN, Infinity (json reads `1e999` as that) or a whole number past a
    double (a protobuf Value holds every number as a double); None when there is none. Iterative, and paths are
    built only for what is found: a request may nest as deep as json reads."""
    links: list[tuple[int, str | int]] = []
    todo: list[tuple[Any, int]] = [(value, -1)]
    while todo:
        item, node = todo.pop()
        kind = type(item)
        if kind is str:
            if _lone(item):
                return _path(links, node), "a lone surrogate"
        elif kind is float:
            if numbers and not math.isfinite(item):
                return _path(links, node), ("NaN (not a number JSON has)" if math.isnan(item) else
                                            f"a number out of a double's range ({'-' if item < 0 else ''}Infinity)")
        elif kind is int:
            if numbers and item.bit_length() > 1000:
                try:
                    float(item)
                except OverflowError:
                    return _path(links, node), "a number out of a double's range"
        elif kind is dict:
            children = []
            for key, child in item.items():
                if isinstance(key, str) and _lone(key):
                    return _path(links, node), "a key with a lone surrogate"
                links.append((node, key))
                children.append((child, len(links) - 1))
            todo.extend(reversed(children))  # popped in document order: the first one found is the first written
        elif kind is list:
            start = len(links)
            links.extend((node, n) for n in range(len(item)))
            todo.extend((item[n], start + n) for n in range(len(item) - 1, -1, -1))
    return None


def _said(text: str) -> Part:
    """A text part of words the gateway passes on (a reason, an error message), a lone surrogate escaped."""
    return new_text_part(text.encode("utf-8", "backslashreplace").decode() if _lone(text) else text)


def parts_of(value: Any) -> list[Part]:
    """A mesh answer as A2A parts: text for a string, a data part for anything else JSON. An answer a part cannot
    hold as such (a lone surrogate, a number a Value cannot hold or a2a-sdk cannot write, nesting past protobuf's
    100 levels) is carried as a text part of its JSON (`_carried`): the agent's run did complete."""
    try:
        if isinstance(value, str):
            return [new_text_part(value)]  # UnicodeEncodeError: a lone surrogate
        _STRICT.encode(value)  # ValueError: NaN or Infinity
        return [new_data_part(value, "application/json")]  # UnicodeEncodeError, OverflowError, ParseError (depth)
    except (ValueError, OverflowError, RecursionError, json_format.ParseError) as exc:
        return [_carried(value, exc)]


def _carried(value: Any, exc: BaseException) -> Part:
    """value as a text part of its JSON in ASCII (a lone surrogate as its escape, a large number in all its digits;
    NaN and Infinity, which JSON has no words for, as Python's json writes them), marked
    `{"hivemesh": {"carried_as": "json-text", "why": ...}}`, and a warning logged (no traceback)."""
    found = uncarried(value)
    if found is not None:
        why = f"{found[1]} at {_where(found[0])}"
    elif isinstance(exc, json_format.ParseError | RecursionError):
        why = "nested deeper than a data part may be (protobuf parses 100 levels, about 2 per JSON level)"
    else:
        why = f"{type(exc).__name__}: {_clip(str(exc), MAX_ECHOED * 2)}".encode("utf-8", "backslashreplace").decode()
    log.warning("an agent's answer is carried over A2A as JSON text: a data part cannot hold it (%s)", why)
    try:
        text = _ESCAPED.encode(value)
    except (ValueError, TypeError, RecursionError) as err:  # not from a JSON answer; yet never a failed task
        text = json.dumps(f"the answer could not be written as JSON: {type(err).__name__}")
    part = new_text_part(text, "application/json")
    part.metadata.update({"hivemesh": {"carried_as": "json-text", "why": why}})
    return part


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: JSON's grammar, yet no number a reader can hold
        raise ValueError(f"{text} is out of a double's range")
    return value


def text_input(texts: list[str]) -> tuple[Any, str]:
    """(the input a message's texts carry, "" or what in it no text can carry): their JSON (joined by newlines) when
    it is strict JSON, else {"text": ...}. NaN, Infinity and 1e999 json reads, yet they are not JSON (the mesh
    refuses to send them): such a text is plain text. A lone surrogate can only come of an escape in the JSON (a
    text part is UTF-8): "a lone surrogate at .text", which the caller is refused."""
    text = "\n".join(texts)
    try:
        value = json_depth.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError):  # not strict JSON (or nested past what json reads): plain text
        return {"text": text}, ""
    found = uncarried(value, numbers=False) if "\\u" in text else None
    return value, "" if found is None else f"{found[1]} at {_where(found[0])}"


def payload_of(message: Message) -> Any:
    """The JSON input a message carries: its first data part, else its texts (`text_input`). A data part holding NaN
    or Infinity (a Value holds them; the mesh sends JSON), or texts whose JSON holds a lone surrogate, are invalid
    params, before any call (the gateway refuses both in the request already, naming where: `gateway._check_json`;
    a2a-sdk logs a traceback for an error raised here)."""
    texts: list[tuple[int, str]] = []
    for n, part in enumerate(message.parts):
        if part.HasField("data"):
            try:
                return _ints(MessageToDict(part.data))
            except ValueError:
                raise InvalidParamsError(message=f"data part {n} holds NaN or Infinity, which JSON cannot carry "
                                                 "(send a number, or a string)") from None
        if part.HasField("text"):  # a protobuf string: UTF-8, so no lone surrogate in the text itself
            texts.append((n, part.text))
    if not texts:
        raise InvalidParamsError(message="the message carries neither a data part nor text")
    value, problem = text_input([t for _, t in texts])
    if problem:
        raise InvalidParamsError(message=f"text part{'s' if len(texts) > 1 else ''} "
                                         f"{', '.join(str(n) for n, _ in texts)} hold{'' if len(texts) > 1 else 's'} "
                                         f"JSON with {problem}, which no UTF-8 text can carry (send the character "
                                         "itself)")
    return value


@dataclass(frozen=True)
class Outcome:
    """What a run's state means to A2A: the task state, its status message and an artifact to add."""

    state: int
    parts: list[Part] | None = None
    metadata: dict[str, Any] | None = None
    artifact: list[Part] | None = None
    escalation_id: str = ""


def outcome_of(run: WorkflowState) -> Outcome:
    """The A2A view of a run as it stands now."""
    spec = run.input if isinstance(run.input, Mapping) else {}
    streaming = run.definition == A2A_STREAM
    if run.state == "COMPLETED":
        return Outcome(TaskState.TASK_STATE_COMPLETED,
                       artifact=None if streaming else parts_of(run.output))
    if run.state == "REJECTED":
        return Outcome(TaskState.TASK_STATE_REJECTED, [_said(run.reason or "rejected")])
    if run.state == "CANCELED":
        return Outcome(TaskState.TASK_STATE_CANCELED, [_said(run.reason or "canceled")])
    if run.state == "FAILED":
        err = run.error or {}
        code, reason = str(err.get("code", "INTERNAL")), str(err.get("reason", "AGENT_ERROR"))
        return Outcome(TaskState.TASK_STATE_REJECTED if code in REFUSED else TaskState.TASK_STATE_FAILED,
                       [_said(f"{reason}: {err.get('message', '')}")],
                       {"hivemesh": {"reason": reason, "grpc_code": code}})
    ask = open_ask(run)  # a resumed run waiting on a person says WORKING, yet waits all the same
    if ask is not None:
        return Outcome(TaskState.TASK_STATE_INPUT_REQUIRED, parts_of(ask[1]),
                       {"hivemesh": {"escalation_id": ask[0], "capability": str(spec.get("capability", ""))}},
                       escalation_id=ask[0])
    return Outcome(TaskState.TASK_STATE_WORKING)


class MeshAgentExecutor(AgentExecutor):
    """Runs A2A tasks as durable workflow runs of the gateway's identity, on its MeshClient."""

    def __init__(self, mesh: MeshClient, *, timeout_s: float, offered: Callable[[str | None], dict[str, bool]]):
        """offered(agent) -> {capability: streaming} of what the addressed card (None: the gateway's) offers."""
        self._mesh = mesh
        self._timeout_s = timeout_s
        self._offered = offered
        self.engine = WorkflowEngine(mesh, on_event=self._notify)
        self._waiters: dict[str, asyncio.Queue[tuple[str, dict[str, Any]]]] = {}
        self._driving: dict[str, WorkflowHandle] = {}

    # --- runs ---------------------------------------------------------------------------------------------------
    def _notify(self, run_id: str, kind: str, data: Mapping[str, Any]) -> None:
        queue = self._waiters.get(run_id)
        if queue is not None:
            queue.put_nowait((kind, dict(data)))

    def _track(self, handle: WorkflowHandle) -> None:
        self._driving[handle.id] = handle

        def done(_task: object) -> None:
            self._driving.pop(handle.id, None)
            TOKENS.drop(handle.id)

        handle.task.add_done_callback(done)

    async def _resume(self, run_id: str, *, wait_s: float) -> None:
        """Drive a run nobody drives here (a gateway restart left it); another live driver keeps it."""
        if run_id in self._driving:
            return
        try:
            self._track(await self.engine.resume(run_id, wait_s=wait_s))
        except FailedPreconditionError as exc:
            log.info("not resuming A2A task %s: %s", run_id, exc.message)

    @staticmethod
    def _skill(context: RequestContext, offered: dict[str, bool]) -> str:
        message = context.message
        wanted: Any = None
        for meta in (MessageToDict(message.metadata) if message is not None else {}, context.metadata):
            if isinstance(meta.get("skill"), str):
                wanted = meta["skill"]
                break
        choices = _clip(", ".join(sorted(offered)) or "none", MAX_ECHOED * 4)
        if wanted is None:
            if len(offered) == 1:
                return next(iter(offered))
            raise InvalidParamsError(message=f'name the skill in the message metadata ({{"skill": ...}}); '
                                             f"offered: {choices}")
        if wanted not in offered:
            raise InvalidParamsError(message=f"no skill {_clip(wanted, MAX_ECHOED)!r} here; offered: {choices}")
        return str(wanted)

    # --- A2A ----------------------------------------------------------------------------------------------------
    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        state = context.call_context.state
        caller: A2ACaller | None = state.get(CALLER_STATE_KEY)
        if caller is None or context.message is None:  # the gateway's route authenticates before dispatch
            raise InvalidParamsError(message="no authenticated caller or no message")
        task = context.current_task
        answer = payload_of(context.message)
        answered = ""
        if task is None:
            agent: str | None = state.get(AGENT_STATE_KEY)
            offered = self._offered(agent)
            capability = self._skill(context, offered)
            task = new_task_from_user_message(context.message)
            _fits(task.ByteSize())
            await event_queue.enqueue_event(task)
            updater = TaskUpdater(event_queue, task.id, task.context_id)
            if capability not in caller.scopes:
                exc = ScopeMissingError(f"the caller's token does not allow {capability!r} (it allows: "
                                        f"{', '.join(sorted(caller.scopes)) or 'nothing'})")
                await updater.update_status(TaskState.TASK_STATE_REJECTED, updater.new_agent_message(
                    [new_text_part(f"{exc.reason}: {exc.message}")], metadata={"hivemesh": refusal(exc)}))
                return
            run_id = self.engine.run_id_for(task.id)
            TOKENS.set(run_id, caller.token)
            queue = self._waiters.setdefault(run_id, asyncio.Queue())
            try:
                self._track(await self.engine.submit(
                    A2A_STREAM if offered[capability] else A2A_CALL,
                    {"capability": capability, "payload": answer, "principal": caller.principal,
                     "timeout_s": self._timeout_s, **({"agent": agent} if agent is not None else {})},
                    workflow_id=task.id, labels={LABEL: caller.user_name}))
            except BaseException as exc:
                self._waiters.pop(run_id, None)
                TOKENS.drop(run_id)
                if isinstance(exc, InvalidInputError):  # the run's own bounds (its input recorded in etcd)
                    raise InvalidParamsError(message=exc.message) from None
                raise
        else:
            _fits(task.ByteSize() + context.message.ByteSize())
            run_id = self.engine.run_id_for(task.id)
            updater = TaskUpdater(event_queue, task.id, task.context_id)
            queue = self._waiters.setdefault(run_id, asyncio.Queue())
            TOKENS.set(run_id, caller.token)
            answered = await self._answer(run_id, answer, caller)
        await updater.start_work()
        try:
            await self._follow(run_id, queue, updater, task, answered)
        finally:
            self._waiters.pop(run_id, None)

    async def _answer(self, run_id: str, answer: Any, caller: A2ACaller) -> str:
        """Relay the caller's message as the answer to the run's open escalation; resume the run if nobody
        drives it. Returns the escalation answered ("" when the run was not waiting for one)."""
        try:
            run = await self.engine.get(run_id)
        except NotFoundError:
            raise InvalidParamsError(message=f"task {run_id} has no run on this mesh") from None
        ask = None if run.terminal else open_ask(run)
        if ask is not None:
            verdict = answer if isinstance(answer, dict) and isinstance(answer.get("approved"), bool) else None
            with contextlib.suppress(FailedPreconditionError):  # answered already (an operator, a retry)
                await self.engine.escalations.resolve(
                    ask[0], approve=verdict["approved"] if verdict else True,
                    answer=verdict.get("answer") if verdict else answer,
                    note=str(verdict.get("note", "")) if verdict else "", subject_token=caller.token)
        if not run.terminal:
            await self._resume(run_id, wait_s=self.engine.lock_ttl_s + 2.0)
        return ask[0] if ask is not None else ""

    async def _follow(self, run_id: str, queue: asyncio.Queue[tuple[str, dict[str, Any]]], updater: TaskUpdater,
                      task: Task, answered: str) -> None:
        """Mirror the run into the task until it ends or waits for a person; bounded by the call timeout (after
        which the task stays WORKING and the caller polls tasks/get)."""
        run = await self.engine.get(run_id)
        capability = str((run.input or {}).get("capability", "")) if isinstance(run.input, Mapping) else ""
        chunks = 0

        async def handle(kind: str, data: dict[str, Any]) -> None:
            nonlocal chunks
            if kind == CHUNK:
                await updater.add_artifact(parts_of(data.get("item")), artifact_id=f"{task.id}-{capability}",
                                           name=capability, append=chunks > 0)
                chunks += 1

        async def drain() -> None:
            while not queue.empty():
                await handle(*queue.get_nowait())

        until = time.monotonic() + self._timeout_s + 30.0
        while True:
            await drain()
            run = await self.engine.get(run_id)
            out = outcome_of(run)
            stale_ask = out.state == TaskState.TASK_STATE_INPUT_REQUIRED and out.escalation_id == answered
            if out.state != TaskState.TASK_STATE_WORKING and not stale_ask:  # the ask just answered is not news
                break
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            try:
                await handle(*await asyncio.wait_for(queue.get(), min(remaining, 1.0)))
            except TimeoutError:
                continue
        await drain()  # a stream's last items, emitted before the run recorded its end
        if out.artifact is not None:
            await updater.add_artifact(out.artifact, name=capability)
        message = updater.new_agent_message(out.parts, metadata=out.metadata) if out.parts else None
        await updater.update_status(out.state, message)  # type: ignore[arg-type]

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        """Cancel the task's run (its running mesh call with it, and its open escalation)."""
        task = context.current_task
        if task is None:
            return
        await self.cancel_run(task.id)
        await TaskUpdater(event_queue, task.id, task.context_id).cancel()

    async def cancel_run(self, task_id: str) -> None:
        """Cancel the task's run and withdraw the escalation it waits on: a run nobody drives (a gateway
        restart) is only marked canceled by the engine, its escalation left pending for a person."""
        run_id = self.engine.run_id_for(task_id)
        try:
            before = await self.engine.get(run_id)
        except NotFoundError:
            return
        ask = None if before.terminal else open_ask(before)
        if not before.terminal:
            await self.engine.cancel(run_id, reason="canceled by the A2A caller")
        if ask is not None:
            with contextlib.suppress(FailedPreconditionError, NotFoundError):  # answered meanwhile, or gone
                await self.engine.escalations.cancel(ask[0], note="the A2A caller canceled the task")

    # --- tasks/get ------------------------------------------------------------------------------------------------
    async def revive(self, task_id: str, context: ServerCallContext) -> None:
        """Before tasks/get: resume the caller's run if nobody drives it (a gateway restart), with the token
        this request presents; a stream cannot be picked up again, so it is canceled instead."""
        caller: A2ACaller | None = context.state.get(CALLER_STATE_KEY)
        try:
            run_id = self.engine.run_id_for(task_id)
            run = await self.engine.get(run_id)
        except HivemeshError:
            return
        if caller is None or run.terminal or run_id in self._driving or run.labels.get(LABEL) != caller.user_name:
            return
        if run.definition == A2A_STREAM:
            with contextlib.suppress(HivemeshError):
                await self.engine.cancel(run_id, reason="the gateway restarted during the stream", wait_s=5.0)
            return
        TOKENS.set(run_id, caller.token)
        await self._resume(run_id, wait_s=0.0)

    async def sync(self, task: Task) -> Task:
        """The stored task brought up to date with its run (the same object when nothing changed). A final task
        stays as stored (kept FAILED for being too large, or CANCELED by the caller)."""
        if task.status.state in FINAL:
            return task
        try:
            run = await self.engine.get(self.engine.run_id_for(task.id))
        except HivemeshError:
            return task
        out = outcome_of(run)
        if out.state == task.status.state and (out.state != TaskState.TASK_STATE_INPUT_REQUIRED or _asked(
                task) == out.escalation_id):
            return task
        updated = Task()
        updated.CopyFrom(task)
        updated.status.state = out.state  # type: ignore[assignment]
        updated.status.timestamp.GetCurrentTime()
        updated.status.ClearField("message")
        if out.parts:
            meta = Struct()
            if out.metadata:
                ParseDict(out.metadata, meta)
            updated.status.message.CopyFrom(Message(
                role=Role.ROLE_AGENT, parts=out.parts, message_id=uuid.uuid4().hex, task_id=task.id,
                context_id=task.context_id, metadata=meta))
        if out.artifact is not None and not task.artifacts:
            capability = str((run.input or {}).get("capability", "")) if isinstance(run.input, Mapping) else ""
            updated.artifacts.append(Artifact(artifact_id=uuid.uuid4().hex, name=capability, parts=out.artifact))
        return updated


def _fits(size: int) -> None:
    """Refuse (invalid params) a message that would make its task too large to ever be kept, before any run."""
    if size > MAX_TASK_BYTES - STATUS_ROOM:
        raise InvalidParamsError(message=f"the message makes its task {size} bytes; a task keeps at most "
                                         f"{MAX_TASK_BYTES - STATUS_ROOM} bytes of input (send less, or start a "
                                         "new task)")


def _asked(task: Task) -> str:
    """The escalation id a stored input-required task shows ("" if none)."""
    if not task.status.HasField("message"):
        return ""
    meta = MessageToDict(task.status.message.metadata)
    return str((meta.get("hivemesh") or {}).get("escalation_id", ""))

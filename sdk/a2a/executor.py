"""A2A task execution on the mesh: one A2A message is one Invoke (or InvokeStream) of a mesh capability.

The capability is the `skill` named in the message's (or the request's) metadata, or the only skill of the
card the caller addressed. Input is the first data part, else the text (JSON if it parses, otherwise
`{"text": ...}`). Each call runs `on_behalf_of` the caller's token: the control plane exchanges it for a
delegated token, so the callee's authz, rate limits and audit see the A2A caller as the principal and the
gateway as the actor. A streaming capability is called with InvokeStream: each item becomes an artifact chunk.

An agent that answers INPUT_REQUIRED (an `InputRequired` escalation) puts the task in A2A's input-required;
the caller's next message on that task is the person's answer, and the capability is re-called with it as
`"human": {"approved", "answer", "note"}` (the convention of `hivemesh.sdk.patterns.call_with_escalation`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from a2a.helpers import new_data_part, new_task_from_user_message, new_text_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.tasks import TaskUpdater
from a2a.types import Message, Part, TaskState
from a2a.utils.errors import InvalidParamsError
from google.protobuf.json_format import MessageToDict

from hivemesh.mesh.errors import HivemeshError, PermissionDeniedError, ScopeMissingError, UnauthenticatedError
from hivemesh.sdk.a2a.auth import AGENT_STATE_KEY, CALLER_STATE_KEY, A2ACaller, refusal
from hivemesh.sdk.client import MeshClient
from hivemesh.v1 import agent_pb2


@dataclass(frozen=True)
class _Pending:
    """A task waiting for a person's answer: what to re-call with it."""

    capability: str
    payload: Any


def _ints(value: Any) -> Any:
    """protobuf's Value holds every number as a double: give whole numbers back their integer type."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


def parts_of(value: Any) -> list[Part]:
    """A mesh answer as A2A parts: text for a string, a data part for anything else JSON."""
    return [new_text_part(value)] if isinstance(value, str) else [new_data_part(value, "application/json")]


def payload_of(message: Message) -> Any:
    """The JSON input a message carries (its first data part, else its text)."""
    texts: list[str] = []
    for part in message.parts:
        if part.HasField("data"):
            return _ints(MessageToDict(part.data))
        if part.HasField("text"):
            texts.append(part.text)
    if not texts:
        raise InvalidParamsError(message="the message carries neither a data part nor text")
    text = "\n".join(texts)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"text": text}


class MeshAgentExecutor(AgentExecutor):
    """Runs A2A tasks as mesh calls through the gateway's MeshClient."""

    def __init__(self, mesh: MeshClient, *, timeout_s: float, offered: Callable[[str | None], dict[str, bool]]):
        """offered(agent) -> {capability: streaming} of what the addressed card (None: the gateway's) offers."""
        self._mesh = mesh
        self._timeout_s = timeout_s
        self._offered = offered
        self._pending: dict[str, _Pending] = {}

    @staticmethod
    def _skill(context: RequestContext, offered: dict[str, bool]) -> str:
        message = context.message
        wanted: Any = None
        for meta in (MessageToDict(message.metadata) if message is not None else {}, context.metadata):
            if isinstance(meta.get("skill"), str):
                wanted = meta["skill"]
                break
        choices = ", ".join(sorted(offered)) or "none"
        if wanted is None:
            if len(offered) == 1:
                return next(iter(offered))
            raise InvalidParamsError(message=f'name the skill in the message metadata ({{"skill": ...}}); '
                                             f"offered: {choices}")
        if wanted not in offered:
            raise InvalidParamsError(message=f"no skill {wanted!r} here; offered: {choices}")
        return str(wanted)

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        state = context.call_context.state
        caller: A2ACaller | None = state.get(CALLER_STATE_KEY)
        if caller is None or context.message is None:  # the gateway's route authenticates before dispatch
            raise InvalidParamsError(message="no authenticated caller or no message")
        task = context.current_task
        answer = payload_of(context.message)
        pending = self._pending.pop(task.id, None) if task is not None else None
        if pending is not None:
            capability, streaming = pending.capability, False
            human = answer if isinstance(answer, dict) and "approved" in answer else {
                "approved": True, "answer": answer, "note": ""}
            base = pending.payload if isinstance(pending.payload, dict) else {"input": pending.payload}
            payload = {**base, "human": human}
        else:
            offered = self._offered(state.get(AGENT_STATE_KEY))
            capability = self._skill(context, offered)
            payload, streaming = answer, offered[capability]
        if task is None:
            task = new_task_from_user_message(context.message)
            await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        await updater.start_work()
        try:
            if capability not in caller.scopes:
                raise ScopeMissingError(f"the caller's token does not allow {capability!r} (it allows: "
                                        f"{', '.join(sorted(caller.scopes)) or 'nothing'})")
            with self._mesh.on_behalf_of(caller.token):
                if streaming:
                    n = 0
                    async for item in self._mesh.stream(capability, payload, timeout=self._timeout_s):
                        await updater.add_artifact(parts_of(item), artifact_id=f"{task.id}-{capability}",
                                                   name=capability, append=n > 0)
                        n += 1
                    await updater.complete()
                    return
                result = await self._mesh.call_detailed(capability, payload, timeout=self._timeout_s)
        except HivemeshError as exc:
            refused = isinstance(exc, PermissionDeniedError | UnauthenticatedError)
            message = updater.new_agent_message([new_text_part(f"{exc.reason}: {exc.message}")],
                                                metadata={"hivemesh": refusal(exc)})
            await updater.update_status(
                TaskState.TASK_STATE_REJECTED if refused else TaskState.TASK_STATE_FAILED, message)
            return
        if result.state == agent_pb2.TASK_STATE_INPUT_REQUIRED:
            self._pending[task.id] = _Pending(capability, payload)
            await updater.requires_input(updater.new_agent_message(parts_of(result.output)))
            return
        await updater.add_artifact(parts_of(result.output), name=capability)
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        """Cancel the task; the handler also cancels its running call, and with it the mesh call."""
        task = context.current_task
        if task is None:
            return
        self._pending.pop(task.id, None)
        await TaskUpdater(event_queue, task.id, task.context_id).cancel()

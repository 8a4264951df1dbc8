"""The gateway's A2A task store, in etcd beside each task's workflow run: tasks outlive a gateway restart.

A task's A2A document (status, history, artifacts, as a2a-sdk's task manager builds them) is kept at
`/hivemesh/workflows/<gateway run id>/a2a-task`, inside the run's own key prefix, so the gateway's etcd role
already covers it, only the gateway (and operators) can read it, and retention deletes it with its run.
Each document records its owner (the A2A caller's principal); another caller asking for it is told it does
not exist (A2A -32001), as a2a-sdk's in-memory store does.

`get` returns the document brought up to date with its run (`sync`): a run that moved on while no request was
waiting (an operator answered its escalation, it completed or failed) shows its current state.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final

from a2a.server.context import ServerCallContext
from a2a.server.owner_resolver import resolve_user_scope
from a2a.server.tasks import InMemoryTaskStore, TaskStore
from a2a.types.a2a_pb2 import ListTasksRequest, ListTasksResponse, Message, Part, Role, Task, TaskState
from google.protobuf.message import DecodeError

from hivemesh.mesh import json_depth
from hivemesh.mesh.errors import HivemeshError, InvalidInputError
from hivemesh.mesh.keyspace import WORKFLOWS
from hivemesh.mesh.pki import NAME_RE
from hivemesh.sdk.a2a.tasks import LABEL

MAX_TASK_BYTES: Final = 512 * 1024
"""Largest task document kept (etcd's request limit is 1.5 MiB; history grows per turn): a larger one is kept
FAILED without its artifacts (`fitted`)."""
STATUS_ROOM: Final = 16 * 1024
"""Room a task keeps for its status messages: an input leaving less is refused before any run starts."""
MAX_LISTED: Final = 1000
"""`ListTasks` looks at this caller's newest 1,000 tasks at most."""

Sync = Callable[[Task], Awaitable[Task]]
log = logging.getLogger(__name__)


def fitted(task: Task) -> Task:
    """task itself if its document fits MAX_TASK_BYTES; else the task FAILED, saying its answer was too large,
    without its artifacts (and, if still too large, its history). Saving never fails on size: a task whose
    work is done is never lost for being too large to keep, and its run's outcome is not retried."""
    size = task.ByteSize()
    if size <= MAX_TASK_BYTES:
        return task
    log.warning("A2A task %s would be %d bytes (at most %d kept): kept FAILED", task.id, size, MAX_TASK_BYTES)
    failed = Task()
    failed.CopyFrom(task)
    del failed.artifacts[:]
    failed.ClearField("metadata")
    failed.status.state = TaskState.TASK_STATE_FAILED
    failed.status.timestamp.GetCurrentTime()
    failed.status.message.CopyFrom(Message(
        role=Role.ROLE_AGENT, message_id=uuid.uuid4().hex, task_id=task.id, context_id=task.context_id,
        parts=[Part(text=f"PAYLOAD_TOO_LARGE: the answer made the task {size} bytes; at most {MAX_TASK_BYTES} "
                         "are kept (ask for a smaller answer)")]))
    if failed.ByteSize() > MAX_TASK_BYTES:
        del failed.history[:]
    return failed


class EtcdTaskStore(TaskStore):
    """a2a-sdk's TaskStore over etcd, one document per task under the gateway's own run prefix."""

    def __init__(self, etcd: Any, owner_segment: str, *, list_runs: Callable[[], Awaitable[list[dict[str, Any]]]],
                 sync: Sync | None = None) -> None:
        """owner_segment: the gateway's `<kind>-<name>`; list_runs: its runs' summaries (for ListTasks); sync:
        brings a stored task up to date with its run."""
        self._etcd = etcd
        self._segment = owner_segment
        self._list_runs = list_runs
        self._sync = sync

    def key(self, task_id: str) -> bytes:
        return f"{WORKFLOWS}{self._segment}/{task_id}/a2a-task".encode()

    async def save(self, task: Task, context: ServerCallContext) -> None:
        if not NAME_RE.fullmatch(task.id):
            raise InvalidInputError(f"task id {task.id[:80]!r} is not one this gateway issues")
        data = fitted(task).SerializeToString()
        envelope = {"owner": resolve_user_scope(context), "task": base64.b64encode(data).decode()}
        await self._etcd.put(self.key(task.id), json.dumps(envelope).encode())

    async def load(self, task_id: str, owner: str) -> Task | None:
        """The stored document as saved (no sync), or None when absent or another owner's."""
        if not NAME_RE.fullmatch(task_id):
            return None
        kv = await self._etcd.get(self.key(task_id))
        if kv is None:
            return None
        envelope = json_depth.loads(kv.value)
        if envelope.get("owner") != owner:
            return None
        task = Task()
        task.ParseFromString(base64.b64decode(envelope["task"]))
        return task

    async def get(self, task_id: str, context: ServerCallContext) -> Task | None:
        task = await self.load(task_id, resolve_user_scope(context))
        if task is not None and self._sync is not None:
            synced = await self._sync(task)
            if synced is not task:
                task = fitted(synced)  # what is kept is what the caller sees
                await self.save(task, context)
        return task

    async def delete(self, task_id: str, context: ServerCallContext) -> None:
        if await self.load(task_id, resolve_user_scope(context)) is not None:
            await self._etcd.delete(self.key(task_id))

    async def list(self, params: ListTasksRequest, context: ServerCallContext) -> ListTasksResponse:
        """This caller's tasks, filtered and paged exactly as a2a-sdk's in-memory store does."""
        owner = resolve_user_scope(context)
        mine = [r for r in await self._list_runs() if (r.get("labels") or {}).get(LABEL) == owner]
        mine.sort(key=lambda r: -float(r.get("updated_at") or 0.0))
        page = InMemoryTaskStore()
        for summary in mine[:MAX_LISTED]:
            task_id = str(summary["id"]).rsplit("/", 1)[-1]
            try:
                task = await self.get(task_id, context)
            except (HivemeshError, ValueError, KeyError, TypeError, DecodeError) as exc:
                # One unreadable document (damaged, or from an older gateway) must not hide all the others.
                log.warning("ListTasks skips the unreadable A2A task %s: %s", task_id, exc)
                continue
            if task is not None:
                await page.save(task, context)
        return await page.list(params, context)

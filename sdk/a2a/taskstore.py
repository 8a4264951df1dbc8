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
from collections.abc import Awaitable, Callable
from typing import Any, Final

from a2a.server.context import ServerCallContext
from a2a.server.owner_resolver import resolve_user_scope
from a2a.server.tasks import InMemoryTaskStore, TaskStore
from a2a.types.a2a_pb2 import ListTasksRequest, ListTasksResponse, Task

from hivemesh.mesh.errors import InvalidInputError
from hivemesh.mesh.keyspace import WORKFLOWS
from hivemesh.mesh.pki import NAME_RE
from hivemesh.sdk.a2a.tasks import LABEL

MAX_TASK_BYTES: Final = 512 * 1024
"""A task document larger than this is refused (etcd's request limit is 1.5 MiB; history grows per turn)."""
MAX_LISTED: Final = 1000
"""`ListTasks` looks at this caller's newest 1,000 tasks at most."""

Sync = Callable[[Task], Awaitable[Task]]


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
        data = task.SerializeToString()
        if len(data) > MAX_TASK_BYTES:
            raise InvalidInputError(f"task {task.id} would be {len(data)} bytes; at most {MAX_TASK_BYTES} are kept "
                                    "(start a new task instead of continuing this one)")
        envelope = {"owner": resolve_user_scope(context), "task": base64.b64encode(data).decode()}
        await self._etcd.put(self.key(task.id), json.dumps(envelope).encode())

    async def load(self, task_id: str, owner: str) -> Task | None:
        """The stored document as saved (no sync), or None when absent or another owner's."""
        if not NAME_RE.fullmatch(task_id):
            return None
        kv = await self._etcd.get(self.key(task_id))
        if kv is None:
            return None
        envelope = json.loads(kv.value)
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
                await self.save(synced, context)
                task = synced
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
            task = await self.get(str(summary["id"]).rsplit("/", 1)[-1], context)
            if task is not None:
                await page.save(task, context)
        return await page.list(params, context)

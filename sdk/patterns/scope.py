"""`scoped(runner, "doc-2")`: a runner whose step ids, escalations, memo and note keys all start `doc-2/`.

A pattern names its steps by what they do (`01-extract`, `branch-search-web`, `decompose`), not by which instance
of the pattern runs them, so that a run recorded by one release resumes under the next. Two patterns of the same
kind in one workflow run (two documents through one Pipeline, two FanOuts over the same branches) would therefore
ask for the same step ids, and a durable run answers a step id it has recorded from its journal: the second
pattern would be handed the first one's results. `WorkflowRun` refuses a step id asked for twice in one execution;
this wrapper is the fix it names. Each pattern (or each pass of a loop) runs on its own scope:

    for n, doc in enumerate(docs):
        await Pipeline(["extract", "validate"]).run(scoped(run, f"doc-{n}"), doc)

Scopes nest (`scoped(scoped(run, "a"), "b")` writes `a/b/...`, at most `MAX_PATH` characters together); outside a
workflow they only rename the steps.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from hivemesh.sdk.escalation import EscalationInfo, OnDeadline
from hivemesh.sdk.patterns.base import Caller, Runner, StepResult, as_runner
from hivemesh.v1 import mesh_pb2

if TYPE_CHECKING:
    from hivemesh.mesh.registry import CapabilityInfo

_SCOPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
"""A scope is one path segment of a step id: no `/` (that joins scopes), no spaces, at most 64 characters."""
MAX_PATH = 128
"""Characters of all nested scopes together, slashes included: an escalation's step id may have 256 (the control
plane refuses more), so a scoped pattern keeps 127 for its own step ids. Checked when the scope is made, not at the
run's first escalation."""


class ScopedRunner:
    """`inner` with every step id, escalation step id, memo key and note key prefixed `<scope>/`; the rest (the
    run's id, its conversation, the registry reads) is inner's own. See the module docstring."""

    def __init__(self, inner: Runner, scope: str) -> None:
        if not isinstance(scope, str) or not _SCOPE.fullmatch(scope):
            raise ValueError(f"a scope is 1-64 letters, digits, '.', '_', ':' or '-' (no '/'), not {scope!r}")
        path: str = f"{inner.path}/{scope}" if isinstance(inner, ScopedRunner) else scope
        if len(path) > MAX_PATH:
            raise ValueError(f"nested scopes {path[:40]!r}... are {len(path)} characters; at most {MAX_PATH} "
                             "together (an escalation's step id, scopes included, has at most 256)")
        self.inner = inner
        self.scope = scope
        self.path: str = path
        """Every scope from the outermost, joined by `/`."""
        self._prefix = scope + "/"

    @property
    def workflow_id(self) -> str:
        return self.inner.workflow_id

    @property
    def conversation_id(self) -> str:
        return str(getattr(self.inner, "conversation_id", "") or "")

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
        return await self.inner.step(self._prefix + step_id, capability, payload, timeout=timeout, instance=instance,
                                     agent=agent, conversation_id=conversation_id)

    async def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        return await self.inner.memo(self._prefix + key if isinstance(key, str) else key, compute)

    def recorded(self, step_id: str) -> bool:
        return self.inner.recorded(self._prefix + step_id)

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
        return await self.inner.escalate(self._prefix + step_id, reason, context, deadline_s=deadline_s,
                                         on_deadline=on_deadline, default_answer=default_answer, labels=labels)

    async def note(self, key: str, data: Mapping[str, Any]) -> None:
        await self.inner.note(self._prefix + key, data)

    def instances(self, capability: str) -> tuple[mesh_pb2.AgentInstance, ...]:
        return self.inner.instances(capability)

    def capability_infos(self) -> list[CapabilityInfo]:
        return self.inner.capability_infos()


def scoped(target: Runner | Caller, scope: str) -> ScopedRunner:
    """A runner for one pattern (or one pass of a loop) in a run that holds others of its kind: its step ids,
    escalations, memos and notes start `<scope>/`. target is a Runner (a `WorkflowRun`, another scoped runner) or
    a caller (MeshClient, Context), as `Pattern.run` takes."""
    return ScopedRunner(as_runner(target), scope)

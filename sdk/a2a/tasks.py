"""A2A tasks as durable workflow runs: what a run does for one task, and what its state means to A2A.

Each A2A task the gateway accepts is a run of `hivemesh.sdk.workflow`, owned by the gateway's identity, whose
local id is the task id. A unary task's run (`A2A_CALL`) calls the capability as a recorded step; when the
agent answers INPUT_REQUIRED, the run opens a control-plane escalation that names the A2A caller as its
answerer, waits for it, and calls again with the verdict as `"human": {"approved", "answer", "note"}` (the
convention of `call_with_escalation`). The caller answers through the gateway with its next message on the
task; an operator can answer the same escalation with `hivemesh escalations approve|reject`. A streaming
task's run (`A2A_STREAM`) forwards each item to whoever is waiting in this process.

A task sent to one agent's route (`/agents/<agent>/`) records that agent in its run's input (`"agent"`), so
a run resumed by a restarted gateway keeps it: every call, unary or stream, is pinned to that agent
(`CallOptions.agent`): it goes to that agent's instances only, with the mesh's failover between them,
retries, breakers and route policies.

A run makes its calls on behalf of the A2A caller: with the newest token the caller presented for the task
(`CallerTokens`). Tokens live only in the gateway's memory: a run whose caller has not come back since a
gateway restart waits for the caller's next message or `tasks/get` to be resumed, and a run resumed
elsewhere (`hivemesh workflows resume`) fails with UNAUTHENTICATED rather than call as the gateway itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from hivemesh.mesh.errors import FailedPreconditionError, UnauthenticatedError

if TYPE_CHECKING:
    from hivemesh.sdk.workflow.run import WorkflowRun

A2A_CALL: Final = "hivemesh.sdk.a2a.tasks:a2a_call"
A2A_STREAM: Final = "hivemesh.sdk.a2a.tasks:a2a_stream"
MAX_ASKS: Final = 8
"""Most times one task may ask a person: an agent that keeps asking ends FAILED instead of looping."""
LABEL: Final = "a2a.owner"
"""Run label naming the A2A owner a task belongs to: the caller's principal, followed by `/agents/<agent>/` for a
task sent on a per-agent route (`A2ACaller.user_name`)."""
CHUNK: Final = "a2a.chunk"
"""Progress event kind carrying one streamed item to the process's waiters."""


class CallerTokens:
    """The newest token each task's A2A caller presented, by run id (kept only while this process drives it)."""

    def __init__(self) -> None:
        self._tokens: dict[str, str] = {}

    def set(self, run_id: str, token: str) -> None:
        self._tokens[run_id] = token

    def get(self, run_id: str) -> str:
        token = self._tokens.get(run_id)
        if not token:
            raise UnauthenticatedError(
                f"no A2A caller token for task {run_id}: only the gateway the caller talks to drives it; the "
                "caller resumes it with its next message or tasks/get")
        return token

    def drop(self, run_id: str) -> None:
        self._tokens.pop(run_id, None)


TOKENS: Final = CallerTokens()
"""Process-wide: a run's body is found by import reference, so it reads its caller's token here."""


def _human(info: Any) -> dict[str, Any]:
    return {"approved": bool(info.approved), "answer": info.answer, "note": info.note}


async def a2a_call(run: WorkflowRun, spec: Mapping[str, Any]) -> Any:
    """One unary A2A task: call, and as long as the agent asks for a person (bounded), ask and call again. With
    an `agent` in spec, every call is pinned to that agent."""
    capability, payload = str(spec["capability"]), spec.get("payload")
    agent = str(spec["agent"]) if spec.get("agent") else None
    timeout = float(spec.get("timeout_s") or 60.0)
    base = payload if isinstance(payload, dict) else {"input": payload}
    current = payload
    mesh = run.engine.mesh
    for n in range(MAX_ASKS + 1):
        with mesh.on_behalf_of(TOKENS.get(run.workflow_id)):
            result = await run.step(f"call-{n}", capability, current, timeout=timeout, agent=agent)
        if result.state != "INPUT_REQUIRED":
            return result.output
        if n == MAX_ASKS:
            break
        ask = result.output if isinstance(result.output, dict) else {}
        info = await run.escalate(
            f"ask-{n}", str(ask.get("reason") or f"{capability} needs a person")[:1000],
            {"capability": capability, "input": payload, "ask": result.output},
            answerer=str(spec.get("principal") or ""), labels={"capability": capability[:63], "via": "a2a"},
        )
        current = {**base, "human": _human(info)}
    raise FailedPreconditionError(f"{capability} asked for a person more than {MAX_ASKS} times in one task")


async def a2a_stream(run: WorkflowRun, spec: Mapping[str, Any]) -> Any:
    """One streaming A2A task: each item goes to this process's waiters as a progress event. With an `agent` in
    spec, the stream is pinned to that agent."""
    capability, payload = str(spec["capability"]), spec.get("payload")
    agent = str(spec["agent"]) if spec.get("agent") else None
    mesh = run.engine.mesh
    n = 0
    with mesh.on_behalf_of(TOKENS.get(run.workflow_id)):
        async for item in mesh.stream(capability, payload, timeout=float(spec.get("timeout_s") or 60.0),
                                      agent=agent):
            run.engine.emit(run.workflow_id, CHUNK, {"n": n, "item": item})
            n += 1
    return {"items": n}


def open_ask(state: Any) -> tuple[str, Any] | None:
    """(escalation id, the agent's ask) of the escalation the run waits on, or None."""
    for step_id, rec in reversed(list(state.escalations.items())):
        if rec.get("resolution") or not rec.get("escalation_id"):
            continue
        n = step_id.removeprefix("ask-")
        asked = state.steps.get(f"call-{n}")
        return str(rec["escalation_id"]), (asked.result or {}).get("output") if asked is not None else None
    return None

"""Handoffs: one agent transfers the conversation to another, with its context (the Swarm / Agents SDK idea).

An agent that serves a conversation answers `{"reply": "...", ...}`; to hand the conversation over it answers
`handoff("security-triage", reason="phishing", context={"ticket": 42})` instead. The `Handoff` pattern
carries the whole conversation (id, history, accumulated context, who handed it over and why) to the next
agent, up to `max_handoffs`, and returns the final reply with the path it took:

    chat = Handoff(entry="helpdesk-triage", max_handoffs=3)
    result = await chat.run(mesh, {"message": "My laptop shows a strange login page", "context": {"user": "ana"}})
    result.output["reply"], result.details["path"]   # ["helpdesk-triage", "security-triage"]

Each agent receives `{"message", "conversation": {"id", "history", "context", "handoffs"}}`, and every call
carries that id in `CallContext.conversation_id`, under a workflow too (so conversation memory is that
conversation's). The id is the input's `conversation_id`, else the runner's own (`DirectRunner(conversation_id=)`,
`WorkflowEngine(conversation_id=)`), else a new one recorded for the run.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from hivemesh.mesh.errors import AgentError, FailedPreconditionError
from hivemesh.mesh.pki import NAME_RE
from hivemesh.sdk.patterns.base import Caller, DirectRunner, PatternResult, Runner, StepResult, as_runner
from hivemesh.sdk.patterns.checks import (
    check_capability,
    check_count,
    check_label,
    check_names,
    check_seconds,
    check_str,
    shown,
)


def handoff(to: str, *, reason: str = "", context: Mapping[str, Any] | None = None, reply: str = "") -> dict[str, Any]:
    """What a capability returns to hand the conversation to capability `to` (context is merged in)."""
    check_capability(to, "handoff to")
    check_str(reason, "handoff reason")
    check_str(reply, "handoff reply")
    if context is not None and not isinstance(context, Mapping):
        raise TypeError(f"handoff context must be an object (a mapping) to merge in, or None, not {shown(context)}")
    out: dict[str, Any] = {"handoff": {"to": to, "reason": reason, "context": dict(context or {})}}
    if reply:
        out["reply"] = reply
    return out


class Handoff:
    """Drive a conversation across agents that hand it to each other.

    Args:
        entry: the first capability to talk to.
        max_handoffs: transfers allowed before the pattern stops (a loop guard).
        allowed: if given, the capabilities a conversation may be handed to.
    """

    kind = "handoff"

    def __init__(self, entry: str, *, max_handoffs: int = 3, allowed: Iterable[str] | None = None,
                 timeout: float | None = 30.0, name: str = "handoff") -> None:
        check_capability(entry, "entry")
        check_count(max_handoffs, "max_handoffs", 0)
        check_seconds(timeout, "timeout")
        check_label(name, "name")
        self.entry = entry
        self.max_handoffs = max_handoffs
        # One name is refused, not split: allowed="security-desk" allowed capabilities "s", "e", "c", ...
        self.allowed = (frozenset(check_names(allowed, "allowed", "capability names", check_capability))
                        if allowed is not None else None)
        self.timeout = timeout
        self.name = name

    async def run(self, target: Runner | Caller, input: Any) -> PatternResult:
        runner = as_runner(target)
        if not isinstance(input, Mapping) or not isinstance(input.get("message"), str):
            raise ValueError("a handoff conversation starts from {'message': str, 'context': {...}}")
        # Checked before anything is recorded or called: dict() of a list or a str raised a bare TypeError or
        # ValueError about a "dictionary update sequence".
        if input.get("context") is not None and not isinstance(input["context"], Mapping):
            raise ValueError("a handoff conversation starts from {'message': str, 'context': {...}}: its context must "
                             f"be an object, not {shown(input['context'])}")
        if input.get("conversation_id") is not None and not isinstance(input["conversation_id"], str):
            raise ValueError("a handoff conversation's conversation_id must be a str, not "
                             f"{shown(input['conversation_id'])}")
        preset = str(getattr(runner, "conversation_id", "") or "")
        conv_id = str(input.get("conversation_id") or await runner.memo(
            f"{self.name}-conversation", lambda: preset or uuid.uuid4().hex))
        if isinstance(runner, DirectRunner) and not runner.conversation_id:
            runner.conversation_id = conv_id
        context: dict[str, Any] = dict(input.get("context") or {})  # an object (checked above) or none
        history: list[dict[str, Any]] = [{"role": "user", "content": input["message"]}]
        handoffs: list[dict[str, Any]] = []
        path = [self.entry]
        steps: list[StepResult] = []
        current = self.entry
        for hop in range(self.max_handoffs + 1):
            conversation = {"id": conv_id, "history": history, "context": context, "handoffs": handoffs}
            res = await runner.step(f"turn-{hop + 1}-{current}", current,
                                    {"message": input["message"], "conversation": conversation}, timeout=self.timeout,
                                    conversation_id=conv_id)
            steps.append(res)
            out = res.output
            if not isinstance(out, Mapping):
                raise AgentError(f"{current} answered {type(out).__name__}, not an object")
            if out.get("reply"):
                history.append({"role": "agent", "agent": res.agent or current, "content": str(out["reply"])})
            transfer = out.get("handoff")
            if not isinstance(transfer, Mapping):
                return PatternResult(output={**dict(out), "conversation_id": conv_id, "agent": current},
                                     steps=steps, details={"path": path, "handoffs": handoffs, "context": context})
            to, handed = transfer.get("to"), transfer.get("context")
            if not isinstance(to, str) or not to:
                raise AgentError(f"{current} handed the conversation to no capability (handoff.to: {str(to)[:80]!r})")
            if not NAME_RE.fullmatch(to):
                # Model-written text: it names the next step (`turn-N-<to>`) and its journal key, so it is checked
                # as the mesh checks capability names before anything is noted or called.
                raise AgentError(f"{current} handed the conversation to {to[:80]!r}, which is not a capability name "
                                 "([a-z0-9][a-z0-9._-]{0,62})")
            if handed is not None and not isinstance(handed, Mapping):
                raise AgentError(f"{current} handed over a context that is {type(handed).__name__}, not an object")
            if self.allowed is not None and to not in self.allowed:
                raise FailedPreconditionError(
                    f"{current} tried to hand the conversation to {to!r}, which is not allowed")
            if hop == self.max_handoffs:
                break
            context.update(handed or {})
            record = {"from": current, "to": to, "reason": str(transfer.get("reason", ""))}
            handoffs.append(record)
            await runner.note(f"handoff-{hop + 1}", record)
            path.append(to)
            current = to
        raise FailedPreconditionError(f"the conversation was handed over more than {self.max_handoffs} times "
                                      f"({' → '.join(path)})")

"""A workflow run's state: the fold of its events (`WorkflowState.replay`), the one place state changes."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hivemesh.sdk.patterns.base import TERMINAL

log = logging.getLogger(__name__)


@dataclass
class StepInfo:
    """One step as the events tell it: for `workflows show` and for replay."""

    step: str
    capability: str
    key: str = ""
    idempotent: bool = False
    status: str = "WORKING"  # WORKING, COMPLETED, FAILED, INPUT_REQUIRED
    attempts: int = 0
    started_at: float = 0.0
    ended_at: float | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        r = self.result or {}
        return {
            "step": self.step, "capability": self.capability, "status": self.status, "attempts": self.attempts,
            "agent": r.get("agent", ""), "instance": r.get("instance", ""), "idempotent": self.idempotent,
            "started_at": self.started_at, "ended_at": self.ended_at,
            "elapsed_ms": r.get("elapsed_ms") if r else (
                round((self.ended_at - self.started_at) * 1000, 2) if self.ended_at else None),
            "usage": r.get("usage"), "error": self.error,
        }


@dataclass
class WorkflowState:
    """A run's state: the fold of its events (`replay`)."""

    id: str
    definition: str = ""
    input: Any = None
    owner: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    state: str = "SUBMITTED"
    created_at: float = 0.0
    updated_at: float = 0.0
    seq: int = 0
    steps: dict[str, StepInfo] = field(default_factory=dict)
    memos: dict[str, Any] = field(default_factory=dict)
    notes: list[dict[str, Any]] = field(default_factory=list)
    escalations: dict[str, dict[str, Any]] = field(default_factory=dict)
    """step id → {"escalation_id", "reason", "resolution"?}."""
    output: Any = None
    error: dict[str, Any] | None = None
    reason: str = ""
    cancel_requested: dict[str, Any] | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)
    """Each time an orchestrator started or resumed the run: {"owner", "pid", "host", "at"}."""
    journal_bytes: int = 0
    """The stored size of the events folded in (the store counts it against its journal bound)."""

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def tokens(self) -> int:
        total = 0
        for s in self.steps.values():
            u = (s.result or {}).get("usage") or {}
            total += int(u.get("input_tokens", 0)) + int(u.get("output_tokens", 0))
        return total

    def apply(self, event: Mapping[str, Any]) -> None:
        """Fold one event into the state (the only place state changes)."""
        kind, data, at = event["type"], event.get("data") or {}, float(event.get("at", 0.0))
        self.seq = max(self.seq, int(event.get("seq", 0)))
        self.updated_at = max(self.updated_at, at)
        if self.terminal and kind not in ("note",):
            return  # nothing changes a finished run (a late event from a fenced-out owner is ignored)
        if kind == "created":
            self.definition = str(data.get("definition", ""))
            self.input = data.get("input")
            self.owner = str(data.get("owner", ""))
            self.labels = dict(data.get("labels") or {})
            self.created_at = at
            self.state = "SUBMITTED"
        elif kind == "started":
            self.runs.append({**dict(data), "at": at})
            self.state = "WORKING"
        elif kind == "step_started":
            step = str(data["step"])
            info = self.steps.get(step) or StepInfo(step, str(data.get("capability", "")))
            info.key = str(data.get("key", info.key))
            info.idempotent = bool(data.get("idempotent", info.idempotent))
            info.attempts = int(data.get("attempt", info.attempts + 1))
            info.status = "WORKING"
            info.started_at = info.started_at or at
            info.error = None
            self.steps[step] = info
        elif kind == "step_completed":
            info = self.steps.setdefault(str(data["step"]), StepInfo(str(data["step"]), ""))
            info.result = dict(data.get("result") or {})
            info.capability = info.capability or str(info.result.get("capability", ""))
            info.status = "COMPLETED" if info.result.get("state", "COMPLETED") != "INPUT_REQUIRED" else "INPUT_REQUIRED"
            info.ended_at = at
        elif kind == "step_failed":
            info = self.steps.setdefault(str(data["step"]), StepInfo(str(data["step"]), ""))
            info.status = "FAILED"
            info.error = dict(data.get("error") or {})
            info.ended_at = at
        elif kind == "memo":
            self.memos[str(data["key"])] = data.get("value")
        elif kind == "note":
            self.notes.append({"key": data.get("key"), "data": data.get("data"), "at": at})
        elif kind == "input_required":
            self.escalations[str(data["step"])] = {"escalation_id": data.get("escalation_id"),
                                                   "reason": data.get("reason", "")}
            self.state = "INPUT_REQUIRED"
        elif kind == "input_received":
            esc = self.escalations.setdefault(str(data["step"]), {})
            esc["resolution"] = data.get("escalation")
            self.state = "WORKING"
        elif kind == "cancel_requested":
            self.cancel_requested = {**dict(data), "at": at}
        elif kind == "completed":
            self.output, self.state = data.get("output"), "COMPLETED"
        elif kind == "rejected":
            self.output, self.reason, self.state = data.get("output"), str(data.get("reason", "")), "REJECTED"
        elif kind == "failed":
            self.error, self.state = dict(data.get("error") or {}), "FAILED"
            self.reason = str(self.error.get("message", ""))
        elif kind == "canceled":
            self.reason, self.state = str(data.get("reason", "")), "CANCELED"
        else:
            log.warning("workflow %s: ignoring unknown event type %r", self.id, kind)

    @classmethod
    def replay(cls, workflow_id: str, events: Sequence[Mapping[str, Any]]) -> WorkflowState:
        state = cls(workflow_id)
        for event in events:
            state.apply(event)
        return state

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id, "definition": self.definition, "state": self.state, "owner": self.owner,
            "created_at": self.created_at, "updated_at": self.updated_at, "steps": len(self.steps),
            "labels": self.labels, "tokens": self.tokens,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "input": self.input, "output": self.output, "reason": self.reason, "error": self.error,
            "step_list": [s.to_json() for s in self.steps.values()],
            "notes": self.notes, "escalations": self.escalations, "runs": self.runs,
            "cancel_requested": self.cancel_requested, "events": self.seq,
        }

"""Peer-to-peer collaboration: agents iterate on a shared draft in rounds until all approve or a round limit.

    loop = PeerReview(writer="write-draft", reviewers=["edit-draft", "fact-check"], max_rounds=3)
    result = await loop.run(mesh, {"brief": "Explain etcd leases in 100 words"})
    result.details["rounds"]    # every round: the draft, each reviewer's verdict and feedback

Each round the writer gets `{"brief", "draft", "feedback", "round"}` and answers `{"draft": ...}`; then
each reviewer, in order, gets `{"brief", "draft", "round"}` and answers `{"approved": bool, "feedback":
[...]}` (any other fields, e.g. structured corrections, are passed back to the writer with the feedback),
optionally with a revised `"draft"` that the next reviewer sees (an editor edits, a fact-checker
checks the edit). The loop ends COMPLETED when every reviewer approved the same draft in a round; at the
round limit it ends REJECTED with the last draft, or asks a person first when `ask_human_at_limit`.
Each round's state is noted as it ends (visible in `hivemesh workflows show` and to `on_round`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hivemesh.mesh.errors import AgentError
from hivemesh.sdk.patterns.base import Caller, PatternResult, Runner, StepResult, as_runner
from hivemesh.sdk.patterns.checks import (
    check_capability,
    check_count,
    check_flag,
    check_function,
    check_label,
    check_names,
    check_seconds,
)


def _as_mapping(output: Any, who: str) -> Mapping[str, Any]:
    if not isinstance(output, Mapping):
        raise AgentError(f"{who} answered {type(output).__name__}, not an object")
    return output


def _approved(value: Any, who: str) -> bool:
    """A reviewer's verdict, which must be a boolean: bool() made the text "false" (or "no") an approval."""
    if not isinstance(value, bool):
        raise AgentError(f"{who} answered approved that is {type(value).__name__}, not a boolean")
    return value


def _feedback(value: Any, who: str) -> list[Any]:
    """A reviewer's feedback as a list (one string is one item); anything else is the reviewer's mistake, said as
    such (list() of a number raised TypeError, and of a string made one item per character)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise AgentError(f"{who} answered feedback that is {type(value).__name__}, not a list")
    return value


class PeerReview:
    """Writer → reviewers, round after round, over one shared draft.

    Args:
        writer: capability that writes and revises the draft.
        reviewers: capabilities that review it, in order (each may revise the draft for the next).
        max_rounds: the round limit.
        ask_human_at_limit: at the limit without consensus, a person approves the last draft or not.
        on_round: called with each round's state as it ends (progress displays).
    """

    kind = "peer-review"

    def __init__(
        self,
        writer: str,
        reviewers: Sequence[str],
        *,
        max_rounds: int = 3,
        ask_human_at_limit: bool = False,
        timeout: float | None = 30.0,
        on_round: Callable[[Mapping[str, Any]], None] | None = None,
        name: str = "peer-review",
    ) -> None:
        check_capability(writer, "writer")
        # One name is refused, not split: PeerReview("write", "review1") had reviewers "r", "e", "v", ...
        names = check_names(reviewers, "reviewers", "capability names", check_capability)
        if not names:
            raise ValueError("a peer review needs at least one reviewer")
        if len({writer, *names}) != 1 + len(names):
            # Each is one step per round, `round-N/<capability>`: named twice, a durable run's second call replays
            # the first's answer (a writer among its reviewers "reviewed" with its own draft, never called).
            raise ValueError(f"the writer and reviewers must be distinct capabilities: {[writer, *names]}")
        check_count(max_rounds, "max_rounds", 1)
        check_flag(ask_human_at_limit, "ask_human_at_limit")
        check_seconds(timeout, "timeout")
        check_function(on_round, "on_round")
        check_label(name, "name")
        self.writer = writer
        self.reviewers = names
        self.max_rounds = max_rounds
        self.ask_human_at_limit = ask_human_at_limit
        self.timeout = timeout
        self.on_round = on_round
        self.name = name

    async def run(self, target: Runner | Caller, input: Any) -> PatternResult:
        runner = as_runner(target)
        brief = input.get("brief", input) if isinstance(input, Mapping) else input
        draft: Any = input.get("draft") if isinstance(input, Mapping) else None
        feedback: list[dict[str, Any]] = []
        rounds: list[dict[str, Any]] = []
        steps: list[StepResult] = []
        for r in range(1, self.max_rounds + 1):
            written = await runner.step(f"round-{r}/{self.writer}", self.writer,
                                        {"brief": brief, "draft": draft, "feedback": feedback, "round": r},
                                        timeout=self.timeout)
            steps.append(written)
            draft = _as_mapping(written.output, self.writer).get("draft")
            verdicts: list[dict[str, Any]] = []
            for reviewer in self.reviewers:
                reviewed = await runner.step(f"round-{r}/{reviewer}", reviewer,
                                             {"brief": brief, "draft": draft, "round": r}, timeout=self.timeout)
                steps.append(reviewed)
                out = _as_mapping(reviewed.output, reviewer)
                revised = out.get("draft")
                verdicts.append({
                    "reviewer": reviewer,
                    "agent": reviewed.agent,
                    "approved": _approved(out.get("approved", False), reviewer),
                    "feedback": _feedback(out.get("feedback"), reviewer),
                    "revised": revised is not None and revised != draft,
                    # anything else the reviewer said (e.g. structured corrections) goes back to the writer
                    "extra": {k: v for k, v in out.items() if k not in ("approved", "feedback", "draft")},
                })
                if revised is not None:
                    draft = revised
            # Consensus: every reviewer approved this round (a reviewer that approves does not revise).
            approved = all(v["approved"] for v in verdicts)
            state = {"round": r, "draft": draft, "verdicts": verdicts, "approved": approved}
            rounds.append(state)
            await runner.note(f"round-{r}", state)
            if self.on_round is not None:
                self.on_round(state)
            if approved:
                return PatternResult(output={"draft": draft, "rounds": r, "approved": True}, steps=steps,
                                     details={"rounds": rounds})
            feedback = [{"reviewer": v["reviewer"], "feedback": v["feedback"], **v["extra"]}
                        for v in verdicts if not v["approved"]]
        reason = f"no consensus after {self.max_rounds} round(s)"
        if self.ask_human_at_limit:
            info = await runner.escalate("final/human", reason, {"brief": brief, "draft": draft, "rounds": rounds})
            if info.approved:
                final = info.answer if info.answer is not None else draft
                return PatternResult(output={"draft": final, "rounds": self.max_rounds, "approved": True,
                                             "approved_by": info.resolved_by},
                                     steps=steps, details={"rounds": rounds, "escalation": info.id})
            reason = f"{reason}; a person rejected the last draft ({info.note or info.resolved_by})"
        return PatternResult(output={"draft": draft, "rounds": self.max_rounds, "approved": False}, state="REJECTED",
                             steps=steps, reason=reason, details={"rounds": rounds})

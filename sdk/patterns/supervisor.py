"""Hierarchical supervision: decompose a task, delegate each subtask by capability, review, retry or reassign,
and escalate to a person when the rules say so.

    supervisor = Supervisor(
        decompose=lambda task: [Subtask("answer", "tier1-answer", {"question": task["question"]},
                                        reassign_to=("tier2-answer", "supervisor-answer"))],
        rules=EscalationRules(min_confidence=0.7, max_errors=2, tiers=("enterprise",)),
    )
    result = await supervisor.run(mesh, {"question": "...", "tier": "enterprise"})

The escalation rules are the source design's (confidence < 0.7, a sensitive task, more than 2 errors, an
enterprise customer), all configurable, plus any policy function. A person's approval accepts the subtask's
result (or replaces it with their answer); a rejection marks the subtask rejected and the run REJECTED.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hivemesh.mesh.errors import AgentError, HivemeshError
from hivemesh.mesh.pki import NAME_RE
from hivemesh.sdk.escalation import MAX_DEADLINE_S, OnDeadline
from hivemesh.sdk.patterns.base import (
    Caller,
    PatternResult,
    Runner,
    StepResult,
    as_runner,
    error_to_json,
    why_failed,
)
from hivemesh.sdk.patterns.checks import (
    check_capability,
    check_count,
    check_flag,
    check_function,
    check_label,
    check_names,
    check_seconds,
    check_sequence,
    check_str,
    shown,
)


@dataclass(frozen=True)
class Subtask:
    """One piece of the task, delegated to the capability that serves it.

    Args:
        id: stable name within the task ([a-z0-9._-]).
        capability: who does it first.
        input: its input.
        reassign_to: capabilities to hand it to, in order, when the current one fails twice or its result is
            not good enough (low confidence or not approved by the reviewer).
        sensitive: always needs a person's approval (money, personal data, legal commitments).
    """

    id: str
    capability: str
    input: Any
    reassign_to: tuple[str, ...] = ()
    sensitive: bool = False

    def __post_init__(self) -> None:
        if not NAME_RE.fullmatch(check_str(self.id, "subtask id")):
            raise ValueError(f"subtask id {self.id!r} must match [a-z0-9][a-z0-9._-]{{0,62}}")
        check_capability(self.capability, f"subtask {self.id} capability")
        # One name is refused, not split: reassign_to="tier2" reassigned to capabilities "t", "i", "e", "r", "2".
        object.__setattr__(self, "reassign_to", check_names(self.reassign_to, f"subtask {self.id} reassign_to",
                                                            "capability names", check_capability))
        check_flag(self.sensitive, f"subtask {self.id} sensitive")

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "capability": self.capability, "input": self.input,
                "reassign_to": list(self.reassign_to), "sensitive": self.sensitive}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Subtask:
        """A subtask as `to_json` (or a decomposing agent) writes it. reassign_to must be a list and sensitive a
        boolean: tuple("tier2") reassigned to capabilities "t", "i", "e", "r" and "2", and bool("false") is True."""
        reassign, sensitive = d.get("reassign_to") or [], d.get("sensitive", False)
        if not isinstance(reassign, list | tuple) or not all(isinstance(c, str) for c in reassign):
            raise ValueError(f"reassign_to is {type(reassign).__name__}, not a list of capability names")
        if not isinstance(sensitive, bool):
            raise ValueError(f"sensitive is {type(sensitive).__name__}, not a boolean")
        return cls(str(d["id"]), str(d["capability"]), d.get("input"), tuple(map(str, reassign)), sensitive)


@dataclass(frozen=True)
class Review:
    """A reviewer's verdict on one subtask result."""

    approved: bool = True
    confidence: float | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        check_flag(self.approved, "Review approved")  # Review("no") approved before
        if self.confidence is not None and (isinstance(self.confidence, bool)
                                            or not isinstance(self.confidence, int | float)):
            raise TypeError(f"Review confidence must be a number (or None), not {shown(self.confidence)}")
        check_str(self.notes, "Review notes")


@dataclass(frozen=True)
class EscalationRules:
    """When a person must decide (each rule can be switched off).

    Args:
        min_confidence: escalate when the result's confidence is below this (None: never).
        max_errors: escalate when a subtask failed more than this many times in total (None: never).
        escalate_sensitive: escalate every sensitive subtask.
        tiers: customer tiers that always get a person (read from the task's `tier_field`).
        tier_field: where the tier is in the task input.
        policy: any other rule: (task, subtask, result output, errors) → a reason to escalate, or None.
        deadline_s / on_deadline / default_answer: what an unanswered escalation does.
    """

    min_confidence: float | None = 0.7
    max_errors: int | None = 2
    escalate_sensitive: bool = True
    tiers: tuple[str, ...] = ("enterprise",)
    tier_field: str = "tier"
    policy: Callable[[Any, Subtask, Any, int], str | None] | None = None
    deadline_s: float | None = 3600.0
    on_deadline: OnDeadline = "reject"
    default_answer: Any = None

    def __post_init__(self) -> None:
        # Each checked here, where the rules are made, not at the first escalation in the middle of a run (or never,
        # deciding wrongly: one str for tiers was a substring test, so tier "pr" was "enterprise", and from a JSON
        # document it became tiers "g", "o", "l" and "d", so tier "gold" was not escalated).
        conf = self.min_confidence
        if conf is not None and (isinstance(conf, bool) or not isinstance(conf, int | float) or not 0.0 <= conf <= 1.0):
            raise ValueError(f"min_confidence must be a number within 0..1, or None (never), not {shown(conf)}")
        if self.max_errors is not None:
            check_count(self.max_errors, "max_errors", 0)
        check_flag(self.escalate_sensitive, "escalate_sensitive")
        object.__setattr__(self, "tiers", check_names(self.tiers, "tiers", "customer tier names"))
        check_label(self.tier_field, "tier_field")
        check_function(self.policy, "policy")
        if self.deadline_s is not None and (isinstance(self.deadline_s, bool) or not (
                isinstance(self.deadline_s, int | float) and 0 < self.deadline_s <= MAX_DEADLINE_S)):
            raise ValueError(f"deadline_s must be in (0, {MAX_DEADLINE_S}] seconds, or None for no deadline")
        if self.on_deadline not in ("reject", "default"):
            raise ValueError(f"on_deadline must be 'reject' (an unanswered escalation rejects) or 'default' (it takes "
                             f"default_answer), not {shown(self.on_deadline)}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EscalationRules:
        """Rules from a JSON document (e.g. a stored policy): the same field names, policy excluded. tiers is a
        list there; one str is refused (tuple("gold") made tiers "g", "o", "l", "d")."""
        if not isinstance(d, Mapping):
            raise TypeError(f"escalation rules must be an object of rule fields, not {shown(d)}")
        known = {"min_confidence", "max_errors", "escalate_sensitive", "tiers", "tier_field", "deadline_s",
                 "on_deadline", "default_answer"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown escalation rule fields: {', '.join(sorted(map(str, unknown)))}")
        return cls(**d)

    def reason(self, task: Any, sub: Subtask, output: Any, confidence: float | None, errors: int) -> str | None:
        """Why this result needs a person, or None (the first rule that fires, in a fixed order)."""
        if self.max_errors is not None and errors > self.max_errors:
            return f"{errors} errors on subtask {sub.id} (more than {self.max_errors})"
        if self.escalate_sensitive and sub.sensitive:
            return f"subtask {sub.id} is sensitive"
        tier = task.get(self.tier_field) if isinstance(task, Mapping) else None
        if tier is not None and str(tier) in self.tiers:
            return f"customer tier {tier} always gets a person"
        if self.min_confidence is not None and confidence is not None and confidence < self.min_confidence:
            return f"confidence {confidence:.2f} is below {self.min_confidence:.2f}"
        if self.policy is not None:
            why = self.policy(task, sub, output, errors)
            if why is not None and not isinstance(why, str):
                raise TypeError(f"the escalation policy returned {shown(why)}, not a reason (a str) or None")
            return why
        return None


def _confidence(output: Any) -> float | None:
    if isinstance(output, Mapping) and isinstance(output.get("confidence"), int | float):
        return float(output["confidence"])
    return None


@dataclass
class SubtaskOutcome:
    subtask: Subtask
    output: Any = None
    status: str = "COMPLETED"  # COMPLETED, REJECTED, FAILED
    served_by: str = ""
    attempts: list[dict[str, Any]] = field(default_factory=list)
    errors: int = 0
    confidence: float | None = None
    escalation: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.subtask.id, "status": self.status, "output": self.output, "served_by": self.served_by,
                "attempts": self.attempts, "errors": self.errors, "confidence": self.confidence,
                "escalation": self.escalation}


Decompose = Callable[[Any], Sequence[Subtask]]
Reviewer = Callable[[Subtask, Any], Review]

MAX_SUBTASKS = 64
"""`Supervisor(max_subtasks=)`'s default: far more than a task's real decomposition, far fewer than a runaway one."""


class Supervisor:
    """Decompose → delegate → review → retry/reassign → escalate → combine.

    Args:
        decompose: task → subtasks (a local function; its result is memoized so a resumed run delegates the
            same subtasks), or a capability name whose output is a list of subtask objects.
        review: a local reviewer function, or a capability answering {"approved", "confidence", "notes"} for
            {"subtask", "input", "output"}; default: accept, with the output's own `confidence` if it has one.
        combine: (task, {subtask id: output}) → the run's output; default the mapping.
        rules: when to escalate to a person.
        attempts_per_assignee: tries on one capability before reassigning (errors and weak results count).
        max_subtasks: the most subtasks one decomposition may have (default `MAX_SUBTASKS`): each is delegated,
            reviewed and noted in turn, so a decomposer's answer is otherwise bounded only by the message size. A
            larger one fails the run (an AgentError naming a decomposing capability) before any subtask starts.
    """

    kind = "supervisor"

    def __init__(
        self,
        decompose: Decompose | str,
        *,
        review: Reviewer | str | None = None,
        combine: Callable[[Any, Mapping[str, Any]], Any] | None = None,
        rules: EscalationRules | None = None,
        attempts_per_assignee: int = 2,
        timeout: float | None = 30.0,
        name: str = "supervisor",
        max_subtasks: int = MAX_SUBTASKS,
    ) -> None:
        if isinstance(decompose, str):
            check_capability(decompose, "decompose")
        elif not callable(decompose):
            raise TypeError(f"decompose must be a function (task → list of Subtask) or a capability name, "
                            f"not {shown(decompose)}")
        if isinstance(review, str):
            check_capability(review, "review")
        elif review is not None and not callable(review):
            raise TypeError(f"review must be a function ((Subtask, output) → Review), a capability name or None, "
                            f"not {shown(review)}")
        check_function(combine, "combine")
        if rules is not None and not isinstance(rules, EscalationRules):
            raise TypeError(f"rules must be EscalationRules (EscalationRules.from_dict reads a JSON document), "
                            f"not {shown(rules)}")
        check_count(attempts_per_assignee, "attempts_per_assignee", 1)
        check_seconds(timeout, "timeout")
        check_label(name, "name")
        if isinstance(max_subtasks, bool) or not isinstance(max_subtasks, int) or max_subtasks < 1:
            raise ValueError(f"max_subtasks must be a positive int, not {max_subtasks!r}")
        self.max_subtasks = max_subtasks
        self.decompose = decompose
        self.review = review
        self.combine = combine
        self.rules = rules or EscalationRules()
        self.attempts_per_assignee = attempts_per_assignee
        self.timeout = timeout
        self.name = name

    async def _subtasks(self, runner: Runner, task: Any, steps: list[StepResult]) -> list[Subtask]:
        if isinstance(self.decompose, str):
            res = await runner.step("decompose", self.decompose, task, timeout=self.timeout)
            steps.append(res)
            raw = res.output
        else:
            fn = self.decompose

            def planned() -> list[dict[str, Any]]:
                out: list[dict[str, Any]] = []
                for i, sub in enumerate(check_sequence(fn(task), "decompose's result", "Subtask objects")):
                    if not isinstance(sub, Subtask):
                        raise TypeError(f"decompose returned {shown(sub)} as subtask {i}, not a Subtask")
                    out.append(sub.to_json())
                return out

            raw = await runner.memo("decompose", planned)
        # A decomposing capability's answer is an agent's (a model's): what it gets wrong is an AgentError naming
        # it, never a KeyError or TypeError from reading it; a decompose function's is the caller's own mistake.
        wrong: type[Exception] = AgentError if isinstance(self.decompose, str) else ValueError
        who = f"decompose capability {self.decompose!r}" if isinstance(self.decompose, str) else "decompose"
        if not isinstance(raw, list) or not raw:
            raise wrong(f"{who} produced no subtasks (a non-empty list of {{id, capability, input}})")
        if len(raw) > self.max_subtasks:
            raise wrong(f"{who} produced {len(raw)} subtasks, more than the {self.max_subtasks} this supervisor "
                        "allows (max_subtasks)")
        try:
            subs = [Subtask.from_json(d) for d in raw]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise wrong(f"{who} produced a subtask that is not {{id, capability, input}}: {exc!r}") from None
        if len({s.id for s in subs}) != len(subs):
            raise wrong(f"{who} produced subtask ids that are not unique")
        return subs

    async def _review(self, runner: Runner, sub: Subtask, output: Any, step_id: str,
                      steps: list[StepResult]) -> Review:
        if self.review is None:
            return Review(True, _confidence(output))
        if isinstance(self.review, str):
            res = await runner.step(step_id, self.review, {"subtask": sub.id, "input": sub.input, "output": output},
                                    timeout=self.timeout)
            steps.append(res)
            # A verdict the reviewer did not give is not an approval: an answer that is no object (prose saying
            # REJECTED) or an `approved` that is no boolean (the text "false") approved the result before.
            out, who = res.output, f"review capability {self.review!r}"
            if not isinstance(out, Mapping):
                raise AgentError(f"{who} answered {type(out).__name__}, not {{approved, confidence, notes}}")
            approved, conf = out.get("approved", True), out.get("confidence")
            if not isinstance(approved, bool):
                raise AgentError(f"{who} answered approved that is {type(approved).__name__}, not a boolean")
            if conf is not None and (isinstance(conf, bool) or not isinstance(conf, int | float)):
                raise AgentError(f"{who} answered confidence that is {type(conf).__name__}, not a number")
            return Review(approved, float(conf) if conf is not None else None, str(out.get("notes", "")))
        verdict = self.review(sub, output)
        if not isinstance(verdict, Review):
            raise TypeError(f"the review function returned {shown(verdict)} for subtask {sub.id}, not a Review "
                            "(Review(approved, confidence, notes))")
        return verdict

    async def _delegate(self, runner: Runner, task: Any, sub: Subtask, steps: list[StepResult]) -> SubtaskOutcome:
        outcome = SubtaskOutcome(sub)
        assignees = (sub.capability, *sub.reassign_to)
        best: tuple[Any, float | None, str] | None = None
        accepted = False
        for a_index, capability in enumerate(assignees):
            for attempt in range(1, self.attempts_per_assignee + 1):
                step_id = f"{sub.id}/{a_index + 1}-{capability}/try-{attempt}"
                try:
                    res = await runner.step(step_id, capability, sub.input, timeout=self.timeout)
                except HivemeshError as err:  # an error: retry this assignee, then reassign
                    outcome.errors += 1
                    outcome.attempts.append({"capability": capability, "error": error_to_json(err)})
                    continue
                steps.append(res)
                review = await self._review(runner, sub, res.output, f"{step_id}/review", steps)
                conf = review.confidence if review.confidence is not None else _confidence(res.output)
                outcome.attempts.append({"capability": capability, "approved": review.approved, "confidence": conf})
                accepted = review.approved and (self.rules.min_confidence is None or conf is None
                                                or conf >= self.rules.min_confidence)
                if accepted or best is None or (review.approved and (conf or 0.0) > (best[1] or 0.0)):
                    best = (res.output, conf, res.agent or capability)
                break  # an answer: good enough, or weak (then the next assignee gets it)
            if accepted:
                break
        if best is None:
            outcome.status = "FAILED"
        else:
            outcome.output, outcome.confidence, outcome.served_by = best
        reason = self.rules.reason(task, sub, outcome.output, outcome.confidence, outcome.errors)
        if reason is None and best is not None and not accepted:
            reason = f"no assignee's result for {sub.id} passed review"
        if best is None and reason is None:
            return outcome  # every assignee failed and no rule sends it to a person
        if reason is not None:
            info = await runner.escalate(
                f"{sub.id}/human",
                reason,
                {"task": task, "subtask": sub.to_json(), "proposed": outcome.output, "confidence": outcome.confidence,
                 "attempts": outcome.attempts},
                deadline_s=self.rules.deadline_s, on_deadline=self.rules.on_deadline,
                default_answer=self.rules.default_answer, labels={"subtask": sub.id[:63]},
            )
            outcome.escalation = {"id": info.id, "reason": reason, "status": info.status, "note": info.note,
                                  "resolved_by": info.resolved_by}
            if info.approved:
                outcome.status = "COMPLETED"
                if info.answer is not None:
                    outcome.output = info.answer
                    outcome.served_by = info.resolved_by
            else:
                outcome.status = "REJECTED"
        return outcome

    async def run(self, target: Runner | Caller, input: Any) -> PatternResult:
        runner = as_runner(target)
        steps: list[StepResult] = []
        subs = await self._subtasks(runner, input, steps)
        outcomes = [await self._delegate(runner, input, sub, steps) for sub in subs]
        for o in outcomes:
            await runner.note(f"subtask-{o.subtask.id}", o.to_json())
        accepted = {o.subtask.id: o.output for o in outcomes if o.status == "COMPLETED"}
        rejected = [o.subtask.id for o in outcomes if o.status == "REJECTED"]
        failed = [o.subtask.id for o in outcomes if o.status == "FAILED"]
        output = self.combine(input, accepted) if self.combine is not None else accepted
        details = {"subtasks": [o.to_json() for o in outcomes], "rejected": rejected, "failed": failed,
                   "escalations": [o.escalation for o in outcomes if o.escalation]}
        if failed:
            first = next(o for o in outcomes if o.status == "FAILED")
            errors = [a["error"] for a in first.attempts if "error" in a]
            why = f"; {first.subtask.id}: {why_failed(errors[-1])}" if errors else ""  # its last assignee's error
            return PatternResult(output=output, state="FAILED", steps=steps,
                                 reason=f"failed: {', '.join(failed)}{why}", details=details)
        if rejected:
            return PatternResult(output=output, state="REJECTED", steps=steps,
                                 reason=f"a person rejected: {', '.join(rejected)}", details=details)
        return PatternResult(output=output, steps=steps, details=details)

"""Sequential pipeline: each step is a capability; each output feeds the next; a validation step can stop it.

    pipeline = Pipeline([
        Step("ocr"),
        Step("extract", input=lambda prev, ctx: {"text": prev["text"]}),
        Step("validate", stop_if=lambda out: None if out["valid"] else "; ".join(e["message"] for e in out["errors"])),
        Step("store"),
    ])
    result = await pipeline.run(mesh, {"sample": "invoice-001"})   # result.state: COMPLETED or REJECTED
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hivemesh.mesh.pki import NAME_RE
from hivemesh.sdk.patterns.base import Caller, PatternResult, Runner, StepResult, as_runner, call_with_escalation
from hivemesh.sdk.patterns.checks import (
    check_capability,
    check_flag,
    check_function,
    check_label,
    check_seconds,
    check_sequence,
    check_str,
    shown,
)


@dataclass(frozen=True)
class PipelineContext:
    """What an input function sees: the pipeline's input and every earlier step's output by step name."""

    input: Any
    outputs: Mapping[str, Any]


@dataclass(frozen=True)
class Step:
    """One pipeline step.

    Args:
        capability: what to call.
        name: the step's name (its id in a workflow); default the capability.
        input: builds this step's input from the previous output (and the PipelineContext); default: the
            previous output as it is (the pipeline's input for the first step).
        stop_if: a validation check on this step's output: return a reason to stop the pipeline (it ends
            REJECTED with that reason), or None to go on.
        timeout: this step's deadline in seconds.
        ask_human: if the agent answers INPUT_REQUIRED, escalate to a person and re-call with the answer.
    """

    capability: str
    name: str = ""
    input: Callable[[Any, PipelineContext], Any] | None = None
    stop_if: Callable[[Any], str | None] | None = None
    timeout: float | None = None
    ask_human: bool = True

    def __post_init__(self) -> None:
        check_capability(self.capability, "step capability")
        if check_str(self.name, "step name") and not NAME_RE.fullmatch(self.name):
            raise ValueError(f"step name {self.name!r} must match [a-z0-9][a-z0-9._-]{{0,62}}")
        check_function(self.input, f"step {self.id} input")
        check_function(self.stop_if, f"step {self.id} stop_if")
        check_seconds(self.timeout, f"step {self.id} timeout")
        check_flag(self.ask_human, f"step {self.id} ask_human")

    @property
    def id(self) -> str:
        return self.name or self.capability


def _step(value: object, what: str) -> Step:
    """A pipeline step as given: a Step, or a capability name."""
    if isinstance(value, Step):
        return value
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a Step or a capability name, not {shown(value)}")
    return Step(value)


class Pipeline:
    """Run steps in order; the first failure raises (typed), a validation stop ends the run REJECTED."""

    kind = "pipeline"

    def __init__(self, steps: Sequence[Step | str], *, name: str = "pipeline",
                 output: Callable[[PipelineContext], Any] | None = None) -> None:
        # One name is refused, not split: Pipeline("ocr") was steps "o", "c" and "r".
        self.steps = tuple(_step(s, f"steps[{i}]") for i, s in
                           enumerate(check_sequence(steps, "steps", "Step objects or capability names")))
        if not self.steps:
            raise ValueError("a pipeline needs at least one step")
        ids = [s.id for s in self.steps]
        if len(set(ids)) != len(ids):
            raise ValueError(f"pipeline step names must be unique: {ids}")
        check_label(name, "name")
        check_function(output, "output")
        self.name = name
        self._output = output

    async def run(self, target: Runner | Caller, input: Any) -> PatternResult:
        runner = as_runner(target)
        outputs: dict[str, Any] = {}
        done: list[StepResult] = []
        previous = input
        for index, step in enumerate(self.steps):
            ctx = PipelineContext(input, dict(outputs))
            payload = step.input(previous, ctx) if step.input is not None else previous
            step_id = f"{index + 1:02d}-{step.id}"
            if step.ask_human:
                result, _ = await call_with_escalation(runner, step_id, step.capability, payload, timeout=step.timeout)
            else:
                result = await runner.step(step_id, step.capability, payload, timeout=step.timeout)
            done.append(result)
            outputs[step.id] = result.output
            previous = result.output
            if step.stop_if is not None:
                reason = step.stop_if(result.output)
                if reason is not None and not isinstance(reason, str):
                    raise TypeError(f"step {step.id} stop_if returned {shown(reason)}, not a reason to stop (a str) "
                                    "or None to go on")
                if reason:
                    await runner.note(f"stopped-at-{step.id}", {"step": step.id, "reason": reason})
                    return PatternResult(output=result.output, state="REJECTED", steps=done, reason=reason,
                                         details={"stopped_at": step.id, "outputs": outputs})
        final = self._output(PipelineContext(input, outputs)) if self._output is not None else previous
        return PatternResult(output=final, steps=done, details={"outputs": outputs})

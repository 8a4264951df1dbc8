"""Parallel fan-out / fan-in: call several capabilities (or every instance of one) at once, aggregate the results.

    research = FanOut(["search-papers", "search-news", "search-wiki"], aggregate=merge, branch_timeout=5)
    result = await research.run(mesh, {"query": "event sourcing"})
    result.output              # merge({branch: output}) over the branches that answered
    result.details["failed"]   # {branch: {"reason": ..., "message": ...}} for the ones that did not

Graceful degradation by default: a failed or late branch is named in the result and the rest is
aggregated (the run fails only when fewer than `min_success` branches answered). `fail_fast=True` cancels
the other branches at the first failure and raises it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hivemesh.mesh.errors import AgentError, DeadlineExceededError, HivemeshError
from hivemesh.mesh.instance_ref import instance_key
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
    check_seconds,
    check_sequence,
    shown,
)
from hivemesh.v1 import mesh_pb2


class FanOutError(HivemeshError):
    """Too few branches answered (or, fail-fast, one failed); `failed` names each failed branch and why."""

    def __init__(self, message: str, failed: Mapping[str, Mapping[str, Any]], first: HivemeshError | None = None):
        super().__init__(message, metadata={"failed": ",".join(sorted(failed))[:500]},
                         code=first.code if first else None, reason=first.reason if first else None)
        self.failed = dict(failed)


@dataclass(frozen=True)
class Branch:
    """One branch: a capability (or one instance of it) and how to build its input from the fan-out's input."""

    capability: str
    name: str = ""
    input: Callable[[Any], Any] | None = None
    timeout: float | None = None

    def __post_init__(self) -> None:
        check_capability(self.capability, "branch capability")
        if not isinstance(self.name, str):
            raise TypeError(f"branch name must be a str, not {shown(self.name)}")
        check_function(self.input, f"branch {self.id} input")
        check_seconds(self.timeout, f"branch {self.id} timeout")

    @property
    def id(self) -> str:
        return self.name or self.capability


Aggregate = Callable[[Mapping[str, Any]], Any]


def _branch(value: object, what: str) -> Branch:
    """A FanOut branch as given: a Branch, or a capability name."""
    if isinstance(value, Branch):
        return value
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a Branch or a capability name, not {shown(value)}")
    return Branch(value)


def _planned_instance(
    key: str, live: Mapping[str, mesh_pb2.AgentInstance]
) -> tuple[mesh_pb2.AgentInstance | None, dict[str, str] | None]:
    """The live instance a plan's key names, else why the branch fails. A key with no "/" is a bare instance id
    from a plan memoized before keys named the agent too: a run started then and resumed now must still reach
    its instances, so it names the one live instance with that id; with several it is ambiguous, and guessing
    could send the branch to another agent."""
    if "/" not in key:
        matches = sorted(k for k in live if k.rpartition("/")[2] == key)
        if len(matches) > 1:
            return None, {"code": "FAILED_PRECONDITION", "reason": "AMBIGUOUS_INSTANCE",
                          "message": f"instance {key} is ambiguous: this run's plan predates agent-qualified "
                                     f"instance keys (agent/instance id), and {len(matches)} live instances have "
                                     f"the id {key}: {', '.join(matches)}"}
        key = matches[0] if matches else key
    instance = live.get(key)
    if instance is None:
        return None, {"code": "UNAVAILABLE", "reason": "NO_LIVE_INSTANCE", "message": f"instance {key} is gone"}
    return instance, None


class FanOut:
    """Run branches concurrently, each with its own deadline, and aggregate what comes back.

    Args:
        branches: capabilities or Branch objects (mutually exclusive with all_instances_of).
        all_instances_of: call every live instance of this capability (e.g. shards, replicas to compare).
        aggregate: {branch: output} → output; default: the mapping itself.
        branch_timeout: per-branch deadline in seconds (a late branch counts as failed: DEADLINE_EXCEEDED).
        fail_fast: cancel the others and raise at the first failure.
        min_success: fewest branches that must answer (default 1), else FanOutError.
    """

    kind = "fanout"

    def __init__(
        self,
        branches: Sequence[Branch | str] = (),
        *,
        all_instances_of: str | None = None,
        aggregate: Aggregate | None = None,
        branch_timeout: float | None = 10.0,
        fail_fast: bool = False,
        min_success: int = 1,
        name: str = "fanout",
    ) -> None:
        self.branches = tuple(_branch(b, f"branches[{i}]") for i, b in
                              enumerate(check_sequence(branches, "branches", "capability names or Branch objects")))
        if all_instances_of is not None:
            check_capability(all_instances_of, "all_instances_of")
        if bool(self.branches) == bool(all_instances_of):
            raise ValueError("give either branches or all_instances_of")
        ids = [b.id for b in self.branches]
        if len(set(ids)) != len(ids):
            raise ValueError(f"branch names must be unique: {ids}")
        check_function(aggregate, "aggregate")
        check_seconds(branch_timeout, "branch_timeout")
        check_flag(fail_fast, "fail_fast")
        check_count(min_success, "min_success", 0)
        check_label(name, "name")
        if self.branches and min_success > len(self.branches):
            # Else every branch is called (side effects and all) only to fail "too few answered" at the end.
            raise ValueError(f"min_success {min_success} is more than the {len(self.branches)} branches given")
        self.all_instances_of = all_instances_of
        self.aggregate = aggregate
        self.branch_timeout = branch_timeout
        self.fail_fast = fail_fast
        self.min_success = min_success
        self.name = name

    async def _plan(self, runner: Runner) -> list[tuple[str, str, str]]:
        """(branch id, capability, instance key or "") — memoized, so a resumed run fans out to the same set. An
        instance is named by agent and id ("cap@agent/id"): two agents may each have an instance "w-1". A plan
        memoized before that holds bare ids ("cap@w-1"); it is kept as it is (results are keyed by its branch ids)
        and its keys are resolved at run time (`_planned_instance`)."""
        if self.all_instances_of is None:
            return [(b.id, b.capability, "") for b in self.branches]
        cap = self.all_instances_of

        def listing() -> list[list[str]]:
            return [[f"{cap}@{key}", cap, key] for key in map(instance_key, runner.instances(cap))]

        plan = await runner.memo(f"{self.name}-instances", listing)
        return [(str(a), str(b), str(c)) for a, b, c in plan]

    async def run(self, target: Runner | Caller, input: Any) -> PatternResult:
        runner = as_runner(target)
        plan = await self._plan(runner)
        by_id = {b.id: b for b in self.branches}
        live = {instance_key(i): i for i in runner.instances(self.all_instances_of)} if self.all_instances_of else {}
        results: dict[str, StepResult] = {}
        failed: dict[str, dict[str, Any]] = {}
        first_error: list[tuple[str, HivemeshError]] = []

        async def branch(branch_id: str, capability: str, key: str) -> None:
            spec = by_id.get(branch_id)
            timeout = spec.timeout if spec is not None and spec.timeout is not None else self.branch_timeout
            instance = None
            if key:
                instance, why = _planned_instance(key, live)
                if why is not None and not runner.recorded(f"branch-{branch_id}"):  # else replayed: no call
                    failed[branch_id] = why
                    return
            try:
                try:
                    payload = spec.input(input) if spec is not None and spec.input is not None else input
                except Exception as exc:  # the branch's own code, its input function
                    raise AgentError(f"branch {branch_id} raised {type(exc).__name__}: {exc}") from exc
                try:
                    results[branch_id] = await runner.step(f"branch-{branch_id}", capability, payload,
                                                           timeout=timeout, instance=instance)
                except (TypeError, ValueError) as exc:  # an input that is no JSON
                    raise AgentError(f"branch {branch_id} raised {type(exc).__name__}: {exc}") from exc
                # Anything else the runner raises is not this branch's answer but the run's trouble (a workflow
                # whose etcd did not answer): it leaves the fan-out, so the engine replays the run. Recorded as
                # the branch failing, a branch that had answered was dropped from a durable run's result.
            except HivemeshError as err:
                if isinstance(err, DeadlineExceededError):
                    err.message = f"branch {branch_id} missed its {timeout} s deadline: {err.message}"
                failed[branch_id] = error_to_json(err)
                first_error.append((branch_id, err))
                if self.fail_fast:
                    raise

        tasks = [asyncio.ensure_future(branch(*p)) for p in plan]
        try:
            if tasks:  # (none: every instance of a capability, and it has none)
                # A branch raises only at fail-fast's first failure, or with trouble that is the run's (above).
                await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            # That, or the caller cancelling this run: the other branches are cancelled and awaited here, so none
            # is still calling for nobody once run returns or raises (cancelling without waiting left them running
            # past a cancelled run) and every outcome is retrieved.
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        errors = [t.exception() for t in tasks if not t.cancelled() and t.exception() is not None]
        trouble = next((e for e in errors if not isinstance(e, HivemeshError)), None)
        if trouble is not None:
            raise trouble
        if errors:  # fail-fast
            name, err = first_error[0]
            raise FanOutError(f"fan-out branch {name} failed: {err.message}", failed, err)
        outputs = {b: results[b].output for b, _, _ in plan if b in results}
        if len(outputs) < self.min_success:
            names = ", ".join(sorted(failed)) or "none"
            why = f"; {first_error[0][0]}: {why_failed(first_error[0][1])}" if first_error else ""
            raise FanOutError(f"only {len(outputs)} of {len(plan)} branches answered (failed: {names}){why}", failed,
                              first_error[0][1] if first_error else None)
        output = self.aggregate(outputs) if self.aggregate is not None else outputs
        steps = [results[b] for b, _, _ in plan if b in results]
        details = {"branches": [b for b, _, _ in plan], "succeeded": sorted(outputs), "failed": failed,
                   "partial": bool(failed)}
        return PatternResult(output=output, steps=steps, details=details)

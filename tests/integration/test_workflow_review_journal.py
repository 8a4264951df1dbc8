"""What a durable run's journal cannot hold, and bodies that cannot run, over the real mesh and etcd.

- A step whose outcome the journal refuses (an answer over the event limit, a journal past its bound) is the
  run's failure, not the step's: a Supervisor retried it under a new idempotency key (a non-idempotent charge
  ran twice), a FanOut recorded the answered branch as failed and the run COMPLETED.
- A definition that is not async (a sync function, a lambda, a pattern whose run is sync) was accepted and its
  run stayed WORKING for ever; a recorded one that no longer starts made `workflows resume` print a traceback.
- NaN, an infinity or a key that is not text (at any depth) in a run's input, output, memo or note was stored
  (NaN then printed bare by `workflows show --json`, `{1: "a"}` read back as `{"1": "a"}`).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from hivemesh.mesh.errors import InvalidInputError, NotFoundError
from hivemesh.sdk import Agent, Context, capability
from hivemesh.sdk.patterns import EscalationRules, FanOut, Runner, Subtask, Supervisor
from hivemesh.sdk.workflow import WorkflowEngine, WorkflowRun, WorkflowState
from hivemesh.sdk.workflow.store import MAX_EVENT_BYTES
from tests.support.orch_env import Orch

pytestmark = pytest.mark.timeout(120)

RECEIPT_BYTES = 600_000
"""A `bill` answer this big makes a step_completed event past the journal's event limit."""
assert RECEIPT_BYTES > MAX_EVENT_BYTES


class Biller(Agent):
    """`bill` is not idempotent and counts every effect; its receipt is as big as the input asks."""

    name = "biller"

    def __init__(self) -> None:
        super().__init__()
        self.effects: list[str] = []

    @capability(description="Bill an account: NOT idempotent, every effect is recorded")
    async def bill(self, req: dict[str, Any], ctx: Context) -> dict[str, Any]:
        self.effects.append(ctx.idempotency_key)
        return {"receipt": "r" * int(req.get("size", RECEIPT_BYTES))}

    @capability(description="A small answer", idempotent=True)
    async def tally(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}


NO_PERSON = EscalationRules(min_confidence=None, max_errors=None, escalate_sensitive=False, tiers=())
SUPERVISED = Supervisor(lambda task: [Subtask("bill", "bill", task)], rules=NO_PERSON)
"""Two tries per assignee: a step failure is tried again under a new step id and idempotency key."""
FANNED = FanOut(["bill", "tally"])
"""One branch may fail and the run still complete (min_success=1)."""


async def plain_bill(run: Runner, inp: Any) -> Any:
    return (await run.step("bill", "bill", inp)).output


def sync_body(run: Any, inp: Any) -> Any:
    return {"sync": True}


class SyncPattern:
    """A pattern-like object whose run is not async."""

    def run(self, target: Any, input: Any) -> Any:
        return {"sync": True}


async def takes_one(run: Any) -> Any:
    """Async, but not (run, input): its call fails when the run starts."""
    return 1


async def fill_then_ask(run: WorkflowRun, bound: int) -> Any:
    """Fills the journal to just under its bound (room for no escalation event), then asks a person."""
    await run.memo("filler", lambda: "y" * (bound - run.state.journal_bytes - 150))
    return (await run.escalate("approve", "approve?", {"x": 1})).status


async def echo(run: WorkflowRun, input: Any) -> Any:
    return {"input": input}


def bad_value(which: str) -> Any:
    """Values JSON would not hold as they are (built in the body: a run's input cannot carry them)."""
    return {"nan": {"score": math.nan}, "inf": [1.0, -math.inf], "int-key": {1: "a"},
            "deep-key": {"a": [{2.5: "x"}]}}[which]


BAD_WHERE = {"nan": "score", "inf": "[1]", "int-key": "", "deep-key": "a[0]"}
"""Where each bad_value is wrong, below the field that holds it."""


async def memo_bad(run: WorkflowRun, which: str) -> Any:
    await run.memo("m", lambda: bad_value(which))
    return "recorded"


async def note_bad(run: WorkflowRun, which: str) -> Any:
    await run.note("n", {"v": bad_value(which)})
    return "noted"


async def output_bad(run: WorkflowRun, which: str) -> Any:
    return bad_value(which)


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise AssertionError(f"not JSON: a bare {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(("size", "bound", "code", "says"), [
    (RECEIPT_BYTES, None, "INVALID_ARGUMENT", f"the limit is {MAX_EVENT_BYTES}"),
    (100_000, 60_000, "RESOURCE_EXHAUSTED", "would pass the bound of 60000"),
], ids=["event-too-big", "journal-full"])
async def test_a_step_outcome_the_journal_refuses_fails_the_run_and_its_effect_happens_once(
        orch: Orch, size: int, bound: int | None, code: str, says: str) -> None:
    biller = Biller()
    await orch.serve(biller)
    kwargs = {} if bound is None else {"max_journal_bytes": bound}
    async with WorkflowEngine(orch.mesh, **kwargs) as engine:
        for name, definition in (("supervisor", SUPERVISED), ("fanout", FANNED), ("plain", plain_bill)):
            biller.effects.clear()
            state = await engine.run(definition, {"account": "a", "size": size}, workflow_id=f"wf-{name}")
            # Before: the Supervisor billed twice and failed PATTERN_FAILED; the FanOut COMPLETED without the branch.
            assert state.state == "FAILED", (name, state.state, state.error)
            assert state.error is not None and state.error["code"] == code, (name, state.error)
            assert says in state.error["message"], (name, state.error)
            assert len(biller.effects) == 1, (name, biller.effects)
            assert not state.notes, (name, state.notes)  # the pattern did not go on as if the step had failed
            assert await engine.store.owner(state.id) is None
        assert await engine.resume_all() == []


async def test_an_escalation_the_journal_cannot_record_is_withdrawn_with_the_failed_run(orch: Orch) -> None:
    bound = 20_000
    async with WorkflowEngine(orch.mesh, max_journal_bytes=bound) as engine:
        state = await engine.run(fill_then_ask, bound, workflow_id="wf-ask-full")
        assert state.state == "FAILED", (state.state, state.error)
        assert state.error is not None and state.error["reason"] == "WORKFLOW_JOURNAL_FULL", state.error
        assert "input_required" in state.error["message"], state.error
        asked = await engine.escalations.list(workflow_id=state.id)
        # Before: left PENDING, a person asked about a run that had already failed (and not recorded it).
        assert [info.status for info in asked] == ["CANCELED"], asked


async def test_a_definition_that_is_not_async_is_refused_before_anything_is_written(orch: Orch) -> None:
    async with WorkflowEngine(orch.mesh) as engine:
        bad: list[Any] = [sync_body, lambda r, i: 5, SyncPattern(), f"{__name__}:sync_body", 42]
        for n, definition in enumerate(bad):
            wid = f"wf-sync-{n}"
            for start in (engine.submit, engine.run):
                with pytest.raises(InvalidInputError) as refused:
                    await start(definition, {}, workflow_id=wid)
                assert "pattern object" in refused.value.message and "async function" in refused.value.message, (
                    refused.value.message)
                assert "definition" in refused.value.field_violations
            with pytest.raises(NotFoundError):
                await engine.get(wid)
        with pytest.raises(InvalidInputError):  # an explicit definition to resume with: the caller's mistake
            await engine.resume("wf-none", definition=sync_body)
        assert await engine.list() == []


async def test_a_run_whose_body_cannot_start_fails_instead_of_staying_working(orch: Orch) -> None:
    async with WorkflowEngine(orch.mesh) as engine:
        # Accepted (async), but called with (run, input) it raises TypeError before its body starts.
        state = await engine.run(takes_one, {}, workflow_id="wf-arity")
        assert state.state == "FAILED", (state.state, state.error)
        assert state.error is not None and state.error["code"] == "INVALID_ARGUMENT", state.error
        assert "could not start: TypeError" in state.error["message"], state.error

        # Recorded when its definition was async; it resolves to a sync function now.
        wid = engine.run_id_for("wf-now-sync")
        await engine.store.create(WorkflowState(wid), {"definition": f"{__name__}:sync_body", "input": {},
                                                       "owner": engine.owner, "labels": {}})
        state = await (await engine.resume(wid, wait_s=0)).result(timeout=30)
        assert state.state == "FAILED", (state.state, state.error)
        assert state.error is not None and state.error["code"] == "INVALID_ARGUMENT", state.error
        assert f"{__name__}:sync_body" in state.error["message"] and "not async" in state.error["message"]
        assert await engine.store.owner(wid) is None

        # The CLI resumes such a run to FAILED, with no traceback.
        cli_wid = engine.run_id_for("wf-cli-sync")
        await engine.store.create(WorkflowState(cli_wid), {"definition": f"{__name__}:sync_body", "input": {},
                                                           "owner": engine.owner, "labels": {}})
    proc = await orch.hivemesh("workflows", "resume", cli_wid, "--wait-lock", "0", "--json")
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    resumed = _strict_json(proc.stdout)
    assert resumed["state"] == "FAILED" and "not async" in resumed["error"]["message"], resumed


async def test_an_input_with_nan_or_a_key_that_is_not_text_is_refused_naming_where(orch: Orch) -> None:
    bad: list[tuple[Any, str]] = [
        ({"x": math.nan}, "input.x"), ({"x": [1.0, math.inf]}, "input.x[1]"), (-math.inf, "input"),
        ({1: "a"}, "input"), ({"a": [{2: "x"}]}, "input.a[0]"), ({"a": {None: 1}}, "input.a"), ({True: 1}, "input"),
    ]
    async with WorkflowEngine(orch.mesh) as engine:
        for value, where in bad:
            with pytest.raises(InvalidInputError) as refused:
                await engine.submit(echo, value, workflow_id="wf-badin")
            assert where in refused.value.field_violations, (value, refused.value.field_violations)
            assert "plain JSON" in refused.value.message, refused.value.message
            with pytest.raises(NotFoundError):
                await engine.get("wf-badin")
        assert await engine.list() == []


async def test_a_memo_note_or_output_with_nan_or_a_key_that_is_not_text_fails_the_run_unrecorded(orch: Orch) -> None:
    async with WorkflowEngine(orch.mesh) as engine:
        for body, field in ((memo_bad, "value"), (note_bad, "data.v"), (output_bad, "output")):
            for which, below in BAD_WHERE.items():
                wid = f"wf-{body.__name__.replace('_', '-')}-{which}"
                state = await engine.run(body, which, workflow_id=wid)
                assert state.state == "FAILED", (wid, state.state, state.output)
                assert state.error is not None and state.error["code"] == "INVALID_ARGUMENT", (wid, state.error)
                where = field + (("" if below.startswith("[") else ".") + below if below else "")
                assert where in state.error.get("field_violations", {}), (wid, where, state.error)
                assert state.memos == {} and state.notes == [] and state.output is None, wid
                kinds = {ev["type"] for ev in await engine.store.events(state.id)}
                assert not kinds & {"memo", "note", "completed"}, (wid, kinds)
    shown = await orch.hivemesh("workflows", "show", "wf-output-bad-nan", "--json")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert _strict_json(shown.stdout)["state"] == "FAILED"

"""`hivemesh workflows ...` and `hivemesh escalations ...`: durable runs and the human escalation queue.

Workflows are read from etcd (their events) as the operator, whose etcd role reads every owner's runs; a run id
is `<kind>-<name>/<local>` (its owner first), and a bare local id is accepted when one owner uses it. Resuming a
run drives it in this process as the operator.
Escalations go through the control plane's Escalations service over mutual TLS as the operator, so
resolving one is authenticated and audited like any other control-plane call.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import click

from hivemesh.controlplane.cli.context import CliContext, as_operator, err, friendly_errors, out, pass_cli, run_async
from hivemesh.controlplane.cli.output import clean, escape, new_table
from hivemesh.mesh import json_depth
from hivemesh.mesh.errors import FailedPreconditionError
from hivemesh.mesh.keyspace import TERMINAL_RUN_STATES
from hivemesh.mesh.settings import MeshSettings

T = TypeVar("T")

RUN_STATES: Final = ("SUBMITTED", "WORKING", "INPUT_REQUIRED", *sorted(TERMINAL_RUN_STATES))
"""Every state a run's summary can hold (`WorkflowState.apply`): `list --state` takes one of these, so a typo is a
usage error, not an empty list."""


class _RunState(click.Choice):  # type: ignore[type-arg]  # generic only from click 8.2 on
    """One of RUN_STATES in any case, named in help and errors as runs show it (upper case), where click 8.2+
    would list a case-insensitive choice folded to lower case."""

    def __init__(self) -> None:
        super().__init__(RUN_STATES, case_sensitive=False)

    def normalize_choice(self, choice: object, ctx: click.Context | None) -> str:
        return str(choice).upper()


def _when(ts: Any) -> str:
    """A time of day for a unix time; "-" for none, "?" for what is not one (a summary holds what its run's
    workload wrote: text, a number past any date, NaN)."""
    if ts is None or ts == 0:
        return "-"
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        return "?"
    try:
        return datetime.datetime.fromtimestamp(ts).strftime("%H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return "?"


async def _index(store: Any, owner: str | None) -> list[dict[str, Any]]:
    """The run index (every owner's, or owner's), read as stored rather than through `WorkflowStore.list`: an
    entry that is not a run's summary (`summary_problem`) becomes `{"id", "malformed": why}` for the list to show
    as such, where `list` would rebuild it or leave it out. Well-formed summaries come first, newest first; then
    the malformed ones, by id."""
    from hivemesh.sdk.workflow.store import summary_problem

    good: list[dict[str, Any]] = []
    malformed: list[dict[str, Any]] = []
    for wid, summary in await store.index(owner):
        problem = "not JSON" if summary is None else summary_problem(wid, summary)
        if problem:
            malformed.append({"id": wid, "malformed": problem})
        else:
            good.append(summary)
    good.sort(key=lambda s: (-float(s["created_at"]), s["id"]))
    return good + sorted(malformed, key=lambda s: str(s["id"]))


async def _with_store(settings: MeshSettings, fn: Callable[[Any], Awaitable[T]]) -> T:
    from hivemesh.mesh.etcd import client, wait_connected
    from hivemesh.sdk.workflow import WorkflowStore

    etcd = client(settings.etcd_access())
    try:
        await wait_connected(etcd, timeout=5.0)
        return await fn(WorkflowStore(etcd))
    finally:
        await etcd.close()


def _operator_id(obj: CliContext) -> str:
    from hivemesh.mesh.tls import load_workload_files

    try:
        return load_workload_files(obj.certs_dir / "operator.pem", obj.certs_dir / "operator.key",
                                   obj.certs_dir / "ca.pem").spiffe_id
    except (OSError, ValueError):
        return "operator"


# --- workflows -------------------------------------------------------------------------------------------------
@click.group()
def workflows() -> None:
    """Durable workflow runs: list, show, cancel, resume."""


@workflows.command("list")
@click.option("--state", type=_RunState(), default=None, help="Only runs in this state (any case).")
@click.option("--owner", default=None, help="Only the runs of this workload, as <kind>-<name> (e.g. client-orders).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_cli
@friendly_errors
def workflows_list(obj: CliContext, state: str | None, owner: str | None, as_json: bool) -> None:
    """List workflow runs (every owner's), newest first."""
    settings = obj.operator_settings()
    if owner is not None:
        from hivemesh.mesh.run_ids import parse_run_id

        try:
            owner = parse_run_id(f"{owner}/x").owner
        except ValueError:
            raise click.BadParameter(f"{owner!r} is not <kind>-<name> (kind agent, client or operator)",
                                     param_hint="--owner") from None
    rows = run_async(_with_store(settings, lambda s: _index(s, owner)))
    if state:  # a malformed entry has no state to filter on: it stays listed, so it is seen
        rows = [r for r in rows if "malformed" in r or r.get("state") == state]  # Choice gives it as listed
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        out.print("no workflow runs")
        return
    table = new_table("id", "state", "definition", "steps", "tokens", "owner", "created", "updated")
    for r in rows:
        if "malformed" in r:
            table.add_row(r["id"], "?", f"(malformed index entry: {r['malformed']})", "", "", "", "", "")
            continue
        owner = str(r.get("owner") or "").rsplit("/", 1)[-1]
        table.add_row(r["id"], r["state"], r.get("definition") or "", str(r.get("steps") or 0),
                      str(r.get("tokens") or 0), owner, _when(r.get("created_at")), _when(r.get("updated_at")))
    out.print(table)
    bad = sum("malformed" in r for r in rows)
    if bad:
        err.print(f"{bad} index entr{'y is' if bad == 1 else 'ies are'} not a run's summary (its workload wrote "
                  "it so, or it is damaged): shown with state ?", highlight=False)


@workflows.command("show")
@click.argument("workflow_id")
@click.option("--events", is_flag=True, help="Also print the raw events.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_cli
@friendly_errors
def workflows_show(obj: CliContext, workflow_id: str, events: bool, as_json: bool) -> None:
    """Show a run: each step with its agent, status and timing; notes; escalations; the outcome."""
    settings = obj.operator_settings()

    async def load(store: Any) -> tuple[Any, list[dict[str, Any]], Any]:
        wid = await store.resolve(workflow_id)
        state = await store.load(wid)
        evs = await store.events(wid) if events else []
        return state, evs, await store.owner(wid)

    state, evs, owner = run_async(_with_store(settings, load))
    data = state.to_json()
    data["driven_by"] = owner
    if events:
        data["event_log"] = evs
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    steps = data["step_list"]
    total = sum(_tokens(s.get("usage")) for s in steps)
    out.print(f"[bold]{escape(clean(state.id))}[/bold]  {escape(clean(state.state))}  "
              f"{escape(clean(state.definition))}  tokens={total}", markup=True, highlight=False)
    out.print(f"owner {clean(state.owner)}; driven by {clean(owner.get('owner')) if owner else 'nobody now'}; "
              f"runs {len(state.runs)}", highlight=False)
    table = new_table("step", "capability", "agent", "status", "attempts", "started", "ms", "tokens")
    for s in steps:
        error = s.get("error")
        status = s["status"] + (f" ({error.get('reason')})" if isinstance(error, dict) and error else "")
        elapsed = s.get("elapsed_ms")
        ms = f"{elapsed:.1f}" if isinstance(elapsed, int | float) and not isinstance(elapsed, bool) else "-"
        table.add_row(s["step"], s["capability"], str(s.get("agent") or "-"), status, str(s["attempts"]),
                      _when(s.get("started_at")), ms, str(_tokens(s.get("usage")) or "-"))
    out.print(table)
    for note in state.notes:
        out.print(f"  note {clean(note['key'])}: {json.dumps(note['data'], default=str)[:300]}", highlight=False)
    for step, esc in state.escalations.items():
        res = esc.get("resolution")
        res = res if isinstance(res, dict) else {}
        out.print(f"  escalation {clean(esc.get('escalation_id'))} at {clean(step)}: {clean(esc.get('reason'))} → "
                  f"{clean(res.get('status', 'PENDING'))} {clean(res.get('note', ''))}", highlight=False)
    if state.terminal:
        out.print(f"outcome: {clean(state.state)} {clean(state.reason)}", highlight=False)
    for e in evs:
        out.print(f"  #{clean(e.get('seq'))} {_when(e.get('at'))} {clean(e.get('type'))} "
                  f"{json.dumps(e.get('data'), default=str)[:200]}", highlight=False)


def _tokens(usage: Any) -> int:
    """A step's tokens from its usage record (0 when the record is not one: its workload wrote it)."""
    if not isinstance(usage, dict):
        return 0
    total = 0
    for name in ("input_tokens", "output_tokens"):
        value = usage.get(name, 0)
        if isinstance(value, int) and not isinstance(value, bool):
            total += value
    return total


@workflows.command("cancel")
@click.argument("workflow_id")
@click.option("--reason", default="", help="Recorded with the cancellation.")
@click.option("--wait", "wait_s", default=15.0, show_default=True, help="Seconds to wait for the run to stop.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_cli
@friendly_errors
def workflows_cancel(obj: CliContext, workflow_id: str, reason: str, wait_s: float, as_json: bool) -> None:
    """Cancel a run: its owner cancels the in-flight calls and withdraws its escalations."""
    import time

    settings = obj.operator_settings()
    by = _operator_id(obj)

    async def go(store: Any) -> Any:
        wid = await store.resolve(workflow_id)
        before = await store.load(wid)
        if before.terminal:  # nothing to stop: say so, and fail, so a script does not take it for a cancellation
            raise FailedPreconditionError(f"{before.id} already finished ({before.state}); there is nothing to cancel",
                                          metadata={"workflow_id": before.id, "state": before.state})
        state = await store.request_cancel(wid, by=by, reason=reason)
        deadline = time.monotonic() + wait_s
        while not state.terminal and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            state = await store.load(wid)
        return state

    state = run_async(_with_store(settings, go))
    if as_json:
        click.echo(json.dumps(state.summary()))
    else:
        out.print(f"{clean(state.id)}: {clean(state.state)}"
                  + ("" if state.terminal else " (cancel requested; still stopping)"), highlight=False)
    if not state.terminal:
        raise SystemExit(1)


@workflows.command("resume")
@click.argument("workflow_id")
@click.option("--wait-lock", default=None, type=float,
              help="Seconds to wait for a dead owner's lease to expire (default: the lease TTL + 2 s).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_cli
@friendly_errors
def workflows_resume(obj: CliContext, workflow_id: str, wait_lock: float | None, as_json: bool) -> None:
    """Resume an unfinished run in this process (as the operator) from its last completed step."""
    from hivemesh.sdk.client import MeshClient
    from hivemesh.sdk.workflow import WorkflowEngine

    settings = obj.operator_settings()

    def progress(_wid: str, kind: str, data: Any) -> None:
        if not as_json and kind == "step":
            replay = " (replayed)" if data.get("replayed") else ""
            err.print(f"step {clean(data['step'])} → {clean(data.get('agent'))} {clean(data.get('elapsed_ms'))} ms"
                      f"{replay}", style="dim", highlight=False)
        elif not as_json and kind == "input_required":
            err.print(f"waiting for a person: escalation {clean(data['escalation_id'])} ({clean(data['reason'])})",
                      highlight=False)

    async def go() -> Any:
        async with MeshClient.connect(name="admin", kind="operator", settings=settings) as mesh:
            async with WorkflowEngine(mesh, on_event=progress) as engine:
                handle = await engine.resume(await engine.store.resolve(workflow_id), wait_s=wait_lock)
                return await handle.result()

    state = run_async(go())
    if as_json:
        click.echo(json.dumps(state.to_json(), default=str))
    else:
        out.print(f"{clean(state.id)}: {clean(state.state)} {clean(state.reason)}", highlight=False)
    if state.state != "COMPLETED":
        raise SystemExit(1)


# --- escalations -----------------------------------------------------------------------------------------------
@click.group()
def escalations() -> None:
    """The human escalation queue: list, show, approve, reject."""


def _esc_client_call(obj: CliContext, fn: Callable[[Any], Awaitable[T]]) -> T:
    from hivemesh.sdk.escalation import EscalationClient

    return as_operator(obj, lambda cp: fn(EscalationClient(cp)))


def _print_escalation(info: Any) -> None:
    colour = {"PENDING": "yellow", "APPROVED": "green", "REJECTED": "red"}.get(info.status, "white")
    out.print(f"[bold]{escape(clean(info.id))}[/bold] [{colour}]{escape(clean(info.status))}[/{colour}]  "
              f"{escape(clean(info.reason))}", markup=True, highlight=False)
    out.print(f"  requested by {clean(info.requested_by)} at {_when(info.created_at)}; workflow "
              f"{clean(info.workflow_id or '-')} step {clean(info.step_id or '-')}", highlight=False)
    if info.deadline:
        out.print(f"  deadline {_when(info.deadline)}, then: {clean(info.on_deadline)}"
                  + (f" ({json.dumps(info.default_answer)})" if info.on_deadline == "default" else ""), highlight=False)
    out.print("  context: " + json.dumps(info.context, indent=2, default=str).replace("\n", "\n  "), highlight=False)
    if not info.pending:
        by = clean(info.resolved_by) + (f" on behalf of {clean(info.on_behalf_of)}"
                                        + (" (claimed)" if info.on_behalf_of_claimed else "")
                                        if info.on_behalf_of else "")
        out.print(f"  resolved by {by} at {_when(info.resolved_at)}: {clean(info.note)}"
                  + (f" answer={json.dumps(info.answer)}" if info.answer is not None else ""), highlight=False)


@escalations.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include resolved escalations (default: pending only).")
@click.option("--workflow", default="", help="Only this workflow run's escalations.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_cli
@friendly_errors
def escalations_list(obj: CliContext, show_all: bool, workflow: str, as_json: bool) -> None:
    """List escalations waiting for a person (or all of them)."""
    items = _esc_client_call(obj, lambda c: c.list(None if show_all else "PENDING", workflow))
    if as_json:
        click.echo(json.dumps([i.to_json() for i in items], indent=2, default=str))
        return
    if not items:
        out.print("no pending escalations" if not show_all else "no escalations")
        return
    table = new_table("id", "status", "reason", "workflow", "requested by", "created", "deadline")
    for i in items:
        table.add_row(i.id, i.status, i.reason[:60], i.workflow_id or "-", i.requested_by.rsplit("/", 1)[-1],
                      _when(i.created_at), _when(i.deadline))
    out.print(table)


@escalations.command("show")
@click.argument("escalation_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_cli
@friendly_errors
def escalations_show(obj: CliContext, escalation_id: str, as_json: bool) -> None:
    """Show one escalation with the context a person needs to decide."""
    info = _esc_client_call(obj, lambda c: c.get(escalation_id))
    if as_json:
        click.echo(json.dumps(info.to_json(), indent=2, default=str))
    else:
        _print_escalation(info)


def _parse_answer(answer: str | None) -> Any:
    if answer is None:
        return None
    try:
        return json_depth.loads(answer)
    except json.JSONDecodeError:
        return answer  # a bare word or sentence is an answer too


def _resolve(obj: CliContext, escalation_id: str, approve: bool, note: str, answer: str | None, as_json: bool) -> None:
    info = _esc_client_call(obj, lambda c: c.resolve(escalation_id, approve=approve, note=note,
                                                     answer=_parse_answer(answer)))
    if as_json:
        click.echo(json.dumps(info.to_json(), default=str))
    else:
        out.print(f"{clean(info.id)}: {clean(info.status)}" + (f" — {clean(note)}" if note else ""), highlight=False)


@escalations.command("approve")
@click.argument("escalation_id")
@click.option("--note", default="", help="Why (kept with the resolution, audited).")
@click.option("--answer", default=None, help="An answer for the run to resume with: JSON, or plain text.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_cli
@friendly_errors
def escalations_approve(obj: CliContext, escalation_id: str, note: str, answer: str | None, as_json: bool) -> None:
    """Approve an escalation; the waiting run resumes with the answer."""
    _resolve(obj, escalation_id, True, note, answer, as_json)


@escalations.command("reject")
@click.argument("escalation_id")
@click.option("--note", default="", help="Why (kept with the resolution, audited).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_cli
@friendly_errors
def escalations_reject(obj: CliContext, escalation_id: str, note: str, as_json: bool) -> None:
    """Reject an escalation; the waiting run goes on knowing it was rejected."""
    _resolve(obj, escalation_id, False, note, None, as_json)

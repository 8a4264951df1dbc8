"""`hivemesh slo rules|list`: the service-level objectives stored as `slos` policies, and the Prometheus rules
rendered from them (`hivemesh.controlplane.slo`), so the alerts are regenerated, never edited by hand.

Objectives are managed with `hivemesh policy apply|get|delete` (kind `slos`); this group only reads them, from
etcd as the operator (policies are readable by every workload).
"""

from __future__ import annotations

import json
from typing import Any

import click
import yaml

from hivemesh.controlplane.cli.context import CliContext, err, friendly_errors, out, pass_cli, run_async
from hivemesh.controlplane.cli.output import clean, new_table
from hivemesh.controlplane.slo import KIND_NAME, Objective, objectives, render_rules
from hivemesh.mesh.policy import PolicyDoc
from hivemesh.mesh.settings import MeshSettings


async def _load(settings: MeshSettings) -> dict[str, PolicyDoc]:
    from hivemesh.controlplane.policies import list_policies
    from hivemesh.mesh.etcd import client, wait_connected

    c = client(settings.etcd_access())
    try:
        await wait_connected(c)
        docs = await list_policies(c, KIND_NAME)
    finally:
        await c.close()
    return {d.name: d for d in docs}


def _stored(obj: CliContext) -> dict[str, PolicyDoc]:
    docs = run_async(_load(obj.operator_settings()))
    if not docs:
        err.print(f"[yellow]no {KIND_NAME} policies are stored[/yellow] (write one and `hivemesh policy apply -f` "
                  "it; see docs/observability.md)", markup=True, highlight=False)
    return docs


def _source(docs: dict[str, PolicyDoc]) -> dict[str, str]:
    """capability -> the document its objective comes from (the first by name, as `objectives` picks)."""
    found: dict[str, str] = {}
    for name in sorted(docs):
        for raw in docs[name].spec["objectives"]:
            found.setdefault(raw["capability"], name)
    return found


def _budget_min(o: Objective) -> float | None:
    """The availability error budget over the objective's window, in minutes (None without an availability
    objective): the one computation `slo list` shows in its table and gives in its JSON."""
    return None if o.availability is None else (1 - o.availability) * o.window_days * 24 * 60


def _as_json(o: Objective, policy: str) -> dict[str, Any]:
    budget = _budget_min(o)
    return {
        "capability": o.capability, "policy": policy, "availability": o.availability,
        "availability_budget_min": None if budget is None else round(budget, 3),
        "latency_threshold_ms": None if o.latency_threshold_s is None else round(o.latency_threshold_s * 1000, 3),
        "latency_target": o.latency_target, "window_days": o.window_days,
    }


@click.group()
def slo() -> None:
    """Service-level objectives (kind `slos`; manage them with `hivemesh policy`) and their alert rules."""


@slo.command("rules")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of YAML (Prometheus reads both).")
@pass_cli
@friendly_errors
def slo_rules(obj: CliContext, as_json: bool) -> None:
    """Print the Prometheus rule file (recording rules and multi-window, multi-burn-rate alerts) for every stored
    objective; write it where Prometheus's `rule_files` points and reload Prometheus."""
    docs = _stored(obj)
    rules = render_rules(objectives(docs))
    if as_json:
        click.echo(json.dumps(rules, indent=2))
        return
    names = clean(", ".join(sorted(docs))) or "(none)"  # a comment line: one line, whatever a name holds
    click.echo(f"# Rendered by `hivemesh slo rules` from the slos policies: {names}.\n"
               "# Do not edit: change the objectives (`hivemesh policy apply`) and render again.")
    click.echo(yaml.safe_dump(rules, sort_keys=False, width=1 << 16).rstrip())


@slo.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_cli
@friendly_errors
def slo_list(obj: CliContext, as_json: bool) -> None:
    """The objectives in force, one per capability, with the error budget each leaves over its window."""
    docs = _stored(obj)
    source = _source(docs)
    objs = objectives(docs)
    if as_json:
        click.echo(json.dumps([_as_json(o, source[o.capability]) for o in objs], indent=2))
        return
    if not objs:
        return
    table = new_table("capability", "availability", "latency", "window", "availability budget", "policy")
    for o in objs:
        availability = "-" if o.availability is None else f"{o.availability:.3%}"
        budget_min = _budget_min(o)
        budget = "-" if budget_min is None else f"{budget_min:.1f} min"
        latency = "-" if o.latency_threshold_s is None or o.latency_target is None else (
            f"{o.latency_target:.2%} within {o.latency_threshold_s * 1000:g} ms")
        table.add_row(o.capability, availability, latency, f"{o.window_days} d", budget, source[o.capability])
    out.print(table)

"""`hivemesh up`: a whole mesh on this machine and a demo over it (the launcher is `launcher.py`); this module
parses the options and prints what the demo reports."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Mapping
from typing import Any

import click

from hivemesh.controlplane.cli.context import CliContext, err, friendly_errors, out, pass_cli
from hivemesh.controlplane.cli.output import escape, new_table
from hivemesh.mesh.settings import DEFAULT_TRUST_DOMAIN


@click.command()
@click.option("--once", is_flag=True, help="Run the demo once, then stop everything and exit.")
@click.option("--trust-domain", default=DEFAULT_TRUST_DOMAIN, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print each document's result as one JSON line.")
@click.option("--demo", default="default", show_default=True,
              help="Which demo: default (document pipeline + a tour of the five patterns), tour, pipeline, research, "
                   "helpdesk, support, content, contract, leads, risk, sales, tools; none (only etcd and the "
                   "control plane); 'list' shows the menu.")
@click.option("--listen", default="127.0.0.1", show_default=True, metavar="HOST",
              help="The host etcd, the control plane, the sidecar and the agents bind (0.0.0.0: every interface; "
                   "then give --advertise).")
@click.option("--advertise", envvar="HIVEMESH_ADVERTISE", default=None, metavar="HOST",
              help="The host name or IP they are reached at, written into mesh.json, the registry and the "
                   "certificates [default: the --listen host; never a wildcard].")
@pass_cli
@friendly_errors
def up(obj: CliContext, once: bool, trust_domain: str, as_json: bool, demo: str, listen: str,
       advertise: str | None) -> None:
    """Start etcd, the control plane and the reference agents, then run the demo pipeline."""
    from hivemesh.agents.demos import DEMOS, demos_for
    from hivemesh.controlplane.cli.launcher import NO_DEMO, UpOptions, run_up

    if demo == "list":
        menu = [{"demo": d.name, "pattern": d.pattern, "what": d.title} for d in DEMOS.values()]
        if as_json:
            click.echo(json.dumps(menu))
        else:
            table = new_table("demo", "pattern", "what")
            for row in menu:
                table.add_row(row["demo"], row["pattern"], row["what"])
            out.print(table)
            out.print("default: the pipeline, then a tour of the others; tour: all but the pipeline")
        return
    opts = UpOptions(home=obj.home, certs_dir=obj.certs_dir, trust_domain=trust_domain, once=once, demo=demo,
                     listen=listen, advertise=advertise)
    _ = opts.advertised  # a wildcard or a host:port: a ValueError (exit 2) before anything starts
    if demo != NO_DEMO:
        demos_for(demo)  # a ValueError (exit 2) before anything starts

    def say(line: str) -> None:
        with contextlib.suppress(OSError):  # a closed terminal (EIO) or pipe must not cut the shutdown short
            if as_json:
                err.print(line, style="dim", highlight=False)
            else:
                out.print(f"[bold cyan]hivemesh[/bold cyan] {escape(line)}", markup=True, highlight=False)

    def show(result: Mapping[str, Any]) -> None:
        with contextlib.suppress(OSError):
            _show(result)

    def _show(result: Mapping[str, Any]) -> None:
        if as_json:
            click.echo(json.dumps(result, sort_keys=True))
            return
        if "summary" in result:
            _print_demo_summary(result["summary"])
        elif "demo" in result:
            state = result.get("state", "?")
            colour = "green" if state == "COMPLETED" else "red"
            note = escape(str(result.get("highlight") or result.get("error", "")))
            out.print(f"[bold]{escape(str(result['demo']))}[/bold] → [{colour}]{escape(str(state))}[/{colour}] {note}",
                      markup=True, highlight=False)
        else:
            _print_pipeline_result(result)

    code = run_up(opts, say, show)
    sys.exit(code)


def _print_demo_summary(rows: list[dict[str, Any]]) -> None:
    table = new_table("demo", "pattern", "state", "workflows", "steps", "tokens", "s", "what happened",
                  title="patterns demo summary")
    for r in rows:
        table.add_row(r.get("demo", "?"), r.get("pattern", ""), r.get("state", "?"), str(len(r.get("workflows", []))),
                      str(r.get("steps", "")), str(r.get("tokens", "")), str(r.get("seconds", "")),
                      str(r.get("highlight") or r.get("error", "")))
    out.print(table)
    out.print("inspect them: hivemesh workflows list   |   hivemesh workflows show <id>", highlight=False)


def _hop_label(hop: dict[str, Any]) -> str:
    return f"{hop.get('kind', '?')}:{str(hop.get('identity', '')).rsplit('/', 1)[-1]}"


def _print_pipeline_result(result: Mapping[str, Any]) -> None:
    """One document's journey: its verdict, then each step with the agent, packaging and hops that served it."""
    source = result.get("source") or result.get("sample", "?")
    if "error" in result:
        out.print(f"[red]✗ {escape(str(source))}[/red]: {escape(str(result['error']))}", markup=True, highlight=False)
        return
    status = str(result.get("status", ""))
    colour = {"stored": "green", "duplicate": "cyan"}.get(status, "yellow")
    doc = result.get("document", {}) or {}
    summary = f"{doc.get('document_type', '?')} {doc.get('invoice_number') or ''} total={doc.get('total')} " \
              f"{doc.get('currency') or ''}".strip()
    out.print(f"\n[bold]{escape(str(source))}[/bold] → [{colour}]{escape(status)}[/{colour}] "
              f"(id {escape(str(result.get('id')))})  {escape(summary)}", markup=True, highlight=False)
    for e in result.get("errors", []) or []:
        out.print(f"   [yellow]invalid[/yellow] {escape(str(e.get('field')))}: {escape(str(e.get('message')))}",
                  markup=True, highlight=False)
    table = new_table("step", "agent", "packaging", "hops (caller → … → agent)", "ms", show_edge=False, pad_edge=False)
    for step in result.get("steps", []):
        hops = " → ".join(["demo", *reversed([_hop_label(h) for h in step.get("hops", [])])])
        table.add_row(str(step.get("step", "")), step.get("agent", ""), step.get("packaging", ""), hops,
                      f"{float(step.get('elapsed_ms', 0.0)):.1f}")
    out.print(table)

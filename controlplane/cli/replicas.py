"""`hivemesh controlplanes`: the control-plane replicas that are up, and which one leads (read from etcd)."""

from __future__ import annotations

import json
from typing import Any

import click

from hivemesh.controlplane.cli.context import CliContext, friendly_errors, out, pass_cli, run_async
from hivemesh.controlplane.cli.output import CleanTable, clean


async def _read(access: Any) -> tuple[list[Any], str]:
    from hivemesh.mesh.controlplane_endpoints import discover
    from hivemesh.mesh.etcd import client, wait_connected
    from hivemesh.mesh.keyspace import CONTROLPLANE_LEADER

    c = client(access)
    try:
        await wait_connected(c, timeout=5.0)
        adverts = await discover(c)
        got = await c.get(CONTROLPLANE_LEADER.encode())
        return adverts, got.value.decode(errors="replace") if got is not None else ""
    finally:
        await c.close()


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_cli
@friendly_errors
def controlplanes(obj: CliContext, as_json: bool) -> None:
    """List the control-plane replicas that are up (their leased adverts) and which one leads."""
    adverts, leader = run_async(_read(obj.operator_settings().etcd_access()))
    rows = [{"replica": a.replica, "controlplane": a.controlplane, "join": a.join, "leader": a.replica == leader}
            for a in adverts]
    if as_json:
        click.echo(json.dumps({"leader": leader or None, "replicas": rows}, indent=2))
        return
    if not rows:
        out.print("no control-plane replica is advertised (none running, or all older than this version)")
        return
    table = CleanTable("replica", "controlplane", "join", "leader")
    for r in rows:
        table.add_row(r["replica"], r["controlplane"], r["join"], "yes" if r["leader"] else "")
    out.print(table)
    if leader and not any(r["leader"] for r in rows):
        out.print(f"leader {clean(leader)} holds the leader key but does not advertise itself", markup=False)

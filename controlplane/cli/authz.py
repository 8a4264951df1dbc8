"""`hivemesh authz check`: explain the authorization decision for a caller and a capability, rule by rule,
from the authz policies in etcd (the same compiled table every node evaluates). Policies themselves are
managed with `hivemesh policy apply|get|list|delete` (kind `authz`)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import click

from hivemesh.controlplane.cli.context import CliContext, friendly_errors, out, pass_cli
from hivemesh.controlplane.cli.output import new_table
from hivemesh.mesh.authz import AuthzRequest, AuthzTable, compile_authz
from hivemesh.mesh.layers.authn import ACTION_OF_METHOD
from hivemesh.mesh.settings import MeshSettings
from hivemesh.v1 import mesh_pb2


async def _load(settings: MeshSettings) -> tuple[AuthzTable, list[mesh_pb2.AgentInstance]]:
    from hivemesh.controlplane.policies import list_policies
    from hivemesh.mesh.etcd import client, wait_connected
    from hivemesh.mesh.registry import read_instances

    c = client(settings.etcd_access())
    try:
        await wait_connected(c)
        docs = await list_policies(c, "authz")
    finally:
        await c.close()
    return compile_authz({d.name: d for d in docs}), await read_instances(settings.etcd_access())


def _agents_serving(capability: str, instances: list[mesh_pb2.AgentInstance]) -> list[str]:
    return sorted({i.identity for i in instances if any(c.name == capability for c in i.card.capabilities)})


@click.group()
def authz() -> None:
    """Authorization policies (kind `authz`; manage them with `hivemesh policy`)."""


@authz.command("check")
@click.option("--caller", required=True, help="The caller's SPIFFE id (the peer presenting the token).")
@click.option("--capability", required=True)
@click.option("--principal", default=None, help="The original principal of a delegated call (default: the caller).")
@click.option("--action", type=click.Choice(sorted(set(ACTION_OF_METHOD.values()))), default="invoke",
              show_default=True)
@click.option("--agent", default=None, help="Target agent SPIFFE id (default: every agent serving the capability).")
@click.option("--json", "as_json", is_flag=True)
@pass_cli
@friendly_errors
def authz_check(obj: CliContext, caller: str, capability: str, principal: str | None, action: str,
                agent: str | None, as_json: bool) -> None:
    """Explain whether CALLER may call CAPABILITY, and which rule decides."""
    settings = obj.operator_settings()
    table, instances = asyncio.run(_load(settings))
    agents = [agent] if agent else _agents_serving(capability, instances) or [
        f"spiffe://{settings.trust_domain}/agent/*"
    ]
    results: list[dict[str, Any]] = []
    for target in agents:
        req = AuthzRequest(caller=caller, capability=capability, action=action, agent=target,
                           principal=principal or caller)
        mine = table.for_agent(target) if "*" not in target else table
        d = mine.decide(req)
        results.append({"agent": target, "allowed": d.allowed, "rule": d.rule, "reason": d.reason,
                        "would_deny": d.would_deny, "rules": mine.explain(req)})
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        for r in results:
            verdict = "[green]ALLOW[/green]" if r["allowed"] else "[red]DENY[/red]"
            out.print(f"{verdict} on {r['agent']}: {r['reason']}", highlight=False)
            if r["would_deny"]:
                out.print(f"  [yellow]dry run: would be denied by {r['would_deny']}[/yellow]", highlight=False)
            if r["rules"]:
                t = new_table("rule", "action", "mode", "matches", "first condition that failed", show_edge=False,
                          pad_edge=False)
                for row in r["rules"]:
                    t.add_row(row["rule"], row["action"], row["mode"], row["matched"], row["failed"])
                out.print(t)
            elif table.empty:
                out.print("  (no authz policy exists: everything is denied until one allows it)")
    if not all(r["allowed"] for r in results):
        raise SystemExit(1)

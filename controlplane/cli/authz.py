"""`hivemesh authz check`: explain whether a caller may call a capability, gate by gate: the grant that lets the
control plane issue the caller a token (kind `grants`, read through the control plane), the authz rule that
lets the call into the agent (kind `authz`, the same compiled table every node evaluates), rule by rule, and
whether the agent may serve the capability at all (kind `providers`: callers never send a call to an agent it
leaves out). Policies themselves are managed with `hivemesh policy apply|get|list|delete`, or grants and authz at
once with `hivemesh allow`."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.text import Text

from hivemesh.controlplane.access import explain_access, spiffe_id
from hivemesh.controlplane.cli.context import CliContext, err, friendly_errors, out, pass_cli, run_async
from hivemesh.controlplane.cli.output import clean, new_table
from hivemesh.controlplane.grants import Grant, GrantSet
from hivemesh.mesh import json_depth
from hivemesh.mesh.authz import AuthzTable, compile_authz
from hivemesh.mesh.layers.authn import ACTION_OF_METHOD
from hivemesh.mesh.pki import parse_spiffe_id, spiffe_id_of
from hivemesh.mesh.providers import PROVIDERS, ProvidersTable, compile_providers
from hivemesh.mesh.settings import MeshSettings
from hivemesh.v1 import mesh_pb2


def operator_trust_domain(obj: CliContext) -> str:
    """The trust domain of the operator certificate (no mesh needed), else of the mesh settings."""
    try:
        return parse_spiffe_id(spiffe_id_of((obj.certs_dir / "operator.pem").read_bytes())).trust_domain
    except (OSError, ValueError):
        return obj.operator_settings().trust_domain


async def _load(obj: CliContext, settings: MeshSettings
                ) -> tuple[AuthzTable, ProvidersTable, GrantSet, list[mesh_pb2.AgentInstance]]:
    from hivemesh.controlplane.cli.policy_client import PolicyClient
    from hivemesh.controlplane.policies import list_policies
    from hivemesh.mesh.controlplane_client import ControlPlaneClient
    from hivemesh.mesh.etcd import client, wait_connected
    from hivemesh.mesh.registry import read_instances

    c = client(settings.etcd_access())
    try:
        await wait_connected(c)
        docs = await list_policies(c, "authz")
        providers = await list_policies(c, PROVIDERS.name)
    finally:
        await c.close()
    async with ControlPlaneClient.from_certs_dir(settings.controlplane, obj.certs_dir) as cp:  # grants: its own
        stored = await PolicyClient(cp).list_policies("grants")
    grants = GrantSet(Grant.from_doc({"name": p.name, **json_depth.loads(p.spec_json)}) for p in stored)
    return (compile_authz({d.name: d for d in docs}), compile_providers({d.name: d for d in providers}), grants,
            await read_instances(settings.etcd_access()))


def provider_gate(table: ProvidersTable, capability: str, agent: str) -> dict[str, Any]:
    """The providers gate for one target: whether agent may serve capability, as nodes route. A glob target (no
    agent serves the capability now) is not judged: it only says who may serve it."""
    restriction = table.restriction(capability)
    if restriction is None:
        return {"serves": True, "policies": [],
                "reason": f"no {PROVIDERS.name} policy names {capability!r}: any agent may serve it"}
    policies = [f"{PROVIDERS.name}/{p}" for p in restriction.policies]
    if any(c in agent for c in "*?["):
        return {"serves": True, "policies": policies, "reason": restriction.describe()}
    if restriction.allows(agent):
        return {"serves": True, "policies": policies, "reason": f"{restriction.describe()}, {agent} among them"}
    return {"serves": False, "policies": policies,
            "reason": f"{restriction.describe()}: {agent} is left out, so no caller sends it this call"}


def _agents_serving(capability: str, instances: list[mesh_pb2.AgentInstance]) -> list[str]:
    return sorted({i.identity for i in instances if any(c.name == capability for c in i.card.capabilities)})


@click.group()
def authz() -> None:
    """Authorization policies (kind `authz`; manage them with `hivemesh policy`, or `hivemesh allow`)."""


@authz.command("check")
@click.option("--caller", required=True,
              help="The caller's SPIFFE id (the peer presenting the token); KIND/NAME is completed with the trust "
                   "domain.")
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
    """Explain whether CALLER may call CAPABILITY: the grant (token) gate, then the authz rule that decides."""
    td = operator_trust_domain(obj)
    caller_id = spiffe_id(caller, td)
    principal_id = spiffe_id(principal, td, what="principal") if principal else caller_id
    agent_id = spiffe_id(agent, td, what="agent") if agent else None
    if caller_id != caller and not as_json:
        err.print(f"caller {clean(caller)} is {clean(caller_id)}", style="dim", highlight=False)
    settings = obj.operator_settings()
    table, providers, grants, instances = run_async(_load(obj, settings))
    agents = [agent_id] if agent_id else _agents_serving(capability, instances) or [
        f"spiffe://{settings.trust_domain}/agent/*"
    ]
    results: list[dict[str, Any]] = []
    for target in agents:
        access = explain_access(grants, table, caller=caller_id, capability=capability, action=action, agent=target,
                                principal=principal_id)
        serving = provider_gate(providers, capability, target)
        results.append({"caller": caller_id, "capability": capability, **access,
                        "allowed": access["allowed"] and serving["serves"], "providers": serving})
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        for r in results:
            _print_result(r, empty=table.empty)
    if not all(r["allowed"] for r in results):
        raise SystemExit(1)


def _verdict(allowed: bool) -> Text:
    return Text("ALLOW", style="green") if allowed else Text("DENY", style="red")


def _print_result(r: dict[str, Any], *, empty: bool) -> None:
    grant, rule = r["grant"], r["authz"]
    out.print(Text.assemble(_verdict(r["allowed"]), f" on {clean(r['agent'])}"), highlight=False)
    out.print(Text.assemble("  1. token (grants): ", _verdict(grant["granted"]), f"  {clean(grant['reason'])}"),
              highlight=False)
    out.print(Text.assemble("  2. call (authz):   ", _verdict(rule["allowed"]), f"  {clean(rule['reason'])}"),
              highlight=False)
    serving = r["providers"]
    out.print(Text.assemble("  3. serve (providers): ", _verdict(serving["serves"]), f"  {clean(serving['reason'])}"),
              highlight=False)
    if r["would_deny"]:
        out.print(f"  dry run: would be denied by {clean(r['would_deny'])}", style="yellow", highlight=False)
    if r["rules"]:
        t = new_table("rule", "action", "mode", "matches", "first condition that failed", show_edge=False,
                      pad_edge=False)
        for row in r["rules"]:
            t.add_row(row["rule"], row["action"], row["mode"], row["matched"], row["failed"])
        out.print(t)
    elif empty:
        out.print("  (no authz policy exists: everything is denied until one allows it)")
    if not (grant["granted"] and rule["allowed"]):
        out.print(f"  to allow it: hivemesh allow {clean(r['caller'])} {clean(r['capability'])}",
                  style="dim", highlight=False)
    if not serving["serves"]:
        kind, _, name = serving["policies"][0].partition("/")
        out.print(f"  to let it serve {clean(r['capability'])}: add it to a rule's agents in "
                  f"`hivemesh policy get {clean(kind)} {clean(name)}` and apply that again", style="dim",
                  highlight=False)

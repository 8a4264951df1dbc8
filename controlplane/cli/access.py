"""`hivemesh allow CALLER CAPABILITY...`: the one way to say "this caller may call this capability".

It writes both gates a call passes (`hivemesh.controlplane.access`): a `grants` document (the control plane
issues the caller tokens for it) and an `authz` document (the nodes let the call in), in one `ApplyPolicies`
call, so one etcd transaction stores both or neither. `hivemesh authz check` explains both gates afterwards.
"""

from __future__ import annotations

import click

from hivemesh.controlplane.access import access_documents, access_name, spiffe_id
from hivemesh.controlplane.cli.authz import operator_trust_domain
from hivemesh.controlplane.cli.context import CliContext, as_operator, friendly_errors, out, pass_cli
from hivemesh.controlplane.cli.output import clean
from hivemesh.controlplane.cli.policy import show_applied
from hivemesh.controlplane.cli.policy_client import PolicyClient
from hivemesh.controlplane.policies import validate_documents


@click.command("allow")
@click.argument("caller")
@click.argument("capabilities", nargs=-1, required=True)
@click.option("--agent", "agents", multiple=True,
              help="Only on this agent (SPIFFE id or agent/NAME, globs allowed; repeatable). Default: every agent.")
@click.option("--name", default=None, help="Name of both documents (default: allow-<caller>-<capabilities>).")
@click.option("--description", default="", help="Kept with both documents (default: says what they allow).")
@click.option("--dry-run", is_flag=True, help="Validate (and compile) without writing anything.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_cli
@friendly_errors
def allow(obj: CliContext, caller: str, capabilities: tuple[str, ...], agents: tuple[str, ...], name: str | None,
          description: str, dry_run: bool, as_json: bool) -> None:
    """Let CALLER call each CAPABILITY: a grant (its tokens) and an authz rule (the call), both or neither.

    CALLER is a SPIFFE id or KIND/NAME (e.g. client/orders; globs such as client/* allowed). Applying the same
    statement again changes nothing. Undo it with `hivemesh policy delete grants NAME` and `... authz NAME`.
    """
    td = operator_trust_domain(obj)
    caller_id = spiffe_id(caller, td, globs=True)
    agent_ids = [spiffe_id(a, td, what="agent", globs=True) for a in agents]
    doc_name = name or access_name(caller_id, capabilities)
    documents = access_documents(caller_id, capabilities, name=doc_name, agents=agent_ids, description=description)
    validate_documents(documents)  # a bad --name or capability is reported before any network
    resp = as_operator(obj, lambda cp: PolicyClient(cp).apply(documents, dry_run=dry_run))
    written = show_applied(resp, as_json, caller=caller_id, capabilities=list(capabilities), agents=agent_ids,
                           name=doc_name)
    if written:
        where = f" on {', '.join(agent_ids)}" if agent_ids else ""
        out.print(f"{clean(caller_id)} may call {clean(', '.join(capabilities))}{clean(where)} (every node within "
                  "about a second)", highlight=False)

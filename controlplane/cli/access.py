"""`hivemesh allow CALLER CAPABILITY...`: the one way to say "this caller may call this capability".

It writes both gates a call passes (`hivemesh.controlplane.access`): a `grants` document (the control plane
issues the caller tokens for it) and an `authz` document (the nodes let the call in), in one `ApplyPolicies`
call, so one etcd transaction stores both or neither. `hivemesh authz check` explains both gates afterwards.
It never replaces a document it did not write: a dry run first says what is there, and the write carries the
versions it saw (compare-and-swap), so what another writer stored in between is refused, not overwritten.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import click

from hivemesh.controlplane.access import access_documents, access_name, claim_documents, spiffe_id
from hivemesh.controlplane.cli.authz import operator_trust_domain
from hivemesh.controlplane.cli.context import CliContext, as_operator, friendly_errors, out, pass_cli
from hivemesh.controlplane.cli.output import clean
from hivemesh.controlplane.cli.policy import show_applied
from hivemesh.controlplane.cli.policy_client import PolicyClient
from hivemesh.controlplane.policies import validate_documents
from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.errors import FailedPreconditionError
from hivemesh.v1 import policy_pb2

_ATTEMPTS: Final = 3
"""Dry runs and writes at most: a write that lost a race is checked again (it is then refused, or unchanged)."""


async def _apply_claimed(cp: ControlPlaneClient, documents: Sequence[dict[str, Any]], *, dry_run: bool
                         ) -> policy_pb2.ApplyPoliciesResponse:
    """Apply documents unless one of that kind and name holds something else (`claim_documents`): a dry run, then
    the write at the versions it saw. Another writer in between fails the write's compare-and-swap (a version
    violation); the next round sees what it wrote and refuses, or finds it already as written here."""
    client, attempt = PolicyClient(cp), 1
    while True:
        planned = await client.apply(documents, dry_run=True)
        claimed = claim_documents(documents, planned.applied)
        if dry_run:
            return planned
        try:
            return await client.apply(claimed)
        except FailedPreconditionError as exc:
            lost_race = any(f.rsplit(".", 1)[-1] == "version" for f in exc.field_violations)
            if not lost_race or attempt == _ATTEMPTS:
                raise
        attempt += 1


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
    statement again changes nothing; a grants or authz document of that name holding anything else is never
    replaced (nothing is written: give another --name, or edit it with `hivemesh policy apply`). Undo it with
    `hivemesh policy delete grants NAME` and `... authz NAME`.
    """
    td = operator_trust_domain(obj)
    caller_id = spiffe_id(caller, td, globs=True)
    agent_ids = [spiffe_id(a, td, what="agent", globs=True) for a in agents]
    doc_name = name or access_name(caller_id, capabilities)
    documents = access_documents(caller_id, capabilities, name=doc_name, agents=agent_ids, description=description)
    validate_documents(documents)  # a bad --name or capability is reported before any network
    resp = as_operator(obj, lambda cp: _apply_claimed(cp, documents, dry_run=dry_run))
    written = show_applied(resp, as_json, caller=caller_id, capabilities=list(capabilities), agents=agent_ids,
                           name=doc_name)
    if written:
        where = f" on {', '.join(agent_ids)}" if agent_ids else ""
        out.print(f"{clean(caller_id)} may call {clean(', '.join(capabilities))}{clean(where)} (every node within "
                  "about a second)", highlight=False)

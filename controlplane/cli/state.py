"""`hivemesh state list|get`: read shared state and conversation memory as the operator (who reads every
namespace and writes none unless a `state` policy names it), through the control plane's State service."""

from __future__ import annotations

import json
from typing import Any

import click

from hivemesh.controlplane.cli.context import CliContext, as_operator, friendly_errors, out, pass_cli
from hivemesh.controlplane.cli.output import clean, new_table
from hivemesh.mesh.errors import NotFoundError
from hivemesh.sdk.state import StateClient, StateEntry


def _row(e: StateEntry) -> dict[str, Any]:
    return {"key": e.key, "value": e.value, "revision": e.revision, "updated_by": e.updated_by,
            "updated_at": e.updated_at, "expires_at": e.expires_at}


@click.group()
def state() -> None:
    """Shared state and conversation memory (docs/state.md)."""


@state.command("list")
@click.argument("namespace")
@click.option("--prefix", default="", help="Only keys starting with this.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_cli
@friendly_errors
def list_state(obj: CliContext, namespace: str, prefix: str, as_json: bool) -> None:
    """List a namespace's entries, with its size against its bound."""
    listing = as_operator(obj, lambda cp: StateClient(cp).list(namespace, prefix))
    if as_json:
        click.echo(json.dumps({
            "namespace": namespace, "revision": listing.revision, "namespace_bytes": listing.namespace_bytes,
            "max_namespace_bytes": listing.max_namespace_bytes, "max_value_bytes": listing.max_value_bytes,
            "entries": [_row(e) for e in listing.entries]}, indent=2))
        return
    out.print(f"{clean(namespace)}: {len(listing.entries)} entries, {listing.namespace_bytes} of "
              f"{listing.max_namespace_bytes} bytes")
    table = new_table("key", "revision", "updated by", "value")
    for e in listing.entries:
        shown = json.dumps(e.value)
        table.add_row(e.key, str(e.revision), e.updated_by, shown if len(shown) <= 60 else shown[:57] + "...")
    out.print(table)


@state.command("get")
@click.argument("namespace")
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_cli
@friendly_errors
def get_state(obj: CliContext, namespace: str, key: str, as_json: bool) -> None:
    """Print one entry's value (NOT_FOUND when there is none)."""
    entry = as_operator(obj, lambda cp: StateClient(cp).get(namespace, key))
    if entry is None:
        raise NotFoundError(f"no state at {namespace}/{key}")
    click.echo(json.dumps(_row(entry) if as_json else entry.value, indent=2))

"""`hivemesh keys|tokens|ca ...`: signing-key rotation, token revocation and root CA rotation, as the operator."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from hivemesh.controlplane.cli.context import CliContext, as_operator, friendly_errors, out, pass_cli
from hivemesh.controlplane.cli.output import clean, new_table
from hivemesh.controlplane.issuer import DEFAULT_ACTIVATE_AFTER_S
from hivemesh.controlplane.trust_service import MAX_ACTIVATE_AFTER_S
from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.v1 import trust_pb2


def _when(ts: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _print_keys(resp: trust_pb2.SigningKeysResponse, as_json: bool) -> None:
    rows: list[dict[str, Any]] = [
        {"kid": k.kid, "state": k.state, "created_at": k.created_at_unix, "activates_at": k.activates_at_unix,
         "retires_at": k.retires_at_unix} for k in resp.keys
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = new_table("kid", "state", "signs from", "leaves the JWKS", show_edge=False, pad_edge=False)
    for r in rows:
        table.add_row(r["kid"], r["state"], _when(r["activates_at"]), _when(r["retires_at"]))
    out.print(table)


class _ActivateAfter(click.IntRange):
    """--activate-after: 1..MAX_ACTIVATE_AFTER_S. 0 is refused with why: RotateSigningKeyRequest's field has no
    presence, so a 0 sent reads as unset (the default delay), never as "activate now"."""

    def __init__(self) -> None:
        super().__init__(1, MAX_ACTIVATE_AFTER_S)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if click.INT.convert(value, param, ctx) == 0:
            self.fail(f"0 is not in the range 1<=x<={MAX_ACTIVATE_AFTER_S}: the control plane reads 0 as its "
                      f"default ({DEFAULT_ACTIVATE_AFTER_S:g} s), not as now; the shortest delay is 1.", param, ctx)
        return super().convert(value, param, ctx)


# --- keys -------------------------------------------------------------------------------------------------------
@click.group()
def keys() -> None:
    """Token signing keys (published in the JWKS before they sign; retired after the longest token lifetime)."""


@keys.command("rotate")
@click.option("--activate-after", type=_ActivateAfter(), default=int(DEFAULT_ACTIVATE_AFTER_S), show_default=True,
              help="Seconds between publishing the new key and signing with it (time for every node to learn it).")
@click.option("--json", "as_json", is_flag=True)
@pass_cli
@friendly_errors
def keys_rotate(obj: CliContext, activate_after: int, as_json: bool) -> None:
    """Add a new signing key now; no call fails during the rotation."""
    resp = as_operator(obj, lambda cp: cp.call(cp.trust.RotateSigningKey,
                                       trust_pb2.RotateSigningKeyRequest(activate_after_seconds=activate_after)))
    _print_keys(resp, as_json)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_cli
@friendly_errors
def keys_list(obj: CliContext, as_json: bool) -> None:
    """The published signing keys and their state."""
    resp = as_operator(obj, lambda cp: cp.call(cp.trust.ListSigningKeys, trust_pb2.ListSigningKeysRequest()))
    _print_keys(resp, as_json)


# --- tokens -----------------------------------------------------------------------------------------------------
@click.group()
def tokens() -> None:
    """Capability tokens: revoke one, or every token of an identity."""


@tokens.command("revoke")
@click.option("--jti", default="", help="The id of the token to revoke.")
@click.option("--subject", default="", help="A SPIFFE id: every token naming it (principal or actor) issued until now.")
@click.option("--note", default="", help="Why (kept with the revocation and in the audit log).")
@click.option("--json", "as_json", is_flag=True)
@pass_cli
@friendly_errors
def tokens_revoke(obj: CliContext, jti: str, subject: str, note: str, as_json: bool) -> None:
    """Revoke by --jti or --subject; every node refuses the token(s) within a second."""
    if bool(jti) == bool(subject):
        raise click.UsageError("give exactly one of --jti or --subject")
    resp = as_operator(obj, lambda cp: cp.call(cp.trust.Revoke, trust_pb2.RevokeRequest(jti=jti, subject=subject,
                                                                                           note=note)))
    if as_json:
        click.echo(json.dumps({"key": resp.key, "expires_at_unix": resp.expires_at_unix}))
        return
    out.print(f"revoked {clean('token ' + jti if jti else 'every token of ' + subject)} (entry {clean(resp.key)} "
              f"lasts until {_when(resp.expires_at_unix)}, when every token it covers has expired)", highlight=False)


@tokens.command("revocations")
@click.option("--json", "as_json", is_flag=True)
@pass_cli
@friendly_errors
def tokens_revocations(obj: CliContext, as_json: bool) -> None:
    """Revocations in force."""
    resp = as_operator(obj, lambda cp: cp.call(cp.trust.ListRevocations, trust_pb2.ListRevocationsRequest()))
    rows: list[dict[str, Any]] = [
        {"jti": r.jti, "subject": r.subject, "revoked_at": r.revoked_at_unix, "expires_at": r.expires_at_unix,
         "by": r.by, "note": r.note} for r in resp.revocations
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        out.print("no revocations in force")
        return
    table = new_table("jti / subject", "revoked", "until", "by", "note", show_edge=False, pad_edge=False)
    for r in rows:
        table.add_row(r["jti"] or r["subject"], _when(r["revoked_at"]), _when(r["expires_at"]), r["by"], r["note"])
    out.print(table)


# --- ca -----------------------------------------------------------------------------------------------------------
def _print_ca(resp: trust_pb2.CaStatusResponse, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"phase": resp.phase, "generation": resp.generation, "roots": list(resp.roots),
                               "signing_root": resp.signing_root}, indent=2))
        return
    out.print(f"phase {clean(resp.phase)} (generation {resp.generation}); signing root "
              f"{clean(resp.signing_root[:16])}…", highlight=False)
    for r in resp.roots:
        out.print(f"  trusted root {clean(r[:16])}…{' (signs)' if r == resp.signing_root else ''}", highlight=False)


@click.group()
def ca() -> None:
    """The root CA: three-step rotation with zero failed calls."""


@ca.command("rotate")
@click.option("--step", type=click.Choice(["prepare", "activate", "finish"]), required=True,
              help="prepare: trust old+new; activate: new root signs, every node renews; finish: drop the old.")
@click.option("--json", "as_json", is_flag=True)
@pass_cli
@friendly_errors
def ca_rotate(obj: CliContext, step: str, as_json: bool) -> None:
    """Run one step of a root CA rotation (in order: prepare, activate, finish)."""
    _print_ca(as_operator(obj, lambda cp: cp.call(cp.trust.RotateCa, trust_pb2.RotateCaRequest(step=step))), as_json)


@ca.command("status")
@click.option("--json", "as_json", is_flag=True)
@pass_cli
@friendly_errors
def ca_status(obj: CliContext, as_json: bool) -> None:
    """Which roots are trusted and which one signs, and the registered nodes not yet on the signing root."""
    from hivemesh.controlplane.ca_stragglers import stragglers

    async def both(cp: ControlPlaneClient) -> tuple[trust_pb2.CaStatusResponse, list[Any]]:
        resp = await cp.call(cp.trust.GetCaStatus, trust_pb2.GetCaStatusRequest())
        return resp, stragglers(await cp.list_agents(), resp.signing_root)

    resp, behind = as_operator(obj, both)
    if as_json:
        click.echo(json.dumps({"phase": resp.phase, "generation": resp.generation, "roots": list(resp.roots),
                               "signing_root": resp.signing_root,
                               "not_on_signing_root": [vars(s) for s in behind]}, indent=2))
        return
    _print_ca(resp, as_json)
    if behind:
        out.print(f"{len(behind)} registered node(s) not on the signing root (`finish` waits for them):",
                  highlight=False)
    for s in behind:
        out.print(f"  {clean(s.describe())}", highlight=False)

"""`hivemesh certs init`: the development certificate authority."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from hivemesh.controlplane.cli.context import CliContext, friendly_errors, out, pass_cli
from hivemesh.mesh.settings import DEFAULT_TRUST_DOMAIN

if TYPE_CHECKING:
    from hivemesh.controlplane.ca import Unfinished


@click.group()
def certs() -> None:
    """Development certificate authority."""


@certs.command("init")
@click.option("--trust-domain", default=DEFAULT_TRUST_DOMAIN, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing CA (invalidates every certificate it signed).")
@pass_cli
@friendly_errors
def certs_init(obj: CliContext, trust_domain: str, force: bool) -> None:
    """Create a CA, the operator identity and the control plane's certificate in --certs-dir.

    Whole or nothing (`init_ca`): what a `certs init` or `up` killed while making a CA there left is made anew,
    and one another live process is making is left alone."""
    from hivemesh.controlplane.ca import CaFiles, init_ca

    def unfinished(left: Unfinished) -> None:
        out.print(f"a previous `{left.maker}` was stopped while it made the CA in {obj.certs_dir}: removed what it "
                  f"left ({', '.join(left.removed) or 'no files'}); making a new one")

    ca_cert = CaFiles.in_dir(obj.certs_dir).ca_cert
    replacing = force and ca_cert.exists()
    try:
        files = init_ca(obj.certs_dir, trust_domain, force=force, on_unfinished=unfinished)
    except OSError as exc:  # e.g. a full disk: nothing of the new CA is left (init_ca), say what stopped it
        gone = "; the CA it was replacing is removed too (half replaced, it was no CA)"
        raise OSError(f"could not create a CA in {obj.certs_dir}: {exc.strerror or exc}"
                      f"{gone if replacing and not ca_cert.exists() else ''}") from None
    out.print(f"CA for spiffe://{trust_domain} in {files.certs_dir} (private keys are 0600; never commit them)")

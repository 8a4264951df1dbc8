"""`hivemesh certs init`: the development certificate authority."""

from __future__ import annotations

import click

from hivemesh.controlplane.cli.context import CliContext, friendly_errors, out, pass_cli
from hivemesh.mesh.settings import DEFAULT_TRUST_DOMAIN


@click.group()
def certs() -> None:
    """Development certificate authority."""


@certs.command("init")
@click.option("--trust-domain", default=DEFAULT_TRUST_DOMAIN, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing CA (invalidates every certificate it signed).")
@pass_cli
@friendly_errors
def certs_init(obj: CliContext, trust_domain: str, force: bool) -> None:
    """Create a CA, the operator identity and the control plane's certificate in --certs-dir."""
    from hivemesh.controlplane.ca import init_ca

    files = init_ca(obj.certs_dir, trust_domain, force=force)
    out.print(f"CA for spiffe://{trust_domain} in {files.certs_dir} (private keys are 0600; never commit them)")

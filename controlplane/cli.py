"""The `hivemesh` command line: the operator's one place to steer the mesh from.

Every command that reports data takes `--json` for scripts; people get tables. Errors are one clear line on
stderr (with the gRPC status and reason where there is one) and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from hivemesh.mesh.errors import HivemeshError
from hivemesh.mesh.etcd import EtcdNotFoundError
from hivemesh.mesh.settings import DEFAULT_TRUST_DOMAIN, MeshSettings

F = TypeVar("F", bound=Callable[..., Any])
out = Console()
err = Console(stderr=True)


@dataclass(frozen=True)
class CliContext:
    """Shared options of every command."""

    home: Path
    certs_dir: Path
    verbose: bool

    def operator_settings(self) -> MeshSettings:
        """Where the mesh is (env or the `hivemesh up` state file), acting as the operator identity."""
        cert, key = self.certs_dir / "operator.pem", self.certs_dir / "operator.key"
        if not cert.exists() or not key.exists():
            raise click.ClickException(
                f"no operator identity in {self.certs_dir} (operator.pem/.key): run `hivemesh certs init` "
                "or point --certs-dir / HIVEMESH_CERTS at your certificates"
            )
        return MeshSettings.resolve(cert_file=cert, key_file=key)


def _friendly_errors(fn: F) -> F:
    """Turn the errors a user can cause into one readable line and exit code 1 (2 for usage problems)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except HivemeshError as exc:
            err.print(f"[red]error:[/red] {exc.message} [dim]({exc.code.name}, {exc.reason})[/dim]", highlight=False)
            for field, why in exc.field_violations.items():
                err.print(f"  {field}: {why}", highlight=False)
            sys.exit(1)
        except (ValueError, EtcdNotFoundError, TimeoutError, RuntimeError, OSError) as exc:
            err.print(f"[red]error:[/red] {exc}", highlight=False)
            sys.exit(2 if isinstance(exc, ValueError) else 1)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", envvar="HIVEMESH_HOME", default=".hivemesh", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="State folder (etcd data, logs, mesh.json).")
@click.option("--certs-dir", envvar="HIVEMESH_CERTS", default="certs", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="CA and operator certificates.")
@click.option("-v", "--verbose", is_flag=True, help="Log what the mesh does.")
@click.version_option(package_name="hivemesh")
@click.pass_context
def cli(ctx: click.Context, home: Path, certs_dir: Path, verbose: bool) -> None:
    """hivemesh: a gRPC agent mesh with a sidecar control plane."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import os

    os.environ["HIVEMESH_HOME"] = str(home.resolve())
    ctx.obj = CliContext(home=home.resolve(), certs_dir=certs_dir.resolve(), verbose=verbose)


# Annotated: feature modules import it, and mypy cannot infer it across that import cycle.
pass_cli: Callable[[Callable[..., Any]], Callable[..., Any]] = click.make_pass_decorator(CliContext)


# --- up -----------------------------------------------------------------------------------------------------
@cli.command()
@click.option("--once", is_flag=True, help="Run the demo once, then stop everything and exit.")
@click.option("--trust-domain", default=DEFAULT_TRUST_DOMAIN, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print each document's result as one JSON line.")
@click.option("--demo", default="default", show_default=True,
              help="Which demo: default (document pipeline + a tour of the five patterns), tour, pipeline, research, "
                   "helpdesk, support, content, contract; 'list' shows the menu.")
@pass_cli
@_friendly_errors
def up(obj: CliContext, once: bool, trust_domain: str, as_json: bool, demo: str) -> None:
    """Start etcd, the control plane and the reference agents, then run the demo pipeline."""
    from hivemesh.agents.demos import DEMOS, demos_for
    from hivemesh.controlplane.up import UpOptions, run_up

    if demo == "list":
        menu = [{"demo": d.name, "pattern": d.pattern, "what": d.title} for d in DEMOS.values()]
        if as_json:
            click.echo(json.dumps(menu))
        else:
            table = Table("demo", "pattern", "what")
            for row in menu:
                table.add_row(row["demo"], row["pattern"], row["what"])
            out.print(table)
            out.print("default: the pipeline, then a tour of the others; tour: all but the pipeline")
        return
    demos_for(demo)  # a ValueError (exit 2) before anything starts

    def say(line: str) -> None:
        if as_json:
            err.print(f"[dim]{line}[/dim]", highlight=False)
        else:
            out.print(f"[bold cyan]hivemesh[/bold cyan] {line}", highlight=False)

    def show(result: Mapping[str, Any]) -> None:
        if as_json:
            click.echo(json.dumps(result, sort_keys=True))
            return
        if "summary" in result:
            _print_demo_summary(result["summary"])
        elif "demo" in result:
            state = result.get("state", "?")
            colour = "green" if state == "COMPLETED" else "red"
            out.print(f"[bold]{result['demo']}[/bold] → [{colour}]{state}[/{colour}] "
                      f"{result.get('highlight') or result.get('error', '')}", highlight=False)
        else:
            _print_pipeline_result(result)

    opts = UpOptions(home=obj.home, certs_dir=obj.certs_dir, trust_domain=trust_domain, once=once, demo=demo)
    code = run_up(opts, say, show)
    sys.exit(code)


def _print_demo_summary(rows: list[dict[str, Any]]) -> None:
    table = Table("demo", "pattern", "state", "workflows", "steps", "tokens", "s", "what happened",
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
        out.print(f"[red]✗ {source}[/red]: {result['error']}", highlight=False)
        return
    status = str(result.get("status", ""))
    colour = {"stored": "green", "duplicate": "cyan"}.get(status, "yellow")
    doc = result.get("document", {}) or {}
    summary = f"{doc.get('document_type', '?')} {doc.get('invoice_number') or ''} total={doc.get('total')} " \
              f"{doc.get('currency') or ''}".strip()
    out.print(f"\n[bold]{source}[/bold] → [{colour}]{status}[/{colour}] (id {result.get('id')})  {summary}",
              highlight=False)
    for e in result.get("errors", []) or []:
        out.print(f"   [yellow]invalid[/yellow] {e.get('field')}: {e.get('message')}", highlight=False)
    table = Table("step", "agent", "packaging", "hops (caller → … → agent)", "ms", show_edge=False, pad_edge=False)
    for step in result.get("steps", []):
        hops = " → ".join(["demo", *reversed([_hop_label(h) for h in step.get("hops", [])])])
        table.add_row(str(step.get("step", "")), step.get("agent", ""), step.get("packaging", ""), hops,
                      f"{float(step.get('elapsed_ms', 0.0)):.1f}")
    out.print(table)


# --- certs ----------------------------------------------------------------------------------------------------
@cli.group()
def certs() -> None:
    """Development certificate authority."""


@certs.command("init")
@click.option("--trust-domain", default=DEFAULT_TRUST_DOMAIN, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing CA (invalidates every certificate it signed).")
@pass_cli
@_friendly_errors
def certs_init(obj: CliContext, trust_domain: str, force: bool) -> None:
    """Create a CA, the operator identity and the control plane's certificate in --certs-dir."""
    from hivemesh.controlplane.ca import init_ca

    files = init_ca(obj.certs_dir, trust_domain, force=force)
    out.print(f"CA for spiffe://{trust_domain} in {files.certs_dir} (private keys are 0600; never commit them)")


# --- processes ------------------------------------------------------------------------------------------------
@cli.command()
@click.option("--etcd", "etcd_endpoints", envvar="HIVEMESH_ETCD", required=True, help="etcd endpoints host:port[,...]")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Private state (token signing keys). Default: <home>/controlplane.")
@click.option("--trust-domain", default=DEFAULT_TRUST_DOMAIN, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=0, show_default=True, help="mTLS port (0: any free port).")
@click.option("--join-port", default=0, show_default=True, help="Join port, server-TLS only (0: any free port).")
@click.option("--grants", "grants_file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Grant file (YAML) loaded into etcd at start.")
@click.option("--cert-ttl", default=3600, show_default=True, help="Workload certificate lifetime, seconds.")
@pass_cli
@_friendly_errors
def controlplane(obj: CliContext, etcd_endpoints: str, state_dir: Path | None, trust_domain: str, host: str,
                 port: int, join_port: int, grants_file: Path | None, cert_ttl: int) -> None:
    """Run the control plane: CA, token issuer, join service."""
    from hivemesh.controlplane.server import ControlPlaneConfig, ControlPlaneServer
    from hivemesh.controlplane.server import main as serve_controlplane
    from hivemesh.mesh.handshake_audit import reexec_with_tracer

    reexec_with_tracer()  # before gRPC starts: audit the TLS handshakes it refuses

    config = ControlPlaneConfig(
        etcd_endpoints=etcd_endpoints, certs_dir=obj.certs_dir, state_dir=state_dir or obj.home / "controlplane",
        trust_domain=trust_domain, host=host, port=port, join_port=join_port, grants_file=grants_file,
        cert_ttl_s=cert_ttl,
    )

    def ready(server: ControlPlaneServer) -> None:
        click.echo(f"ready controlplane={server.address} join={server.join_address}")

    asyncio.run(serve_controlplane(config, on_started=ready))


@cli.command()
@click.option("--agent", required=True,
              help="The agent's plaintext address: loopback, e.g. 127.0.0.1:7001, or unix:PATH.")
@click.option("--listen", default="127.0.0.1:0", show_default=True, help="Inbound mutual-TLS listener.")
@click.option("--mesh-socket", default=None, metavar="PATH",
              help="Unix socket (0600, folder 0700) serving Mesh for the agent's own outbound calls "
                   "[default: <home>/run/sidecar-<pid>.sock].")
@click.option("--mesh-listen", default=None, metavar="HOST:PORT",
              help="Serve Mesh on loopback TCP instead of the socket. Unsafe on a shared host: any local "
                   "process can then call the mesh as this agent.")
@click.option("--name", default=None, help="Agent name (default: from the agent card).")
@click.option("--lease-ttl", default=10, show_default=True, help="Registry lease TTL, seconds.")
@click.option("--max-input-bytes", default=4 * 1024 * 1024, show_default=True)
@click.option("--limit", "limits", multiple=True, metavar="CAP=BYTES",
              help="Input size limit of one capability (repeatable).")
@click.option("--no-content-screen", is_flag=True, help="Do not screen text fields for prompt-injection patterns.")
@click.option("--screen-exempt", multiple=True, metavar="CAP", help="A capability the content screen skips.")
@click.option("--audit-dir", default=None, help="Audit spool directory (default: <home>/audit).")
@_friendly_errors
def sidecar(agent: str, listen: str, mesh_socket: str | None, mesh_listen: str | None, name: str | None,
            lease_ttl: int, max_input_bytes: int, limits: tuple[str, ...], no_content_screen: bool,
            screen_exempt: tuple[str, ...], audit_dir: str | None) -> None:
    """Front an agent written in any language: mTLS, tokens, authz, audit, registry, routing.

    The mesh location and the one-time join token come from HIVEMESH_* variables (or the `up` state file). The
    identity it joins with is kept in <home>/identity/, so a restart needs no new join token.
    """
    from hivemesh.mesh.handshake_audit import reexec_with_tracer
    from hivemesh.mesh.sidecar import SidecarConfig, run_sidecar

    per_cap: list[tuple[str, int]] = []
    for item in limits:
        cap, sep, size = item.partition("=")
        if not sep or not cap or not size.isdigit() or int(size) <= 0:
            raise click.BadParameter(f"{item!r}: expected CAPABILITY=BYTES", param_hint="--limit")
        per_cap.append((cap, int(size)))
    if mesh_socket is not None and mesh_listen is not None:
        raise click.UsageError("give --mesh-socket or --mesh-listen, not both")
    # Before anything of gRPC's starts: audit the TLS handshakes it refuses (needs its handshaker tracer).
    reexec_with_tracer()
    config = SidecarConfig(agent=agent, listen=listen, mesh_socket=mesh_socket, mesh_listen=mesh_listen, name=name,
                           lease_ttl_s=lease_ttl, max_input_bytes=max_input_bytes, limits=tuple(per_cap),
                           content_screen=not no_content_screen, screen_exempt=screen_exempt, audit_dir=audit_dir)
    asyncio.run(run_sidecar(config, MeshSettings.resolve()))


# --- operating the mesh -----------------------------------------------------------------------------------------
@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_cli
@_friendly_errors
def agents(obj: CliContext, as_json: bool) -> None:
    """List registered agents and their capabilities (read from etcd)."""
    from hivemesh.mesh.registry import read_instances

    settings = MeshSettings.resolve()
    instances = asyncio.run(read_instances(settings.etcd))
    rows: list[dict[str, Any]] = [
        {
            "agent": i.card.name,
            "version": i.card.version,
            "instance": i.instance_id,
            "endpoint": i.endpoint,
            "packaging": i.packaging,
            "identity": i.identity,
            "capabilities": [c.name for c in i.card.capabilities],
        }
        for i in instances
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        out.print("no agents registered")
        return
    table = Table("agent", "version", "capabilities", "packaging", "endpoint", "instance")
    for r in rows:
        table.add_row(r["agent"], r["version"], ", ".join(r["capabilities"]), r["packaging"], r["endpoint"],
                      r["instance"])
    out.print(table)


def _read_data(data: str | None) -> Any:
    if data is None:
        return None
    if data.startswith("@"):
        path = Path(data[1:])
        try:
            data = path.read_text()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--data") from None
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--data") from None


@cli.command()
@click.argument("capability")
@click.option("--data", "-d", default=None, help="JSON input, or @file.json.")
@click.option("--timeout", default=30.0, show_default=True, help="Deadline in seconds.")
@click.option("--stream", is_flag=True, help="Use the streaming call and print items as they arrive.")
@click.option("--json", "as_json", is_flag=True, help="Print only the JSON output.")
@pass_cli
@_friendly_errors
def call(obj: CliContext, capability: str, data: str | None, timeout: float, stream: bool, as_json: bool) -> None:
    """Call CAPABILITY through the mesh (as the operator) and print its result."""
    from hivemesh.sdk.client import MeshClient

    payload = _read_data(data)
    settings = obj.operator_settings()

    async def go() -> None:
        async with MeshClient.connect(name="admin", kind="operator", settings=settings) as mesh:
            await mesh.node.registry.wait_for_capability(capability, 1, timeout=min(timeout, 3.0))
            if stream:
                async for item in mesh.stream(capability, payload, timeout=timeout):
                    click.echo(json.dumps(item))
                return
            result = await mesh.call_detailed(capability, payload, timeout=timeout)
            if as_json:
                click.echo(json.dumps(result.output, indent=2))
                return
            out.print_json(json.dumps(result.output))
            hops = " → ".join(f"{h.kind}:{h.identity.rsplit('/', 1)[-1]}" for h in result.hops)
            err.print(f"[dim]served by {result.instance.card.name} ({result.instance.instance_id}, "
                      f"{result.instance.packaging}) via {hops}[/dim]", highlight=False)

    asyncio.run(go())


@cli.command("join-token")
@click.argument("name")
@click.option("--kind", type=click.Choice(["agent", "client"]), default="agent", show_default=True)
@click.option("--ttl", default=600, show_default=True, help="Seconds the token stays usable if unused.")
@click.option("--json", "as_json", is_flag=True)
@pass_cli
@_friendly_errors
def join_token(obj: CliContext, name: str, kind: str, ttl: int, as_json: bool) -> None:
    """Mint a one-time join token for a workload NAME (give it to the agent/sidecar as HIVEMESH_JOIN_TOKEN)."""
    from hivemesh.controlplane.client import ControlPlaneClient

    settings = obj.operator_settings()

    async def go() -> Any:
        async with ControlPlaneClient.from_certs_dir(settings.controlplane, obj.certs_dir) as cp:
            return await cp.create_join_token(name, kind, ttl)

    resp = asyncio.run(go())
    if as_json:
        click.echo(json.dumps({"token": resp.token, "expires_at_unix": resp.expires_at_unix, "name": name,
                               "kind": kind}))
    else:
        click.echo(resp.token)


# --- feature command groups (each in its own module, registered here) -------------------------------------------
# Only in the module imported as hivemesh.controlplane.cli: under `python -m hivemesh.controlplane.cli` this file
# also runs as __main__, which hands over to that module (bottom of the file); registering here too would make
# the feature modules' `from hivemesh.controlplane.cli import ...` a circular import.
if __name__ != "__main__":
    from hivemesh.controlplane.cli_policy import policy as _policy_group
    from hivemesh.controlplane.cli_policy import status as _status_command

    cli.add_command(_policy_group)  # hivemesh policy apply|get|list|delete|kinds (issue 3)
    cli.add_command(_status_command)  # hivemesh status (issue 3)
    from hivemesh.controlplane.cli_workflows import escalations as _escalations_group
    from hivemesh.controlplane.cli_workflows import workflows as _workflows_group

    cli.add_command(_workflows_group)  # hivemesh workflows list|show|cancel|resume (issue 5)
    cli.add_command(_escalations_group)  # hivemesh escalations list|show|approve|reject (issue 5)
    from hivemesh.controlplane.cli_audit import audit as _audit_group

    cli.add_command(_audit_group)  # hivemesh audit tail|query|verify|export (issue 4)
    from hivemesh.controlplane.cli_trust import ca as _ca_group
    from hivemesh.controlplane.cli_trust import keys as _keys_group
    from hivemesh.controlplane.cli_trust import tokens as _tokens_group

    cli.add_command(_keys_group)  # hivemesh keys rotate|list (issue 4)
    cli.add_command(_tokens_group)  # hivemesh tokens revoke|revocations (issue 4)
    cli.add_command(_ca_group)  # hivemesh ca rotate --step ...|status (issue 4)
    from hivemesh.controlplane.cli_authz import authz as _authz_group

    cli.add_command(_authz_group)  # hivemesh authz check (issue 4)


def main() -> None:
    """Console-script entry point."""
    from hivemesh.controlplane.procs import die_with_parent_if_asked

    die_with_parent_if_asked()
    cli(prog_name="hivemesh")


if __name__ == "__main__":
    from hivemesh.controlplane.cli import main as _main  # the module with every command group registered

    _main()

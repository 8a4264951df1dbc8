"""The `hivemesh` command line: the operator's one place to steer the mesh from.

This module is the root group (the shared options become the `CliContext` every command gets) and the list of
command groups, one module each. Every command that reports data takes `--json` for scripts; people get
tables. Errors are one clear line on stderr and a non-zero exit code (`context.friendly_errors`).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from hivemesh.controlplane.cli.context import CliContext
from hivemesh.controlplane.cli.localmesh import locate
from hivemesh.controlplane.cli.output import emit_error
from hivemesh.controlplane.cli.version import version_text
from hivemesh.mesh.lifeline import die_with_parent_if_asked
from hivemesh.mesh.logjson import basic_config

COMMANDS: dict[str, str] = {
    "up": "up:up",  # hivemesh up: a local mesh and a demo
    "certs": "certs:certs",  # hivemesh certs init
    "controlplane": "serve:controlplane",  # hivemesh controlplane
    "controlplanes": "replicas:controlplanes",  # hivemesh controlplanes: the replicas and the leader (issue 11)
    "sidecar": "serve:sidecar",  # hivemesh sidecar
    "agents": "operate:agents",  # hivemesh agents
    "call": "operate:call",  # hivemesh call CAPABILITY
    "join-token": "operate:join_token",  # hivemesh join-token NAME
    "policy": "policy:policy",  # hivemesh policy apply|get|list|delete|kinds (issue 3)
    "status": "policy:status",  # hivemesh status (issue 3)
    "workflows": "workflows:workflows",  # hivemesh workflows list|show|cancel|resume (issue 5)
    "escalations": "workflows:escalations",  # hivemesh escalations list|show|approve|reject (issue 5)
    "audit": "audit:audit",  # hivemesh audit tail|query|verify|export (issue 4)
    "keys": "trust:keys",  # hivemesh keys rotate|list (issue 4)
    "tokens": "trust:tokens",  # hivemesh tokens revoke|revocations (issue 4)
    "ca": "trust:ca",  # hivemesh ca rotate --step ...|status (issue 4)
    "authz": "authz:authz",  # hivemesh authz check (issue 4)
    "allow": "access:allow",  # hivemesh allow CALLER CAPABILITY... (issue 11)
    "slo": "slo:slo",  # hivemesh slo rules|list (issue 12)
    "top": "top:top",  # hivemesh top (issue 12)
    "a2a": "a2a:a2a",  # hivemesh a2a serve|register URL (issue 13)
    "state": "state:state",  # hivemesh state list|get (issue 15)
}
"""Each command by name: `module:attribute` in this package, imported only when the command runs (or `--help`
lists them all). A process runs one command: a sidecar then loads none of the control plane's code, and a command
starts on about half the CPU it took with every command loaded (`bench/cli_start.py`, BENCHMARKS.md)."""


class _Root(click.Group):
    """The root group: its commands load lazily, by name (COMMANDS).

    With `--json` among the arguments, a mistake click itself finds while reading them (an option missing, a file
    that is a folder, a bad --home) is one JSON error object too, with the same exit code, as every command's own
    errors are (`output.emit_error`); click wrote its usage text instead, before any command's `friendly_errors`
    could run. Without `--json`, click's own text, as ever."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = self.commands.get(cmd_name)
        if found is None and cmd_name in COMMANDS:
            module, _, attribute = COMMANDS[cmd_name].partition(":")
            found = getattr(importlib.import_module(f"{__package__}.{module}"), attribute)
            assert isinstance(found, click.Command) and found.name == cmd_name, (cmd_name, found)
            self.add_command(found)
        return found

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if not standalone_mode or "--json" not in argv:
            return super().main(argv, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            emit_error("INVALID_ARGUMENT", exc.format_message(), as_json=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            emit_error("FAILED_PRECONDITION", exc.format_message(), as_json=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            emit_error("CANCELLED", "aborted", as_json=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)  # as standalone mode ends (an Exit's code: --help is 0)


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(version_text())
        ctx.exit()


@click.group(cls=_Root, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", envvar="HIVEMESH_HOME", default=".hivemesh", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="State folder (etcd data, logs, mesh.json).")
@click.option("--certs-dir", envvar="HIVEMESH_CERTS", default="certs", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="CA and operator certificates.")
@click.option("-v", "--verbose", is_flag=True, help="Log what the mesh does.")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version, the Python and grpcio it runs on and the OpenSSL of its TLS, and exit.")
@click.pass_context
def cli(ctx: click.Context, home: Path, certs_dir: Path, verbose: bool) -> None:
    """hivemesh: a gRPC agent mesh with a sidecar control plane."""
    try:
        basic_config(logging.INFO if verbose else logging.WARNING)  # HIVEMESH_LOG_FORMAT=json: JSON lines
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    given = {name: ctx.get_parameter_source(name) is not ParameterSource.DEFAULT for name in ("home", "certs_dir")}
    home, certs_dir = locate(ctx.invoked_subcommand, home.resolve(), certs_dir.resolve(),  # a mesh run elsewhere
                             home_given=given["home"], certs_given=given["certs_dir"])
    os.environ["HIVEMESH_HOME"] = str(home)
    ctx.obj = CliContext(home=home, certs_dir=certs_dir, verbose=verbose)


def main() -> None:
    """Console-script entry point (also `python -m hivemesh.controlplane.cli`)."""
    die_with_parent_if_asked()
    cli(prog_name="hivemesh")

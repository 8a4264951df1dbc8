"""The root command group loads a command's module only when that command runs (`cli/app.py`, COMMANDS)."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from hivemesh.controlplane.cli.app import COMMANDS, cli


def test_every_listed_command_loads_under_its_own_name_and_help_lists_them_all() -> None:
    ctx = click.Context(cli)
    for name in COMMANDS:
        command = cli.get_command(ctx, name)
        assert isinstance(command, click.Command) and command.name == name
    assert cli.list_commands(ctx) == sorted(COMMANDS)
    assert cli.get_command(ctx, "no-such-command") is None
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    lines = result.output.split("Commands:", 1)[1].splitlines()
    listed = [line.split()[0] for line in lines if line.startswith("  ") and not line.startswith("   ")]
    assert listed == sorted(COMMANDS)


_PROBE = """
import sys
from hivemesh.controlplane.cli.app import cli
try:
    cli.main(sys.argv[1:], prog_name="hivemesh", standalone_mode=False)
finally:
    print(__import__("json").dumps(sorted(sys.modules)), file=sys.stderr)
"""


@pytest.mark.parametrize(("argv", "loads", "leaves"), [
    (["--version"], [], ["operate", "serve", "policy", "up", "a2a", "top"]),
    (["agents", "--help"], ["operate"], ["serve", "policy", "up", "a2a", "top", "slo"]),
    (["sidecar", "--help"], ["serve"], ["operate", "policy", "up", "a2a", "top", "access", "workflows"]),
])
def test_a_command_loads_its_own_module_and_no_other_commands(argv: list[str], loads: list[str],
                                                              leaves: list[str]) -> None:
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    modules = set(json.loads(done.stderr.strip().splitlines()[-1]))
    package = "hivemesh.controlplane.cli."
    assert {package + m for m in loads} <= modules
    assert not {package + m for m in leaves} & modules
    if argv[0] == "sidecar":  # the data plane's process loads none of the control plane's own code
        assert not {"hivemesh.controlplane.server", "hivemesh.controlplane.ca", "hivemesh.sdk.patterns"} & modules

"""The `hivemesh` CLI run in-process (click's CliRunner), for commands that need no running mesh (parsing, files,
output); with the `home` fixture of tests/unit/conftest.py."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from hivemesh.controlplane.cli.app import cli


def hivemesh(home: Path, *args: str, stdin: str | bytes | None = None) -> Result:
    """`hivemesh ARGS` with home's state and certs folders."""
    base = ["--home", str(home / "home"), "--certs-dir", str(home / "certs")]
    return CliRunner().invoke(cli, [*base, *args], input=stdin, prog_name="hivemesh")

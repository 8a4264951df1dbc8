"""The `hivemesh` command line and the local dev launcher (`hivemesh up`).

A leaf: it may import every other hivemesh package, and none imports it (an import-linter contract).
Public names: `cli` (the root click group) and `main` (the console-script entry point). One module per
command group; `context` holds what they share.
"""

from hivemesh.controlplane.cli.app import cli, main

__all__ = ["cli", "main"]

"""The `hivemesh` command line and the local dev launcher (`hivemesh up`).

A leaf: it may import every other hivemesh package, and none imports it (an import-linter contract).
Public names: `main` (the console-script entry point; `cli`, the root click group, lives in `.app`). One module
per command group; `context` holds what they share.

This package's own import loads nothing of gRPC, so `main` can decide before gRPC loads whether the command is
one of the servers hivemesh owns (`sidecar`, `controlplane`), which audit the TLS handshakes they refuse: gRPC
reads its handshaker tracer setting once, when it loads (`hivemesh.mesh.audit.handshake.switch`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main", "owned_server_command"]

_OWNED_SERVERS = frozenset({"sidecar", "controlplane"})
_VALUED_GLOBAL_OPTIONS = frozenset({"--home", "--certs-dir"})


def owned_server_command(argv: Sequence[str]) -> bool:
    """Whether argv (without the program name) runs `hivemesh sidecar` or `hivemesh controlplane`: the first
    word that is neither a global option nor its value names the command."""
    skip = False
    for word in argv:
        if skip:
            skip = False
            continue
        if word in _VALUED_GLOBAL_OPTIONS:
            skip = True
            continue
        if word.startswith("-"):
            continue
        return word in _OWNED_SERVERS
    return False


def main() -> None:
    """Console-script entry point (also `python -m hivemesh.controlplane.cli`)."""
    if owned_server_command(sys.argv[1:]):
        from hivemesh.mesh.audit.handshake.switch import enable

        enable()  # before gRPC loads: the tracer that reports refused handshakes, and the consent to the tee
    from hivemesh.controlplane.cli.app import main as run

    run()

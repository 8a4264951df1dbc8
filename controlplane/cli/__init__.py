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

__all__ = ["audits_handshakes", "main", "owned_server_command"]

_OWNED_SERVERS = frozenset({"sidecar", "controlplane"})
_VALUED_GLOBAL_OPTIONS = frozenset({"--home", "--certs-dir"})


def _command(argv: Sequence[str]) -> tuple[str, Sequence[str]]:
    """(the command argv runs, the words after it); ("", ()) when there is none. The command is the first word
    that is neither a global option nor its value."""
    skip = False
    for i, word in enumerate(argv):
        if skip:
            skip = False
            continue
        if word in _VALUED_GLOBAL_OPTIONS:
            skip = True
            continue
        if word.startswith("-"):
            continue
        return word, argv[i + 1:]
    return "", ()


def owned_server_command(argv: Sequence[str]) -> bool:
    """Whether argv (without the program name) runs `hivemesh sidecar` or `hivemesh controlplane`."""
    return _command(argv)[0] in _OWNED_SERVERS


def audits_handshakes(argv: Sequence[str]) -> bool:
    """Whether the owned server argv runs has a mutual-TLS port whose refused handshakes it audits: not a
    caller-only sidecar (`sidecar --client NAME`), which serves Mesh on a local socket and nothing over TLS."""
    command, rest = _command(argv)
    if command not in _OWNED_SERVERS:
        return False
    return command != "sidecar" or not any(w == "--client" or w.startswith("--client=") for w in rest)


def main() -> None:
    """Console-script entry point (also `python -m hivemesh.controlplane.cli`)."""
    argv = sys.argv[1:]
    if owned_server_command(argv):
        from hivemesh.mesh.audit.handshake.tracer import start_owned

        # Before gRPC loads (it reads the tracer setting then) and before the command connects anywhere (etcd,
        # the agent, the control plane): the tracer and the stderr tee that keeps its lines out of the log.
        start_owned(audits=audits_handshakes(argv))
    from hivemesh.controlplane.cli.app import main as run

    run()

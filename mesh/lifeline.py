"""Die with the launcher: processes hivemesh starts (`hivemesh up`'s children, the benchmark's) end when it ends.

Stdlib only, so a plain gRPC agent (`python -m hivemesh.agents.run validator`) can call it without the
mesh runtime; the launcher (`hivemesh.controlplane.cli.procs`) sets `PARENT_ENV` for its children.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

__all__ = ["PARENT_ENV", "die_with_parent_if_asked"]

_PR_SET_PDEATHSIG = 1
PARENT_ENV = "HIVEMESH_PARENT_PID"


def die_with_parent_if_asked() -> None:
    """Called first thing by hivemesh processes: if started by `hivemesh up`, die when it dies.

    Done in the child itself, not in a preexec_fn: a preexec_fn forces a plain fork() of a process with gRPC
    threads, which gRPC does not survive, while without one Python spawns children with vfork + exec.
    """
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if str(os.getppid()) != parent:  # the parent died before prctl took effect
        os._exit(1)

"""A child process under resource limits, set by a small exec wrapper rather than a `preexec_fn`.

A `preexec_fn` makes Python start the child with a plain fork() instead of vfork + exec. A test process runs gRPC's
threads (its poller, its executor), and a forked copy of it runs gRPC's fork handlers in a child whose other
threads are gone: measured on 6 Dec, 38 of 200 such children of a process making gRPC calls died by SIGSEGV
before their exec, 0 of 200 started without one. The "gRPC poller abort at the CLI's exit" of earlier runs
(SIGABRT, "epoll_wait error: Bad file descriptor") was such a child dying before the CLI ever ran. The wrapper
is a fresh interpreter with no gRPC in it: it sets the limits and execs the command, which inherits them.
"""

from __future__ import annotations

import sys

__all__ = ["limited"]

_WRAPPER = (
    "import os, resource, signal, sys\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"  # a write past the file limit fails instead of killing
    "fsize, space = int(sys.argv[1]), int(sys.argv[2])\n"
    "if fsize: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))\n"
    "if space: resource.setrlimit(resource.RLIMIT_AS, (space, space))\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)
"""Runs argv[3:] with each file it writes limited to argv[1] bytes and its address space to argv[2] (0: no
limit). The ignored SIGXFSZ and both limits are inherited across exec."""


def limited(command: list[str], *, file_bytes: int = 0, address_space: int = 0) -> list[str]:
    """command (an absolute executable first), run under the limits: file_bytes, the most any file it writes may
    hold (RLIMIT_FSIZE: a write past it fails with EFBIG, as on a disk that fills up); address_space, the most
    memory it may map (RLIMIT_AS: an allocation past it fails). 0 leaves a limit as it is."""
    if file_bytes < 0 or address_space < 0:
        raise ValueError("limits are byte counts, 0 for none")
    if not command or not command[0].startswith("/"):
        raise ValueError(f"the command needs its executable's absolute path first: {command!r}")
    return [sys.executable, "-c", _WRAPPER, str(file_bytes), str(address_space), *command]

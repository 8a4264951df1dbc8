"""The event loop hivemesh's own processes run on: uvloop's (libuv, in C) where it imports, else asyncio's.

A mesh call is mostly event-loop work at small sizes (callbacks, wake-ups, timers), and uvloop does it in C.
callgrind, one in-process call at a time (`bench/mesh_instructions.py`, BENCHMARKS.md): 0.822x the instructions at
200 B and 0.935x at 64 KiB, and an idle node's loop 0.72x. Agents started with `hivemesh.sdk.run`, programs started
with `hivemesh.sdk.run_main`, the reference agents and every `hivemesh` command run on it.

`HIVEMESH_LOOP` chooses: `auto` (the default: uvloop when installed), `uvloop` (required: an error without it) or
`asyncio` (the standard loop: for a debugger or a library that needs it).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, Final, TypeVar

T = TypeVar("T")

LOOP_ENV: Final = "HIVEMESH_LOOP"
CHOICES: Final = ("auto", "uvloop", "asyncio")


def loop_factory(choice: str | None = None) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory of the loop to run on (None: asyncio's own), from choice or else $HIVEMESH_LOOP. Raises
    ValueError for an unknown choice and RuntimeError when uvloop is required but not installed."""
    raw = (os.environ.get(LOOP_ENV, "") if choice is None else choice).strip().lower() or "auto"
    if raw not in CHOICES:
        raise ValueError(f"{LOOP_ENV} must be one of {', '.join(CHOICES)}, not {raw!r}")
    if raw == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if raw == "uvloop":
            raise RuntimeError(f"{LOOP_ENV}=uvloop, but uvloop is not installed (pip install uvloop)") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], *, choice: str | None = None) -> T:
    """`asyncio.run(main)` on the mesh's loop (`loop_factory`)."""
    try:
        factory = loop_factory(choice)
    except BaseException:
        main.close()  # never awaited: close it, or Python warns about it
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


__all__ = ["CHOICES", "LOOP_ENV", "loop_factory", "run"]

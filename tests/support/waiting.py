"""Bounded waiting on a condition that has no event of its own (connection state, counters), for tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def until(cond: Callable[[], bool], limit_s: float, step_s: float = 0.02) -> bool:
    """True once cond() holds, False if it still does not after limit_s: the caller asserts with its own message."""
    deadline = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(step_s)
    return True

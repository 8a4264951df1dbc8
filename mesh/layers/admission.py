"""Admission: the bounded in-flight limit per agent with priority classes (`concurrency` policies), and the
per-capability in-flight and error counts `hivemesh status` reports.

Unlike the checks before it, admission may wait (in a bounded, priority-ordered queue), and it holds a slot
for as long as the handler runs, so the interceptor awaits `enter` once every check passed and calls the
returned `done(failed)` when the call ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from hivemesh.mesh.layers.base import Inbound
from hivemesh.mesh.resilience.traffic import Traffic

Done = Callable[[bool], None]


class Admission:
    """Admits calls into one agent: waits for a slot (high priority first) or sheds with OVERLOADED."""

    name = "admission"

    def __init__(self, traffic: Traffic, agent_name: str) -> None:
        self._traffic = traffic
        self._agent = agent_name

    async def enter(self, call: Inbound, time_remaining: float | None) -> Done | None:
        """Take a slot for call (raises OverloadedError / DeadlineExceededError when shed); None for Describe."""
        req = call.request
        if req is None:
            return None
        t = self._traffic.state
        capability = req.capability
        policy = self._traffic.policy.concurrency(self._agent)
        gate = t.gate(self._agent, policy) if policy is not None else None
        if gate is not None:
            await gate.acquire(req.context.priority, timeout=time_remaining)
        t.in_started(capability)
        started = time.monotonic()

        def done(failed: bool) -> None:
            t.in_finished(capability, failed=failed, seconds=time.monotonic() - started)
            if gate is not None:
                gate.release()

        return done

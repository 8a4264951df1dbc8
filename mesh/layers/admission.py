"""Admission: the bounded in-flight limit per agent with priority classes (`concurrency` policies), and the
per-capability in-flight and error counts `hivemesh status` reports.

Unlike the checks before it, admission may wait (in a bounded, priority-ordered queue), and it holds a slot
for as long as the handler runs, so the interceptor awaits `enter` once every check passed and calls the
returned `done(failed)` when the call ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from hivemesh.mesh.errors import DeadlineExceededError, OverloadedError
from hivemesh.mesh.layers.base import Inbound
from hivemesh.mesh.resilience.concurrency import overdue
from hivemesh.mesh.resilience.traffic import Traffic

Done = Callable[[bool], None]

UNQUEUED_WAIT_SHARE: Final = 0.25
"""With no `concurrency` policy, a call that waited more than this share of its deadline in the agent before it
could start is shed (OVERLOADED, retryable). Its caller's clock started before the agent read the call, and its
answer waits for the loop too, so past about a third the answer comes too late; an agent that ran such calls
anyway, offered 1.5x what it could do, answered none of them in time (`bench/overload.py`). Calls without a
deadline are never shed by it, nor any call that waited less than `UNQUEUED_MIN_WAIT_S`."""
UNQUEUED_MIN_WAIT_S: Final = 0.1
"""A loaded host stalls a loop for tens of milliseconds now and then (a burst, a collection): the share above is
for an agent that stays behind, so a short deadline is not shed for such a stall."""


class Admission:
    """Admits calls into one agent: waits for a slot (high priority first) or sheds with OVERLOADED."""

    name = "admission"

    def __init__(self, traffic: Traffic, agent_name: str) -> None:
        self._traffic = traffic
        self._agent = agent_name

    def too_late(self, call: Inbound, time_remaining: float | None, waited: float) -> None:
        """Shed a call that waited too long in this agent before it could start: its deadline passed
        (DeadlineExceededError), or it waited past its agent's `concurrency` queue timeout, or with no such policy
        past `UNQUEUED_WAIT_SHARE` of its deadline (OverloadedError). waited: seconds since it reached the agent.

        Such calls waited as tasks on a busy event loop, whose timers could not fire meanwhile: their callers have
        given up or soon will, and running them would take the time of calls that can still make it."""
        req = call.request
        if req is None:
            return
        if time_remaining is not None and time_remaining <= 0:
            raise DeadlineExceededError(f"the deadline passed before the call could start: it waited {waited:.3f} s "
                                        "in this agent")
        policy = self._traffic.policy.concurrency(self._agent)
        if policy is not None:
            refusal = overdue(policy, waited, req.context.priority)
            if refusal is not None:
                self._traffic.state.gate(self._agent, policy).shed += 1
                raise refusal
        elif (time_remaining is not None and waited >= UNQUEUED_MIN_WAIT_S
              and waited > UNQUEUED_WAIT_SHARE * (waited + time_remaining)):
            raise OverloadedError(
                f"the call waited {waited:.3f} s in this agent before it could start, over "
                f"{UNQUEUED_WAIT_SHARE:.0%} of its deadline: the agent is busier than it can serve (a `concurrency` "
                "policy sets a bound of its own)", retry_after_s=0.05)

    async def enter(self, call: Inbound, time_remaining: float | None, waited: float = 0.0) -> Done | None:
        """Take a slot for call (raises OverloadedError / DeadlineExceededError when shed); None for Describe.
        waited: seconds since the call reached this agent, which its queue timeout counts (`too_late` has
        already refused a call that came too late)."""
        req = call.request
        if req is None:
            return None
        t = self._traffic.state
        capability = req.capability
        policy = self._traffic.policy.concurrency(self._agent)
        gate = t.gate(self._agent, policy) if policy is not None else None
        if gate is not None:
            await gate.acquire(req.context.priority, timeout=time_remaining, waited=waited)
        t.in_started(capability)
        started = time.monotonic()

        def done(failed: bool) -> None:
            t.in_finished(capability, failed=failed, seconds=time.monotonic() - started)
            if gate is not None:
                gate.release()

        return done

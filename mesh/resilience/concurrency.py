"""Concurrency and priority: a bounded number of calls in flight per agent, high priority first, shed the rest.

Calls past `max_in_flight` wait in a bounded queue ordered by priority (CallContext.priority, higher first;
FIFO within a priority). Priority classes may reserve slots: a call below a class's `min_priority` cannot use
the slots that class reserves, so urgent calls find room even when the agent is busy with background work.
A full queue sheds its lowest-priority call (the newcomer, if it is no higher) with RESOURCE_EXHAUSTED /
OVERLOADED, and a call that waited `queue_timeout_s` is shed too: load is refused, never queued without bound.

The wait counts from when the call reached the agent, not from when it asked for a slot. A handler that computes
on the event loop finishes before the next call gets there, so slots stay free while the calls behind it wait
as tasks on the loop: without that, an agent offered more than it can do ran every call, each one after its
caller had given up, and answered none in time (`bench/overload.py`).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass

from hivemesh.mesh.errors import DeadlineExceededError, OverloadedError


@dataclass(frozen=True)
class PriorityClass:
    name: str
    min_priority: int
    reserved: int = 0
    """Slots of max_in_flight only calls at or above min_priority may use."""


@dataclass(frozen=True)
class ConcurrencyPolicy:
    max_in_flight: int = 64
    max_queue: int = 64
    queue_timeout_s: float = 1.0
    classes: tuple[PriorityClass, ...] = ()

    def __post_init__(self) -> None:
        if self.max_in_flight < 1 or self.max_queue < 0 or self.queue_timeout_s < 0:
            raise ValueError("max_in_flight >= 1, max_queue >= 0 and queue_timeout_s >= 0 are required")
        if sum(c.reserved for c in self.classes) >= self.max_in_flight:
            raise ValueError("reserved slots must leave at least one slot for every priority")
        object.__setattr__(self, "classes", tuple(sorted(self.classes, key=lambda c: -c.min_priority)))

    def usable(self, priority: int) -> int:
        """Slots a call of this priority may occupy."""
        return self.max_in_flight - sum(c.reserved for c in self.classes if c.min_priority > priority)

    def class_of(self, priority: int) -> str:
        for c in self.classes:
            if priority >= c.min_priority:
                return c.name
        return "default"


def overdue(policy: ConcurrencyPolicy, waited: float, priority: int) -> OverloadedError | None:
    """The refusal of a call that waited `waited` seconds in the agent before it could start, when that is past
    the policy's queue timeout (never with queue_timeout_s 0, "no queue": there only a full house sheds)."""
    if not 0 < policy.queue_timeout_s <= waited:
        return None
    return OverloadedError(
        f"the call waited {waited:.3f} s in this agent before it could start, past its queue timeout of "
        f"{policy.queue_timeout_s:g} s: the agent is busier than it can serve",
        metadata={"max_in_flight": str(policy.max_in_flight), "class": policy.class_of(priority)},
        retry_after_s=0.05,
    )


class _Waiter:
    __slots__ = ("future", "priority", "seq")

    def __init__(self, priority: int, seq: int, future: asyncio.Future[None]) -> None:
        self.priority = priority
        self.seq = seq
        self.future = future

    def __lt__(self, other: _Waiter) -> bool:
        return (-self.priority, self.seq) < (-other.priority, other.seq)


class ConcurrencyGate:
    """In-flight accounting for one agent. `acquire` then exactly one `release` per admitted call."""

    def __init__(self, policy: ConcurrencyPolicy) -> None:
        self.policy = policy
        self.in_flight = 0
        self._queue: list[_Waiter] = []
        self._seq = itertools.count()
        self.admitted = 0
        self.shed = 0

    @property
    def queued(self) -> int:
        return sum(1 for w in self._queue if not w.future.done())

    def configure(self, policy: ConcurrencyPolicy) -> None:
        self.policy = policy
        self._wake()

    def _can_run(self, priority: int) -> bool:
        return self.in_flight < self.policy.usable(priority)

    async def acquire(self, priority: int = 0, *, timeout: float | None = None, waited: float = 0.0) -> None:
        """Take a slot, waiting in the queue if needed; raises OverloadedError (shed) or DeadlineExceededError
        (the caller's deadline, `timeout`, passed while queued). waited: seconds the call already spent in this
        agent before it asked (see the module docstring): they count against `queue_timeout_s`. A call that waited
        it all is refused before it asks (`overdue`)."""
        policy = self.policy
        self._purge()
        ahead = bool(self._queue) and self._queue[0].priority >= priority
        if self._can_run(priority) and not ahead:
            self.in_flight += 1
            self.admitted += 1
            return
        if len(self._queue) >= policy.max_queue:
            lowest = max(self._queue) if self._queue else None
            if lowest is None or lowest.priority >= priority:
                self.shed += 1
                raise OverloadedError(
                    f"agent is at its limit of {policy.max_in_flight} calls in flight and its queue is full",
                    metadata={"max_in_flight": str(policy.max_in_flight), "class": policy.class_of(priority)},
                    retry_after_s=0.05,
                )
            self._queue.remove(lowest)
            heapq.heapify(self._queue)
            self.shed += 1
            lowest.future.set_exception(
                OverloadedError("shed from the queue for a call of higher priority", retry_after_s=0.05)
            )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(priority, next(self._seq), future)
        heapq.heappush(self._queue, waiter)
        left = max(policy.queue_timeout_s - waited, 0.0)
        wait = left if timeout is None else min(left, max(timeout, 0.0))
        try:
            async with asyncio.timeout(wait):
                await future
        except TimeoutError:
            self._drop(waiter)
            self.shed += 1
            if timeout is not None and timeout <= left:
                raise DeadlineExceededError("the deadline passed while the call waited for a slot") from None
            raise OverloadedError(
                f"no slot freed within {policy.queue_timeout_s:g} s (limit {policy.max_in_flight} in flight)",
                metadata={"max_in_flight": str(policy.max_in_flight), "class": policy.class_of(priority)},
                retry_after_s=0.05,
            ) from None
        except BaseException:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release()  # granted, then cancelled before we could use it: hand the slot on
            else:
                self._drop(waiter)
            raise
        self.admitted += 1

    def release(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        self._wake()

    def _drop(self, waiter: _Waiter) -> None:
        if waiter in self._queue:
            self._queue.remove(waiter)
            heapq.heapify(self._queue)

    def _purge(self) -> None:
        while self._queue and self._queue[0].future.done():
            heapq.heappop(self._queue)

    def _wake(self) -> None:
        while self._queue:
            head = self._queue[0]
            if head.future.done():
                heapq.heappop(self._queue)
                continue
            if not self._can_run(head.priority):
                return
            heapq.heappop(self._queue)
            self.in_flight += 1
            head.future.set_result(None)

"""Retries: which failures may be tried again, when, and how many, so that retries never amplify an outage.

- Only codes the policy lists are retried, and never INVALID_ARGUMENT, PERMISSION_DENIED, UNAUTHENTICATED or
  FAILED_PRECONDITION: the same request would fail the same way.
- A call that may have reached the agent is retried only if its capability is idempotent or the call carries
  an idempotency key (the SDK server then runs each key once). A request that was certainly never sent
  (connection refused) may always move to another instance.
- Backoff grows exponentially with jitter, and a server's RetryInfo delay is honoured.
- A retry budget caps retries at a fraction of calls over a sliding window (Finagle/Linkerd style): during an
  outage attempts ÷ calls stays at or below 1 + ratio.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from hivemesh.mesh.resilience.window import WindowCounter

NEVER_RETRIED: frozenset[grpc.StatusCode] = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)
"""Codes no policy may retry."""

MAX_ATTEMPTS = 10


@dataclass(frozen=True)
class Backoff:
    """Delay before retry n (1-based): min(max_s, base_s * multiplier**(n-1)), minus up to `jitter` of it."""

    base_s: float = 0.025
    max_s: float = 1.0
    multiplier: float = 2.0
    jitter: float = 0.5
    """Fraction of the delay drawn at random (1.0 is AWS's "full jitter")."""

    def __post_init__(self) -> None:
        if self.base_s < 0 or self.max_s < self.base_s:
            raise ValueError("backoff needs 0 <= base_s <= max_s")
        if self.multiplier < 1:
            raise ValueError("backoff multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("backoff jitter must be within 0..1")

    def delay(self, retry: int, rng: Callable[[], float] = random.random) -> float:
        if retry < 1:
            return 0.0
        d = min(self.max_s, self.base_s * self.multiplier ** (retry - 1))
        return d * (1.0 - self.jitter * rng())


@dataclass(frozen=True)
class RetryPolicy:
    """How one capability's calls are retried."""

    attempts: int = 3
    """Total attempts including the first (1 disables retries)."""
    per_try_timeout_s: float | None = None
    """Deadline of each attempt (within the call's own deadline); a timed-out attempt may be retried."""
    backoff: Backoff = field(default_factory=Backoff)
    retryable: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})
    budget_ratio: float = 0.2
    """Retries may be at most this fraction of calls in the window..."""
    budget_min_per_s: float = 1.0
    """...or this many per second of the window, whichever is more (so a trickle of calls can still retry)."""
    budget_window_s: float = 10.0

    def __post_init__(self) -> None:
        if not 1 <= self.attempts <= MAX_ATTEMPTS:
            raise ValueError(f"attempts must be within 1..{MAX_ATTEMPTS}")
        if self.per_try_timeout_s is not None and self.per_try_timeout_s <= 0:
            raise ValueError("per_try_timeout_s must be positive")
        forbidden = self.retryable & NEVER_RETRIED
        if forbidden:
            raise ValueError(f"{', '.join(sorted(c.name for c in forbidden))} must never be retried")
        if not 0 <= self.budget_ratio <= 10 or self.budget_min_per_s < 0 or self.budget_window_s <= 0:
            raise ValueError("budget needs 0 <= ratio <= 10, min_per_s >= 0, window_s > 0")

    def is_retryable(self, code: grpc.StatusCode, *, per_try_timed_out: bool = False) -> bool:
        """Whether a failed attempt with code is one this policy retries (before idempotency and budget)."""
        if code in NEVER_RETRIED:
            return False
        if per_try_timed_out:
            return True  # the point of a per-try timeout is to try again within the call's deadline
        return code in self.retryable


def may_resend(*, idempotent: bool, idempotency_key: bool) -> bool:
    """A request that may have reached the agent can be sent again only if running it twice is harmless."""
    return idempotent or idempotency_key


class RetryBudget:
    """Allows a retry while retries in the window stay within max(ratio × calls, min_per_s × window_s)."""

    _CALLS, _RETRIES = 0, 1

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_s: float = 1.0,
        window_s: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.window_s = window_s
        self._window = WindowCounter(window_s, width=2, clock=clock)
        self.denied = 0

    def configure(self, ratio: float, min_per_s: float) -> None:
        """Adopt a changed policy without forgetting the traffic already counted."""
        self.ratio, self.min_per_s = ratio, min_per_s

    def record_call(self) -> None:
        """Count one call (its first attempt)."""
        self._window.add(self._CALLS)

    def try_spend(self) -> bool:
        """Take one retry from the budget if there is room; False (and counted as denied) otherwise."""
        calls, retries = self._window.totals()
        allowance = max(self.ratio * calls, self.min_per_s * self.window_s)
        if retries + 1 > allowance:
            self.denied += 1
            return False
        self._window.add(self._RETRIES)
        return True

    def counts(self) -> tuple[int, int]:
        """(calls, retries) in the window."""
        calls, retries = self._window.totals()
        return calls, retries

"""Circuit breakers: stop sending to what keeps failing, probe it now and then, resume when it works again.

One `CircuitBreaker` guards one target: an instance of a capability (outlier ejection), or a whole capability
(fail fast with CIRCUIT_OPEN and let the caller degrade). It opens on `consecutive_failures` in a row, or on a
failure ratio over a sliding window once `min_calls` were seen; after `open_s` it lets `half_open_probes`
probe calls through (half-open); that many successes close it, a failure opens it again for twice as long
(up to `max_open_s`). An instance breaker may open only while `may_open()` agrees, which is how the maximum
ejected share is kept: the last instances of a capability are never all ejected.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from hivemesh.mesh.resilience.window import WindowCounter

DEFAULT_FAILURE_CODES: frozenset[grpc.StatusCode] = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.DATA_LOSS,
    }
)
"""What counts against a target's health by default; a refused input or a denied token says nothing about it."""


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(frozen=True)
class BreakerPolicy:
    """When a breaker opens and how it recovers."""

    consecutive_failures: int | None = 5
    failure_ratio: float | None = None
    window_s: float = 10.0
    min_calls: int = 20
    open_s: float = 5.0
    max_open_s: float = 60.0
    half_open_probes: int = 1

    def __post_init__(self) -> None:
        if self.consecutive_failures is None and self.failure_ratio is None:
            raise ValueError("a breaker needs consecutive_failures or failure_ratio")
        if self.consecutive_failures is not None and self.consecutive_failures < 1:
            raise ValueError("consecutive_failures must be >= 1")
        if self.failure_ratio is not None and not 0 < self.failure_ratio <= 1:
            raise ValueError("failure_ratio must be within (0, 1]")
        if self.window_s <= 0 or self.min_calls < 1 or self.open_s <= 0 or self.max_open_s < self.open_s:
            raise ValueError("window_s, min_calls, open_s must be positive and max_open_s >= open_s")
        if self.half_open_probes < 1:
            raise ValueError("half_open_probes must be >= 1")


class CircuitBreaker:
    """The state machine of one target. Every `allow()` that returned True must be followed by exactly one
    of `on_success()`, `on_failure()` or `on_neutral()` (an outcome that says nothing about health)."""

    _OK, _FAILED = 0, 1

    def __init__(self, policy: BreakerPolicy, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._state = State.CLOSED
        self._consecutive = 0
        self._window = WindowCounter(policy.window_s, width=2, clock=clock)
        self._open_until = 0.0
        self._times_opened = 0
        self._probes_in_flight = 0
        self._probe_successes = 0
        self.opened_count = 0
        self.closed_count = 0
        self.rejected = 0
        self.opened_at = 0.0

    def configure(self, policy: BreakerPolicy) -> None:
        """Adopt a changed policy, keeping the state: what was learnt about the target's health stays (a new
        window if its length changed), the new settings decide from now on.

        An open breaker's open time is measured again under the new `open_s`/`max_open_s`, from when it opened
        (with the doubling it had reached): otherwise a shortened `open_ms` (an operator unsticking a breaker
        opened for 10 minutes) would only apply from its next opening, and a lengthened one likewise.
        """
        if policy.window_s != self.policy.window_s:
            self._window = WindowCounter(policy.window_s, width=2, clock=self._clock)
        self.policy = policy
        if self.state is State.OPEN:  # (still open now: a half-open one stays so)
            self._open_until = self.opened_at + self._open_duration()

    @property
    def state(self) -> State:
        if self._state is State.OPEN and self._clock() >= self._open_until:
            self._state = State.HALF_OPEN
            self._probes_in_flight = 0
            self._probe_successes = 0
        return self._state

    @property
    def open_until(self) -> float:
        """When the last opening let (or lets) probes through: the clock time it turned (turns) half-open."""
        return self._open_until

    @property
    def ejected(self) -> bool:
        """True while no ordinary call should be sent (open, or half-open with every probe slot taken)."""
        s = self.state
        return s is State.OPEN or (s is State.HALF_OPEN and self._probes_in_flight >= self.policy.half_open_probes)

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive

    def failure_ratio(self) -> float:
        ok, failed = self._window.totals()
        return failed / (ok + failed) if ok + failed else 0.0

    def window_counts(self) -> tuple[int, int]:
        """(successes, failures) in the window."""
        ok, failed = self._window.totals()
        return ok, failed

    def allow(self) -> bool:
        """May a call go to this target now? In half-open, True takes one probe slot."""
        s = self.state
        if s is State.CLOSED:
            return True
        if s is State.HALF_OPEN and self._probes_in_flight < self.policy.half_open_probes:
            self._probes_in_flight += 1
            return True
        self.rejected += 1
        return False

    def on_success(self) -> None:
        self._window.add(self._OK)
        self._consecutive = 0
        if self._state is State.HALF_OPEN:
            self._probes_in_flight = max(0, self._probes_in_flight - 1)
            self._probe_successes += 1
            if self._probe_successes >= self.policy.half_open_probes:
                self._close()

    def on_neutral(self) -> None:
        if self._state is State.HALF_OPEN:
            self._probes_in_flight = max(0, self._probes_in_flight - 1)

    def on_failure(self, may_open: Callable[[], bool] = lambda: True) -> bool:
        """Count a failure; returns True if this failure opened the breaker."""
        self._window.add(self._FAILED)
        self._consecutive += 1
        if self._state is State.HALF_OPEN:
            self._probes_in_flight = max(0, self._probes_in_flight - 1)
            self._open()  # a failed probe: the target is still broken (the share check passed when it first opened)
            return True
        if self._state is State.OPEN or not self._tripped() or not may_open():
            return False
        self._open()
        return True

    def _tripped(self) -> bool:
        p = self.policy
        if p.consecutive_failures is not None and self._consecutive >= p.consecutive_failures:
            return True
        if p.failure_ratio is not None:
            ok, failed = self._window.totals()
            total = ok + failed
            return total >= p.min_calls and failed / total >= p.failure_ratio
        return False

    def _open_duration(self) -> float:
        """open_s, doubled for each opening since it last closed, up to max_open_s (the exponent bounded: a
        target failing its probes for days must not overflow the float)."""
        p = self.policy
        return min(p.max_open_s, p.open_s * 2.0 ** min(64, max(0, self._times_opened - 1)))

    def _open(self) -> None:
        self._times_opened += 1
        self._state = State.OPEN
        self.opened_at = self._clock()
        self._open_until = self.opened_at + self._open_duration()
        self._probes_in_flight = 0
        self._probe_successes = 0
        self.opened_count += 1

    def _close(self) -> None:
        self._state = State.CLOSED
        self._consecutive = 0
        self._times_opened = 0
        self._window.reset()
        self.closed_count += 1

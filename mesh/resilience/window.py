"""A sliding-window counter: how many events of each kind happened in the last few seconds.

Shared by the retry budget (calls vs retries), the circuit breaker (failure ratio) and the status report
(recent error rate). Ring buckets make every operation O(1) amortised with no allocation per event.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class WindowCounter:
    """Counts of `width` event kinds over the last `window_s` seconds, in `buckets` slices.

    The window slides a slice at a time, so a count may include up to one slice more than window_s.
    """

    __slots__ = ("_buckets", "_clock", "_counts", "_current", "_slice", "_totals", "width", "window_s")

    def __init__(
        self, window_s: float, *, width: int = 2, buckets: int = 10, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if window_s <= 0 or buckets < 1 or width < 1:
            raise ValueError("window_s, buckets and width must be positive")
        self.window_s = window_s
        self.width = width
        self._buckets = buckets
        self._slice = window_s / buckets
        self._clock = clock
        self._counts = [[0] * width for _ in range(buckets)]
        self._totals = [0] * width
        self._current = int(clock() / self._slice)

    def _advance(self) -> None:
        now = int(self._clock() / self._slice)
        if now == self._current:
            return
        steps = min(now - self._current, self._buckets)
        for i in range(1, steps + 1):
            bucket = self._counts[(self._current + i) % self._buckets]
            for k in range(self.width):
                self._totals[k] -= bucket[k]
                bucket[k] = 0
        self._current = now

    def add(self, kind: int = 0, n: int = 1) -> None:
        self._advance()
        self._counts[self._current % self._buckets][kind] += n
        self._totals[kind] += n

    def total(self, kind: int = 0) -> int:
        self._advance()
        return self._totals[kind]

    def totals(self) -> tuple[int, ...]:
        self._advance()
        return tuple(self._totals)

    def reset(self) -> None:
        for bucket in self._counts:
            for k in range(self.width):
                bucket[k] = 0
        self._totals = [0] * self.width

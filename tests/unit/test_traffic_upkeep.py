"""The traffic state's upkeep under instance churn, on a clock the test moves: agents that restart get a new
instance id each time, and what a caller keeps of the ones gone (status rows, breakers) must not grow with
them; an open breaker stays while it keeps calls off its instance."""

from __future__ import annotations

import asyncio

from hivemesh.mesh.resilience.breaker import BreakerPolicy, CircuitBreaker
from hivemesh.mesh.resilience.traffic import TrafficState, breaker_states


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _rows(state: TrafficState) -> set[str]:
    snap = state.snapshot(identity="caller", instance="i")
    return {i.instance for c in snap.capabilities for i in c.instances}


def _attempt(state: TrafficState, key: str, policy: BreakerPolicy, *, failed: bool) -> None:
    """One call of `work` with one attempt to the instance key, as the outbound pipeline records it."""
    state.out_started("work")
    breaker = state.instance_breaker("work", key, policy)
    assert breaker.allow()
    state.attempt_started("work", key)
    state.attempt_finished("work", key, failed=failed)
    state.out_finished("work", failed=failed, retries=0, degraded=False)
    if failed:
        breaker.on_failure()
    else:
        breaker.on_success()


def test_instances_that_restart_under_new_ids_do_not_grow_what_a_caller_keeps() -> None:
    clock = Clock()
    state = TrafficState(clock=clock)
    policy = BreakerPolicy(consecutive_failures=5, open_s=30.0)
    most_rows = most_breakers = 0
    for n in range(300):  # a restart every 5 s for 25 minutes; each instance failed once as it died (still closed)
        _attempt(state, f"extractor/vm-{n}", policy, failed=False)
        _attempt(state, f"extractor/vm-{n}", policy, failed=True)
        clock.now += 5.0
        rows = _rows(state)
        most_rows = max(most_rows, len(rows))
        most_breakers = max(most_breakers, len(breaker_states(state, "work")))
    assert most_rows <= 3  # the instances called within the 10 s window
    assert most_breakers <= 14  # and the breakers that learnt something, for 60 s after their last attempt
    clock.now += 61.0
    assert _rows(state) == set() and breaker_states(state, "work") == {}


def test_an_open_instance_breaker_stays_until_its_open_time_ends_then_goes_once_at_rest() -> None:
    clock = Clock()
    state = TrafficState(clock=clock)
    policy = BreakerPolicy(consecutive_failures=1, open_s=30.0)
    _attempt(state, "extractor/vm-1", policy, failed=True)
    _attempt(state, "extractor/vm-2", policy, failed=False)
    assert breaker_states(state, "work") == {"extractor/vm-1": "open", "extractor/vm-2": "closed"}
    clock.now += 20.0  # vm-2's closed breaker (nothing learnt) goes with its row; vm-1's open one stays, shown
    assert _rows(state) == {"extractor/vm-1"}
    assert breaker_states(state, "work") == {"extractor/vm-1": "open"}
    clock.now += 15.0  # half-open since 5 s: a live instance in use would have been probed; not yet at rest
    assert _rows(state) == {"extractor/vm-1"}
    clock.now += 5.0  # half-open for a whole window with no probe: gone
    assert _rows(state) == set() and breaker_states(state, "work") == {}


def test_a_closed_breaker_keeps_its_failure_run_while_its_instance_is_called_now_and_then() -> None:
    clock = Clock()
    state = TrafficState(clock=clock)
    policy = BreakerPolicy(consecutive_failures=3, open_s=30.0)
    for _ in range(2):  # a call every 20 s: the row goes in between, the breaker's run of failures does not
        _attempt(state, "extractor/vm-1", policy, failed=True)
        clock.now += 20.0
        assert _rows(state) == set()
    _attempt(state, "extractor/vm-1", policy, failed=True)
    assert breaker_states(state, "work") == {"extractor/vm-1": "open"}


def test_a_breaker_whose_probes_fail_for_days_keeps_reopening_for_max_open() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerPolicy(consecutive_failures=1, open_s=5.0, max_open_s=60.0), clock=clock)
    assert breaker.allow() and breaker.on_failure()
    for _ in range(1100):  # ~18 hours of failed probes: the doubling's exponent overflowed a float at 1024
        clock.now = breaker.open_until
        assert breaker.allow()
        assert breaker.on_failure()
    assert breaker.open_until - clock.now == 60.0


async def test_metrics_scrapes_in_threads_never_prune_under_the_loop() -> None:
    """`breakers()` runs in the metrics server's threads, one per scrape: it takes copies and hands the upkeep to
    the event loop, so scrapes at once with the loop's status snapshot lose no key mid-iteration (they raised
    KeyError and "dictionary changed size" when each scrape pruned), and what the upkeep drops is gone by the
    next scrape."""
    import threading

    state = TrafficState()
    state.snapshot(identity="x", instance="y")  # on the loop: the state now knows it
    errors: list[str] = []
    for _ in range(4):  # bounded: 4 rounds of 2 scrapes racing the loop's snapshot (each waits at most 1 s)
        for i in range(5000):
            state.instance_breaker("cap", f"i{i}", BreakerPolicy())  # closed, never called: the upkeep drops them
        barrier = threading.Barrier(3)

        def scrape(barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                state.breakers()
            except Exception as exc:  # noqa: BLE001 - what the test looks for
                errors.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=scrape) for _ in range(2)]
        for t in threads:
            t.start()
        barrier.wait()
        try:
            state.snapshot(identity="x", instance="y")
        except Exception as exc:  # noqa: BLE001
            errors.append(f"loop: {type(exc).__name__}: {exc}")
        for t in threads:
            t.join(10)
        await asyncio.sleep(0)  # the upkeeps the scrapes handed to the loop run
    assert errors == []
    assert state.breakers() == [], "the upkeep a scrape asked for ran on the loop"

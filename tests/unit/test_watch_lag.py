"""RevisionLag: heard minus complete, both only moving forward."""

from __future__ import annotations

from hivemesh.mesh.watch_lag import RevisionLag


def test_lag_is_heard_minus_complete_and_returns_to_zero() -> None:
    lag = RevisionLag()
    assert lag.lag == 0
    lag.complete_to(10)  # a list at revision 10
    assert (lag.heard, lag.complete, lag.lag) == (10, 10, 0)
    lag.hear(17)  # a watch created (or a backlog batch) reporting the store at 17
    assert lag.lag == 7
    lag.complete_to(12)  # the backlog's first events
    assert lag.lag == 5
    lag.hear(15)  # an older header never lowers what we heard
    assert lag.heard == 17
    lag.complete_to(17)
    assert lag.lag == 0
    lag.complete_to(11)  # nor does an older completion lower complete
    assert (lag.complete, lag.lag) == (17, 0)
    lag.complete_to(20)  # a progress notification past what we had heard moves both
    assert (lag.heard, lag.complete, lag.lag) == (20, 20, 0)

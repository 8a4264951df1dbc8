"""`sidecar._onward_timeout`: the deadline a local caller's call goes on with is its own less a margin of 5% of the
time left, at least 20 ms, at most 250 ms and never over a quarter of the time left; no deadline, no margin."""

from __future__ import annotations

import pytest

from hivemesh.mesh.sidecar import _onward_timeout


@pytest.mark.parametrize(("remaining", "margin"), [
    (60.0, 0.25),   # 5% would be 3 s: capped, more only takes time from the call
    (5.0, 0.25),    # 5% exactly at the cap
    (2.0, 0.1),     # 5%
    (0.2, 0.02),    # 5% is 10 ms: the floor, the way back through two event loops
    (0.04, 0.01),   # the floor would take half: a quarter at most
])
def test_the_margin_is_five_percent_between_20_and_250_ms_and_at_most_a_quarter(remaining: float,
                                                                                margin: float) -> None:
    onward = _onward_timeout(remaining)
    assert onward is not None
    assert remaining - onward == pytest.approx(margin)


def test_no_deadline_goes_on_with_none() -> None:
    assert _onward_timeout(None) is None

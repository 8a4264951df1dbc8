"""A node whose renewal keeps failing retries with backoff, but wakes at its certificate's expiry to report it
(`hivemesh.mesh.cert_presence` then takes it out of service) instead of up to 30 s after."""

from __future__ import annotations

from hivemesh.mesh.node import renewal_retry_delay


def test_retries_back_off_to_thirty_seconds_while_the_certificate_is_far_from_expiry() -> None:
    assert [renewal_retry_delay(a, 3600.0) for a in range(8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_a_retry_never_sleeps_past_the_expiry() -> None:
    assert 5.0 <= renewal_retry_delay(5, 5.0) <= 5.2  # just after expiry: the next failure is told "expired"
    assert renewal_retry_delay(0, 0.5) == 0.6
    assert renewal_retry_delay(2, 3.0) == 3.1


def test_once_expired_it_keeps_backing_off() -> None:
    assert [renewal_retry_delay(a, -10.0) for a in (0, 3, 9)] == [1.0, 8.0, 30.0]

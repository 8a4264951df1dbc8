"""`utc_iso` stamps what datetime stamps, formatting each second once (`mesh/audit/record.py`): the same text,
microseconds rounded alike, the same error for a time datetime cannot hold."""

from __future__ import annotations

import datetime
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivemesh.mesh.audit import record
from hivemesh.mesh.audit.record import utc_iso


def _datetime_text(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def _outcome(fn: object, ts: float) -> object:
    try:
        return fn(ts)  # type: ignore[operator]
    except (ValueError, OverflowError, OSError) as exc:
        return type(exc)


# Near a second's end the microseconds round up into the next second; halves round to even.
_EDGES = [0.0, 0.9999995, 0.99999949999, 1.0000005, 1e9 + 0.5e-6, 1e9 + 1.5e-6, 1764900000.0000005,
          1764900000.9999996, 253402300799.0, 253402300799.9999995, 253402300800.0, -0.5, -1.0000005,
          math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("ts", _EDGES)
def test_edges_read_as_datetime_reads_them(ts: float) -> None:
    assert _outcome(utc_iso, ts) == _outcome(_datetime_text, ts)


@settings(max_examples=600, deadline=None)
@given(st.one_of(st.floats(0, 4e9), st.integers(0, 4 * 10**9).map(float),
                 st.tuples(st.integers(0, 4 * 10**9), st.integers(0, 2 * 10**6)).map(lambda t: t[0] + t[1] / 2e6)))
def test_any_time_is_stamped_as_datetime_stamps_it(ts: float) -> None:
    assert utc_iso(ts) == _datetime_text(ts)


def test_a_new_second_is_formatted_afresh_not_taken_from_the_last() -> None:
    first = utc_iso(1764900000.25)
    assert record._second[0] == 1764900000
    assert utc_iso(1764900001.5) == "2025-12-05T02:00:01.500000Z" and first == "2025-12-05T02:00:00.250000Z"
    assert utc_iso(1764900000.75) == "2025-12-05T02:00:00.750000Z"  # an earlier second again (a clock stepped back)

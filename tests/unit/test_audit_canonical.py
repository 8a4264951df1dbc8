"""`canonical` writes exactly what the json encoder writes (sorted, compact, ASCII), or raises what it raises,
whatever the value: orjson writes it only where the two agree (`mesh/audit/chain.py`)."""

from __future__ import annotations

import datetime
import enum
import json
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivemesh.mesh.audit import chain
from hivemesh.mesh.audit.chain import MAX_WALK, canonical

_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


class _Level(enum.IntEnum):
    LOW = 1


class _Text(str):
    pass


_odd_text = st.text(alphabet=st.sampled_from(["a", "Z", '"', "\\", "\x00", "\x1f", "\x7f", "\x80", "é", "\u2028",
                                              "\ud800", "\U0001f600", " ", "/"]), max_size=6)
_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8),
    _odd_text, st.just(_Level.LOW), st.just(_Text("x")), st.just(datetime.date(2026, 12, 4)), st.just(uuid.UUID(int=7)),
)
_keys = st.one_of(st.text(max_size=5), _odd_text, st.integers(-3, 3), st.booleans(), st.none())
_values = st.recursive(
    _leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.lists(inner, max_size=3).map(tuple),
                            st.dictionaries(_keys, inner, max_size=5)),
    max_leaves=16,
)


def _outcome(encode: Any, value: Any) -> tuple[str, Any]:
    try:
        return "bytes", encode(value)
    except (TypeError, ValueError) as exc:
        return "error", type(exc)


def _json(value: Any) -> bytes:
    return _JSON.encode(value).encode()


@settings(max_examples=600, deadline=None)
@given(_values)
def test_any_value_is_written_as_json_writes_it_or_refused_as_json_refuses_it(value: Any) -> None:
    assert _outcome(canonical, value) == _outcome(_json, value)


@pytest.mark.parametrize("value", [
    {"a": "\x7f"},                      # json escapes DEL, orjson writes it raw (and it is ASCII)
    {"t": datetime.date(2026, 12, 4)},  # orjson writes dates, json refuses them
    {"n": _Level.LOW},                  # an IntEnum: json writes its value, orjson its own way
    {"s": _Text("x"), 1: "int key"},    # a str subclass; json turns an int key into a string, orjson refuses it
    {"f": 1e16},                        # json writes 1e+16, orjson 1e16
    {"f": float("nan")},                # json refuses NaN here, orjson writes null
])
def test_values_where_the_two_disagree_are_json_s(value: Any) -> None:
    assert _outcome(canonical, value) == _outcome(_json, value)


def test_a_record_is_written_by_orjson() -> None:
    """The common case takes the fast path (else the module would only be slower): a sealed record's fields."""
    record = {"v": 1, "time": "2026-12-04T20:30:01.123456Z", "kind": "inbound", "latency_us": 734, "caller": "x",
              "chain": ["a", "b"], "dry_run": True, "seq": 9, "prev": "0" * 64}
    assert chain._orjson_agrees(record)
    assert canonical(record) == _json(record)


def test_a_value_that_holds_itself_is_refused_as_json_refuses_it() -> None:
    loop: dict[str, Any] = {"a": 1}
    loop["self"] = [loop, loop]  # walked without a bound it would grow for ever
    with pytest.raises(ValueError, match="Circular reference"):
        canonical(loop)


def test_a_value_too_large_to_walk_is_still_written_exactly() -> None:
    big = {"items": list(range(MAX_WALK + 10))}
    assert not chain._orjson_agrees(big)
    assert canonical(big) == _json(big)

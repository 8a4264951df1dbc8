"""`mesh/json_fast.py`: `json.loads`, value for value and error for error, on any text (orjson reads the rest)."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hivemesh.mesh import json_fast
from hivemesh.mesh.json_fast import MAX_DEPTH, loads

_numbers = st.one_of(
    st.integers(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=False, allow_infinity=False, places=30).map(str).map(float),
)
_values = st.recursive(
    st.one_of(st.none(), st.booleans(), _numbers, st.text()),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)),
    max_leaves=12,
)
_number_texts = st.from_regex(r"-?(0|[1-9][0-9]{0,30})(\.[0-9]{1,30})?([eE][-+]?[0-9]{1,4})?", fullmatch=True)
"""Numbers as texts, including mantissas and exponents no float holds exactly."""


def _outcome(read: Any, data: bytes | str) -> tuple[str, Any]:
    """What reading data gives: ("value", its canonical JSON with NaN kept apart) or ("error", type, message)."""
    try:
        value = read(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return "error", (type(exc), str(exc))
    return "value", (repr(value), json.dumps(value, allow_nan=True))


def _same(data: bytes | str) -> None:
    assert _outcome(loads, data) == _outcome(json.loads, data), data
    if isinstance(data, bytes):  # a view of the bytes (a payload inside a received message) reads the same
        assert _outcome(loads, memoryview(b"<" + data + b">")[1:-1]) == _outcome(json.loads, data), data


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_values, st.booleans())
def test_any_value_json_writes_is_read_as_json_reads_it(value: Any, ensure_ascii: bool) -> None:
    text = json.dumps(value, ensure_ascii=ensure_ascii)
    _same(text.encode())
    _same(text)


@settings(max_examples=400, deadline=None)
@given(_number_texts, st.sampled_from(["{}", '{{"n":{}}}', "[1,{}]", " {} "]))
def test_any_number_text_is_read_as_json_reads_it(number: str, shape: str) -> None:
    _same(shape.format(number).encode())


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=40))
def test_any_bytes_are_read_or_refused_as_json_does(data: bytes) -> None:
    _same(data)


@settings(max_examples=300, deadline=None)
@given(_values, st.integers(0, 60), st.binary(min_size=1, max_size=3))
def test_a_json_text_with_bytes_changed_is_read_or_refused_as_json_does(value: Any, at: int, junk: bytes) -> None:
    text = json.dumps(value).encode()
    _same(text[:at] + junk + text[at + len(junk):])


@pytest.mark.parametrize("data", [
    b"18446744073709551616", b"-9223372036854775809", b'{"n":123456789012345678901234567890}',  # orjson: floats
    b"NaN", b"[Infinity,-Infinity]", b'"\\ud800"', b'{"a":"\\udc00x"}',  # orjson refuses these
    b"1e400", b"0.1", b"-0", b"-0.0", b"1E2", b'{"a":1,"a":2}',
    "\ufeff{}".encode(), '{"k":"v"}'.encode("utf-16"), b'"\xed\xa0\x80"',  # a BOM, UTF-16, a UTF-8 surrogate
    b"", b"   ", b"[1,]", b"01", b'{"a":1}x', b'"\x01"', b"\xff",
    '"\ud800"', '["a\udfff"]',  # text (the output screen's input) holding lone surrogates: orjson refuses it
])
def test_the_texts_orjson_reads_otherwise_are_read_as_json_reads_them(data: bytes | str) -> None:
    _same(data)


def test_nesting_past_max_depth_is_json_s_to_read() -> None:
    for depth in (MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 900, 1100):
        _same(b"[" * depth + b"1" + b"]" * depth)
        _same(b'{"a":' * depth + b"1" + b"}" * depth)


def test_orjson_reads_the_payloads_calls_carry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of the module: a call's usual payload (text, ints, lists, objects) never reaches json."""
    def refuse(*_: Any) -> Any:
        raise AssertionError("json was asked")

    monkeypatch.setattr(json_fast.json, "loads", refuse)
    payload = {"text": "x" * 65536, "n": 2**63 - 1, "tags": ["a", {"b": [1, 2, None, True]}], "ok": False}
    assert loads(json.dumps(payload).encode()) == payload
    with pytest.raises(AssertionError, match="json was asked"):
        loads(b'{"x": 1.5}')  # a float: json reads it


def test_past_max_depth_json_decides_even_when_its_caller_is_deep() -> None:
    """From a deep stack json refuses a text orjson reads (RecursionError); past MAX_DEPTH json is asked, so the
    outcome is json's. (Within MAX_DEPTH the two agree unless the caller is ~800 frames deep.)"""
    doc = b"[" * (MAX_DEPTH + 100) + b"]" * (MAX_DEPTH + 100)
    here, frame = 0, sys._getframe()
    while frame is not None:
        here, frame = here + 1, frame.f_back
    room = sys.getrecursionlimit() - here - 20  # frames left below the limit, less a margin for the calls below

    def deep(n: int) -> tuple[tuple[str, Any], tuple[str, Any]]:
        return deep(n - 1) if n else (_outcome(loads, doc), _outcome(json.loads, doc))

    ours, theirs = deep(room - (MAX_DEPTH + 50))  # json has ~MAX_DEPTH + 50 frames: fewer than the text needs
    assert theirs[0] == "error" and theirs[1][0] is RecursionError, theirs
    assert ours == theirs

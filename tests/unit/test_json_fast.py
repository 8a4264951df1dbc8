"""`mesh/json_fast.py`: `json.loads`, value for value and error for error, on any text (orjson reads the rest)."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hivemesh.mesh import json_depth, json_fast
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
    # json_depth.loads is json.loads with the mesh's one nesting bound (json's own on 3.11, by depth on 3.12+)
    assert _outcome(loads, data) == _outcome(json_depth.loads, data), data
    if isinstance(data, bytes):  # a view of the bytes (a payload inside a received message) reads the same
        assert _outcome(loads, memoryview(b"<" + data + b">")[1:-1]) == _outcome(json_depth.loads, data), data


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

    monkeypatch.setattr(json_fast.json_depth, "loads", refuse)
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
        return deep(n - 1) if n else (_outcome(loads, doc), _outcome(json_depth.loads, doc))

    ours, theirs = deep(room - (MAX_DEPTH + 50))  # json has ~MAX_DEPTH + 50 frames: fewer than the text needs
    if sys.version_info < (3, 12):  # 3.11's json recurses through the interpreter's stack; later ones do not
        assert theirs[0] == "error" and theirs[1][0] is RecursionError, theirs
    else:
        assert theirs[0] == "value", theirs
    assert ours == theirs


# --- long strings, decoded apart from orjson's read (`_long_strings`) ------------------------------------------------
LONG = json_fast.LONG_STRING
_plain = st.characters(blacklist_categories=("Cs",), blacklist_characters='"\\' + "".join(map(chr, range(32))))
"""Characters json writes as they are (no escape): the texts `_long_strings` takes hold only these."""


def _stretch(s: str) -> str:
    return (s * (LONG // len(s) + 2))[: LONG + len(s)]


_long_texts = st.one_of(st.text(_plain, min_size=1, max_size=6), st.text(min_size=1, max_size=6)).map(_stretch)
"""Strings just past LONG_STRING characters (so past it in bytes): mostly of characters json does not escape,
some of any characters (escapes and controls too)."""
_long_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(_plain, max_size=5), _long_texts),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.one_of(st.text(_plain, max_size=5), _long_texts), inner, max_size=3)),
    max_leaves=5,
)
_with_long = st.fixed_dictionaries({
    "a": st.text(_plain, max_size=5), "t": st.text(_plain, min_size=1, max_size=6).map(_stretch),
    "l": st.lists(st.one_of(st.integers(), st.text(_plain, min_size=1, max_size=6).map(_stretch)), max_size=2),
})
"""Texts `_long_strings` reads apart: long values of characters json writes as they are."""


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(_long_values, st.booleans(), st.sampled_from([None, 2]))
def test_any_value_with_long_strings_is_read_as_json_reads_it(
    value: Any, ensure_ascii: bool, indent: int | None
) -> None:
    text = json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)
    _same(text.encode())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(_with_long, st.integers(0, 4 * LONG), st.sampled_from(
    [b"\x00", b"\x01", b"\n", b"\t", b"\x1f", b"\\", b'"', b"\xff", b"\xed\xa0\x80", b"\xc3", b"\\u0001", b"}", b":"]))
def test_a_text_with_long_strings_with_bytes_changed_is_read_or_refused_as_json_does(
    value: Any, at: int, junk: bytes
) -> None:
    text = json.dumps(value, ensure_ascii=False).encode()
    at %= len(text) + 1
    _same(text[:at] + junk + text[at + len(junk):])
    _same(text[:at] + junk + text[at:])


LONG_X = "x" * (LONG + 10)


@pytest.mark.parametrize("text", [
    json.dumps(LONG_X), f' "{LONG_X}" ', json.dumps({"a": LONG_X, "a ": 1}), json.dumps({LONG_X: LONG_X}),
    '{"a": "' + LONG_X + '", "a": 1}', '{"a": 1, "a": "' + LONG_X + '"}',  # the last value wins, as in json
    json.dumps([[[LONG_X, {"k": [LONG_X, 1.5]}]]]), json.dumps({"f": 2.5, "t": LONG_X}),  # a float: json reads it
    json.dumps({"t": LONG_X, "n": 2**70}), json.dumps(["é" * LONG, "日本" * LONG], ensure_ascii=False),
    json.dumps([str(i) for i in range(20)] + [LONG_X]),  # past MAX_STRINGS: orjson reads it all
    '{"t": "' + LONG_X + '"', '"' + LONG_X, '{"t": "' + LONG_X + '" "u": 1}', '["' + LONG_X + '",]',
    "\ufeff" + json.dumps([LONG_X]), "[" * 300 + json.dumps(LONG_X) + "]" * 300,
])
def test_texts_with_a_long_string_are_read_as_json_reads_them(text: str) -> None:
    _same(text.encode())


def test_a_long_string_value_is_not_read_by_orjson(monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of `_long_strings`: orjson reads a payload's long text values ~7× slower than their bytes decode,
    so it reads only the rest of the text."""
    read: list[int] = []
    real = json_fast.orjson.loads

    def counting(data: Any) -> Any:
        read.append(len(data))
        return real(data)

    monkeypatch.setattr(json_fast.orjson, "loads", counting)
    payload = {"text": "x" * 65526, "id": 7, "tags": ["a", {"b": None}], "image": "QUJD" * 10000}
    assert loads(json.dumps(payload).encode()) == payload
    assert read and max(read) < 100, read
    assert loads(memoryview(json.dumps(payload).encode())) == payload
    assert max(read) < 100, read


def test_whitespace_after_long_strings_costs_no_python_per_byte() -> None:
    """Whether a long string is a key is read past its whitespace in C: skipped a byte at a time in Python, 8 MiB
    of whitespace after long strings took ~290 ms against orjson's ~5. Counted, not timed: the text is read as json
    reads it, and the work done per byte of whitespace is the regex's, not the interpreter's."""
    text = b"[" + b",".join([json.dumps(LONG_X).encode() + b" " * (1 << 20)] * 8) + b"]"
    assert loads(text) == [LONG_X] * 8
    ticks = 0

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        nonlocal ticks
        if frame.f_code.co_name == "_long_strings":
            frame.f_trace_opcodes = True
            if event == "opcode":
                ticks += 1
        return tracer

    sys.settrace(tracer)
    try:
        assert loads(text) == [LONG_X] * 8
    finally:
        sys.settrace(None)
    assert ticks < 5_000, ticks  # ~1.4 opcodes a byte of whitespace (8 Mi) when Python walked it

"""compact_json gives exactly the bytes (and the errors) of `json.dumps(value, separators=(",", ":"),
allow_nan=False).encode()`: NaN and Infinity are refused, as they are not JSON."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivemesh.mesh.json_compact import LONG, MAX_FIELDS, compact_json


def standard(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


PLAIN = "The quarterly report shows revenue grew in the north; review the contracts. " * 900
"""~68 KB of printable ASCII with nothing to escape: the plain path."""


@pytest.mark.parametrize("text", [
    PLAIN,
    "x" * LONG,
    "x" * (LONG - 1),
    PLAIN + '"',  # a quote, a backslash, a control character, DEL, non-ASCII, a lone surrogate: escaped
    "\\" + PLAIN,
    PLAIN[:5000] + "\n" + PLAIN[:5000],
    PLAIN[:5000] + "\x00",
    PLAIN[:5000] + "\x1f",
    PLAIN[:5000] + "\x7f",
    PLAIN[:5000] + "é",
    PLAIN[:5000] + "\ud800",
    "",
])
def test_long_strings_top_level_and_as_fields(text: str) -> None:
    for value in (text, {"text": text}, {"id": 7, "text": text, "tags": ["a", None, 1.5], "more": {"t": text}}):
        assert compact_json(value) == standard(value)


@pytest.mark.parametrize("code", range(128))
def test_every_ascii_character_in_a_long_string(code: int) -> None:
    """The fast path's claim, character by character: orjson writes ASCII text as json does, except DEL."""
    for text in (chr(code) * LONG, PLAIN[:LONG] + chr(code), chr(code) + PLAIN[:LONG] + chr(code) * 3):
        assert compact_json(text) == standard(text)
        assert compact_json({"t": text}) == standard({"t": text})


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=0x7F), min_size=LONG, max_size=3 * LONG))
def test_long_ascii_text_of_any_characters(text: str) -> None:
    assert compact_json(text) == standard(text)


def test_objects_the_plain_path_leaves_to_the_standard_encoder() -> None:
    cases: list[Any] = [
        {1: PLAIN, "b": PLAIN},  # non-string keys are converted by json
        {None: "x", True: PLAIN, 2.5: PLAIN},
        {f"k{i}": PLAIN[:LONG] for i in range(MAX_FIELDS + 1)},  # too many fields
        {f"k{i}": PLAIN[:LONG] for i in range(MAX_FIELDS)},
        {"big": 10**40, "text": PLAIN},
        type("Sub", (str,), {})(PLAIN),  # a str subclass
        {"text": type("Sub", (str,), {})(PLAIN)},
        type("D", (dict,), {})(text=PLAIN),  # a dict subclass
        [PLAIN, {"text": PLAIN}],
        (PLAIN,),
        {"text": PLAIN, "t": (1, 2)},
        None, 3, 2.5, True,
    ]
    for value in cases:
        assert compact_json(value) == standard(value)


def test_errors_are_the_standard_ones() -> None:
    cyclic: dict[str, Any] = {"text": PLAIN}
    cyclic["self"] = cyclic
    for value in ({"text": PLAIN, "when": object()}, {"text": PLAIN, 1j: 1}, {1j: 1, "text": PLAIN}, cyclic,
                  {"n": float("nan"), "text": PLAIN}, {"text": PLAIN, "inf": float("inf")}):
        with pytest.raises((TypeError, ValueError)) as std:
            standard(value)
        with pytest.raises(std.type, match=f"^{re.escape(str(std.value))}$"):
            compact_json(value)


_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(
    max_size=20)
_LONG_TEXT = st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=8), st.integers(LONG // 8, LONG // 4))
_VALUES = st.recursive(
    _SCALARS | _LONG_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(max_size=8) | st.integers(), _VALUES, max_size=6) | _VALUES)
def test_same_bytes_as_json_dumps(value: Any) -> None:
    assert compact_json(value) == standard(value)

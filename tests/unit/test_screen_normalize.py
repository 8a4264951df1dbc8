"""What the content screen normalizes: exactly NFKC (less zero-width characters), at a cost bounded by the
input's size. One character can become 18 under NFKC (U+FDFA): 4 MiB of it grew to 25 million characters and
held the event loop ~3 s per call before this bound."""

from __future__ import annotations

import re
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivemesh.mesh.errors import InvalidInputError
from hivemesh.mesh.layers.screen import (
    MAX_GROWTH,
    NFKC_CHUNK,
    ClassifierScreen,
    PatternScreen,
    TextExpandsError,
    normalize,
)

_ZERO_WIDTH = re.compile("[\u200b-\u200f\u2060\ufeff\u00ad]")
# Letters, combining marks that compose with them, Hangul jamo that compose with each other, compatibility
# characters that grow (ligatures, fractions, full-width), zero-width ones: what crosses a piece's edge.
_ALPHABET = "aeouAE \u00e9\u00fc\u0301\u0308\u0327\u1100\u1161\u11a8\uac00\ufb01\u00bd\uff21\u200b\u00ad\u3300"


def _reference(text: str) -> str:
    return _ZERO_WIDTH.sub("", unicodedata.normalize("NFKC", text))


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=_ALPHABET, max_size=40), st.text(alphabet=_ALPHABET, max_size=40), st.integers(0, 40))
def test_long_text_is_normalized_exactly_as_whole(a: str, b: str, shift: int) -> None:
    """Whatever straddles a piece's edge (a composing pair, jamo, a growing character) comes out as NFKC of the
    whole text: a starts `shift` characters before the first edge, b right at the second."""
    text = "x" * (NFKC_CHUNK - shift) + a + "y" * (NFKC_CHUNK - len(a) + shift) + b + "z" * 100
    assert normalize(text) == _reference(text)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=_ALPHABET, max_size=40), st.text(alphabet=_ALPHABET, max_size=40), st.integers(0, 40))
def test_long_text_without_ascii_near_an_edge_is_normalized_exactly(a: str, b: str, shift: int) -> None:
    """The same where no ASCII character is near an edge (the pieces are normalized together again)."""
    text = "\u00e9" * (NFKC_CHUNK - shift) + a + "\u00fc" * (NFKC_CHUNK + 2_000) + b + "\u00f6" * 100
    assert normalize(text) == _reference(text)


def test_text_that_grows_past_the_bound_is_refused_by_both_screens() -> None:
    bomb = "ok " * 1_000 + "\ufdfa" * (2 * NFKC_CHUNK)
    with pytest.raises(TextExpandsError):
        normalize(bomb)
    with pytest.raises(InvalidInputError, match="over 4 times longer") as refused:
        PatternScreen().screen("echo", {"text": "hello", "note": bomb})
    assert list(refused.value.field_violations) == ["input.note"] and refused.value.reason == "INVALID_INPUT"
    with pytest.raises(InvalidInputError, match="over 4 times longer"):
        ClassifierScreen(lambda _text: 0.0).screen("echo", {"note": bomb})


def test_real_text_and_short_growth_pass() -> None:
    screen = PatternScreen()
    assert screen.screen("echo", {"text": "Größe Übung, ½ Tasse, ﬁnal " * 20_000}) is None  # grows < 2x
    short = "\ufdfa" * (NFKC_CHUNK // 2)  # one piece: bounded however much it grows (18x of 8 Ki characters)
    assert len(normalize(short)) == 18 * len(short)
    dense = "\ufdfb" * NFKC_CHUNK * 2  # a ligature of 8 characters each: past the bound
    assert len(unicodedata.normalize("NFKC", "\ufdfb")) > MAX_GROWTH
    with pytest.raises(TextExpandsError):
        normalize(dense)

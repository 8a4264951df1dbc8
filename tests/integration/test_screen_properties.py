"""Property trials of the content screen's fast paths (1,500 examples each): every fast path decides
exactly as the full scan, over the screen's vocabulary and every kind of whitespace. Slow, so not a unit test."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from hivemesh.mesh.layers.screen import (
    DEFAULT_RULES,
    DEFAULT_SCREEN,
    Finding,
    PatternScreen,
    normalize,
)

_VOCAB = [
    "ignore", "IGNORE", "all", "previous", "Prior", "instructions", "prompt", "rules", "reveal", "the", "system",
    "Hidden", "message", "you", "are", "now", "developer", "mode", "enabled", "jailbreak", "do", "anything", "DAN",
    "<|im_start|>", "[INST]", "<<SYS>>", "##", "new", "instructions:", "invoice", "total", "show", "output", "print",
    "disregard", "above", "guidelines", "secret", ".", "\n", "override", "god", "on", "real", "instruction:",
]

_ASCII_SPACE = [chr(c) for c in range(128) if re.match(r"\s", chr(c))]
"""Every ASCII character Python's `\\s` matches, as Python says: \\x1c-\\x1f are among them."""
_SEPARATORS = [*_ASCII_SPACE, "  ", "\r\n", ", ", ". ", ""]


_SCREENS = [PatternScreen(engine=e) for e in ("hyperscan", "re2", "literals")]


def _full_scan(value: str) -> Finding | None:
    norm = normalize(value)
    for rule in DEFAULT_RULES:
        m = rule.pattern.search(value if rule.raw else norm)
        if m:
            return Finding("input", rule.name, m.group(0)[:80])
    return None


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(_VOCAB), max_size=14).map(" ".join))
def test_fast_path_matches_the_full_scan(text: str) -> None:
    assert text.isascii()
    assert DEFAULT_SCREEN.screen("cap", text) == _full_scan(text)


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_VOCAB), st.sampled_from(_SEPARATORS)), max_size=14)
       .map(lambda parts: "".join(w + sep for w, sep in parts)))
def test_both_fast_paths_match_the_full_scan_with_any_whitespace(text: str) -> None:
    """RE2's own \\s lacks the vertical tab and \\x1c-\\x1f: the rules are rewritten so every engine decides
    exactly as Python's re."""
    assert text.isascii()
    expected = _full_scan(text)
    for screen in _SCREENS:
        assert screen.screen("cap", text) == expected, screen.engine

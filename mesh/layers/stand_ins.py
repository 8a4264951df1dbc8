"""A text's ASCII stand-ins: one ASCII byte per character, so the content screen's single pass (Hyperscan or
RE2, which see bytes) can screen text that is not ASCII, where it used to run every rule in Python's `re`
(64 Ki characters of German prose: ~8 ms a field, against ~30 µs for as much ASCII prose).

Each character that is not ASCII stands for its class as Python's `re` sees it: ' ' for whitespace, '0' for a
digit, '_' for any other word character, DEL for anything else; and the four characters that IGNORECASE makes
equal to an ASCII letter (İ ı ſ K) stand for that letter. ASCII characters stand for themselves. So a rule
that `rule_is_sound` accepts, matching the text in Python, matches the stand-ins in the engine: every literal,
class, word boundary and anchor that takes a character takes its stand-in too (a property test checks this on
Unicode text). The converse need not hold: a hit in the stand-ins is only a candidate, confirmed by Python's `re`
on the text itself.
"""

from __future__ import annotations

import codecs
import re
import threading
from typing import Any, Final

FOLDS: Final = {0x130: "i", 0x131: "i", 0x17F: "s", 0x212A: "k"}
"""The characters beyond ASCII that Python's IGNORECASE matches to an ASCII character (CPython 3.11-3.14;
tests/unit/test_screen_stand_ins.py recomputes them from Python's `re` itself)."""

STAND_INS: Final = frozenset(" 0_\x7f" + "".join(FOLDS.values()))
"""Every byte put in place of a character beyond ASCII."""
_STAND_IN_CODES: Final = frozenset(ord(c) for s in STAND_INS for c in (s, s.upper()))
"""The stand-ins as code points, in either case (IGNORECASE makes a negated [^K] refuse 'k' too)."""

_CACHE_LIMIT: Final = 65_536
"""Characters whose stand-in is remembered (a text could hold a million distinct ones: the rest are worked out
each time rather than kept)."""

_SPACE, _DIGIT, _WORD = re.compile(r"\s"), re.compile(r"\d"), re.compile(r"\w")


class _StandIns(dict[int, str]):
    """Code point -> its stand-in, worked out on first sight from Python's own `re` classes."""

    def __missing__(self, code: int) -> str:
        char = chr(code)
        if code in FOLDS:
            out = FOLDS[code]
        elif _SPACE.match(char):
            out = " "
        elif _DIGIT.match(char):
            out = "0"
        elif _WORD.match(char):
            out = "_"
        else:
            out = "\x7f"
        if len(self) < _CACHE_LIMIT:
            self[code] = out
        return out


_STAND_INS = _StandIns()
for _code in range(256):  # so that translating a whole text maps ASCII to itself and Latin-1 to stand-ins
    _STAND_INS[_code] = chr(_code) if _code < 128 else _STAND_INS.__missing__(_code)
_ERRORS: Final = "hivemesh-screen-stand-ins"
_LATIN1: Final = "".join(_STAND_INS[code] for code in range(256)).encode("ascii")
"""Bytes 0-255 as Latin-1 characters -> their stand-ins, for `bytes.translate`."""
CHARS_PER_RUN: Final = 32
"""A run of characters beyond Latin-1 is handed over by the codec in a Python call (~1 µs); translating the
whole text costs ~70 ns a character. So a text gets one run per 32 characters (at least 64) before it is
translated whole instead: prose with an emoji or a curly quote per sentence stays on the cheap path, and text
alternating scripts costs ~100 ns a character (where running every rule in Python cost ~270), not a Python call
per character."""
_runs = threading.local()


class _TooManyRunsError(Exception):
    pass


def _stand_in(err: UnicodeError) -> tuple[str, int]:
    if not isinstance(err, UnicodeEncodeError):
        raise err
    left = getattr(_runs, "left", 0)
    if left <= 0:
        raise _TooManyRunsError
    _runs.left = left - 1
    # The encoder hands over each run of characters it cannot encode at once.
    return err.object[err.start:err.end].translate(_STAND_INS), err.end


codecs.register_error(_ERRORS, _stand_in)


def ascii_stand_ins(text: str) -> bytes:
    """The text with every character beyond ASCII replaced by its stand-in (same length, in characters).

    Latin-1 first: most text beyond ASCII is Latin letters with accents, which then cost one `bytes.translate`
    (64 KiB of German prose: ~60 µs, against ~1 ms for a Python call per accented letter); the characters beyond
    Latin-1 (curly quotes, emoji, other scripts) go through the codec's error handler, a run at a time, up to one
    run per CHARS_PER_RUN characters; beyond that the whole text is translated character by character.
    """
    _runs.left = max(64, len(text) // CHARS_PER_RUN)
    try:
        return text.encode("latin-1", _ERRORS).translate(_LATIN1)
    except _TooManyRunsError:
        return text.translate(_STAND_INS).encode("ascii")


def rule_is_sound(pattern: re.Pattern[str]) -> bool:
    """Whether a match of pattern in a text implies a match of its single-pass form in the text's ASCII stand-ins.

    Literals and classes made of ASCII members cannot take a character beyond ASCII, but for the folds, which
    become their letter; `\\s \\d \\w \\b` and their negations see each stand-in's class as the character's; `.`,
    `^` and `$` see no newline where there was none. What breaks the implication is a negated class holding a
    stand-in (`[^_]` takes é, not its '_'): such a rule, or one this cannot read, is not sound here, and keeps
    running in Python on text beyond ASCII.
    """
    if not pattern.pattern.isascii():
        return False
    try:
        from re import _constants, _parser  # type: ignore[attr-defined]  # the parser Python's re compiles with

        tree = _parser.parse(pattern.pattern, pattern.flags)
    except Exception:  # noqa: BLE001 - a private module, so when it changes the rule is not taken as sound
        return False
    return _negations_avoid_stand_ins(tree, _constants, _parser.SubPattern)


def _negations_avoid_stand_ins(node: Any, c: Any, subpattern: type) -> bool:
    stand_in_codes = _STAND_IN_CODES
    for op, av in node:
        if op is c.NOT_LITERAL:  # the parser's form of [^x]
            if av in stand_in_codes:
                return False
        elif op is c.IN:
            if av and av[0][0] is c.NEGATE:
                for member_op, member in av[1:]:
                    if member_op is c.LITERAL:
                        if member in stand_in_codes:
                            return False
                    elif member_op is c.RANGE:
                        lo, hi = member
                        if any(lo <= code <= hi for code in stand_in_codes):
                            return False
                    else:  # a category (\s, \w...) or anything newer inside a negated class: not read here
                        return False
        else:
            for part in av if isinstance(av, (tuple, list)) else (av,):
                kids = part if isinstance(part, list) else [part]
                for kid in kids:
                    if isinstance(kid, subpattern) and not _negations_avoid_stand_ins(kid, c, subpattern):
                        return False
    return True

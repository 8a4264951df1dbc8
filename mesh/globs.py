"""A list of names and shell-style globs, matched as `fnmatch.fnmatchcase` would.

Policies name identities and capabilities by such lists, and some name thousands of exact identities: compiled
into one regex alternation, 50,000 names took 5.2 s of CPU to build and 2.6 ms a match (7 Dec, BENCHMARKS.md).
Exact names are kept in a set instead, and only real globs are compiled."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable


def is_glob(pattern: str) -> bool:
    """Whether pattern has a glob character (`*`, `?`, `[`); anything else matches only itself."""
    return any(c in pattern for c in "*?[")


class Globs:
    """Names by set lookup, globs by one compiled regex; an empty list matches nothing."""

    __slots__ = ("_names", "_pattern")

    def __init__(self, patterns: Iterable[str]) -> None:
        patterns = tuple(patterns)
        self._names = frozenset(p for p in patterns if not is_glob(p))
        globs = [p for p in patterns if is_glob(p)]
        self._pattern = re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs)) if globs else None

    def match(self, text: str) -> bool:
        return text in self._names or (self._pattern is not None and self._pattern.match(text) is not None)

    def _key(self) -> tuple[frozenset[str], str | None]:
        return self._names, None if self._pattern is None else self._pattern.pattern

    def __eq__(self, other: object) -> bool:
        """Equal when they match the same names and globs (compiled rules compare as a compiled regex would)."""
        return isinstance(other, Globs) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Globs(names={len(self._names)}, globs={self._pattern.pattern if self._pattern else None!r})"

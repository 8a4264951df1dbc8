"""Hyperscan, shared by the call path's byte checks (the content screen's single pass, JSON's "nothing to escape").

A `Scanner` is a set of patterns compiled once into one Hyperscan database, scanned from any thread: a scratch
space serves one scan at a time, and a scan releases the GIL, so each thread gets its own. Hyperscan is a
dependency; where it cannot load (a platform without its wheel, a CPU it refuses) `AVAILABLE` is False and the
callers use their slower ways, which decide the same.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, cast

try:
    import hyperscan
except ImportError:  # pragma: no cover - a platform without its wheel
    hyperscan = None  # type: ignore[assignment]

AVAILABLE = hyperscan is not None
CompileError: type[Exception] = hyperscan.error if hyperscan is not None else Exception
"""What compiling raises for a pattern Hyperscan does not take (look-around, an empty match...)."""


class Scanner:
    """Patterns (id, regex) compiled into one database; `hits` says which ids match (each once)."""

    def __init__(self, patterns: Sequence[tuple[int, str]]) -> None:
        if hyperscan is None:
            raise RuntimeError("hyperscan is not installed")
        self._db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        self._db.compile(expressions=[p.encode("ascii") for _, p in patterns], ids=[i for i, _ in patterns],
                         elements=len(patterns), flags=[hyperscan.HS_FLAG_SINGLEMATCH] * len(patterns))
        self._local = threading.local()

    def _scratch(self) -> Any:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = hyperscan.Scratch(self._db)
        return scratch

    def hits(self, data: bytes | memoryview) -> list[int]:
        """The ids of the patterns that match somewhere in data (a view is scanned in place), in the order their
        first matches end. (A callback that stops the scan makes the binding raise, so a scan always runs to the
        end: cheap, as a pattern reports once.)"""
        found: list[int] = []
        self._db.scan(cast("bytes", data), match_event_handler=_collect, context=found, scratch=self._scratch())
        return found


def _collect(pattern: int, start: int, end: int, flags: int, found: object) -> None:
    cast("list[int]", found).append(pattern)

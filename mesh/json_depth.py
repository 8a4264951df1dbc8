"""`json.loads` with one nesting bound on every interpreter: text nested past `MAX_NESTING` raises RecursionError.

Every reader of JSON from outside (tokens, payloads, policies, state values, cards, audit records, A2A messages)
refuses text nested too deeply by catching RecursionError: on Python 3.11 json's decoder recurses through the
interpreter's stack, so `[` a thousand deep raises it. From 3.12 the decoder's C recursion has a limit of its own
(~10,000 levels on 3.13), so the same text reads as a value there, and the refusals became type errors, values
stored that a 3.11 node cannot read back, or text passed on as data (19 tests failed on 3.13.0). This module keeps
the refusal where it was, by depth rather than by the stack: a value nested deeper than `MAX_NESTING` raises
`NestedTooDeepError`, a RecursionError, so every `except RecursionError` keeps its meaning.

The bound costs two `count`s of the text in C; only a text with more brackets than the bound is walked (iteratively,
so the check itself cannot exhaust the stack)."""

from __future__ import annotations

import json
from typing import Any, Final

MAX_NESTING: Final = 900
"""Containers inside containers, at most. 3.11's json stops near 1,000 levels less its caller's frames (~900 in a
served call); no document the mesh or an agent writes comes near it."""


class NestedTooDeepError(RecursionError):
    """JSON nested deeper than `MAX_NESTING`: what json raises for it on Python 3.11, on every interpreter."""


def loads(text: str | bytes | bytearray, **kwargs: Any) -> Any:
    """`json.loads(text, **kwargs)`, raising NestedTooDeepError for a value nested deeper than `MAX_NESTING`."""
    value = json.loads(text, **kwargs)
    if type(value) in (dict, list) and _brackets(text) > MAX_NESTING:
        check(value)
    return value


def _brackets(text: str | bytes | bytearray) -> int:
    """How many containers the text can hold at most (brackets inside strings counted too)."""
    if isinstance(text, str):
        return text.count("[") + text.count("{")
    return text.count(b"[") + text.count(b"{")


def check(value: Any) -> None:
    """Raise NestedTooDeepError if value (decoded JSON: dicts, lists and scalars) nests deeper than
    `MAX_NESTING`."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_NESTING:
            raise NestedTooDeepError(f"JSON nested more than {MAX_NESTING} levels deep")
        children = item.values() if type(item) is dict else item
        stack.extend((child, depth + 1) for child in children if type(child) in (dict, list))


__all__ = ["MAX_NESTING", "NestedTooDeepError", "check", "loads"]

"""Keyword matching shared by the sales examples' agents."""

from __future__ import annotations

from collections.abc import Iterable

from hivemesh.sdk.patterns.router import words


def mentioned(keywords: Iterable[str], text: str) -> list[str]:
    """The keywords the text mentions, in any inflection `words` folds ("pricing" mentions "price" too)."""
    said = set(words(text))
    return [k for k in keywords if words(k) and set(words(k)) <= said]

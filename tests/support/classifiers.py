"""Output classifiers that tests name by `module:callable`, as an operator names one with --output-classifier."""

from __future__ import annotations

import re
from typing import Any

from hivemesh.mesh.layers.output_screen import DEFAULT_CLASSIFIER, Span

_PROJECT = re.compile(r"\bPRJ-\d{4}\b")


def with_project_codes(text: str) -> list[Span]:
    """The default patterns plus a deployment's own rule: internal project codes (PRJ-1234) must not leave."""
    return [*DEFAULT_CLASSIFIER(text), *(Span("project-code", m.start(), m.end()) for m in _PROJECT.finditer(text))]


def broken(text: str) -> list[Span]:
    """A classifier whose backend is down."""
    raise ConnectionError("the DLP service is unreachable")


def out_of_bounds(text: str) -> list[Any]:
    """A classifier that returns nonsense: a span past the end of the text, and a tuple instead of a Span."""
    return [Span("x", 0, len(text) + 5), ("x", 0, 1)]


NOT_CALLABLE = 42


class NeedsArguments:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def __call__(self, text: str) -> list[Span]:
        return []

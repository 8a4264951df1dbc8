"""Naming the output screen's classifier in configuration: `--output-classifier package.module:callable`.

The output screen (`output_screen.py`) finds what it refuses or redacts with a classifier, a callable from a
text to the `Span`s it flags; the default is the pattern classifier. An operator swaps in another (a local
model, a DLP service's client) by naming it, on the sidecar (`hivemesh sidecar --output-classifier`), on a
reference agent (`python -m hivemesh.agents.run AGENT --output-classifier`) or in `AgentServerConfig`.

The name is resolved when the configuration is made, so a typo fails at start with a message saying what is
wrong, not on the first answer. A class is instantiated without arguments (so
`hivemesh.mesh.layers.output_screen:PatternClassifier` works). What the classifier returns is checked on every
answer: one that raises or returns something other than spans inside the text fails closed, withholding the
answer (OUTPUT_SCREENED), as an unscreened answer is what the screen exists to stop.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable
from typing import Any, Final

from hivemesh.mesh.errors import OutputScreenedError
from hivemesh.mesh.layers.output_screen import Classifier, Span

log = logging.getLogger(__name__)

REF_RE: Final = re.compile(r"^[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")
"""`package.module:name` (the name may be dotted: `module:Class.method`), as entry points are written."""


def load_classifier(ref: str) -> Classifier:
    """The classifier `ref` names, wrapped so a faulty one fails closed.

    Raises:
        ValueError: ref is not `module:callable`, the module cannot be imported, the name is not in it, or what
            it names is not callable (or is a class that cannot be made without arguments).
    """
    where = f"output classifier {ref!r}"
    if not REF_RE.fullmatch(ref):
        raise ValueError(f"{where}: give it as package.module:callable (e.g. "
                         f"hivemesh.mesh.layers.output_screen:PatternClassifier)")
    module_name, _, path = ref.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{where}: cannot import {module_name!r}: {exc}") from None
    for part in path.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{where}: {module_name!r} has no {path!r}") from None
        target = getattr(target, part)
    if isinstance(target, type):
        try:
            target = target()
        except Exception as exc:  # noqa: BLE001 - any failure to build it is a configuration error to report
            raise ValueError(f"{where}: the class cannot be made without arguments: {exc}") from None
    if not callable(target):
        raise ValueError(f"{where}: {type(target).__name__} is not callable (a classifier takes a text and "
                         f"returns Spans)")
    return checked(target, ref)


def checked(classify: Callable[[str], Any], name: str) -> Classifier:
    """classify, failing closed (OutputScreenedError) when it raises or returns anything but spans in the text."""

    def run(text: str) -> list[Span]:
        try:
            spans = list(classify(text))
        except Exception as exc:  # noqa: BLE001 - whatever broke, the answer must not leave unscreened
            log.warning("output classifier %s failed: %r", name, exc)
            raise OutputScreenedError(f"the output classifier {name} failed ({type(exc).__name__}), so the "
                                      f"answer was withheld", metadata={"classifier": name[:128]}) from None
        for span in spans:
            if not (isinstance(span, Span) and isinstance(span.rule, str) and span.rule
                    and 0 <= span.start < span.end <= len(text)):
                raise OutputScreenedError(f"the output classifier {name} returned {str(span)[:80]}, not a Span "
                                          f"inside the text, so the answer was withheld",
                                          metadata={"classifier": name[:128]})
        return spans

    return run


def resolve_classifier(value: Classifier | str | None) -> Classifier | None:
    """A configured classifier: a `module:callable` name is loaded, a callable is checked, None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        return load_classifier(value)
    if not callable(value):
        raise ValueError(f"output_classifier must be a callable or a 'module:callable' name, not {value!r}")
    return checked(value, f"{getattr(value, '__module__', '?')}:{getattr(value, '__qualname__', type(value).__name__)}")


__all__ = ["REF_RE", "checked", "load_classifier", "resolve_classifier"]

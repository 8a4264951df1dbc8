"""Operator YAML (and JSON, which is YAML) read safely, for every loader of policy and grant text.

- A syntax error is one readable line (`yaml_error_text`): PyYAML's own text names the stream it was given,
  `<unicode string>` for text read first, and spreads over several lines; operators need `policies.yaml: not
  valid YAML/JSON at line 3, column 9: ...` instead.
- Nesting past what PyYAML's recursive composer reads is refused, not a RecursionError.
- Aliases may be used, but what they expand to is bounded (`MAX_VALUES`). PyYAML shares an aliased node instead
  of copying it, so 551 bytes of aliases nested nine deep ("billion laughs") load at once as 10^9 values; the
  policy validation then walked them for ever, holding the control plane's event loop.
"""

from __future__ import annotations

from typing import Any, Final

import yaml

from hivemesh.mesh.errors import InvalidInputError

MAX_VALUES: Final = 100_000
"""Values (mappings, sequences, keys and scalars) a text may hold once its aliases are expanded."""


def yaml_error_text(exc: yaml.YAMLError, source: str) -> str:
    """`<source>: not valid YAML/JSON at line L, column C: <what the parser expected and found>`."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem, context = getattr(exc, "problem", None), getattr(exc, "context", None)
    what = ", ".join(str(p) for p in (context, problem) if p) if problem else str(exc).splitlines()[0]
    return f"{source}: not valid YAML/JSON{where}: {what}"


def load_all(text: str, source: str) -> list[Any]:
    """The non-empty documents of a multi-document stream; InvalidInputError naming source when it cannot be read."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise InvalidInputError(yaml_error_text(exc, source)) from None
    except RecursionError:  # PyYAML composes recursively: ~1,000 levels exhaust the stack
        raise InvalidInputError(f"{source}: nested too deeply") from None
    _bounded(docs, source)
    return docs


def load(text: str, source: str) -> Any:
    """The one document of text (None when empty); InvalidInputError naming source when it cannot be read."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidInputError(yaml_error_text(exc, source)) from None
    except RecursionError:
        raise InvalidInputError(f"{source}: nested too deeply") from None
    _bounded(doc, source)
    return doc


def _bounded(value: Any, source: str) -> None:
    """Refuse value when it holds more than MAX_VALUES values counted as every reader walks them (an alias once
    per use): the walk stops there, so an alias bomb costs at most that."""
    stack = [value]
    seen = 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise InvalidInputError(f"{source}: more than {MAX_VALUES:,} values once its aliases are expanded")
        if isinstance(node, dict):
            stack.extend(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)

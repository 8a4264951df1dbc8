"""One readable line for a YAML syntax error: the file it is in, then the line and column.

PyYAML's own text names the stream it was given, `<unicode string>` for text read first (as every loader here
does), and spreads over several lines; operators need `policies.yaml: not valid YAML/JSON at line 3, column 9:
...` instead.
"""

from __future__ import annotations

import yaml


def yaml_error_text(exc: yaml.YAMLError, source: str) -> str:
    """`<source>: not valid YAML/JSON at line L, column C: <what the parser expected and found>`."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem, context = getattr(exc, "problem", None), getattr(exc, "context", None)
    what = ", ".join(str(p) for p in (context, problem) if p) if problem else str(exc).splitlines()[0]
    return f"{source}: not valid YAML/JSON{where}: {what}"

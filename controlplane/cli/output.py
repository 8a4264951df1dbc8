"""How `hivemesh` writes: the two consoles, tables that never cut an id, and errors as text or JSON.

Markup is off on both consoles: messages and table cells carry ids, globs and patterns from users and servers
(`must match [a-z0-9][a-z0-9._-]{0,62}`), which rich would otherwise read as style tags and drop. A command that
wants colour says so per call (`markup=True`, with every dynamic part passed through `escape`) or uses `Text`.

When stdout is not a terminal (a pipe, a file, a script) and COLUMNS is unset, lines are not cut to rich's
80-column fallback: a table is as wide as its content, so ids come out whole for copying. On a terminal, table
columns fold long cells instead of ending them with an ellipsis.

With `--json`, an error is one JSON object on stderr, `{"error": {"code", "message", "details"}}`, and the exit
code is the same as without it (1, or 2 for a usage mistake).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any, Final

from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = ["emit_error", "err", "escape", "new_table", "out"]

_PIPE_WIDTH: Final = 4096
"""Wide enough for any row a table here prints; only used when nothing says how wide the output is."""


def _width(stream: Any) -> int | None:
    """None (rich decides: COLUMNS, else the terminal) on a terminal or when COLUMNS is set; else unbounded."""
    isatty = getattr(stream, "isatty", None)
    if "COLUMNS" in os.environ or (isatty is not None and isatty()):
        return None
    return _PIPE_WIDTH


out = Console(markup=False, width=_width(sys.stdout))
err = Console(stderr=True, soft_wrap=True, markup=False, width=_width(sys.stderr))  # a message is one line


def new_table(*headers: str, **options: Any) -> Table:
    """A rich Table whose columns fold long cells (never an ellipsis: ids must stay whole to be copied)."""
    t = Table(**options)
    for h in headers:
        t.add_column(h, overflow="fold")
    return t


def emit_error(code: str, message: str, details: Mapping[str, Any] | None = None, *, as_json: bool,
               hint: str = "") -> None:
    """Write one error: a JSON object on stderr with --json, else one readable line (and the details under it)."""
    if as_json:
        body = {"error": {"code": code, "message": message, "details": dict(details or {})}}
        sys.stderr.write(json.dumps(body) + "\n")
        sys.stderr.flush()
        return
    suffix = f" [dim]({escape(hint)})[/dim]" if hint else ""
    err.print(f"[red]error:[/red] {escape(message)}{suffix}", markup=True, highlight=False)
    for field, why in (details or {}).get("field_violations", {}).items():
        err.print(f"  {field}: {why}", highlight=False)

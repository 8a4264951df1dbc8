"""How `hivemesh` writes: the two consoles, tables that never cut an id, and errors as text or JSON.

Markup is off on both consoles: messages and table cells carry ids, globs and patterns from users and servers
(`must match [a-z0-9][a-z0-9._-]{0,62}`), which rich would otherwise read as style tags and drop. A command that
wants colour says so per call (`markup=True`, with every dynamic part passed through `escape`) or uses `Text`.

Text from the mesh never steers the terminal: an audit record, an escalation's reason or a workflow summary is
written by workloads, and rich passes ESC, the other C0/C1 controls and bidi overrides through (it strips only
BEL, BS, VT, FF and CR), so a record could erase its own row, set the window title or show the approver another
request. `clean` writes each such character as its escape (`\\x1b`, `\\u202e`); every table cell goes through it
(`new_table`, `CleanTable`), so do messages that print one value (with newlines and tabs shown too: a value is
one line), and both consoles apply it to everything they render (keeping the newlines and tabs of the CLI's
own layout), so a print that forgot still writes nothing raw. `--json` output needs none of it: JSON escapes them.

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
from collections.abc import Iterable, Mapping
from typing import Any, Final

from rich.console import Console, ConsoleOptions, HighlighterType, JustifyMethod, OverflowMethod, RenderableType
from rich.markup import escape
from rich.protocol import rich_cast
from rich.segment import Segment
from rich.style import Style, StyleType
from rich.table import Table
from rich.text import Span, Text

from hivemesh.mesh.text_clean import LAYOUT, UNSAFE, clean, shown

__all__ = ["CleanTable", "clean", "clean_text", "emit_error", "err", "escape", "new_table", "out"]

_PIPE_WIDTH: Final = 4096
"""Wide enough for any row a table here prints; only used when nothing says how wide the output is."""


def clean_text(text: Text, *, layout: bool = False) -> Text:
    """A rich Text as `clean` writes its characters, its styles kept on the characters they styled."""
    plain = text.plain
    if not UNSAFE.search(plain):
        return text
    pieces: list[str] = []
    starts: list[int] = []  # where each character of plain starts in the cleaned text
    at = 0
    for char in plain:
        starts.append(at)
        piece = char if not UNSAFE.fullmatch(char) or (layout and char in LAYOUT) else shown(char)
        pieces.append(piece)
        at += len(piece)
    starts.append(at)
    last = len(plain)
    spans = [Span(starts[min(s.start, last)], starts[min(s.end, last)], s.style) for s in text.spans]
    return Text("".join(pieces), text.style, justify=text.justify, overflow=text.overflow, no_wrap=text.no_wrap,
                end=text.end, tab_size=text.tab_size, spans=spans)


def _cell(value: RenderableType | None) -> RenderableType | None:
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, Text):
        return clean_text(value)
    return value


class CleanTable(Table):
    """A rich Table whose str and Text cells are `clean`ed as they are added (measured as they will show)."""

    def add_row(self, *renderables: RenderableType | None, style: StyleType | None = None,
                end_section: bool = False) -> None:
        super().add_row(*(_cell(r) for r in renderables), style=style, end_section=end_section)


class _CleanConsole(Console):
    """A Console that `clean`s (keeping newlines and tabs) every string and Text it renders, and any text
    segment that still holds such a character: what it writes steers the terminal only through rich's own
    styles and control segments."""

    def render_str(self, text: str, *, style: str | Style = "", justify: JustifyMethod | None = None,
                   overflow: OverflowMethod | None = None, emoji: bool | None = None, markup: bool | None = None,
                   highlight: bool | None = None, highlighter: HighlighterType | None = None) -> Text:
        return super().render_str(clean(text, layout=True), style=style, justify=justify, overflow=overflow,
                                  emoji=emoji, markup=markup, highlight=highlight, highlighter=highlighter)

    def render(self, renderable: RenderableType, options: ConsoleOptions | None = None) -> Iterable[Segment]:
        renderable = rich_cast(renderable)
        if isinstance(renderable, Text):
            renderable = clean_text(renderable, layout=True)
        for segment in super().render(renderable, options):
            if segment.control or not UNSAFE.search(segment.text):
                yield segment
            else:
                yield Segment(clean(segment.text, layout=True), segment.style, segment.control)


def _width(stream: Any) -> int | None:
    """None (rich decides: COLUMNS, else the terminal) on a terminal or when COLUMNS is set; else unbounded."""
    isatty = getattr(stream, "isatty", None)
    if "COLUMNS" in os.environ or (isatty is not None and isatty()):
        return None
    return _PIPE_WIDTH


out: Console = _CleanConsole(markup=False, width=_width(sys.stdout))
err: Console = _CleanConsole(stderr=True, soft_wrap=True, markup=False, width=_width(sys.stderr))  # one line


def new_table(*headers: str, **options: Any) -> CleanTable:
    """A CleanTable whose columns fold long cells (never an ellipsis: ids must stay whole to be copied)."""
    t = CleanTable(**options)
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
    suffix = f" [dim]({escape(clean(hint))})[/dim]" if hint else ""
    # Newlines kept: a few local errors end with the log lines of a process that would not start.
    err.print(f"[red]error:[/red] {escape(clean(message, layout=True))}{suffix}", markup=True, highlight=False)
    for field, why in (details or {}).get("field_violations", {}).items():
        err.print(f"  {clean(field)}: {clean(why)}", highlight=False)

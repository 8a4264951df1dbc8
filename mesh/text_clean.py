"""Text from the mesh made safe to write to a terminal: each control, bidi or invisible formatting character shown
as its escape, every other character as it is.

Agent names, capabilities, error messages from remotes and audit records are written by workloads; a terminal acts
on ESC and the other C0/C1 controls (erase a line, set the window title) and bidi overrides reorder what is shown,
so such text written raw could steer the operator's terminal or show them other text than it holds. The CLI's
output and the text log lines (`hivemesh.mesh.logjson`) both write through `clean`; it lives in the mesh so the
log format, which the data plane configures too, needs nothing from the control plane.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["LAYOUT", "UNSAFE", "clean", "shown"]

UNSAFE: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f"  # C0 controls (ESC among them), DEL, C1 controls (CSI, OSC, NEL, ...)
    "\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff"  # bidi marks, overrides and isolates; invisible ones
    "\ud800-\udfff]"  # lone surrogates (undecodable bytes): not even writable as UTF-8
)
"""Characters a terminal acts on, or that change how the text around them reads, instead of showing them."""
LAYOUT: Final = frozenset("\n\t")
"""What `clean(layout=True)` keeps: the characters that lay out text of several lines."""


def shown(char: str) -> str:
    """How clean writes one UNSAFE character: `\\xNN` up to U+00FF, else `\\uNNNN`."""
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _shown_unless_layout(match: re.Match[str]) -> str:
    char = match.group()
    return char if char in LAYOUT else shown(char)


def _shown_match(match: re.Match[str]) -> str:
    return shown(match.group())


def clean(text: object, *, layout: bool = False) -> str:
    """text (str() of anything else) with each control, bidi or invisible formatting character written as its
    escape (ESC as the four characters `\\x1b`); with layout, newlines and tabs are kept (text that is several
    lines: a traceback, the CLI's own layout), else shown as `\\x0a` and `\\x09` (one value, one line). Text with
    none of them is returned as it is."""
    s = text if isinstance(text, str) else str(text)
    if not UNSAFE.search(s):
        return s
    return UNSAFE.sub(_shown_unless_layout if layout else _shown_match, s)

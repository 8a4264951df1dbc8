"""Compact JSON bytes for call payloads, byte for byte what `json.dumps(value, separators=(",", ":"),
allow_nan=False).encode()` gives, without its per-character pass over long text. NaN and Infinity are refused
(ValueError): json would write them, but they are not JSON, and readers in other languages (and orjson) refuse
them.

The standard encoder escapes a string one character at a time (~2.3 ns each here: ~150 µs for a 64 KiB field,
as much as the rest of a mesh call's Python work). Most long fields an agent sends are ASCII text. For ASCII
text without DEL, orjson's string encoding is the standard one, escapes and all (tested for every ASCII
character and for random text); it writes a 64 KiB field, quotes included, in ~3 µs, against ~6 µs for copying
it out and proving it needs no escape with a Hyperscan pass, as this module did before (BENCHMARKS.md). json
writes DEL as `\\u007f` and orjson as itself, and non-ASCII text is escaped by json and not by orjson: those go
through the standard escape. Only a top-level string and the direct string fields of a top-level object (the
common payload shapes) take this path; everything else goes through the standard encoder, so errors
(TypeError, ValueError for a cycle or a non-finite number) and output are the standard ones.
"""

from __future__ import annotations

import json
from typing import Any, Final

import orjson

LONG: Final = 1024
"""Strings from this length on are written by orjson (below it the standard escape is as cheap)."""
MAX_FIELDS: Final = 64
"""Objects with more fields than this go to the standard encoder whole (one field each costs an encoder call)."""

_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_escape = json.encoder.encode_basestring_ascii  # the standard encoder's own string escape (C when available)
_DEL: Final = "\x7f"


def _string(text: str, parts: list[bytes]) -> None:
    """Append text as a JSON string to parts."""
    if len(text) >= LONG and text.isascii() and _DEL not in text:
        parts.append(orjson.dumps(text))
        return
    parts.append(_escape(text).encode())


def _object(value: dict[Any, Any]) -> list[bytes] | None:
    """A flat object with a long string field, as pieces, field by field; None when the standard encoder should
    do it all.

    The pieces are joined once, by whoever writes them (each `+` of bytes copies the long field again, and three
    such copies of a 64 KiB field cost twice what checking it does: BENCHMARKS.md, 4 Dec afternoon)."""
    worth = False
    for key, field in value.items():
        if type(key) is not str:  # json turns int/float/bool/None keys into strings: leave that to it
            return None
        if type(field) is str and len(field) >= LONG:
            worth = True
    if not worth:
        return None  # no long string field: nothing to gain
    parts: list[bytes] = [b"{"]
    for key, field in value.items():
        if len(parts) > 1:
            parts.append(b",")
        parts += (_escape(key).encode(), b":")
        if type(field) is str:
            _string(field, parts)
        else:
            parts.append(_ENCODER.encode(field).encode())
    parts.append(b"}")
    return parts


def compact_json_parts(value: Any) -> list[bytes]:
    """compact_json(value) as pieces to join, a long plain string field one piece of its own: a message writer
    (`mesh/invoke_wire.py`) joins them into its bytes with the payload copied once. Raises what compact_json
    raises."""
    kind = type(value)
    if kind is str:
        parts: list[bytes] = []
        _string(value, parts)
        return parts
    if kind is dict and len(value) <= MAX_FIELDS:
        pieces = _object(value)
        if pieces is not None:
            return pieces
    return [_ENCODER.encode(value).encode()]


def compact_json(value: Any) -> bytes:
    """`json.dumps(value, separators=(",", ":"), allow_nan=False).encode()`, faster when value (or one of its
    direct fields) is a long plain string. Raises what json.dumps raises (TypeError: not serializable;
    ValueError: a cycle, NaN or Infinity)."""
    parts = compact_json_parts(value)
    return parts[0] if len(parts) == 1 else b"".join(parts)


__all__ = ["LONG", "MAX_FIELDS", "compact_json", "compact_json_parts"]

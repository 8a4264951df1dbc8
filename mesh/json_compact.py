"""Compact JSON bytes for call payloads, byte for byte what `json.dumps(value, separators=(",", ":")).encode()`
gives, without its per-character pass over long plain text.

The standard encoder escapes a string one character at a time (~2.3 ns each here: ~150 µs for a 64 KiB field,
as much as the rest of a mesh call's Python work). Most long fields an agent sends are ASCII text with nothing to
escape: for those, one Hyperscan pass proves it (~0.13 ns a byte; `bytes.translate`, ~0.6 ns, where Hyperscan
cannot load) and the string is copied as it is. Only a
top-level string and the direct string fields of a top-level object (the common payload shapes) take that path;
everything else, and every field that needs escaping, goes through the standard encoder, so errors (TypeError,
ValueError for a cycle) and output are the standard ones.
"""

from __future__ import annotations

import json
from typing import Any, Final

from hivemesh.mesh import simd_scan
from hivemesh.mesh.simd_scan import Scanner

LONG: Final = 1024
"""Strings from this length on are checked for the plain path (below it the standard escape is as cheap)."""
MAX_FIELDS: Final = 64
"""Objects with more fields than this go to the standard encoder whole (one field each costs an encoder call)."""

_ENCODER: Final = json.JSONEncoder(separators=(",", ":"))
_escape = json.encoder.encode_basestring_ascii  # the standard encoder's own string escape (C when available)
_PLAIN: Final = bytes(c for c in range(0x20, 0x7F) if c not in b'"\\')
"""The bytes JSON (with ensure_ascii) writes unchanged; anything else is escaped."""


_ESCAPED: Final = r'[^\x20\x21\x23-\x5b\x5d-\x7e]'
"""A byte JSON escapes: anything but _PLAIN."""
_scanner: Scanner | None = None


def _needs_escape(raw: bytes) -> bool:
    global _scanner  # compiled on first use (~1 ms); a race only compiles it twice
    if simd_scan.AVAILABLE:
        if _scanner is None:
            _scanner = Scanner([(0, _ESCAPED)])
        return bool(_scanner.hits(raw))
    return bool(raw.translate(None, _PLAIN))  # what is left once every plain byte is deleted: something to escape


def _plain(text: str) -> bytes | None:
    """text's ASCII bytes when they go into JSON unescaped (printable ASCII without `"` or `\\`), else None."""
    if not text.isascii():
        return None
    raw = text.encode("ascii")
    return None if _needs_escape(raw) else raw


def _string(text: str, parts: list[bytes]) -> None:
    """Append text as a JSON string to parts."""
    if len(text) >= LONG:
        plain = _plain(text)
        if plain is not None:
            parts += (b'"', plain, b'"')
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
    """`json.dumps(value, separators=(",", ":")).encode()`, faster when value (or one of its direct fields) is a
    long plain string. Raises what json.dumps raises (TypeError: not serializable; ValueError: a cycle)."""
    parts = compact_json_parts(value)
    return parts[0] if len(parts) == 1 else b"".join(parts)


__all__ = ["LONG", "MAX_FIELDS", "compact_json", "compact_json_parts"]

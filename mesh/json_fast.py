"""`json.loads` for call payloads, value for value and error for error, with orjson doing the parsing it agrees on.

The standard decoder reads a string one character at a time: a 64 KiB string field took ~42 µs at each end of a
call, 8-12% of a 64 KiB call's CPU in both the SDK agent and the client (perf, BENCHMARKS.md). orjson reads the
same text in ~18 µs. The two disagree on some texts: orjson turns an integer beyond 64 bits into a float, refuses
NaN, Infinity, lone surrogates, UTF-16 and nesting past 1024, and may round a long decimal differently. So
orjson's result is kept only when it holds no float at all (every number then an integer that fits 64 bits,
which both read exactly) and nests at most `MAX_DEPTH` deep; any other result, and every text orjson refuses, is
parsed again by `json.loads` (through `json_depth`, which refuses nesting past `json_depth.MAX_NESTING` alike on
every interpreter), which returns or raises exactly what it always did.

Long strings are read apart (`_long_strings`). orjson reads a long string at ~3 GB/s (a 64 KiB one in ~22 µs, at
each end of a call), while its bytes decode as UTF-8 in ~3 µs. A string of at least `LONG_STRING` bytes in a text
with no backslash and no control character in it is exactly the UTF-8 decoding of its bytes, as json reads it. So
such strings are cut out and decoded apart, and orjson reads the small rest with a placeholder in each one's place:
a 64 KiB payload in ~12 µs instead of ~21. That is the shape of the payloads that are large in an agent mesh (a
document, an image in base64, a model's one-line answer in one field); any other text goes the way above.
"""

from __future__ import annotations

import re
from typing import Any, Final

import orjson

from hivemesh.mesh import json_depth, simd_scan

MAX_DEPTH: Final = 200
"""Deeper results are parsed by json too: on 3.11 how deep json may nest depends on the caller's stack (it raises
RecursionError near the interpreter's recursion limit, 1,000 frames), so only json can say what it does with
such text; at most 200 levels, it reads them unless its caller is already ~800 frames deep."""
_CONTAINERS: Final = frozenset({dict, list})
LONG_STRING: Final = 20 * 1024
"""A string value at least this many bytes long (between its quotes) is decoded apart from orjson's read; texts
shorter than this are read by orjson alone. Finding the strings, checking and decoding them costs ~4 µs more than
orjson's ~0.35 µs a KiB saves below it (timeit: 16 KiB 6.6 µs against 6.0; 32 KiB 9.0 against 11.4)."""
MAX_STRINGS: Final = 8
"""`_long_strings` looks for long values among the first this many strings of a text only, and leaves the rest of the
text to orjson as it is: finding each string costs ~0.3 µs of Python, so a text of many short ones loses little."""
_PLACEHOLDER: Final = "\x01"
"""Starts the string orjson reads in a long value's place (written `\\u0001<n>`). No string of a text
`_long_strings` takes can start so: it holds no escape, and a raw control character is not JSON."""
_CONTROL = simd_scan.Scanner([(1, r"[\x00-\x1f]")]) if simd_scan.AVAILABLE else None
"""Finds a control character, which a JSON string may hold only escaped."""
_KEY_AFTER: Final = re.compile(rb"[ \t\n\r]*:")
"""What follows a key's closing quote."""
_NOT_FAST: Final = object()


def _exact(value: Any) -> bool:
    """Whether json would read the same text as this value (a dict or a list): no float anywhere, nested at most
    MAX_DEPTH. Each container's types are taken as a set in C (a flat record: ~0.5 µs, not ~2)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth >= MAX_DEPTH:
            return False
        children = item.values() if type(item) is dict else item
        types = set(map(type, children))
        if float in types:
            return False
        if not types.isdisjoint(_CONTAINERS):
            stack.extend((child, depth + 1) for child in children if type(child) in _CONTAINERS)
    return True


def loads(data: bytes | memoryview | str) -> Any:
    """What `json.loads(data)` returns, or raises what it raises (JSONDecodeError, UnicodeDecodeError,
    RecursionError); a memoryview (a payload inside the message received, `mesh/invoke_wire.py`) is read as its
    bytes."""
    if not isinstance(data, str) and len(data) > LONG_STRING and _CONTROL is not None:
        value = _long_strings(data if type(data) is bytes else bytes(data))
        if value is not _NOT_FAST:
            return value
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return json_depth.loads(bytes(data) if type(data) is memoryview else data)
    kind = type(value)
    if kind is float or (kind in _CONTAINERS and not _exact(value)):
        return json_depth.loads(bytes(data) if type(data) is memoryview else data)
    return value


def _long_strings(data: bytes) -> Any:
    """What json reads in data, its long string values decoded apart; `_NOT_FAST` when data has none among its first
    MAX_STRINGS strings, or holds anything orjson and json might then read differently (the caller reads it as
    before).

    With no backslash in data, every quote starts or ends a string, so `find` (memchr) pairs them. A long value must
    hold no control character and be valid UTF-8 (json would read an encoded surrogate, which the strict decoding
    refuses: the caller's orjson refuses it too, and json decides). A key stays as it is. The rest orjson reads keeps
    every token of data with long strings swapped for short ones, so it is JSON exactly when data is, and reads to
    the same value: its floats, depth and so on are checked as for any text (`_exact`)."""
    find = data.find
    if find(b"\\") >= 0:
        return _NOT_FAST
    pieces: list[bytes] = []
    spans: list[tuple[int, int]] = []
    start = pos = 0
    for _ in range(MAX_STRINGS):
        i = find(b'"', pos)
        if i < 0:
            break
        j = find(b'"', i + 1)
        if j < 0:
            return _NOT_FAST  # a string that does not end: orjson and json say so
        pos = j + 1
        if j - i - 1 < LONG_STRING:
            continue
        if _KEY_AFTER.match(data, pos):  # whitespace (skipped in C: any amount of it is JSON), then ":": a key
            continue
        pieces += (data[start:i], b'"\\u0001%d"' % len(spans))
        spans.append((i + 1, j))
        start = pos
    if not spans:
        return _NOT_FAST
    pieces.append(data[start:])
    assert _CONTROL is not None
    view = memoryview(data)
    texts: list[str] = []
    for i, j in spans:
        if _CONTROL.hits(view[i:j]):
            return _NOT_FAST
        try:
            texts.append(str(view[i:j], "utf-8"))
        except UnicodeDecodeError:
            return _NOT_FAST
    try:
        value = orjson.loads(b"".join(pieces))
    except orjson.JSONDecodeError:
        return _NOT_FAST
    kind = type(value)
    if kind is str:
        return texts[int(value[1:])]  # the whole text was one long string
    if kind is float or (kind in _CONTAINERS and not _exact(value)):
        return _NOT_FAST
    return _fill(value, texts)


def _fill(value: Any, texts: list[str]) -> Any:
    """value (a dict or a list) with each placeholder in it replaced by its text. A placeholder a duplicate key
    dropped (the last value wins, as in json) is not found: the walk then ends when value does."""
    left = len(texts)
    stack = [value]
    while stack and left:
        item = stack.pop()
        for key, child in (item.items() if type(item) is dict else enumerate(item)):
            kind = type(child)
            if kind is str:
                if child[:1] == _PLACEHOLDER:
                    item[key] = texts[int(child[1:])]
                    left -= 1
            elif kind is dict or kind is list:
                stack.append(child)
    return value


__all__ = ["LONG_STRING", "MAX_DEPTH", "loads"]

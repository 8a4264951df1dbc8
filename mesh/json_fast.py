"""`json.loads` for call payloads, value for value and error for error, with orjson doing the parsing it agrees on.

The standard decoder reads a string one character at a time: a 64 KiB string field took ~42 µs at each end of a
call, 8-12% of a 64 KiB call's CPU in both the SDK agent and the client (perf, BENCHMARKS.md). orjson reads the
same text in ~18 µs. The two disagree on some texts: orjson turns an integer beyond 64 bits into a float, refuses
NaN, Infinity, lone surrogates, UTF-16 and nesting past 1024, and may round a long decimal differently. So
orjson's result is kept only when it holds no float at all (every number then an integer that fits 64 bits,
which both read exactly) and nests at most `MAX_DEPTH` deep; any other result, and every text orjson refuses, is
parsed again by `json.loads`, which returns or raises exactly what it always did.
"""

from __future__ import annotations

import json
from typing import Any, Final

import orjson

MAX_DEPTH: Final = 200
"""Deeper results are parsed by json too: how deep json may nest depends on the caller's stack (it raises
RecursionError near the interpreter's recursion limit, 1,000 frames), so only json can say what it does with
such text; at most 200 levels, it reads them unless its caller is already ~800 frames deep."""
_CONTAINERS: Final = frozenset({dict, list})


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
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(bytes(data) if type(data) is memoryview else data)
    kind = type(value)
    if kind is float or (kind in _CONTAINERS and not _exact(value)):
        return json.loads(bytes(data) if type(data) is memoryview else data)
    return value


__all__ = ["MAX_DEPTH", "loads"]

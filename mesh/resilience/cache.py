"""The response cache graceful degradation answers from: last good responses by input, bounded and expiring."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any


class ResponseCache:
    """Last good responses of cacheable capabilities, by input: bounded (LRU) and expiring (TTL)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[str, OrderedDict[bytes, tuple[float, Any]]] = {}
        self.hits = 0

    SHARED: bytes = b"*"
    """The scope of answers whose capability's owner marked them cache_shareable (any allowed caller)."""

    @staticmethod
    def key(content_type: str, payload: bytes, scope: bytes) -> bytes:
        """The entry's key: the input, and who may be given the answer (a caller's principal, or SHARED)."""
        return hashlib.sha256(scope + b"\0" + content_type.encode() + b"\0" + payload).digest()

    def put(self, capability: str, key: bytes, response: Any, max_entries: int) -> None:
        entries = self._entries.setdefault(capability, OrderedDict())
        entries[key] = (self._clock(), response)
        entries.move_to_end(key)
        while len(entries) > max_entries:
            entries.popitem(last=False)

    def get(self, capability: str, key: bytes, ttl_s: float) -> Any:
        """The response stored for key if it is younger than ttl_s, else None."""
        entries = self._entries.get(capability)
        entry = entries.get(key) if entries is not None else None
        if entry is None or self._clock() - entry[0] > ttl_s:
            return None
        self.hits += 1
        return entry[1]

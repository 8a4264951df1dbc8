"""Exactly-once effects for non-idempotent capabilities: calls carrying an idempotency key are deduplicated.

A workflow re-sends a step with the same `CallContext.idempotency_key` when it cannot know whether the first
attempt finished (its orchestrator was killed mid-call, a connection broke). The SDK server keeps, per
(scope, capability, key), where the scope is the call's workflow id when it has one (whoever resumes a run,
e.g. the operator, shares its keys) and the caller's identity otherwise:

- a call whose key is **running** is joined: the second caller waits for the first run's result;
- a call whose key **finished** gets the stored result again, without running the handler;
- the same key with a **different input** is refused (INVALID_INPUT): that is a caller bug;
- a run that **failed or was cancelled** releases the key, so a retry runs the handler (its effect did not
  happen as far as the SDK can tell; see the handler contract below).

Handler contract for non-idempotent capabilities: make the effect the last thing the handler does (no
`await` after it), or store the key atomically with the effect as `hivemesh.agents.store` does. Then a
cancelled attempt has either committed and returned (and its result is stored) or not committed at all.

A replay needs the same scope, capability, key *and* input (its SHA-256), from a caller the mesh already let
call the capability; workflow ids and keys are random by default, so treat them as unguessable.

The memory is per agent process (bounded, with a TTL): an agent that must deduplicate across its own
restarts keeps keys in its own database. Implement `DedupeStore` to plug in another store.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from hivemesh.mesh.errors import InvalidInputError


class DedupeStore(Protocol):
    """What the SDK servicer needs to deduplicate keyed calls."""

    async def run(self, scope: tuple[str, str, str], fingerprint: str, fn: Callable[[], Awaitable[Any]]) -> Any: ...


@dataclass
class _Entry:
    fingerprint: str
    future: asyncio.Future[Any]
    finished_at: float | None = None
    runs: int = field(default=1)


def fingerprint(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class IdempotencyCache:
    """In-memory `DedupeStore`: at most `max_entries` finished keys, each kept `ttl_s` seconds."""

    def __init__(self, *, max_entries: int = 10_000, ttl_s: float = 3600.0) -> None:
        # NaN passed `< 1` and `<= 0` and then never compared true again: nothing was ever evicted.
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be an int >= 1, not {max_entries!r}")
        if (isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not math.isfinite(ttl_s)
                or ttl_s <= 0):
            raise ValueError(f"ttl_s must be a finite number of seconds > 0, not {ttl_s!r}")
        self._max = max_entries
        self._ttl = ttl_s
        self._entries: OrderedDict[tuple[str, str, str], _Entry] = OrderedDict()
        self.executions = 0
        self.replays = 0
        self.joins = 0

    def _evict(self) -> None:
        now = time.monotonic()
        stale = [s for s, e in self._entries.items() if e.finished_at is not None and now - e.finished_at > self._ttl]
        for scope in stale:
            del self._entries[scope]
        while len(self._entries) > self._max:
            oldest = next((s for s, e in self._entries.items() if e.finished_at is not None), None)
            if oldest is None:
                break
            del self._entries[oldest]

    async def run(self, scope: tuple[str, str, str], fingerprint: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Run fn once per scope; see the module docstring for joins, replays and releases."""
        while True:
            entry = self._entries.get(scope)
            if entry is None:
                break
            if entry.fingerprint != fingerprint:
                raise InvalidInputError(
                    "this idempotency key was used before with a different input",
                    field_violations={"context.idempotency_key": "reused with a different input"},
                )
            if entry.future.done():
                self.replays += 1
                self._entries.move_to_end(scope)
                return entry.future.result()
            self.joins += 1
            try:
                return await asyncio.shield(entry.future)
            except asyncio.CancelledError:
                if not entry.future.cancelled():
                    raise  # we were cancelled ourselves
                # the first run was cancelled: loop and run it ourselves
            except Exception:  # noqa: BLE001 - the first run failed: loop, the key was released
                continue
        loop = asyncio.get_running_loop()
        entry = _Entry(fingerprint, loop.create_future())
        self._entries[scope] = entry
        self.executions += 1
        try:
            result = await fn()
        except BaseException as exc:
            self._entries.pop(scope, None)
            if isinstance(exc, asyncio.CancelledError):
                entry.future.cancel()
            else:
                entry.future.set_exception(exc)
                entry.future.exception()  # retrieved: joiners see it; no "never retrieved" warning
            raise
        entry.future.set_result(result)
        entry.finished_at = time.monotonic()
        self._evict()
        return result

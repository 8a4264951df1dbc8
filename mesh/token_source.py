"""Capability tokens for outbound calls: fetched from the control plane per target agent, cached, and
refreshed before they expire so a caller never waits for one after the first call."""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from hivemesh.mesh.errors import ControlPlaneUnavailableError, GrantDeniedError, HivemeshError
from hivemesh.v1 import control_pb2

log = logging.getLogger(__name__)

on_behalf_of: contextvars.ContextVar[str | None] = contextvars.ContextVar("hivemesh_on_behalf_of", default=None)
"""The token of the call being served, while an onward call is made on behalf of its principal: the outbound
pipeline then sends a delegated token (exchanged for this one) instead of the node's own."""

_REFRESH_AT = 0.75  # of a token's lifetime: refresh in the background from then on
_REGRANT_INTERVAL_S = 5.0  # re-ask at most this often for a capability a cached token lacks


class TokenIssuerClient(Protocol):
    """The one control-plane call a token source needs."""

    async def issue_token(
        self, audience: str, scopes: Sequence[str] = (), ttl_s: int = 0
    ) -> control_pb2.IssueTokenResponse: ...


@dataclass(frozen=True, slots=True)
class _Cached:
    token: str
    scopes: frozenset[str]
    issued_at: float
    expires_at: float

    @property
    def refresh_at(self) -> float:
        return self.issued_at + (self.expires_at - self.issued_at) * _REFRESH_AT


class TokenSource:
    """One token per audience (target agent), covering every capability the caller is granted there.

    Tokens come from the control plane, which is off the call path: once a token is cached, calls use it
    while a background task fetches the next one. If the control plane is down, a cached token is used until
    it expires; then calls fail with CONTROL_PLANE_UNAVAILABLE (fail closed).
    """

    def __init__(self, issuer: TokenIssuerClient, *, clock: Callable[[], float] = time.time) -> None:
        self._issuer = issuer
        self._clock = clock
        self._cache: dict[str, _Cached] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future[_Cached]] = {}
        self._last_regrant: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._generation = 0  # bumped by clear(): a token fetched across a certificate renewal is discarded
        self._delegated: dict[tuple[str, str, str], _Cached] = {}
        self._by_name: dict[tuple[str, str], _Cached] = {}
        """(audience, capability) -> a token for that one capability, asked by name while the control plane saw no
        instance of the audience to list "every capability" from; used until its refresh time, then asked again."""

    async def get(self, audience: str, capability: str) -> str:
        """A valid token for audience that covers capability (raises GrantDeniedError when none can)."""
        now = self._clock()
        cached = self._cache.get(audience)
        valid = cached is not None and now < cached.expires_at - 1.0
        if cached is not None and valid and capability in cached.scopes:
            if now >= cached.refresh_at:
                self._refresh_in_background(audience)
            return cached.token
        named = self._by_name.get((audience, capability))
        if named is not None and now < named.refresh_at:
            return named.token
        if cached is not None and valid:
            # Grants may have widened since: ask again, but not on every call.
            if now - self._last_regrant.get(audience, 0.0) < _REGRANT_INTERVAL_S:
                raise self._denied(audience, capability, cached.scopes)
            self._last_regrant[audience] = now
        try:
            cached = await self._fetch(audience)
        except GrantDeniedError as exc:
            if exc.metadata.get("ask_by_name") != "true":
                raise
            # The control plane lists "every capability" from the audience's registered instances and saw none
            # (its lease lapsed and is being renewed, or the caller's registry view is ahead): a grant by pattern
            # then lists nothing. Asked by name, the grants judge alone.
            cached = await self._fetch(audience, capability)
        if capability not in cached.scopes:
            raise self._denied(audience, capability, cached.scopes)
        return cached.token

    @staticmethod
    def _denied(audience: str, capability: str, scopes: frozenset[str]) -> GrantDeniedError:
        return GrantDeniedError(
            f"this caller is not granted capability {capability!r} on {audience} "
            f"(granted there: {', '.join(sorted(scopes)) or 'nothing'})",
            metadata={"capability": capability[:128], "audience": audience},
        )

    def _refresh_in_background(self, audience: str) -> None:
        if (audience, "") in self._inflight:
            return

        async def refresh() -> None:
            try:
                await self._fetch(audience)
            except HivemeshError as exc:
                log.warning("background token refresh for %s failed: %s", audience, exc)

        task = asyncio.get_running_loop().create_task(refresh())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch(self, audience: str, capability: str = "") -> _Cached:
        """Fetch a token for audience, for every capability granted there (or only capability, by name);
        concurrent callers share one request (single flight)."""
        key = (audience, capability)
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[_Cached] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        scopes = (capability,) if capability else ()
        try:
            try:
                generation = self._generation
                resp = await self._issuer.issue_token(audience, scopes, 0)
                if generation != self._generation:
                    # The certificate was renewed while we asked: that token is bound to the old one.
                    resp = await self._issuer.issue_token(audience, scopes, 0)
            except HivemeshError as exc:
                if exc.code.name == "UNAVAILABLE" and not isinstance(exc, ControlPlaneUnavailableError):
                    raise ControlPlaneUnavailableError(
                        f"cannot get a token for {audience}: control plane unreachable ({exc.message})"
                    ) from exc
                raise
            entry = _Cached(
                token=resp.token,
                scopes=frozenset(resp.scopes),
                issued_at=self._clock(),
                expires_at=float(resp.expires_at_unix),
            )
            if not capability:
                self._cache[audience] = entry
            elif generation == self._generation:
                if len(self._by_name) > 1024:
                    self._by_name.clear()
                self._by_name[key] = entry
            fut.set_result(entry)
            return entry
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            self._inflight.pop(key, None)

    def clear(self) -> None:
        """Forget every cached token (after a certificate renewal: tokens are bound to the old one)."""
        self._generation += 1
        self._cache.clear()
        self._delegated.clear()
        self._by_name.clear()

    async def get_delegated(self, subject_token: str, audience: str, capability: str) -> str:
        """A delegated token for capability on audience, acting for subject_token's principal (RFC 8693 token
        exchange; least privilege: it asks for that one capability), cached until shortly before it expires."""
        exchange = getattr(self._issuer, "exchange_token", None)
        if exchange is None:
            raise HivemeshError("this token source cannot exchange tokens for delegation")
        key = (hashlib.sha256(subject_token.encode()).hexdigest(), audience, capability)
        now = self._clock()
        cached = self._delegated.get(key)
        if cached is None or now >= cached.expires_at - 1.0:
            generation = self._generation
            resp = await exchange(subject_token, audience, [capability])
            cached = _Cached(resp.token, frozenset(resp.scopes), now, float(resp.expires_at_unix))
            if generation == self._generation:
                if len(self._delegated) > 1024:
                    self._delegated.clear()
                self._delegated[key] = cached
        if capability not in cached.scopes:
            raise self._denied(audience, capability, cached.scopes)
        return cached.token

    def invalidate(self, audience: str) -> None:
        """Forget the cached token (after the target refused it, say)."""
        self._cache.pop(audience, None)
        for key in [k for k in self._by_name if k[0] == audience]:
            del self._by_name[key]

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

"""Graceful degradation: when a capability with a routes policy fails as unavailable or overloaded, answer
from its fallback capability, else from the cached last good answer to the same input.

A cached answer is never a way around authorization or another caller's data:
- it is kept per caller (this node's identity and the principal it calls on behalf of), unless the capability's
  owner declared it `cache_shareable` in its card;
- before it is served, the caller must be allowed to make that call now: a token for the target is issued (the
  grants and revocations of this moment), and the authz policies this node mirrors allow it.

A call pinned to one agent (`OutboundCall.agent`) stays pinned when degraded: its fallback capability is called
pinned to the same agent, and only a cached answer that agent gave is served.

A degraded answer says so: `x-hivemesh-degraded` in InvokeResponse.metadata (`fallback:<capability>` or
`cache`), appended to the response bytes without re-encoding them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc

from hivemesh.mesh.errors import HivemeshError
from hivemesh.mesh.outbound.call import OutboundCall
from hivemesh.mesh.outbound.events import OutboundEvents
from hivemesh.mesh.resilience.cache import ResponseCache
from hivemesh.mesh.resilience.routes import RoutePolicy
from hivemesh.mesh.wire import metadata_entry
from hivemesh.v1 import agent_pb2, mesh_pb2

log = logging.getLogger(__name__)

DEGRADED_KEY = "x-hivemesh-degraded"
"""Set in InvokeResponse.metadata when the answer came from a fallback capability or the response cache."""
DEGRADE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
"""The failures degradation answers; any other error stands."""

Result = tuple[bytes, mesh_pb2.AgentInstance]


Authorize = Callable[[OutboundCall, mesh_pb2.AgentInstance], Awaitable[None]]
"""Raises a HivemeshError unless the caller may make this call to that instance's agent now."""


def shareable(instance: mesh_pb2.AgentInstance, capability: str) -> bool:
    """Whether the agent's card marks capability's answers as the same for every caller."""
    return any(c.name == capability and c.cache_shareable for c in instance.card.capabilities)


class Degradation:
    """Fallback and cached answers of one node; `run` sends a call (the fallback) through the attempt loop.

    principal() names who is calling right now (scopes the cache); authorize proves a cached answer may be
    given to them (see the module docstring).
    """

    def __init__(
        self,
        cache: ResponseCache,
        run: Callable[[OutboundCall], Awaitable[Result]],
        *,
        principal: Callable[[], str],
        authorize: Authorize,
        events: OutboundEvents | None = None,
    ) -> None:
        self.cache = cache
        self._run = run
        self._principal = principal
        self._authorize = authorize
        self._events = events
        self.refused = 0
        """Cached answers withheld because the caller was not allowed to make the call at that moment."""

    def remember(self, call: OutboundCall, routes: RoutePolicy, result: Result) -> None:
        """Keep a good answer of a cacheable capability (routes with cache_ttl_s) for when it fails."""
        req = call.request()
        scope = ResponseCache.SHARED if shareable(result[1], call.capability) else self._principal().encode()
        self.cache.put(call.capability, ResponseCache.key(req.content_type, req.input, scope), result,
                       routes.cache_max_entries)

    def _cached(self, call: OutboundCall, ttl_s: float) -> Result | None:
        req = call.request()
        for scope in (self._principal().encode(), ResponseCache.SHARED):
            hit: Result | None = self.cache.get(
                call.capability, ResponseCache.key(req.content_type, req.input, scope), ttl_s)
            if hit is not None and (not call.agent or hit[1].card.name == call.agent):
                return hit
        return None

    async def answer(self, call: OutboundCall, routes: RoutePolicy, err: HivemeshError) -> Result | None:
        """A fallback capability's answer, else the cached last good answer, else None (the error stands)."""
        if routes.fallback:
            remaining = call.remaining()
            if remaining is None or remaining > 0:
                req = agent_pb2.InvokeRequest()
                req.CopyFrom(call.request())
                req.capability = routes.fallback
                fallback = OutboundCall(routes.fallback, req.SerializeToString(), call.metadata, call.deadline, req,
                                        call.idempotency_key, call.agent, timeout_s=call.timeout_s,
                                        timeout_from=call.timeout_from)
                try:
                    raw, instance = await self._run(fallback)
                    log.info("%s failed (%s): answered by fallback %s", call.capability, err.reason, routes.fallback)
                    if self._events is not None:
                        self._events.fallback(call.capability)
                    return raw + metadata_entry(DEGRADED_KEY, f"fallback:{routes.fallback}"), instance
                except HivemeshError as fb_err:
                    log.info("fallback %s of %s failed too: %s", routes.fallback, call.capability, fb_err.reason)
        if routes.cache_ttl_s is not None:
            hit = self._cached(call, routes.cache_ttl_s)
            if hit is not None:
                raw, instance = hit
                try:
                    await self._authorize(call, instance)
                except HivemeshError as refused:
                    self.refused += 1
                    log.info("%s failed (%s): a cached answer exists, but this caller may not have it now (%s)",
                             call.capability, err.reason, refused.reason)
                    return None
                log.info("%s failed (%s): answered from the response cache", call.capability, err.reason)
                if self._events is not None:
                    self._events.cached(call.capability)
                return raw + metadata_entry(DEGRADED_KEY, "cache"), instance
        return None

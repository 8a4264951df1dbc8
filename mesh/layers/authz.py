"""Authorization: the call's verified identity (peer, principal, chain) × capability × action, decided by the
authz policies in force (`hivemesh.mesh.authz`): default deny, DENY before ALLOW, dry-run audited."""

from __future__ import annotations

from collections.abc import Callable

from hivemesh.mesh.authz import EMPTY, AuthzRequest, AuthzTable, Decision
from hivemesh.mesh.errors import PeerUnauthenticatedError, PolicyDeniedError
from hivemesh.mesh.layers.authn import ACTION_OF_METHOD
from hivemesh.mesh.layers.base import Inbound


class AuthzLayer:
    """Decides each call against the node's compiled authz table.

    `table` returns the table in force now (the node's policy mirror swaps it on each change); without one the
    layer denies everything. Decisions are cached per table and (caller, principal, capability, action), so
    the per-call cost is a dict lookup; the table is filtered once to the rules about this agent.
    """

    name = "authz"

    def __init__(self, table: Callable[[], AuthzTable] | None, agent: str, *, cache_size: int = 10_000) -> None:
        self._source = table or (lambda: EMPTY)
        self._agent = agent
        self._seen: AuthzTable | None = None
        self._mine = EMPTY
        self._cache: dict[tuple[str, str | None, str | None, str], Decision] = {}
        self._cache_size = cache_size

    def check(self, call: Inbound) -> None:
        peer = call.peer
        if peer is None:  # ordering guard: identity (and the token) run first
            raise PeerUnauthenticatedError()
        table = self._source()
        if table is not self._seen:
            self._seen, self._mine, self._cache = table, table.for_agent(self._agent), {}
        claims = call.claims
        caller = str(peer.spiffe_id)
        capability = call.request.capability if call.request is not None else None
        action = ACTION_OF_METHOD.get(call.method, call.method.lower())
        principal = claims.subject if claims is not None else None
        key = (caller, principal, capability, action)
        decision = self._cache.get(key)
        if decision is None:
            req = AuthzRequest(caller=caller, capability=capability, action=action, agent=self._agent,
                               principal=principal, chain=claims.delegation if claims is not None else ())
            decision = self._mine.decide(req)
            if not self._mine.has_custom:  # a custom provider may look at more than the cache key
                if len(self._cache) >= self._cache_size:
                    self._cache.clear()
                self._cache[key] = decision
        if decision.rule:
            call.notes["rule"] = decision.rule
        if decision.would_deny:
            call.notes["dry_run"] = f"deny:{decision.would_deny}"
        if not decision.allowed:
            raise PolicyDeniedError(decision.reason, metadata={"rule": decision.rule or "default-deny"})

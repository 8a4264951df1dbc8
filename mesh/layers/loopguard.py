"""Call-chain loop guard: a call that would re-enter an agent already in its call chain (A -> B -> A) is refused
at once with LOOP_DETECTED, and one deeper than the mesh allows with DEPTH_EXCEEDED, instead of running until
the first caller's deadline. A capability that declares `recursion = N` may be re-entered N times.

The chain is what the call says it passed through: `CallContext.chain` (appended by each agent calling onward:
the SDK's `Context`, the sidecar's `Mesh` service) and, when the call is delegated, the verified delegation chain
of its token. It is a guard against accidents, not an access control: a caller that drops the chain only loses
the guard's protection, which authz and deadlines still bound.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from hivemesh.mesh.errors import DepthExceededError, LoopDetectedError
from hivemesh.mesh.layers.base import Inbound
from hivemesh.v1 import agent_pb2

DEFAULT_MAX_CALL_DEPTH: Final = 8
"""Most agents one call chain may pass through, the called one included."""


def _shown(chain: Iterable[str]) -> str:
    return " -> ".join(chain)[:512]


class LoopGuardLayer:
    """Refuses re-entry beyond a capability's declared recursion, and chains deeper than max_depth."""

    name = "loop-guard"

    def __init__(
        self, capabilities: Iterable[agent_pb2.Capability], *, me: str, max_depth: int = DEFAULT_MAX_CALL_DEPTH
    ) -> None:
        if max_depth < 1:
            raise ValueError("the maximum call depth must be at least 1")
        self._me = me
        self._max = max_depth
        self._recursion = {cap.name: cap.recursion for cap in capabilities if cap.recursion}

    def check(self, call: Inbound) -> None:
        req = call.request
        if req is None:
            return
        chain = req.context.chain
        claims = call.claims
        delegation = claims.delegation if claims is not None else ()
        if not chain and len(delegation) < 2:  # the common case: a first call, straight from its caller
            return
        # The delegation chain names the principal first, then each actor: its agents are all but the first.
        depth = max(len(chain), len(delegation) - 1) + 1
        if depth > self._max:
            raise DepthExceededError(
                f"the call chain is {depth} agents deep, over the mesh's limit of {self._max}: "
                f"{_shown([*chain, self._me])}",
                metadata={"depth": str(depth), "max_depth": str(self._max)},
            )
        visits = max(list(chain).count(self._me), list(delegation[1:]).count(self._me))
        allowed = self._recursion.get(req.capability, 0)
        if visits > allowed:
            bound = f"declares recursion {allowed}" if allowed else "declares no recursion"
            raise LoopDetectedError(
                f"the call would re-enter {self._me} ({visits} time(s) in its chain; capability "
                f"{req.capability!r} {bound}): {_shown([*chain, self._me])}",
                metadata={"agent": self._me[:256], "visits": str(visits), "recursion": str(allowed)},
            )

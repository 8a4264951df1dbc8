"""Registration fencing: a call routed by a registration of this instance that is gone is refused, unrun.

A caller sends the `registration_revision` of the registry entry it routed by (the etcd revision that created
it) as the `hivemesh-fence` header. An instance that lost its lease (paused past the TTL, cut off from etcd, its
lease revoked) registers again under a new revision; callers whose registry still holds the old entry (a
watch that lags or is cut off) would otherwise keep handing it work decided on a registration the rest of the
mesh saw expire, and may already have sent elsewhere. Such a call, or one reaching a process that holds no
registration (a new process at an old entry's address), is refused with STALE_REGISTRATION before anything
else runs; the caller's attempt loop takes that as "never ran" and routes it again. A call without the header
(a client that does not route by the registry, e.g. a direct dial) is not fenced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from hivemesh.mesh.errors import InvalidInputError, StaleRegistrationError
from hivemesh.mesh.layers.base import Inbound

FENCE_HEADER: Final = "hivemesh-fence"
_MAX_DIGITS: Final = 19  # an etcd revision is an int64


def parse_fence(value: object) -> int:
    """The revision a `hivemesh-fence` header names; InvalidInputError unless it is a positive decimal int64."""
    if not isinstance(value, str) or not value.isascii() or not value.isdecimal() or len(value) > _MAX_DIGITS:
        raise InvalidInputError(
            f"the {FENCE_HEADER} header must be the decimal registration revision the call was routed by",
            field_violations={FENCE_HEADER: "not a positive decimal integer"},
        )
    fence = int(value)
    if fence <= 0 or fence >= 2**63:
        raise InvalidInputError(
            f"the {FENCE_HEADER} header must be the decimal registration revision the call was routed by",
            field_violations={FENCE_HEADER: "out of range"},
        )
    return fence


class FenceLayer:
    """Refuses a fenced call unless it was routed by this instance's current registration.

    `follow(problem)` is given the registration's `fence_problem` once the instance registers (the server
    serves before it registers: no fenced call can be for it until then)."""

    name = "fence"

    def __init__(self) -> None:
        self._problem: Callable[[int], str | None] | None = None

    def follow(self, problem: Callable[[int], str | None] | None) -> None:
        """Judge fences by problem(fence) (None: the call is for this registration); None: not registered."""
        self._problem = problem

    def check(self, call: Inbound) -> None:
        value = call.metadata.get(FENCE_HEADER)
        if value is None:
            return
        fence = parse_fence(value)
        problem = self._problem
        why = (problem(fence) if problem is not None
               else f"this instance is not registered yet (the call was routed by revision {fence})")
        if why is not None:
            raise StaleRegistrationError(why, metadata={"fence": str(fence)})

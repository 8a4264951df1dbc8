"""Load balancing across the instances of a capability: round robin, or least outstanding requests picked by
the power of two choices (two instances at random, the one with fewer calls in flight wins).

The balancer orders what it is given; the outbound pipeline hands it only instances that are neither ejected
by a breaker nor suspect, and keeps the others as a last resort. Outstanding counts are this process's own
calls in flight per instance, updated with `started`/`finished` around every attempt.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TypeVar

from hivemesh.mesh.instance_ref import Registered, instance_key

ROUND_ROBIN = "round_robin"
LEAST_OUTSTANDING = "least_outstanding"
MODES = (ROUND_ROBIN, LEAST_OUTSTANDING)


InstanceT = TypeVar("InstanceT", bound=Registered)


class Balancer:
    """Per-process balancing state: round-robin positions per key and outstanding calls per instance (by
    `instance_key`)."""

    def __init__(self, *, rng: Callable[[], float] = random.random) -> None:
        self._next: dict[str, int] = {}
        self._outstanding: dict[str, int] = {}
        self._rng = rng

    def outstanding(self, key: str) -> int:
        return self._outstanding.get(key, 0)

    def started(self, key: str) -> None:
        self._outstanding[key] = self._outstanding.get(key, 0) + 1

    def finished(self, key: str) -> None:
        n = self._outstanding.get(key, 0) - 1
        if n > 0:
            self._outstanding[key] = n
        else:
            self._outstanding.pop(key, None)

    def order(self, key: str, instances: Sequence[InstanceT], mode: str = ROUND_ROBIN) -> list[InstanceT]:
        """instances in the order to try them: the balancer's pick first, then the rest as failover order."""
        n = len(instances)
        if n <= 1:
            return list(instances)
        if mode == LEAST_OUTSTANDING:
            i = int(self._rng() * n) % n
            j = int(self._rng() * (n - 1)) % (n - 1)
            j = j + 1 if j >= i else j
            a, b = instances[i], instances[j]
            first = b if self.outstanding(instance_key(b)) < self.outstanding(instance_key(a)) else a
            rest = sorted((x for x in instances if x is not first), key=lambda x: self.outstanding(instance_key(x)))
            return [first, *rest]
        start = self._next.get(key, 0) % n
        self._next[key] = start + 1
        return [instances[(start + k) % n] for k in range(n)]

"""What the outbound pipeline tells a listener (the node's metrics) besides the call's result.

A Protocol here, so the pipeline depends on no metrics library; each hook runs on the event loop and must
not raise. With no listener (`None`) the pipeline skips every hook.
"""

from __future__ import annotations

from typing import Protocol

from hivemesh.mesh.errors import HivemeshError


class OutboundEvents(Protocol):
    def finished(self, capability: str, error: HivemeshError | None, seconds: float, retries: int) -> None:
        """A call ended: its error (None: answered, perhaps degraded), duration and the retries it spent."""

    def budget_refused(self, capability: str) -> None:
        """A retry the retry budget refused."""

    def ejected(self, capability: str) -> None:
        """An instance's breaker opened (outlier ejection)."""

    def unreachable(self, capability: str, peer: str) -> None:
        """A call could not even connect to an instance of peer (its SPIFFE id): it is skipped for a while."""

    def unanswered(self, capability: str, peer: str) -> None:
        """An instance of peer held an attempt until its deadline without answering: avoided for a while."""

    def fallback(self, capability: str) -> None:
        """A failed call answered by its fallback capability."""

    def cached(self, capability: str) -> None:
        """A failed call answered from the response cache."""

    def shadowed(self, capability: str, result: str) -> None:
        """A mirrored (shadow) call ended: same, different, error, or dropped (hivemesh.mesh.outbound.shadow)."""

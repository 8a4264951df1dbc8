"""One outbound call as the pipeline sees it, and the request bytes it carries.

The request is serialized once, at the edge where the call starts (`encode_request`, or the caller's own
bytes); the pipeline decodes it only if a policy needs one of its fields (route metadata, the cache key, a
fallback's copy). What the caller already knows it hands over instead (the idempotency key).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

from hivemesh.mesh import invoke_wire
from hivemesh.mesh.errors import InvalidInputError
from hivemesh.mesh.outbound.card_flags import capability_flags
from hivemesh.mesh.resilience.view import OutboundPolicies
from hivemesh.v1 import agent_pb2, mesh_pb2

Metadata = Sequence[tuple[str, str]]


class OutboundCall:
    """The capability, request bytes, caller metadata, absolute deadline, idempotency key and agent pin of one
    call."""

    __slots__ = ("_request", "agent", "capability", "deadline", "idempotency_key", "metadata", "raw")

    def __init__(
        self,
        capability: str,
        raw: bytes,
        metadata: Metadata,
        deadline: float | None,
        request: agent_pb2.InvokeRequest | None,
        idempotency_key: str = "",
        agent: str = "",
    ) -> None:
        self.capability = capability
        self.raw = raw
        self.metadata = metadata
        self.deadline = deadline
        self.idempotency_key = idempotency_key
        """`CallContext.idempotency_key` of the request ("" for none), as the caller that encoded it knows it."""
        self.agent = agent
        """The agent whose instances alone may serve the call ("": any), `CallOptions.agent`."""
        self._request = request

    def request(self) -> agent_pb2.InvokeRequest:
        if self._request is None:
            self._request = agent_pb2.InvokeRequest.FromString(self.raw)
        return self._request

    def route_metadata(self) -> Mapping[str, str]:
        md = {k: v for k, v in self.metadata if isinstance(v, str)}
        md.update(self.request().metadata)
        return md

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


def deadline_for(policies: OutboundPolicies, timeout: float | None, default_timeout: float | None) -> float | None:
    """The caller's deadline always wins; without one, the capability's policy default, then the client's."""
    if timeout is None:
        timeout = policies.timeout
    if timeout is None:
        timeout = default_timeout
    if timeout is None:
        return None
    if not math.isfinite(timeout):  # NaN compared false everywhere: over a link it went out as no deadline
        msg = "must be a finite number of seconds (None: the capability's timeouts policy, then the default)"
        raise InvalidInputError(f"timeout {msg}, got {timeout}", field_violations={"timeout": msg})
    return time.monotonic() + timeout


def idempotent(instance: mesh_pb2.AgentInstance, capability: str) -> bool:
    """Does instance declare capability idempotent (safe to run twice)?"""
    return capability_flags(instance, capability).idempotent


def encode_request(
    capability: str,
    payload: bytes,
    *,
    content_type: str = "application/json",
    context: agent_pb2.CallContext | None = None,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """Serialize an InvokeRequest once, at the edge where the call starts (a large payload written around, not
    copied through the message: `invoke_wire`, as MeshClient does)."""
    rest = agent_pb2.InvokeRequest(content_type=content_type, metadata=metadata or {})
    if context is not None:
        rest.context.CopyFrom(context)
    return invoke_wire.request(capability, [payload], rest)

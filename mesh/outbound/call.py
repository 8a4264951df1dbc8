"""One outbound call as the pipeline sees it, and the request bytes it carries.

The request is serialized once, at the edge where the call starts (`encode_request`, or the caller's own
bytes); the pipeline decodes it only if a policy needs one of its fields (route metadata, the cache key, a
fallback's copy). What the caller already knows it hands over instead (the idempotency key).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from hivemesh.mesh import invoke_wire
from hivemesh.mesh.errors import InvalidInputError
from hivemesh.mesh.outbound.card_flags import capability_flags
from hivemesh.mesh.resilience.view import OutboundPolicies
from hivemesh.v1 import agent_pb2, mesh_pb2

Metadata = Sequence[tuple[str, str]]

CALLER, POLICY, DEFAULT, PER_TRY, GIVEN = "caller", "policy", "default", "per-try", "given"
"""Whose deadline an attempt had: the caller's timeout, the capability's timeouts policy, the client's default
timeout, a retries policy's per_try_timeout_ms, or the timeout a call to one given instance was sent with (the
caller's or the client's default, which `invoke_on` is not told apart)."""


class OutboundCall:
    """The capability, request bytes, caller metadata, absolute deadline, idempotency key and agent pin of one
    call."""

    __slots__ = ("_request", "agent", "capability", "deadline", "idempotency_key", "metadata", "raw", "timeout_from",
                 "timeout_s")

    def __init__(
        self,
        capability: str,
        raw: bytes,
        metadata: Metadata,
        deadline: float | None,
        request: agent_pb2.InvokeRequest | None,
        idempotency_key: str = "",
        agent: str = "",
        *,
        timeout_s: float | None = None,
        timeout_from: str = CALLER,
    ) -> None:
        self.capability = capability
        self.raw = raw
        self.metadata = metadata
        self.deadline = deadline
        self.idempotency_key = idempotency_key
        """`CallContext.idempotency_key` of the request ("" for none), as the caller that encoded it knows it."""
        self.agent = agent
        """The agent whose instances alone may serve the call ("": any), `CallOptions.agent`."""
        self.timeout_s = timeout_s
        """The seconds the deadline was set to (None: not known here), for messages that name it."""
        self.timeout_from = timeout_from
        """Whose deadline it is: CALLER, POLICY (the capability's timeouts policy) or DEFAULT (the client's)."""
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


class Deadline(NamedTuple):
    """A call's deadline with the seconds and source it was set from, which an error that it passed names."""

    at: float | None
    """The absolute deadline (time.monotonic()); None: none."""
    seconds: float | None
    source: str
    """CALLER, POLICY or DEFAULT."""


def deadline_for(policies: OutboundPolicies, timeout: float | None, default_timeout: float | None) -> Deadline:
    """The caller's deadline always wins; without one, the capability's policy default, then the client's."""
    source = CALLER
    if timeout is None:
        timeout, source = policies.timeout, POLICY
    if timeout is None:
        timeout, source = default_timeout, DEFAULT
    if timeout is None:
        return Deadline(None, None, CALLER)
    if not math.isfinite(timeout):  # NaN compared false everywhere: over a link it went out as no deadline
        msg = "must be a finite number of seconds (None: the capability's timeouts policy, then the default)"
        raise InvalidInputError(f"timeout {msg}, got {timeout}", field_violations={"timeout": msg})
    return Deadline(time.monotonic() + timeout, timeout, source)


def deadline_words(seconds: float | None, source: str, policy: str = "") -> str:
    """A deadline as a message names it: its seconds and whose it was (policy: "timeouts/<name>" for POLICY,
    "retries/<name>" for PER_TRY), so a caller sees which number to change."""
    if seconds is None:
        return "its deadline"
    s = f"{round(seconds, 3):g} s"
    if source == POLICY:
        return f"the {s} default deadline of {policy or 'its timeouts policy'}"
    if source == PER_TRY:
        return f"the {s} per-try timeout (per_try_timeout_ms) of {policy or 'its retries policy'}"
    if source == DEFAULT:
        return f"the client's default timeout of {s}"
    if source == GIVEN:
        return f"the call's timeout of {s}"
    return f"the caller's timeout of {s}"


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

"""What a capability handler knows about the call it serves, and how it calls onward within it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from hivemesh.v1 import agent_pb2

if TYPE_CHECKING:
    from hivemesh.sdk.client import MeshClient


@dataclass
class Context:
    """Per-call context handed to capabilities that take a third `ctx` parameter.

    Onward calls made through `ctx.call` carry this call's remaining deadline (so a chain never outlives its
    caller), its workflow and conversation ids, and this call as their parent.
    """

    capability: str
    caller: str
    """SPIFFE id of the caller, established by mutual TLS and the token check."""
    call: agent_pb2.CallContext
    metadata: Mapping[str, str] = field(default_factory=dict)
    scopes: frozenset[str] = frozenset()
    mesh: MeshClient | None = None
    _grpc: grpc.aio.ServicerContext[Any, Any] | None = field(default=None, repr=False)

    def time_remaining(self) -> float | None:
        """Seconds left before the caller's deadline, or None when the caller set none."""
        if self._grpc is None:
            return None
        return self._grpc.time_remaining()

    async def call_capability(self, capability: str, payload: Any, *, timeout: float | None = None) -> Any:
        """Call another capability on the mesh as part of this call (deadline and ids propagate)."""
        if self.mesh is None:
            raise RuntimeError("this agent is not connected to a mesh: serve it with hivemesh.sdk.serve()")
        remaining = self.time_remaining()
        if remaining is not None:
            timeout = remaining if timeout is None else min(timeout, remaining)
        child = agent_pb2.CallContext(
            parent_call_id=self.call.call_id,
            conversation_id=self.call.conversation_id,
            workflow_id=self.call.workflow_id,
            priority=self.call.priority,
        )
        return await self.mesh.call(capability, payload, timeout=timeout, context=child)

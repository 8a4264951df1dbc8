"""What every inbound layer sees: one `Inbound` record per call, checked in order by small layers.

Layers are synchronous on purpose: every check is CPU-only over in-memory state (token cache, compiled
schemas, the peer's certificate), so a plain function call is the cheapest possible step on the hot path.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from hivemesh.mesh.pki import Peer
from hivemesh.mesh.tokens import TokenClaims
from hivemesh.v1 import agent_pb2


@dataclass(slots=True)
class Inbound:
    """One inbound call as the layers see it; layers fill in what they establish (peer, claims, parsed input)."""

    method: str
    """RPC name: "Invoke", "InvokeStream" or "Describe"."""
    request: agent_pb2.InvokeRequest | None
    """The decoded request (None for Describe)."""
    wire_size: int
    """Serialized request size in bytes, for size limits."""
    metadata: Mapping[str, str | bytes | tuple[str | bytes, ...]]
    auth_context: Mapping[str, Any]
    peer: Peer | None = None
    claims: TokenClaims | None = None
    parsed_input: Any = None
    """The JSON-decoded input, when a layer has decoded it (so the agent does not decode it again)."""
    notes: dict[str, Any] = field(default_factory=dict)


class InboundLayer(Protocol):
    """One check on the inbound path. Raise a `HivemeshError` to refuse the call; return to let it pass."""

    name: str

    def check(self, call: Inbound) -> None: ...


current_inbound: contextvars.ContextVar[Inbound | None] = contextvars.ContextVar(
    "hivemesh_current_inbound", default=None
)
"""The call being served, for the handler (the SDK reads the caller and parsed input from it)."""

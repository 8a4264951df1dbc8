"""What every inbound layer sees: one `Inbound` record per call, checked in order by small layers.

Layers are synchronous on purpose: every check is CPU-only over in-memory state (token cache, compiled
schemas, the peer's certificate), so a plain function call is the cheapest possible step on the hot path.

The same record is what the handler behind the chain gets (on its servicer context, see
`hivemesh.mesh.callcontext`): whatever a layer decided (the peer, the verified claims, the decoded input, the
bearer token) is decided once per call and read from here, never worked out again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from hivemesh.mesh.pki import Peer
from hivemesh.mesh.tokens import TokenClaims, bearer_from_metadata
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
    input: bytes | memoryview = b""
    """The request's payload: layers read it here, not from `request.input`, which is left unset when a large
    payload was read as a view of the bytes received (`invoke_wire.read_request`: reading it out of the message
    would copy it)."""
    peer: Peer | None = None
    claims: TokenClaims | None = None
    parsed_input: Any = None
    """The JSON-decoded input, when `input_parsed` (so the agent does not decode it again)."""
    input_parsed: bool = False
    """A layer decoded the input into `parsed_input` (which may be None: the JSON `null`)."""
    charge_usage: bool = False
    """A token budget applies to this call: the `usage` of its response is charged after it (set by the budget
    layer; a handler that answers from a replay, spending nothing, clears it)."""
    notes: dict[str, Any] = field(default_factory=dict)
    final_sent: bool = False
    """A stream's final chunk was handed to gRPC (set by the handler that yields it). A caller that goes away while
    it is being written is then on record as answered, as a unary answer is once it is returned to gRPC: the
    server cannot tell a write the caller read before cancelling from one it did not."""
    written: tuple[bytes, agent_pb2.Usage] | None = None
    """(a unary answer's bytes, the usage written into them), noted by a handler that writes its answer itself
    (the SDK's), so the layers that count usage (metrics, budgets) do not parse the answer again for it."""
    _bearer: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.request is not None and not self.input:  # built around a whole message: its input is the payload
            self.input = self.request.input

    def bearer(self) -> str:
        """The caller's bearer token, parsed from the metadata on first use only. Raises TokenMissingError or
        TokenInvalidError (more than one `authorization` header) as `bearer_from_metadata` does."""
        token = self._bearer
        if token is None:
            token = self._bearer = bearer_from_metadata(self.metadata)
        return token

    def noted_usage(self, response: Any) -> agent_pb2.Usage | None:
        """The usage written into response, if its writer noted it (`written`); None: read it from response.
        Only for those very bytes: an answering layer that rewrote the answer made new ones, which are read."""
        written = self.written
        return written[1] if written is not None and written[0] is response else None


class InboundLayer(Protocol):
    """One check on the inbound path. Raise a `HivemeshError` to refuse the call; return to let it pass."""

    name: str

    def check(self, call: Inbound) -> None: ...


@runtime_checkable
class SettlingLayer(InboundLayer, Protocol):
    """A layer with work once the handler answered, too: `settle` gets the answer before it is sent (the
    message, or the bytes a forwarder relays): a unary call's response, each item of a stream. It must not
    raise."""

    def settle(self, call: Inbound, response: Any) -> None: ...


@runtime_checkable
class AnsweringLayer(InboundLayer, Protocol):
    """A layer that may change or refuse the answer before it is sent: `answer` gets each answer (a unary
    response, or each item of a stream; the message, or the bytes a forwarder relays) and returns what is sent
    in its place, or raises a `HivemeshError` to withhold it. Answering layers run innermost first (in reverse
    chain order), so what a later layer changed is what an earlier one (the signer) sees."""

    def answer(self, call: Inbound, response: Any) -> Any: ...

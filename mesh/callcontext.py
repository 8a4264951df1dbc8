"""The hand-over from the inbound chain to the handler behind it: the call's `Inbound` record, on its context.

The inbound interceptor runs the chain, then calls the handler with an `InboundContext`: the gRPC servicer
context it was given, wrapped (as OpenTelemetry's gRPC instrumentation wraps it) to carry the call's record.
The handler reads what the chain established (peer, verified claims, decoded input, bearer token) with
`inbound_call(context)`, explicitly, instead of from ambient state; nothing is decided twice.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, Never

import grpc

from hivemesh.mesh.layers.base import Inbound


def new_call_id() -> str:
    """A new call id: exactly `uuid.uuid4().hex` (version 4, RFC 4122 variant), without building a UUID. The
    one way call ids are minted, by a caller that sent none and by an agent served a call without one."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    return b.hex()


class InboundContext(grpc.aio.ServicerContext[Any, Any]):
    """A servicer context that carries the call's `Inbound` record; everything else is the wrapped context's.

    Thin on purpose: one object per call, and one forwarding call per context method the handler uses.
    """

    __slots__ = ("_context", "call")

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], call: Inbound) -> None:
        self._context = context
        self.call = call
        """What the inbound chain established about this call."""

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> Never:
        await self._context.abort(code, details, trailing_metadata)
        raise AssertionError("grpc.aio's abort raises")  # pragma: no cover

    async def abort_with_status(self, status: grpc.Status) -> Never:
        await self._context.abort_with_status(status)
        raise AssertionError("grpc.aio's abort raises")  # pragma: no cover

    async def read(self) -> Any:
        return await self._context.read()

    async def write(self, message: Any) -> None:
        await self._context.write(message)

    async def send_initial_metadata(self, initial_metadata: Any) -> None:
        await self._context.send_initial_metadata(initial_metadata)

    def add_done_callback(self, callback: Any) -> None:
        self._context.add_done_callback(callback)

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self._context.set_trailing_metadata(trailing_metadata)

    def invocation_metadata(self) -> grpc.aio.Metadata | None:
        return self._context.invocation_metadata()

    def set_code(self, code: grpc.StatusCode) -> None:
        self._context.set_code(code)

    def set_details(self, details: str) -> None:
        self._context.set_details(details)

    def set_compression(self, compression: grpc.Compression) -> None:
        self._context.set_compression(compression)

    def disable_next_message_compression(self) -> None:
        self._context.disable_next_message_compression()

    def peer(self) -> str:
        return self._context.peer()

    def peer_identities(self) -> Iterable[bytes] | None:
        return self._context.peer_identities()

    def peer_identity_key(self) -> str | None:
        return self._context.peer_identity_key()

    def auth_context(self) -> Mapping[str, Iterable[bytes]]:
        return self._context.auth_context()

    def time_remaining(self) -> float:
        return self._context.time_remaining()

    def trailing_metadata(self) -> grpc.aio.Metadata:
        return self._context.trailing_metadata()

    def code(self) -> grpc.StatusCode:
        return self._context.code()

    def details(self) -> str:
        return self._context.details()

    def cancelled(self) -> bool:
        return self._context.cancelled()

    def done(self) -> bool:
        return self._context.done()


def inbound_call(context: grpc.aio.ServicerContext[Any, Any]) -> Inbound:
    """The `Inbound` record of the call context serves; RuntimeError when the handler is served without the
    mesh's inbound interceptor in front of it (a wiring mistake: nothing was checked)."""
    if isinstance(context, InboundContext):
        return context.call
    raise RuntimeError("this handler must be served behind the mesh's inbound interceptor (hivemesh.mesh.front)")

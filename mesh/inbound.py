"""The inbound side of the mesh, assembled in exactly one place.

The same chain fronts an agent in both packagings: the sidecar process (a raw-bytes forwarder behind it) and
the SDK's in-process server (the agent's own servicer behind it). Only what follows the chain differs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from hivemesh.mesh.errors import HivemeshError, InvalidInputError, abort
from hivemesh.mesh.layers import (
    Inbound,
    InboundLayer,
    InputGuardLayer,
    PeerIdentityLayer,
    TokenLayer,
    current_inbound,
)
from hivemesh.mesh.layers.guard import DEFAULT_MAX_INPUT_BYTES
from hivemesh.mesh.tokens import TokenVerifier
from hivemesh.v1 import agent_pb2

AGENT_SERVICE = "hivemesh.v1.Agent"
_AGENT_PREFIX = f"/{AGENT_SERVICE}/"


class InboundChain:
    """An ordered, immutable list of layers; `admit` runs them and raises the first refusal."""

    def __init__(self, layers: Sequence[InboundLayer]) -> None:
        self.layers: tuple[InboundLayer, ...] = tuple(layers)
        self._checks = tuple(layer.check for layer in self.layers)

    def admit(self, call: Inbound) -> None:
        for check in self._checks:
            check(call)


def build_inbound_chain(
    *,
    trust_domain: str,
    verifier: TokenVerifier,
    capabilities: Iterable[agent_pb2.Capability],
    agent_name: str,
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
) -> InboundChain:
    """The inbound chain, in the order the checks must run."""
    return InboundChain(
        [
            # 1. Who is calling: every later layer decides about this identity. gRPC already verified the chain.
            PeerIdentityLayer(trust_domain),
            # 2. What the caller may do: a token for this agent, covering the capability, bound to the peer's
            #    certificate. Before input checks, so an unauthenticated caller learns nothing about inputs.
            TokenLayer(verifier),
            # 3. Is the input acceptable: capability exists, size, JSON, schema. Last, as it is the costliest
            #    (JSON decode); the decoded value is handed to the agent so it is decoded once.
            InputGuardLayer(capabilities, max_input_bytes=max_input_bytes, agent_name=agent_name),
        ]
    )


def _as_dict(metadata: Any) -> dict[str, str | bytes]:
    return {k: v for k, v in (metadata or ())}


def _decode(request: Any) -> tuple[agent_pb2.InvokeRequest, int]:
    if isinstance(request, agent_pb2.InvokeRequest):
        return request, request.ByteSize()
    try:
        return agent_pb2.InvokeRequest.FromString(request), len(request)
    except DecodeError:
        raise InvalidInputError(
            "the request is not a valid hivemesh.v1.InvokeRequest message"
        ) from None


def _handler_request(call: Inbound, raw: Any, deserialize: Callable[[bytes], Any] | None) -> Any:
    """What the handler behind the chain takes: raw bytes for a forwarder (no deserializer), else the message.

    The interceptor owns deserialization, so bytes that are not a valid message become INVALID_ARGUMENT from
    the chain instead of gRPC's own UNKNOWN; an Invoke request is decoded once, by the chain.
    """
    if deserialize is None or not isinstance(raw, bytes):
        return raw
    if call.request is not None:
        return call.request
    try:
        return deserialize(raw)
    except DecodeError:
        raise InvalidInputError(f"the request is not a valid {call.method} request message") from None


def _admit(chain: InboundChain, method: str, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Inbound:
    if method == "Describe":
        req, size = None, 0
    else:
        req, size = _decode(request)
    call = Inbound(
        method=method,
        request=req,
        wire_size=size,
        metadata=_as_dict(context.invocation_metadata()),
        auth_context=context.auth_context(),
    )
    chain.admit(call)
    return call


class MeshInboundInterceptor(grpc.aio.ServerInterceptor):
    """Runs the inbound chain before any `hivemesh.v1.Agent` method; refused calls never reach the handler.

    It wraps the handler's behaviour (as opentelemetry's gRPC instrumentation does) because the checks need
    the request, which `intercept_service` alone does not see. Health and reflection pass untouched.
    """

    def __init__(self, chain: InboundChain) -> None:
        self._chain = chain

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        path: str = handler_call_details.method
        if handler is None or not path.startswith(_AGENT_PREFIX):
            return handler
        method = path[len(_AGENT_PREFIX):]
        chain = self._chain
        deserialize = handler.request_deserializer  # applied by the wrappers below, after the chain
        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                try:
                    call = _admit(chain, method, request, context)
                    inner_request = _handler_request(call, request, deserialize)
                except HivemeshError as err:
                    await abort(context, err)
                current_inbound.set(call)
                return await inner_unary(inner_request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                try:
                    call = _admit(chain, method, request, context)
                    inner_request = _handler_request(call, request, deserialize)
                except HivemeshError as err:
                    await abort(context, err)
                current_inbound.set(call)
                async for item in inner_stream(inner_request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        return handler  # the Agent service has no client-streaming methods

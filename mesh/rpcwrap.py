"""Wrapping a gRPC method handler's behaviour, once for every server interceptor of the mesh.

A `grpc.aio.ServerInterceptor` that needs the request or the outcome (the inbound chain, the control plane's
audit, its revocation guard) cannot act in `intercept_service` alone: it replaces the handler's behaviour, as
OpenTelemetry's gRPC instrumentation does. Rebuilding the handler for its cardinality, with the right
serializers, is the same every time; it lives here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

UnaryBehaviour = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
"""A unary-response behaviour: (request, context) -> response."""
StreamBehaviour = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]
"""A server-streaming behaviour: (request, context) -> the responses."""


def wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any],
    *,
    unary_unary: Callable[[UnaryBehaviour], UnaryBehaviour] | None = None,
    unary_stream: Callable[[StreamBehaviour], StreamBehaviour] | None = None,
    raw_requests: bool = False,
) -> grpc.RpcMethodHandler[Any, Any]:
    """handler with its behaviour replaced by `unary_unary(behaviour)` or `unary_stream(behaviour)`, keeping its
    response serializer. A cardinality given no wrapper (and client streaming, which hivemesh does not use) is
    returned unchanged. raw_requests: the wrapper receives the request bytes and deserializes them itself
    (after its checks); by default it receives the deserialized message."""
    deserializer = None if raw_requests else handler.request_deserializer
    if handler.unary_unary is not None:
        if unary_unary is None:
            return handler
        inner: Any = handler.unary_unary  # async in grpc.aio; the stubs type it sync
        return grpc.unary_unary_rpc_method_handler(
            unary_unary(inner),  # grpc.aio takes a coroutine function here
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        if unary_stream is None:
            return handler
        inner_stream: Any = handler.unary_stream
        return grpc.unary_stream_rpc_method_handler(
            unary_stream(inner_stream),  # and an async generator function here
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler

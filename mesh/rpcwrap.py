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
Deserializer = Callable[[bytes], Any]
"""A method's request deserializer: the request's bytes -> the request."""


def wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any],
    *,
    unary_unary: Callable[[UnaryBehaviour], UnaryBehaviour] | None = None,
    unary_stream: Callable[[StreamBehaviour], StreamBehaviour] | None = None,
    stream_unary: Callable[[UnaryBehaviour], UnaryBehaviour] | None = None,
    stream_stream: Callable[[StreamBehaviour], StreamBehaviour] | None = None,
    raw_requests: bool = False,
    request_deserializer: Deserializer | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """handler with its behaviour replaced by the wrapper for its cardinality (`unary_unary(behaviour)`, ...),
    keeping its response serializer. A cardinality given no wrapper is returned unchanged. For client-streaming
    methods (hivemesh's own services have none) the behaviour's first argument is the iterator of requests.
    raw_requests: the wrapper receives the request bytes and deserializes them itself (after its checks); by
    default it receives the deserialized message. request_deserializer: the one to use instead of the handler's."""
    deserializer = request_deserializer or (None if raw_requests else handler.request_deserializer)
    # grpc.aio takes a coroutine function (unary response) or an async generator function (streaming response)
    # where the stubs type a sync one; the behaviours are typed Any for that reason.
    shapes: tuple[tuple[Any, Any, Any], ...] = (
        (handler.unary_unary, unary_unary, grpc.unary_unary_rpc_method_handler),
        (handler.unary_stream, unary_stream, grpc.unary_stream_rpc_method_handler),
        (handler.stream_unary, stream_unary, grpc.stream_unary_rpc_method_handler),
        (handler.stream_stream, stream_stream, grpc.stream_stream_rpc_method_handler),
    )
    for inner, wrapper, make in shapes:
        if inner is not None:  # the handler's one cardinality
            if wrapper is None:
                return handler
            wrapped: grpc.RpcMethodHandler[Any, Any] = make(
                wrapper(inner), request_deserializer=deserializer, response_serializer=handler.response_serializer)
            return wrapped
    return handler

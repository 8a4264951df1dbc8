"""Wrapping a gRPC method handler's behaviour, once for every server interceptor of the mesh.

A `grpc.aio.ServerInterceptor` that needs the request or the outcome (the inbound chain, the control plane's
audit, its revocation guard) cannot act in `intercept_service` alone: it replaces the handler's behaviour, as
OpenTelemetry's gRPC instrumentation does. Rebuilding the handler for its cardinality, with the right
serializers, is the same every time; it lives here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import grpc

UnaryBehaviour = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
"""A unary-response behaviour: (request, context) -> response."""
StreamBehaviour = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncGenerator[Any, None]]
"""A server-streaming behaviour: (request, context) -> the responses (an async generator function, as grpc.aio
takes one)."""
StreamWriter = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]
"""A server-streaming behaviour in gRPC's writer style: (request, context) -> None, writing each response with
`context.write`. A wrapper that must know how its stream ended takes this shape: gRPC raises a cancel that comes
while it writes an item inside the writer, where it leaves a generator suspended at that item and closes it only
when it is collected."""
Deserializer = Callable[[bytes], Any]
"""A method's request deserializer: the request's bytes -> the request."""

DEADLINE_SLACK_S = 0.1
"""A handler cancelled with at most this much of its deadline left was cancelled by the deadline (see
`outcome_code`): the caller's own timer resets the stream when its deadline passes, which reaches the server just
before the server's copy of it, as gRPC rounds the timeout it sends up (by at most 1 ms under 1 s, 10 ms under 10 s,
100 ms under 100 s). Over 100 s, a timeout gRPC rounds up by more may still be recorded CANCELLED."""


async def write(context: grpc.aio.ServicerContext[Any, Any], item: Any) -> None:
    """`context.write(item)` for a `StreamWriter`. A write gRPC could not make because its caller went away
    (cancelled, or its connection closed) before gRPC noticed is raised as the cancel it is: gRPC fails it with its
    InternalError, which it logs as a server error unless it has seen the cancel by then."""
    try:
        await context.write(item)
    except grpc.aio.InternalError as exc:
        raise asyncio.CancelledError("the stream's caller went away: gRPC could not write to it") from exc


def outcome_code(context: grpc.aio.ServicerContext[Any, Any], failure: BaseException | None) -> grpc.StatusCode:
    """The code a call that ended with failure (None: answered) is recorded with. gRPC cancels a handler alike when
    its caller cancels and when the call's deadline passes; past its deadline it is DEADLINE_EXCEEDED, as the caller
    sees it, so a hung or too-slow agent spends availability budget. A caller's own cancel before then stays
    CANCELLED, which spends none. A generator gRPC closed (GeneratorExit) was cancelled the same way. Any other
    failure is the code the handler set, else UNKNOWN."""
    if failure is None:
        return grpc.StatusCode.OK
    if isinstance(failure, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= DEADLINE_SLACK_S:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.UNKNOWN


def wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any],
    *,
    unary_unary: Callable[[UnaryBehaviour], UnaryBehaviour] | None = None,
    unary_stream: Callable[[StreamBehaviour], StreamBehaviour | StreamWriter] | None = None,
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

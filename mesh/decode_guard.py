"""Undecodable requests are the caller's bad input: INVALID_ARGUMENT, not UNKNOWN, on every typed method.

gRPC deserializes a typed method's request before any handler (or its try/except) runs, so bytes that do not
parse as the request type (a proto3 string that is not UTF-8, a corrupt wire format) reached the caller as
UNKNOWN "Unexpected <class 'DecodeError'>", and nothing of the mesh saw the call. `DecodeGuard`, an early
interceptor of a server, wraps each method's request deserializer so that such bytes become an `Undecodable`
marker, and the method's behaviour so that a marker is refused with `InvalidInputError` (naming the request type
and, when a string is not UTF-8, the field) before any later interceptor or the service sees it: unary and
streaming requests alike. An interceptor before it (the control plane's audit, which records the refusal from the
status the call ends with) is handed the marker as the request and must pass it on unread. Methods that take raw
bytes and decode them themselves (the inbound chain's) are left as they are.

A server whose audit does not see these methods (the data plane's, where the inbound chain audits only the Agent
service, so health checking and reflection pass it by) gives the guard an observer to report each refusal to
before it is sent; the control plane's audit already records them from the status, and its guard has none.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Final

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from hivemesh.mesh.errors import InvalidInputError, abort
from hivemesh.mesh.rpcwrap import Deserializer, StreamBehaviour, UnaryBehaviour, wrap_handler

log = logging.getLogger(__name__)

_MAX_DEPTH: Final = 100
"""Nesting the field search follows at most (protobuf's own recursion limit)."""
_MAX_REASON: Final = 200
"""Most characters of the parser's own reason quoted in the refusal."""


RefusalObserver = Callable[[str, grpc.aio.ServicerContext[Any, Any], InvalidInputError], None]
"""Told of each refusal before it is sent: (the method, "package.Service/Method"; the call's context; the error
the caller gets). What it raises is logged; the refusal goes out all the same."""


class Undecodable:
    """What a guarded deserializer returns for bytes that do not parse: the refusal to answer them with, and the
    method and observer to report it to (carried here, so that a request that decodes costs nothing more)."""

    __slots__ = ("error", "method", "observer")

    def __init__(self, error: InvalidInputError, method: str = "", observer: RefusalObserver | None = None) -> None:
        self.error = error
        self.method = method
        self.observer = observer


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the varint at pos; IndexError/ValueError when it is cut short or too long."""
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint too long")


def bad_utf8_field(descriptor: Descriptor, data: bytes, depth: int = 0) -> str | None:
    """The dotted path of the first string field of data (a serialized `descriptor` message, nested messages
    followed) that is not UTF-8; None when none is found. A plain wire walk: the parser says only that some
    string field had bad UTF-8, and the caller needs to know which."""
    pos = 0
    try:
        while pos < len(data):
            tag, pos = _varint(data, pos)
            wire_type = tag & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            elif wire_type == 2:
                size, pos = _varint(data, pos)
                value, pos = data[pos:pos + size], pos + size
                field = descriptor.fields_by_number.get(tag >> 3)
                if field is None:
                    continue
                if field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        value.decode("utf-8")
                    except UnicodeDecodeError:
                        return field.name
                elif field.type == FieldDescriptor.TYPE_MESSAGE and depth < _MAX_DEPTH:
                    nested = field.message_type
                    inner = None if nested is None else bad_utf8_field(nested, value, depth + 1)
                    if inner is not None:
                        return f"{field.name}.{inner}"
            else:
                return None  # groups (or garbage): nothing proto3 sends
    except (IndexError, ValueError):
        return None
    return None


def refusal(descriptor: Descriptor | None, data: bytes, exc: DecodeError) -> InvalidInputError:
    """The InvalidInputError for request bytes that did not parse as descriptor's message (exc, the parser's)."""
    text = str(exc)
    reason = text.rpartition("': ")[2] if "': " in text else text
    reason = reason[:_MAX_REASON] or "not a valid message"
    name = descriptor.full_name if descriptor is not None else "request"
    field = bad_utf8_field(descriptor, data) if descriptor is not None and "UTF-8" in reason else None
    return InvalidInputError(
        f"the request is not a valid {name} message: {reason}",
        field_violations={field or "request": reason},
        metadata={"request_type": name},
    )


def guard_deserializer(
    deserializer: Deserializer, *, method: str = "", observer: RefusalObserver | None = None
) -> Deserializer:
    """deserializer, returning an `Undecodable` for bytes it refuses with DecodeError instead of raising (to be
    reported to observer as a refusal on method, the call's path, when there is one)."""
    owner = getattr(deserializer, "__self__", None)  # a generated Message.FromString: its class
    descriptor = getattr(owner, "DESCRIPTOR", None)
    if not isinstance(descriptor, Descriptor):
        descriptor = None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return Undecodable(refusal(descriptor, data, exc), method, observer)

    return deserialize


async def _refuse(context: grpc.aio.ServicerContext[Any, Any], request: Undecodable) -> None:
    """Report the refusal to the guard's observer (if any), then send it."""
    if request.observer is not None:
        try:
            request.observer(request.method.lstrip("/"), context, request.error)
        except Exception:  # the caller still gets its INVALID_ARGUMENT
            log.exception("the decode guard's observer failed on %s", request.method)
    await abort(context, request.error)  # raises


def _guarded_unary(inner: UnaryBehaviour) -> UnaryBehaviour:
    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Undecodable):
            await _refuse(context, request)
        return await inner(request, context)

    return unary


def _guarded_stream(inner: StreamBehaviour) -> StreamBehaviour:
    if not inspect.isasyncgenfunction(inner):  # the reader/writer style (grpc's health Watch): a coroutine
        return _guarded_unary(inner)  # type: ignore[arg-type,return-value]

    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncGenerator[Any, None]:
        if isinstance(request, Undecodable):
            await _refuse(context, request)
        async for item in inner(request, context):
            yield item

    return stream


async def _checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
    """A client stream's requests, refused at the first that did not decode."""
    async for request in requests:
        if isinstance(request, Undecodable):
            await _refuse(context, request)
        yield request


def _guarded_requests(inner: Callable[..., Any]) -> Callable[..., Any]:
    """A client-streaming behaviour (either response cardinality) given its requests checked."""
    if inspect.isasyncgenfunction(inner):
        async def stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async for item in inner(_checked(requests, context), context):
                yield item

        return stream

    async def unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await inner(_checked(requests, context), context)

    return unary


def _async(handler: grpc.RpcMethodHandler[Any, Any]) -> bool:
    """The behaviour is a coroutine or async generator function (a sync one runs in grpc's thread pool, where
    the async refusal cannot; it is left unguarded, and no mesh server has one)."""
    behaviour = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    return inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Answers a request that does not decode as its method's type INVALID_ARGUMENT (reason INVALID_INPUT);
    first in a server's interceptors, or behind only those that take the marker for what it is (the control
    plane's audit), so that no later one (the inbound chain, the revocation guard) sees the marker.

    observer: told of each such refusal before it is sent, where no interceptor before the guard records it
    (the data plane's inbound chain, `MeshInboundInterceptor.record_refusal`); never called for requests that
    decode."""

    def __init__(self, observer: RefusalObserver | None = None) -> None:
        self._observer = observer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None or not _async(handler):
            return handler  # unknown method, raw bytes (decoded by the method itself), or a sync behaviour
        return wrap_handler(
            handler,
            unary_unary=_guarded_unary,
            unary_stream=_guarded_stream,
            stream_unary=_guarded_requests,
            stream_stream=_guarded_requests,
            request_deserializer=guard_deserializer(
                handler.request_deserializer, method=handler_call_details.method, observer=self._observer),
        )


__all__ = ["DecodeGuard", "RefusalObserver", "Undecodable", "bad_utf8_field", "guard_deserializer", "refusal"]

"""`DecodeGuard` on a real grpc.aio server (loopback): a typed request that does not decode is INVALID_ARGUMENT
(reason INVALID_INPUT, the type and field named) for every cardinality and both handler styles, before the
method or any later interceptor runs; a request that decodes reaches the method unchanged."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from hivemesh.mesh.decode_guard import DecodeGuard, bad_utf8_field
from hivemesh.mesh.errors import from_rpc_error
from hivemesh.v1 import agent_pb2, mesh_pb2

_BAD = b"\x0a\x02\xff\xfe"  # ResolveRequest.capability, not UTF-8
_GOOD = mesh_pb2.ResolveRequest(capability="ok").SerializeToString()
Context = grpc.aio.ServicerContext[Any, Any]


class _Later(grpc.aio.ServerInterceptor):
    """A later interceptor, as a server's own come after the guard."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        return await continuation(details)


def _handlers(ran: list[str]) -> grpc.GenericRpcHandler:
    out = mesh_pb2.ResolveRequest.SerializeToString
    into = mesh_pb2.ResolveRequest.FromString

    async def unary(request: mesh_pb2.ResolveRequest, context: Context) -> mesh_pb2.ResolveRequest:
        ran.append("unary")
        return request

    async def server_stream(request: mesh_pb2.ResolveRequest, context: Context) -> AsyncIterator[Any]:
        ran.append("server_stream")
        yield request

    async def writer(request: mesh_pb2.ResolveRequest, context: Context) -> None:  # grpc's reader/writer style
        ran.append("writer")
        await context.write(request)

    async def client_stream(requests: AsyncIterator[mesh_pb2.ResolveRequest], context: Context) -> Any:
        ran.append("client_stream")
        return mesh_pb2.ResolveRequest(capability=",".join([r.capability async for r in requests]))

    async def bidi(requests: AsyncIterator[mesh_pb2.ResolveRequest], context: Context) -> AsyncIterator[Any]:
        ran.append("bidi")
        async for r in requests:
            yield r

    kw: dict[str, Any] = {"request_deserializer": into, "response_serializer": out}
    return grpc.method_handlers_generic_handler("t.T", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, **kw),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, **kw),
        "Writer": grpc.unary_stream_rpc_method_handler(writer, **kw),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream, **kw),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi, **kw),
    })


@pytest.fixture
async def channel() -> AsyncIterator[tuple[grpc.aio.Channel, list[str]]]:
    ran: list[str] = []
    server = grpc.aio.server(interceptors=[DecodeGuard(), _Later()])
    server.add_generic_rpc_handlers((_handlers(ran),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield ch, ran
    finally:
        await server.stop(None)


async def _call(ch: grpc.aio.Channel, method: str, requests: list[bytes]) -> list[bytes]:
    path = f"/t.T/{method}"
    if method == "Unary":
        return [await ch.unary_unary(path)(requests[0], timeout=10)]
    if method in ("ServerStream", "Writer"):
        return [r async for r in ch.unary_stream(path)(requests[0], timeout=10)]
    if method == "ClientStream":
        return [await ch.stream_unary(path)(iter(requests), timeout=10)]
    return [r async for r in ch.stream_stream(path)(iter(requests), timeout=10)]


def _violations(exc: grpc.aio.AioRpcError) -> tuple[str, dict[str, str]]:
    err = from_rpc_error(exc)
    return err.reason, dict(err.field_violations)


@pytest.mark.parametrize("method", ["Unary", "ServerStream", "Writer", "ClientStream", "Bidi"])
async def test_an_undecodable_request_is_invalid_argument_before_the_method_runs(
    channel: tuple[grpc.aio.Channel, list[str]], method: str,
) -> None:
    ch, ran = channel
    requests = [_BAD] if method in ("Unary", "ServerStream", "Writer") else [_GOOD, _BAD]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _call(ch, method, requests)
    exc = refused.value
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
    assert exc.details() == "the request is not a valid hivemesh.v1.ResolveRequest message: String field had bad UTF-8"
    assert _violations(exc) == ("INVALID_INPUT", {"capability": "String field had bad UTF-8"})
    if method in ("Unary", "ServerStream", "Writer"):
        assert ran == []  # refused before the method (a client stream's method runs until it reads the bad one)
    # A good request still passes unchanged.
    got = await _call(ch, method, [_GOOD])
    assert [mesh_pb2.ResolveRequest.FromString(g).capability for g in got] == ["ok"]


def test_the_bad_string_is_found_however_deep() -> None:
    deep = agent_pb2.InvokeRequest(capability="c", context=agent_pb2.CallContext(chain=["Z"])).SerializeToString()
    broken = deep.replace(b"\x01Z", b"\x01\xff")  # the chain entry's byte, no longer UTF-8
    assert broken != deep
    assert bad_utf8_field(agent_pb2.InvokeRequest.DESCRIPTOR, broken) == "context.chain"
    assert bad_utf8_field(mesh_pb2.CallBatchRequest.DESCRIPTOR, b"\x0a" + bytes([len(broken)]) + broken) == \
        "items.context.chain"
    assert bad_utf8_field(agent_pb2.InvokeRequest.DESCRIPTOR, deep) is None
    assert bad_utf8_field(agent_pb2.InvokeRequest.DESCRIPTOR, b"\x0a\x7f") is None  # cut short: no field named

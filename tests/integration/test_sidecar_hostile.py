"""A sidecar facing hostile or broken peers: a local caller sending a bad call handle to CallBatch or bytes that
do not decode as a typed request, and an agent whose InvokeStream answer breaks the stream's framing (chunks
that are not InvokeChunks, chunks after the final one, no final chunk at all). Each gets a clear status naming
what was wrong; nothing is relayed that the framing forbids, and the sidecar keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from hivemesh.mesh.errors import HivemeshError, from_rpc_error
from hivemesh.mesh.layers import Inbound
from hivemesh.mesh.outbound import encode_request
from hivemesh.mesh.sidecar import CALL_HANDLE_KEY, Sidecar, SidecarConfig
from hivemesh.sdk import MeshClient
from hivemesh.v1 import agent_pb2, mesh_pb2, mesh_pb2_grpc
from tests.support.meshenv import MeshEnv
from tests.support.plain_agent import PlainAgent
from tests.support.waiting import until

_JSON = "application/json"
_BAD_UTF8 = b"\xff\xfe"


def _status(exc: grpc.aio.AioRpcError) -> tuple[str, dict[str, str]]:
    """(the ErrorInfo reason, the BadRequest field violations) of a failed call's rich status."""
    err = from_rpc_error(exc)
    return err.reason, dict(err.field_violations)


@pytest.fixture
async def caller_only(mesh_env: MeshEnv) -> AsyncIterator[tuple[Sidecar, grpc.aio.Channel]]:
    """A caller-only sidecar serving Mesh on loopback TCP, and a plain channel to it (the local caller's)."""
    sidecar = Sidecar(SidecarConfig(client="hostile", mesh_listen="127.0.0.1:0", audit=False),
                      await mesh_env.settings_for("hostile", "client"))
    async with sidecar, grpc.aio.insecure_channel(sidecar.mesh_endpoint) as channel:
        yield sidecar, channel


async def test_call_batch_with_a_bad_call_handle_is_permission_denied_as_call_is(
    caller_only: tuple[Sidecar, grpc.aio.Channel],
) -> None:
    stub = mesh_pb2_grpc.MeshStub(caller_only[1])
    item = agent_pb2.InvokeRequest(capability="echo", input=b"{}", content_type=_JSON)
    batch = mesh_pb2.CallBatchRequest(items=[item])
    for handles in (("nope",), ("one", "two")):
        metadata = tuple((CALL_HANDLE_KEY, h) for h in handles)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CallBatch(batch, timeout=10, metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError) as single:
            await stub.Call(item, timeout=10, metadata=metadata)
        for exc in (refused.value, single.value):
            assert exc.code() == grpc.StatusCode.PERMISSION_DENIED, exc.details()
            assert _status(exc)[0] == "CALL_HANDLE_INVALID"
        assert refused.value.details() == single.value.details()


# (method, request bytes that do not decode, the field violation's field)
_UNDECODABLE = [
    ("Resolve", b"\x0a\x02" + _BAD_UTF8, "capability"),
    ("ListCapabilities", b"\x0a\x02" + _BAD_UTF8, "tag"),
    # items[0].capability: the nested string is found too
    ("CallBatch", b"\x0a\x04\x0a\x02" + _BAD_UTF8, "items.capability"),
    ("Resolve", b"\xff\xff\xff", "request"),  # not even the wire format
    # The queue's own methods: refused as bad input too (GetQueued may decode its request itself).
    ("ListQueued", b"\xff\xff\xff", "request"),
    ("GetQueued", b"\x0a\x02" + _BAD_UTF8, None),
]


@pytest.mark.parametrize(("method", "raw", "field"), _UNDECODABLE)
async def test_a_typed_request_that_does_not_decode_is_invalid_argument_naming_its_type(
    caller_only: tuple[Sidecar, grpc.aio.Channel], method: str, raw: bytes, field: str | None,
) -> None:
    channel = caller_only[1]
    call = channel.unary_unary(f"/hivemesh.v1.Mesh/{method}")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(raw, timeout=10)
    exc = refused.value
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
    reason, violations = _status(exc)
    assert reason == "INVALID_INPUT"
    assert "Unexpected" not in (exc.details() or "")
    if field is not None:
        assert f"hivemesh.v1.{method}Request" in (exc.details() or "")
        assert list(violations) == [field]
    # The sidecar keeps serving the same method with a good request.
    stub = mesh_pb2_grpc.MeshStub(channel)
    assert (await stub.Resolve(mesh_pb2.ResolveRequest(capability="nobody"), timeout=10)).instances == []


def _chunk(data: bytes = b"", *, final: bool = False) -> bytes:
    state = agent_pb2.TASK_STATE_COMPLETED if final else agent_pb2.TASK_STATE_WORKING
    return agent_pb2.InvokeChunk(data=data, content_type=_JSON, final=final, state=state).SerializeToString()


class MisframingAgent(PlainAgent):
    """A plain agent whose InvokeStream answers as its input's `text` says, breaking the stream's framing: raw
    bytes on the wire, as an agent in any language could send. `cancelled` is set when a stream that kept its
    call open after its final chunk is cancelled (by the sidecar, which must stop reading there)."""

    def __init__(self) -> None:
        super().__init__("plain", prefix="plain-")
        self.cancelled = asyncio.Event()
        self._never = asyncio.Event()

    async def start(self) -> None:
        async def describe(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            return self.card().SerializeToString()

        async def stream(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
            mode = json.loads(agent_pb2.InvokeRequest.FromString(raw).input)["text"]
            if mode == "no-final":
                yield _chunk(b'"a"')
                yield _chunk(b'"b"')
            elif mode == "two-finals":
                yield _chunk(b'"a"', final=True)
                yield _chunk(b'"b"', final=True)
            elif mode == "after-final":
                yield _chunk(b'"a"', final=True)
                yield _chunk(b'"after"')
                try:  # keep the call open: only the sidecar's cancel ends it before this bound
                    await asyncio.wait_for(self._never.wait(), 5)
                except asyncio.CancelledError:
                    self.cancelled.set()
                    raise
            elif mode == "bad-utf8":
                yield _chunk(b'"a"')
                yield b"\x12\x02" + _BAD_UTF8  # content_type (field 2) that is not UTF-8
            elif mode == "garbage":
                yield b"\xff\xff\xff"

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("hivemesh.v1.Agent", {
            "Describe": grpc.unary_unary_rpc_method_handler(describe),
            "InvokeStream": grpc.unary_stream_rpc_method_handler(stream),
        }),))
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server


class StreamRig:
    def __init__(self, agent: MisframingAgent, mesh: MeshClient, refusals: list[tuple[str, str]]) -> None:
        self.agent, self.mesh, self.refusals = agent, mesh, refusals

    async def raw_chunks(self, mode: str) -> list[agent_pb2.InvokeChunk]:
        """Every chunk the caller's side receives, undecoded by any client logic (which stops at a final)."""
        request = encode_request("plain-shout", json.dumps({"text": mode}).encode())
        async with contextlib.aclosing(self.mesh.node.outbound.invoke_stream(
            request, capability="plain-shout", timeout=10,
        )) as chunks:
            return [agent_pb2.InvokeChunk.FromString(raw) async for raw, _ in chunks]


@pytest.fixture
async def stream_rig(mesh_env: MeshEnv) -> AsyncIterator[StreamRig]:
    refusals: list[tuple[str, str]] = []

    def observe(call: Inbound, err: HivemeshError | None, code: grpc.StatusCode, elapsed: float) -> None:
        if err is not None:
            refusals.append((err.reason, err.message))

    async with MisframingAgent() as agent:
        sidecar = Sidecar(SidecarConfig(agent=agent.endpoint, audit=False), await mesh_env.settings_for("plain"),
                          observers=[observe])
        async with sidecar:
            tester = await mesh_env.settings_for("tester", "client")
            async with MeshClient.connect(name="tester", settings=tester) as mesh:
                assert await mesh.node.registry.wait_for_capability("plain-shout", 1, timeout=10)
                yield StreamRig(agent, mesh, refusals)


@pytest.mark.parametrize(("mode", "before", "says"), [
    ("no-final", ["a", "b"], "ended without a final chunk"),
    ("bad-utf8", ["a"], "not an InvokeChunk message"),
    ("garbage", [], "not an InvokeChunk message"),
])
async def test_a_stream_the_agent_frames_wrongly_is_refused_as_invalid_output(
    stream_rig: StreamRig, mode: str, before: list[str], says: str,
) -> None:
    got: list[Any] = []
    with pytest.raises(HivemeshError) as refused:
        async for item in stream_rig.mesh.stream("plain-shout", {"text": mode}, timeout=10):
            got.append(item)
    err = refused.value
    assert (err.code, err.reason) == (grpc.StatusCode.INTERNAL, "INVALID_OUTPUT"), err
    assert says in err.message and "plain-shout" in err.message
    assert got == before  # what came before the fault was well framed
    # Refused on record, as an answer breaking its output schema is (the decision observers hear the reason).
    assert await until(lambda: any(r == "INVALID_OUTPUT" and says in m for r, m in stream_rig.refusals), 5)


async def test_nothing_is_relayed_after_the_final_chunk_and_the_agents_call_is_cancelled(
    stream_rig: StreamRig,
) -> None:
    two = await stream_rig.raw_chunks("two-finals")
    assert [(c.data, c.final, len(c.hops)) for c in two] == [(b'"a"', True, 1)]
    after = await stream_rig.raw_chunks("after-final")
    assert [(c.data, c.final, len(c.hops)) for c in after] == [(b'"a"', True, 1)]
    assert await until(stream_rig.agent.cancelled.is_set, 5), "the agent's call stayed open after its final chunk"

"""The control plane's typed methods refuse a request that does not decode as INVALID_ARGUMENT naming its type
(`mesh/decode_guard.py`), where gRPC's own deserializer had answered UNKNOWN "Unexpected DecodeError"."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.message import Message

from hivemesh.mesh.errors import from_rpc_error
from hivemesh.v1 import state_pb2
from tests.support.meshenv import MeshEnv


def _violations(exc: grpc.aio.AioRpcError) -> list[str]:
    return list(from_rpc_error(exc).field_violations)


@pytest.mark.parametrize("method, raw, field", [
    ("GetState", b"\x0a\x02\xff\xfe\x12\x01k", "namespace"),  # namespace: not UTF-8
    ("PutState", b"\x12\x02\xc3\x28", "key"),
    ("ListState", b"\x0a\xff", "request"),  # a length past the end: no message at all
])
async def test_a_state_request_that_does_not_decode_is_invalid_argument(
    mesh_env: MeshEnv, method: str, raw: bytes, field: str
) -> None:
    call = mesh_env.operator.channel.unary_unary(f"/hivemesh.v1.State/{method}")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(raw, timeout=10)
    exc = refused.value
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
    assert f"hivemesh.v1.{method}Request" in (exc.details() or "") and _violations(exc) == [field]
    # The same method still answers a good request (here: no such key).
    good: Message = state_pb2.GetStateRequest(namespace="conversation/c-1", key="k")
    get = mesh_env.operator.channel.unary_unary("/hivemesh.v1.State/GetState")
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await get(good.SerializeToString(), timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

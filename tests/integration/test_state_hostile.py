"""The State service at its bounds, over the real control plane, etcd and mutual TLS:

- a value within max_value_bytes made of astral characters (4 bytes each in UTF-8; 12 once escaped to ASCII, past
  etcd's request limit) is stored and read back, and leaves no lease behind but its entry's; NaN is still refused;
- a namespace past 4 MiB (gRPC's default answer size) keeps taking writes, and a listing larger than one answer
  carries is refused RESOURCE_EXHAUSTED (STATE_LIST_TOO_LARGE) while narrower key prefixes list.
"""

from __future__ import annotations

import json
from typing import Any

import aetcd
import grpc
import pytest
from aetcd import rpc

from hivemesh.mesh.errors import HivemeshError, InvalidInputError, from_rpc_error
from hivemesh.mesh.keyspace import STATE
from hivemesh.v1 import state_pb2, state_pb2_grpc
from tests.integration.test_state import _identity
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, apply_policies_text

NS = "workflow/big/r-1"


def _policy(max_namespace_bytes: int, ttl: str = "") -> str:
    return f"""
kind: state
name: big
spec:
  namespaces: ["workflow/big/*"]
  write: ["spiffe://{TRUST_DOMAIN}/agent/planner"]
  max_value_bytes: 524288
  max_namespace_bytes: {max_namespace_bytes}
{ttl}"""


async def _leases(etcd: aetcd.Client) -> set[int]:
    resp = await rpc.LeaseStub(etcd.channel).LeaseLeases(rpc.LeaseLeasesRequest(),
                                                         metadata=tuple(etcd.metadata or ()))
    return {int(lease.ID) for lease in resp.leases}


async def _leases_a_write_could_leak(etcd: aetcd.Client, leases: set[int]) -> set[int]:
    """Those of leases still alive that hold no key or a state entry: what a write could leak. The rest belong to
    other parts of the mesh, which grant leases while the test runs (the control plane's audit progress key, with a
    10 s TTL, is granted once it first applies a record: under load, inside the test)."""
    stub = rpc.LeaseStub(etcd.channel)
    found = set()
    for lease in leases:
        live = await stub.LeaseTimeToLive(rpc.LeaseTimeToLiveRequest(ID=lease, keys=True),
                                          metadata=tuple(etcd.metadata or ()))
        if live.TTL > 0 and (not live.keys or any(bytes(k).startswith(STATE.encode()) for k in live.keys)):
            found.add(lease)
    return found


async def _refused(call: Any) -> HivemeshError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    return from_rpc_error(refused.value)


async def test_astral_value_within_bound_is_stored_and_leaks_no_lease(mesh_env: MeshEnv, etcd: aetcd.Client) -> None:
    await apply_policies_text(mesh_env.etcd, _policy(524288, "  ttl_seconds: 3600"))
    planner = await _identity(mesh_env, "planner")
    stub = state_pb2_grpc.StateStub(planner.channel)
    value = '"' + "\U0001f600" * 131070 + '"'  # 524282 bytes of JSON: within max_value_bytes
    before = await _leases(etcd)
    for _ in range(2):  # a rewrite too: it moves the entry to a new lease and revokes the old one
        put = await stub.PutState(state_pb2.PutStateRequest(namespace=NS, key="emoji", value_json=value), timeout=20)
        assert put.value_json == value
    got = await stub.GetState(state_pb2.GetStateRequest(namespace=NS, key="emoji"), timeout=20)
    assert (got.value_json, got.revision) == (value, put.revision)
    kv = await etcd.get(f"{STATE}{NS}#emoji".encode())
    assert kv is not None and len(kv.value) < 2 * len(value.encode())  # stored as UTF-8, not escaped
    # The entry's lease, and no other that is empty or holds state: the first write's was revoked.
    assert await _leases_a_write_could_leak(etcd, await _leases(etcd) - before) == {int(kv.lease)}

    nan = await _refused(stub.PutState(state_pb2.PutStateRequest(namespace=NS, key="nan", value_json="NaN"),
                                       timeout=20))
    assert isinstance(nan, InvalidInputError) and "value_json" in nan.field_violations


async def test_namespace_past_4_mib_keeps_taking_writes_and_lists(mesh_env: MeshEnv) -> None:
    await apply_policies_text(mesh_env.etcd, _policy(16 * 1024 * 1024))
    planner = await _identity(mesh_env, "planner")
    stub = state_pb2_grpc.StateStub(planner.channel)
    chunk = json.dumps("b" * 500_000)
    for i in range(13):  # 6.5 MB: past gRPC's default 4 MiB answer, and more than one ListState answer carries
        await stub.PutState(state_pb2.PutStateRequest(namespace=NS, key=f"k{i:02}", value_json=chunk), timeout=20)
    await stub.PutState(state_pb2.PutStateRequest(namespace=NS, key="small", value_json="1"), timeout=20)
    assert (await stub.GetState(state_pb2.GetStateRequest(namespace=NS, key="k00"), timeout=20)).value_json == chunk

    too_many = await _refused(stub.ListState(state_pb2.ListStateRequest(namespace=NS), timeout=20))
    assert (too_many.code, too_many.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "STATE_LIST_TOO_LARGE")
    assert "key_prefix" in too_many.message and len(too_many.message) < 400
    listed = {}
    for prefix in ("k0", "k1", "s"):  # the way on: narrower prefixes
        part = await stub.ListState(state_pb2.ListStateRequest(namespace=NS, key_prefix=prefix), timeout=20)
        assert part.namespace_bytes == 13 * len(chunk) + 1
        listed.update({e.key: e.value_json for e in part.entries})
    assert sorted(listed) == [f"k{i:02}" for i in range(13)] + ["small"] and listed["small"] == "1"

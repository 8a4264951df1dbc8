"""Shared state and conversation memory over the real control plane, etcd and mutual TLS: compare-and-swap,
watches, size bounds, retention, per-namespace authz from a `state` policy, and `ctx.memory` across calls."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aetcd
import grpc
import pytest

from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.errors import HivemeshError, InvalidInputError, PermissionDeniedError
from hivemesh.mesh.keyspace import STATE
from hivemesh.mesh.tls import join
from hivemesh.sdk import Agent, AgentServer, Context, MeshClient, capability
from hivemesh.sdk.memory import Memory
from hivemesh.sdk.state import StateClient, StateConflictError
from hivemesh.v1 import agent_pb2, state_pb2, state_pb2_grpc
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, apply_policies_text, run_cli

NS = "workflow/team/r-1"
POLICY = f"""
kind: state
name: team
spec:
  namespaces: ["workflow/team/*"]
  read: ["spiffe://{TRUST_DOMAIN}/agent/observer"]
  write: ["spiffe://{TRUST_DOMAIN}/agent/planner"]
  max_value_bytes: 200
  max_namespace_bytes: 500
  ttl_seconds: 600
"""


async def _identity(env: MeshEnv, name: str, kind: str = "agent") -> ControlPlaneClient:
    """A workload's own certificate (a real join), and a control-plane client holding it."""
    token = (await env.operator.create_join_token(name, kind, 120)).token
    workload = await join(env.controlplane.join_address, env.certs.ca_cert.read_bytes(), token, name, kind)
    return ControlPlaneClient(env.controlplane.address, workload)


async def _next(changes: Any) -> Any:
    async with asyncio.timeout(10):
        return await anext(changes)


async def test_cas_watch_bounds_retention_and_authz(mesh_env: MeshEnv, etcd: aetcd.Client) -> None:
    await apply_policies_text(mesh_env.etcd, POLICY)
    planner_cp, observer_cp, stranger_cp = [await _identity(mesh_env, n) for n in ("planner", "observer", "x")]
    planner, observer, stranger = StateClient(planner_cp), StateClient(observer_cp), StateClient(stranger_cp)
    try:
        watch = await observer.watch(NS)
        changes = aiter(watch)

        # Compare-and-swap: create only, then replace only the revision read.
        first = await planner.put(NS, "plan", {"step": 1}, expected_revision=0)
        assert first.updated_by == f"spiffe://{TRUST_DOMAIN}/agent/planner"
        with pytest.raises(StateConflictError) as exists:
            await planner.put(NS, "plan", {"step": 99}, expected_revision=0)
        assert exists.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert exists.value.current_revision == first.revision
        second = await planner.put(NS, "plan", {"step": 2}, expected_revision=first.revision)
        with pytest.raises(StateConflictError) as stale:
            await planner.put(NS, "plan", {"step": 3}, expected_revision=first.revision)
        assert stale.value.current_revision == second.revision
        got = await observer.get(NS, "plan")
        assert got is not None and (got.value, got.revision) == ({"step": 2}, second.revision)
        with pytest.raises(StateConflictError):
            await planner.delete(NS, "plan", expected_revision=first.revision)

        # The watch (opened before any write) sees each change, in order, with its revision.
        seen = [await _next(changes) for _ in range(2)]
        assert [(c.type, c.entry.value, c.revision) for c in seen] == [
            ("put", {"step": 1}, first.revision), ("put", {"step": 2}, second.revision)]
        plan_kv = await etcd.get(f"{STATE}{NS}#plan".encode())
        assert plan_kv is not None and plan_kv.lease
        assert await planner.delete(NS, "plan", expected_revision=second.revision)
        assert await aetcd.leases.Lease(plan_kv.lease, 0, etcd).remaining_ttl() == -1  # its lease went with it
        gone = await _next(changes)
        assert (gone.type, gone.key, gone.entry) == ("delete", "plan", None)
        watch.close()

        # Retention: the entry carries an etcd lease of the namespace's ttl_seconds.
        kept = await planner.put(NS, "note", "x" * 100)
        assert kept.expires_at is not None and 590 < kept.expires_at - time.time() <= 600
        kv = await etcd.get(f"{STATE}{NS}#note".encode())
        assert kv is not None and kv.lease
        old_lease = aetcd.leases.Lease(kv.lease, 0, etcd)
        assert 0 < await old_lease.granted_ttl() <= 600
        await planner.put(NS, "note", "x" * 100)  # a rewrite moves the entry to a new lease, the old one goes
        kv = await etcd.get(f"{STATE}{NS}#note".encode())
        assert kv is not None and kv.lease and kv.lease != old_lease.id
        assert await old_lease.remaining_ttl() == -1

        # Size bounds: one value over max_value_bytes, then the namespace over max_namespace_bytes.
        with pytest.raises(InvalidInputError) as big:
            await planner.put(NS, "big", "y" * 300)
        assert big.value.code == grpc.StatusCode.INVALID_ARGUMENT and "value_json" in big.value.field_violations
        await planner.put(NS, "fill-1", "z" * 150)
        await planner.put(NS, "fill-2", "z" * 150)
        with pytest.raises(HivemeshError) as full:
            await planner.put(NS, "fill-3", "z" * 150)
        assert (full.value.code, full.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "STATE_NAMESPACE_FULL")
        await planner.put(NS, "fill-2", "z" * 10)  # replacing a value counts it once
        listing = await observer.list(NS, "fill-")
        assert [e.key for e in listing.entries] == ["fill-1", "fill-2"]
        assert (listing.namespace_bytes, listing.max_namespace_bytes) == (102 + 152 + 12, 500)

        # Concurrent writers: the namespace bound holds for all of them together, and no increment is lost.
        ns2 = "workflow/team/r-2"
        raced = await asyncio.gather(*(planner.put(ns2, f"k{i}", "w" * 148) for i in range(5)),
                                     return_exceptions=True)
        assert sum(not isinstance(r, BaseException) for r in raced) == 3, raced  # 3 x 150 bytes fit in 500
        assert all(getattr(r, "reason", None) in (None, "STATE_NAMESPACE_FULL") for r in raced), raced
        await asyncio.gather(*(planner.update(NS, "counter", lambda v: (v or 0) + 1) for _ in range(6)))
        counted = await planner.get(NS, "counter")
        assert counted is not None and counted.value == 6

        # Authz per namespace: a reader may not write, a stranger may not read, nobody writes an unnamed one.
        with pytest.raises(PermissionDeniedError) as reader_writes:
            await observer.put(NS, "plan", {"step": 4})
        assert reader_writes.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "may not write" in reader_writes.value.message
        with pytest.raises(PermissionDeniedError):
            await stranger.get(NS, "note")
        with pytest.raises(PermissionDeniedError):
            await stranger.watch(NS)
        with pytest.raises(PermissionDeniedError):
            await planner.put("workflow/other/r-1", "plan", {})
        # The operator reads every namespace.
        assert (await StateClient(mesh_env.operator).get(NS, "note")) is not None

        # Bad input is INVALID_ARGUMENT naming the field.
        for ns, key, field in (("Bad NS", "k", "namespace"), (NS, "a/b", "key")):
            with pytest.raises(InvalidInputError) as bad:
                await planner.get(ns, key)
            assert field in bad.value.field_violations
        stub = state_pb2_grpc.StateStub(planner_cp.channel)
        with pytest.raises(grpc.aio.AioRpcError) as not_json:
            await stub.PutState(state_pb2.PutStateRequest(namespace=NS, key="k", value_json="{nope"), timeout=10)
        assert not_json.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as too_deep:  # JSON past what json reads: not JSON either
            await stub.PutState(state_pb2.PutStateRequest(namespace=NS, key="k", value_json="[" * 1500 + "]" * 1500),
                                timeout=10)
        assert too_deep.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "nested too deeply" in (too_deep.value.details() or "")
        assert await planner.get(NS, "k") is None  # nothing half-written
        for constant in ("NaN", "[1, Infinity]", '{"a": -Infinity}'):  # json reads them; JSON has none
            with pytest.raises(grpc.aio.AioRpcError) as not_a_number:
                await stub.PutState(state_pb2.PutStateRequest(namespace=NS, key="k", value_json=constant), timeout=10)
            assert not_a_number.value.code() == grpc.StatusCode.INVALID_ARGUMENT, constant
            assert "is not JSON" in (not_a_number.value.details() or ""), not_a_number.value.details()
        assert await planner.get(NS, "k") is None
        # A revision past etcd's (int64) range is refused, not UNKNOWN from an overflow past the check.
        with pytest.raises(grpc.aio.AioRpcError) as past:
            async for _ in stub.WatchState(state_pb2.WatchStateRequest(namespace=NS, start_revision=2**63 - 1),
                                           timeout=10):
                break
        assert past.value.code() == grpc.StatusCode.INVALID_ARGUMENT, past.value.details()
        assert "start_revision" in (past.value.details() or "")
    finally:
        for cp in (planner_cp, observer_cp, stranger_cp):
            await cp.close()


class Chat(Agent):
    """Remembers each message of a conversation and answers with what it remembers."""

    name = "chat"

    @capability(name="chat")
    async def chat(self, req: dict[str, Any], ctx: Context) -> dict[str, Any]:
        memory = Memory(ctx.memory.state, ctx.memory.namespace, max_turns=int(req.get("max_turns", 50)))
        if req.get("prefer"):
            await memory.prefer(**req["prefer"])
        history = await memory.remember("user", req["text"])
        return {"history": [t["content"] for t in history], "preferences": await memory.preferences(),
                "namespace": memory.namespace}


async def test_conversation_memory_persists_across_calls_and_is_bounded(mesh_env: MeshEnv) -> None:
    async with AgentServer(Chat(), await mesh_env.settings_for("chat")), \
            MeshClient.connect(name="app", settings=await mesh_env.settings_for("app", "client")) as mesh:
        assert mesh.node is not None and await mesh.node.registry.wait_for_capability("chat", 1, timeout=10)

        async def say(conversation: str, text: str, **extra: Any) -> dict[str, Any]:
            ctx = agent_pb2.CallContext(conversation_id=conversation)
            answer: dict[str, Any] = await mesh.call("chat", {"text": text, **extra}, context=ctx, timeout=10)
            return answer

        assert (await say("c-1", "hello", prefer={"lang": "fr"}))["history"] == ["hello"]
        second = await say("c-1", "again")
        assert (second["history"], second["preferences"]) == (["hello", "again"], {"lang": "fr"})
        assert second["namespace"] == "memory/agent-chat/c/c-1"
        other = await say("conversation with spaces", "other")  # a free-form id: its own, digested, namespace
        assert (other["history"], other["preferences"]) == (["other"], {})
        assert (await say("c-1", "third", max_turns=2))["history"] == ["again", "third"]  # bounded: oldest out

        # The memory is the agent's own: the client that talked to it may not read it.
        peek = StateClient(mesh.node.controlplane)
        with pytest.raises(PermissionDeniedError):
            await peek.get(second["namespace"], "history")
        # The operator reads any namespace, from the CLI too.
        code, stdout, stderr = await run_cli(mesh_env, "state", "list", second["namespace"], "--json")
        assert code == 0, stderr
        shown = json.loads(stdout)
        assert [e["key"] for e in shown["entries"]] == ["history", "preferences"]
        assert shown["entries"][0]["value"][0]["content"] == "again"
        assert shown["max_namespace_bytes"] == 256 * 1024
        # Without a conversation id there is no conversation memory: the call says so.
        with pytest.raises(HivemeshError) as none:
            await mesh.call("chat", {"text": "x"}, timeout=10)
        assert none.value.code == grpc.StatusCode.INVALID_ARGUMENT and "conversation_id" in none.value.message

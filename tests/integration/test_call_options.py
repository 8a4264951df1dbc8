"""CallOptions: one value for a call's options, taken the same way by MeshClient, a capability's Context and the
patterns' runner, and arriving at the agent as set (keywords over a reusable set)."""

from __future__ import annotations

import dataclasses
from typing import TypedDict

import pytest

from hivemesh.sdk import Agent, AgentServer, CallOptions, Context, MeshClient, capability
from hivemesh.sdk.patterns.base import DirectRunner
from hivemesh.v1 import agent_pb2
from tests.support.meshenv import MeshEnv


class Empty(TypedDict):
    pass


class Fields(TypedDict):
    call_id: str
    parent_call_id: str
    workflow_id: str
    conversation_id: str
    idempotency_key: str
    priority: int
    time_remaining: float


class Relayed(TypedDict):
    relay_call_id: str
    relay_time_remaining: float
    onward: Fields


class ProbeAgent(Agent):
    """Answers with what the mesh delivered about the call it serves."""

    name = "probe"
    version = "1.0.0"

    @capability(description="The call's context as the agent saw it", idempotent=True)
    async def fields(self, req: Empty, ctx: Context) -> Fields:
        return {
            "call_id": ctx.call.call_id, "parent_call_id": ctx.call.parent_call_id,
            "workflow_id": ctx.workflow_id, "conversation_id": ctx.call.conversation_id,
            "idempotency_key": ctx.idempotency_key, "priority": ctx.call.priority,
            "time_remaining": ctx.time_remaining() or -1.0,
        }


class RelayAgent(Agent):
    """Calls `fields` onward through its Context, with a set of options and a keyword over it."""

    name = "relay"
    version = "1.0.0"

    @capability(description="Call fields onward", idempotent=True)
    async def relay(self, req: Empty, ctx: Context) -> Relayed:
        urgent = CallOptions(timeout=60, context=agent_pb2.CallContext(priority=7), idempotency_key="set-key")
        onward = await ctx.call_capability("fields", {}, options=urgent, idempotency_key="onward-key")
        return {"relay_call_id": ctx.call.call_id, "relay_time_remaining": ctx.time_remaining() or -1.0,
                "onward": onward}


def test_keywords_override_the_fields_of_a_set_and_nothing_else() -> None:
    base = CallOptions(timeout=5, context=agent_pb2.CallContext(priority=3), idempotency_key="a")
    merged = CallOptions.of(base, {"idempotency_key": "b"})
    assert (merged.timeout, merged.context, merged.idempotency_key) == (5, base.context, "b")
    assert base.idempotency_key == "a"  # the set itself is unchanged (and cannot be changed)
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.timeout = 1  # type: ignore[misc]
    assert CallOptions.of(base, {}) is base
    assert CallOptions.of(None, {"timeout": 2.5}) == CallOptions(timeout=2.5)
    assert CallOptions.of(None, {}) == CallOptions()


async def test_the_agent_receives_the_options_from_a_client_a_context_and_a_runner(mesh_env: MeshEnv) -> None:
    async with AgentServer(ProbeAgent(), await mesh_env.settings_for("probe")), \
            AgentServer(RelayAgent(), await mesh_env.settings_for("relay")):
        async with MeshClient.connect(name="tester", settings=await mesh_env.settings_for("tester", "client")) as mesh:
            for cap in ("fields", "relay"):
                assert await mesh.node.registry.wait_for_capability(cap, 1, timeout=10)

            # MeshClient: a reusable set, and a keyword that overrides one of its fields.
            # (gRPC rounds a deadline on the wire up a little: bounds leave half a second of slack.)
            opts = CallOptions(timeout=30, context=agent_pb2.CallContext(workflow_id="wf-1", priority=2),
                               idempotency_key="k-set")
            seen = await mesh.call("fields", {}, options=opts)
            assert (seen["workflow_id"], seen["priority"], seen["idempotency_key"]) == ("wf-1", 2, "k-set")
            assert 20 < seen["time_remaining"] < 30.5
            seen = await mesh.call("fields", {}, options=opts, idempotency_key="k-kw", timeout=4)
            assert (seen["workflow_id"], seen["idempotency_key"]) == ("wf-1", "k-kw")
            assert 0 < seen["time_remaining"] < 4.5
            detailed = await mesh.call_detailed("fields", {}, idempotency_key="k-plain", timeout=10)
            assert detailed.output["idempotency_key"] == "k-plain" and detailed.output["workflow_id"] == ""
            (instance,) = mesh.instances("fields")
            on = await mesh.call_on(instance, "fields", {}, options=CallOptions(timeout=10, idempotency_key="k-on"))
            assert on.output["idempotency_key"] == "k-on"

            # Context: the caller's ids propagate, the relay's own options apply on top, and the onward call
            # never outlives the call it serves (the relay asked for 60 s; its caller gave it 5).
            relayed = await mesh.call("relay", {}, timeout=5,
                                      context=agent_pb2.CallContext(workflow_id="wf-2", conversation_id="c-2"))
            onward = relayed["onward"]
            assert onward["parent_call_id"] == relayed["relay_call_id"] != onward["call_id"]
            assert (onward["workflow_id"], onward["conversation_id"]) == ("wf-2", "c-2")
            assert (onward["priority"], onward["idempotency_key"]) == (7, "onward-key")
            assert 0 < onward["time_remaining"] < relayed["relay_time_remaining"] + 0.5 < 6

            # The patterns' runner hands its options over as one CallOptions.
            step = await DirectRunner(mesh, conversation_id="conv-9").step("s1", "fields", {}, timeout=10)
            assert step.output["conversation_id"] == "conv-9" and 0 < step.output["time_remaining"] < 10.5

            with pytest.raises(TypeError, match=r"unknown call option\(s\) \['timout'\]"):
                await mesh.call("fields", {}, timout=3)  # type: ignore[call-arg]
            with pytest.raises(TypeError):
                await mesh.call("fields", {}, options=opts, timout=3)  # type: ignore[call-arg]
            with pytest.raises(ValueError, match="a stream is never deduplicated"):
                async for _ in mesh.stream("fields", {}, idempotency_key="k"):
                    pass

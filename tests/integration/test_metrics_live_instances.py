"""A capability whose only instance left the registry reads 0 live instances on its caller's `/metrics`, not
nothing: with the series gone, neither a rule nor the dashboard could tell the outage. Real etcd, control plane,
mutual TLS; the gauge scraped over HTTP as Prometheus does."""

from __future__ import annotations

import asyncio
from typing import TypedDict

import pytest

from hivemesh.mesh.errors import NoLiveInstanceError
from hivemesh.sdk import Agent, AgentServer, Context, MeshClient, capability
from tests.integration.test_metrics_mesh import promtool_clean, sample, scrape
from tests.support.orch_env import Orch, wait_until


class Text(TypedDict):
    text: str


class Validator(Agent):
    name = "validator"

    @capability(description="validates")
    async def validate(self, req: Text, ctx: Context) -> Text:
        return req


async def test_live_instances_reads_zero_after_the_only_instance_leaves(orch: Orch) -> None:
    caller = MeshClient.connect(name="gateway", settings=await orch.env.settings_for("gateway", "client"),
                                metrics_listen="127.0.0.1:0")
    async with caller:
        assert caller.node.metrics is not None
        address = caller.node.metrics.address
        async with AgentServer(Validator(), await orch.env.settings_for("validator")):
            assert await caller.node.registry.wait_for_capability("validate", 1, timeout=10)
            assert await caller.call("validate", {"text": "a"}, timeout=10) == {"text": "a"}
            live = await asyncio.to_thread(scrape, address)
            assert sample(live, "hivemesh_registry_live_instances", capability="validate") == 1
        # The agent stopped: its registration is gone from etcd, and from the caller's view of it.
        await wait_until(lambda: not caller.node.registry.offering("validate"), 10,
                         "the validator's registration to leave the caller's registry view")
        with pytest.raises(NoLiveInstanceError):
            await caller.call("validate", {"text": "b"}, timeout=10)
        gone = await asyncio.to_thread(scrape, address)

    assert sample(gone, "hivemesh_registry_live_instances", capability="validate") == 0
    # The series the caller-side alerts read, as the rules name them (deploy/prometheus/alerts.yml).
    assert sample(gone, "hivemesh_requests_total", direction="outbound", capability="validate",
                  code="UNAVAILABLE", reason="NO_LIVE_INSTANCE") == 1
    promtool_clean(gone)

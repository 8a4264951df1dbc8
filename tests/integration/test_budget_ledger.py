"""Token budgets across replicas: two replicas of one agent count each other's spend, through real etcd."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from hivemesh.mesh.budget_ledger import SPEND_PREFIX, SpendLedger, parse_spend_key, spend_key
from hivemesh.mesh.errors import TokenBudgetExceededError
from hivemesh.mesh.etcd import EtcdServer
from tests.support.meshenv import apply_policies_text, controlplane_access
from tests.support.orch_agents import WorkerAgent
from tests.support.orch_env import Orch, wait_until

CALLER = "spiffe://hivemesh.local/client/orchestrator"
TEXT = {"text": "one two three four five six seven eight"}  # 8 tokens in, 5 out: 13 per call
POLICY = f"""
kind: budgets
name: shared
spec:
  rules:
    - subjects: ["{CALLER}"]
      capabilities: ["summarize"]
      max_tokens: 30
      window_seconds: 2678400  # 31 days: a window boundary cannot fall inside a test run
"""


def test_spend_keys_round_trip_any_name() -> None:
    key = ("shared[0]", "spiffe://td/client/a b/ü", 2941)
    etcd_key = spend_key(key, "vm-1/replica", "summarizer")
    assert etcd_key.startswith(SPEND_PREFIX + "summarizer/") and etcd_key.count("/") == SPEND_PREFIX.count("/") + 4
    assert parse_spend_key(etcd_key) == (key, "vm-1/replica")
    with pytest.raises(ValueError):
        parse_spend_key(SPEND_PREFIX + "agent/x/notanumber/y/z")


async def test_replicas_share_a_callers_budget(orch: Orch) -> None:
    first = await orch.serve(WorkerAgent())
    second = await orch.serve(WorkerAgent())
    await apply_policies_text(orch.env.etcd, POLICY)
    servers = (first, second)
    await wait_until(lambda: all(s.token_budgets is not None and s.token_budgets._table().rules for s in servers),
                     10, "the budgets policy to reach both replicas")
    await wait_until(lambda: len(orch.mesh.instances("summarize")) == 2, 10, "both replicas in the registry")
    by_id = {i.instance_id: i for i in orch.mesh.instances("summarize")}
    a, b = by_id[first.instance_id], by_id[second.instance_id]

    def seen(server: Any) -> int:
        return sum(server.token_budgets.spent(CALLER, "summarize").values())

    await orch.mesh.call_on(a, "summarize", TEXT, timeout=10)  # 13 on the first replica
    await orch.mesh.call_on(b, "summarize", TEXT, timeout=10)  # 26 counted: the second saw the first's 13?
    await wait_until(lambda: seen(first) == seen(second) == 26, 10, "both replicas to count 26 tokens")
    await orch.mesh.call_on(a, "summarize", TEXT, timeout=10)  # 26 < 30: allowed, 39 now
    await wait_until(lambda: seen(second) == 39, 10, "the second replica to count 39 tokens")
    # Each replica alone has spent 26 and 13, under 30; together 39: both refuse.
    for instance in (a, b):
        with pytest.raises(TokenBudgetExceededError) as refused:
            await orch.mesh.call_on(instance, "summarize", TEXT, timeout=10)
        assert refused.value.metadata["spent"] == "39"
    other = await orch.client("someone-else")
    assert await other.call("summarize", TEXT, timeout=10)  # another caller has its own budget


async def test_a_stopped_replicas_spend_still_counts(orch: Orch) -> None:
    """Spend lives under a lease that ends with its window, not with the replica."""
    first = await orch.serve(WorkerAgent())
    await apply_policies_text(orch.env.etcd, POLICY.replace("max_tokens: 30", "max_tokens: 20"))
    await wait_until(lambda: first.token_budgets is not None and first.token_budgets._table().rules, 10,
                     "the budgets policy to reach the agent")
    await orch.mesh.call("summarize", TEXT, timeout=10)  # 13
    await first.stop()  # publishes its last totals
    ledger = SpendLedger(controlplane_access(orch.env.etcd), "an-observer", agent="observer")
    await ledger.start()
    try:
        key = ("shared[0]", CALLER, int(time.time() // 2678400))
        await wait_until(lambda: ledger.others(key) == 13, 10, "the stopped replica's 13 tokens")
    finally:
        await ledger.stop()


async def test_spend_published_during_an_etcd_outage_arrives_after_it(own_etcd: EtcdServer) -> None:
    key = ("shared[0]", CALLER, 7)
    window_end = time.time() + 3600
    writer = SpendLedger(own_etcd.access, "writer", agent="worker")
    reader = SpendLedger(own_etcd.access, "reader", agent="worker")
    await writer.start()
    await reader.start()
    try:
        writer.publish(key, 10, window_end)
        await wait_until(lambda: reader.others(key) == 10, 10, "the first total")
        await asyncio.to_thread(own_etcd.stop)
        writer.publish(key, 25, window_end)  # spend goes on while etcd is down
        await wait_until(lambda: writer.failures > 0, 10, "a failed flush while etcd is down")
        assert reader.others(key) == 10  # the reader keeps its last view
        await asyncio.to_thread(own_etcd.start)
        await wait_until(lambda: reader.others(key) == 25, 30, "the total published after the outage")
    finally:
        await writer.stop()
        await reader.stop()

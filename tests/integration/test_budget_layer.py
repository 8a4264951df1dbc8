"""Token budgets are an inbound layer, so both packagings enforce them: a plain agent (no hivemesh code) behind
a real `Sidecar` is held to a `budgets` policy by the usage it reports, unary and streaming; an SDK agent's
deduplicated replay is not charged again. Real etcd, control plane, mutual TLS and tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypedDict

import grpc
import pytest

from hivemesh.mesh.budget import BUDGETS, BudgetTable, TokenBudgets
from hivemesh.mesh.errors import TokenBudgetExceededError
from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
from hivemesh.sdk import Agent, AgentServerConfig, Context, capability
from hivemesh.sdk.llm import RuleBasedLLM
from tests.support.meshenv import TRUST_DOMAIN, apply_policies_text
from tests.support.orch_env import Orch, wait_until
from tests.support.plain_agent import PlainAgent

CALLER = f"spiffe://{TRUST_DOMAIN}/client/orchestrator"
USAGE = (7, 5)  # what every answer of the plain agent reports: 12 tokens
POLICY = f"""
kind: budgets
name: plain-callers
spec:
  rules:
    - subjects: ["{CALLER}"]
      capabilities: ["plain-echo"]
      max_tokens: 20
      window_seconds: 600
    - subjects: ["{CALLER}"]
      capabilities: ["plain-shout"]
      max_tokens: 10
      window_seconds: 600
"""


@dataclass
class SidecarRig:
    plain: PlainAgent
    sidecar: Sidecar


@pytest.fixture
async def rig(orch: Orch) -> AsyncIterator[SidecarRig]:
    async with PlainAgent("plain", prefix="plain-", usage=USAGE) as plain:
        sidecar = Sidecar(SidecarConfig(agent=plain.endpoint), await orch.env.settings_for("plain"))
        async with sidecar:
            for name in ("plain-echo", "plain-shout"):
                assert await orch.mesh.node.registry.wait_for_capability(name, 1, timeout=10)
            await apply_policies_text(orch.env.etcd, POLICY)
            assert sidecar.node is not None
            policies = sidecar.node.policies
            await wait_until(lambda: len(policies.get(BUDGETS).rules) == 2, 10, "the budgets policy at the sidecar")
            yield SidecarRig(plain, sidecar)


async def test_a_plain_agent_behind_a_sidecar_is_held_to_its_budget(orch: Orch, rig: SidecarRig) -> None:
    budgets = rig.sidecar.token_budgets
    assert budgets is not None
    first = await orch.mesh.call_detailed("plain-echo", {"text": "a"}, timeout=10)
    assert first.usage is not None and (first.usage.input_tokens, first.usage.output_tokens) == USAGE
    assert budgets.spent(CALLER, "plain-echo") == {"plain-callers[0]": 12}  # charged from the response's usage
    await orch.mesh.call("plain-echo", {"text": "b"}, timeout=10)  # 12 < 20 before: served; 24 spent now
    with pytest.raises(TokenBudgetExceededError) as refused:
        await orch.mesh.call("plain-echo", {"text": "c"}, timeout=10)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.reason == "TOKEN_BUDGET_EXCEEDED"
    assert refused.value.metadata["spent"] == "24" and refused.value.metadata["max_tokens"] == "20"
    assert rig.plain.calls == 2  # the refused call never reached the agent

    other = await orch.client("someone-else")  # budgets are per caller: no rule for this one
    assert await other.call("plain-echo", {"text": "d"}, timeout=10) == {
        "text": "d", "caller": f"spiffe://{TRUST_DOMAIN}/client/someone-else"}
    assert budgets.spent(CALLER, "plain-echo") == {"plain-callers[0]": 24}


async def test_a_streams_usage_is_charged_from_its_final_chunk(orch: Orch, rig: SidecarRig) -> None:
    words = [w async for w in orch.mesh.stream("plain-shout", {"text": "x y"}, timeout=10)]
    assert words == ["X", "Y"]
    budgets = rig.sidecar.token_budgets
    assert budgets is not None and budgets.spent(CALLER, "plain-shout") == {"plain-callers[1]": 12}
    with pytest.raises(TokenBudgetExceededError):
        [w async for w in orch.mesh.stream("plain-shout", {"text": "z"}, timeout=10)]
    assert rig.plain.calls == 1
    assert budgets.spent(CALLER, "plain-echo") == {"plain-callers[0]": 0}  # another rule, untouched


class Text(TypedDict):
    text: str


class Spender(Agent):
    """A non-idempotent capability that spends model tokens (deduplicated by idempotency key)."""

    name = "spender"

    def __init__(self) -> None:
        super().__init__()
        self.runs = 0
        self.llm = RuleBasedLLM({"spend": str.upper})

    @capability(description="spend tokens once per key")
    async def spend(self, req: Text, ctx: Context) -> Text:
        self.runs += 1
        done = await self.llm.complete(req["text"], task="spend")
        return {"text": done.text}


async def test_an_sdk_agents_replay_reports_usage_but_is_not_charged_again(orch: Orch) -> None:
    table = BudgetTable.from_specs({"all": {"rules": [{"subjects": [CALLER], "max_tokens": 1000}]}})
    agent = Spender()
    server = await orch.serve(agent, AgentServerConfig(budgets=TokenBudgets(table)))
    assert server.token_budgets is not None
    first = await orch.mesh.call_detailed("spend", {"text": "one two three"}, idempotency_key="k1", timeout=10)
    assert first.usage is not None
    tokens = first.usage.input_tokens + first.usage.output_tokens
    assert tokens > 0 and server.token_budgets.spent(CALLER, "spend") == {"all[0]": tokens}
    again = await orch.mesh.call_detailed("spend", {"text": "one two three"}, idempotency_key="k1", timeout=10)
    assert again.output == first.output and again.usage == first.usage  # the replay reports what was spent
    assert agent.runs == 1
    assert server.token_budgets.spent(CALLER, "spend") == {"all[0]": tokens}  # ... but spends nothing again
    await orch.mesh.call("spend", {"text": "one two three"}, idempotency_key="k2", timeout=10)
    assert server.token_budgets.spent(CALLER, "spend") == {"all[0]": 2 * tokens}

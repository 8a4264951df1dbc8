"""The LLM interface (rule-based default; the OpenAI-compatible provider against a real local HTTP server),
token usage reported per call, and per-caller token budgets enforced by the agent that spends them."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest

from hivemesh.mesh.budget import BudgetTable, TokenBudgets
from hivemesh.mesh.errors import (
    AgentError,
    AgentUnavailableError,
    InvalidInputError,
    TokenBudgetExceededError,
)
from hivemesh.sdk import AgentServerConfig
from hivemesh.sdk.llm import (
    OpenAICompatibleLLM,
    OpenAIConfig,
    RuleBasedLLM,
    TieredLLM,
    UsageMeter,
    count_tokens,
    llm_from_env,
    metering,
)
from tests.support.orch_agents import WorkerAgent
from tests.support.orch_env import Orch, wait_until


class _ChatServer(BaseHTTPRequestHandler):
    """A tiny OpenAI-compatible endpoint: echoes the last user message reversed, with usage."""

    seen: list[dict[str, Any]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if body["model"] == "broken":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b'{"error": "model crashed"}')
            return
        text = body["messages"][-1]["content"][::-1]
        if body["model"] == "garbled":
            payload = b"not json"
        else:
            payload = json.dumps({"model": body["model"] + "-0613", "choices": [{"message": {"content": text}}],
                                  "usage": {"prompt_tokens": 11, "completion_tokens": 7}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def chat_server() -> Iterator[str]:
    _ChatServer.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


async def test_rule_based_llm_is_deterministic_and_counts_tokens() -> None:
    llm = RuleBasedLLM({"shout": str.upper})
    meter = UsageMeter()
    with metering(meter):
        a = await llm.complete("hello there, world", task="shout", system="be loud")
        b = await llm.complete("hello there, world", task="shout", system="be loud")
        c = await llm.complete("First sentence. Second one.", task="unknown")
    assert a == b and a.text == "HELLO THERE, WORLD"
    assert (a.usage.input_tokens, a.usage.output_tokens) == (count_tokens("be loud hello there, world"), 4)
    assert c.text == "First sentence."
    assert meter.calls == 3 and meter.usage.total == a.usage.total * 2 + c.usage.total
    tiered = TieredLLM(RuleBasedLLM(model="small"), RuleBasedLLM(model="large"), max_simple_tokens=3)
    assert tiered.pick("one two").model == "small" and tiered.pick("one two three four five").model == "large"
    assert (await tiered.complete("one two three four five")).usage.model == "large"


async def test_openai_compatible_provider_against_a_local_server(chat_server: str) -> None:
    llm = llm_from_env(env={"HIVEMESH_LLM": "openai", "HIVEMESH_LLM_BASE_URL": chat_server,
                            "HIVEMESH_LLM_MODEL": "tiny", "HIVEMESH_LLM_API_KEY": "sk-test"})
    assert isinstance(llm, OpenAICompatibleLLM)
    meter = UsageMeter()
    with metering(meter):
        done = await llm.complete("abc def", system="sys", max_tokens=32)
    assert done.text == "fed cba"
    assert (done.usage.input_tokens, done.usage.output_tokens, done.usage.model) == (11, 7, "tiny-0613")
    assert meter.usage.total == 18
    (req,) = _ChatServer.seen
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "abc def"}]
    assert req["body"]["max_tokens"] == 32
    with pytest.raises(AgentError, match="HTTP 500"):
        await OpenAICompatibleLLM(OpenAIConfig(chat_server, "broken", max_retries=0)).complete("x")
    with pytest.raises(AgentError, match="not JSON"):
        await OpenAICompatibleLLM(OpenAIConfig(chat_server, "garbled", max_retries=0)).complete("x")
    with pytest.raises(AgentUnavailableError):
        await OpenAICompatibleLLM(OpenAIConfig("http://127.0.0.1:1/v1", "m", timeout_s=2, max_retries=0)).complete("x")
    with pytest.raises(InvalidInputError):
        llm_from_env(env={"HIVEMESH_LLM": "openai"})  # no model
    with pytest.raises(InvalidInputError):
        llm_from_env(env={"HIVEMESH_LLM": "magic"})
    with pytest.raises(ValueError):
        OpenAIConfig("ftp://x", "m")
    assert isinstance(llm_from_env(env={}), RuleBasedLLM)


def test_budget_rules_match_and_windows_roll() -> None:
    now = [1000.0]
    table = BudgetTable.from_specs({"demo": {"rules": [
        {"subjects": ["spiffe://td/client/*"], "capabilities": ["summarize"], "max_tokens": 10,
         "window_seconds": 60}]}})
    budgets = TokenBudgets(table, clock=lambda: now[0])
    budgets.check("spiffe://td/client/a", "summarize")
    budgets.charge("spiffe://td/client/a", "summarize", 10)
    with pytest.raises(TokenBudgetExceededError) as spent:
        budgets.check("spiffe://td/client/a", "summarize")
    assert spent.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and spent.value.retry_after_s == 20.0
    budgets.check("spiffe://td/client/b", "summarize")  # per caller
    budgets.check("spiffe://td/client/a", "upper")  # other capabilities are not budgeted
    budgets.check("spiffe://td/agent/a", "summarize")  # not a matching subject
    now[0] += 60
    budgets.check("spiffe://td/client/a", "summarize")  # a new window
    with pytest.raises(ValueError):
        BudgetTable.from_specs({"x": {"rules": [{"subjects": [], "max_tokens": 1}]}})


async def test_usage_is_reported_and_a_caller_budget_is_enforced_over_the_mesh(orch: Orch) -> None:
    table = BudgetTable.from_specs({"clients": {"rules": [
        {"subjects": ["spiffe://hivemesh.local/client/orchestrator"], "capabilities": ["summarize"],
         "max_tokens": 25, "window_seconds": 3600}]}})
    await orch.serve(WorkerAgent(), AgentServerConfig(budgets=TokenBudgets(table)))
    text = {"text": "one two three four five six seven eight"}
    first = await orch.mesh.call_detailed("summarize", text, timeout=10)
    assert first.output == {"text": "one two three four five"}
    assert first.usage is not None and (first.usage.input_tokens, first.usage.output_tokens) == (8, 5)
    assert first.usage.model == "rules-v1"
    await orch.mesh.call("summarize", text, timeout=10)  # 26 tokens spent now: over the budget
    with pytest.raises(TokenBudgetExceededError) as refused:
        await orch.mesh.call("summarize", text, timeout=10)
    assert refused.value.reason == "TOKEN_BUDGET_EXCEEDED" and refused.value.metadata["max_tokens"] == "25"
    other = await orch.client("someone-else")
    assert (await other.call("summarize", text, timeout=10)) == first.output  # budgets are per caller
    assert (await orch.mesh.call("upper", {"text": "x"}, timeout=10)) == {"text": "X"}  # other capabilities


async def test_a_budgets_policy_applied_like_any_policy_is_enforced(orch: Orch) -> None:
    from hivemesh.mesh.budget import BUDGETS
    from tests.support.meshenv import apply_policies_text

    server = await orch.serve(WorkerAgent())
    await apply_policies_text(orch.env.etcd, """
kind: budgets
name: small-callers
spec:
  rules:
    - subjects: ["spiffe://hivemesh.local/client/orchestrator"]
      capabilities: ["summa*"]
      max_tokens: 12
      window_seconds: 600
""")
    await wait_until(lambda: server.node.policies.get(BUDGETS).rules, 10, "the budgets policy to reach the agent")
    text = {"text": "one two three four five six seven eight"}
    await orch.mesh.call("summarize", text, timeout=10)  # 13 tokens: the budget is spent after this call
    with pytest.raises(TokenBudgetExceededError):
        await orch.mesh.call("summarize", text, timeout=10)
    with pytest.raises(InvalidInputError):  # the policy store validates budgets documents like any other
        await apply_policies_text(orch.env.etcd, "kind: budgets\nname: bad\nspec: {rules: [{subjects: []}]}\n")

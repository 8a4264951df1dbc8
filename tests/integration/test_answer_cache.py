"""The degraded-mode answer cache is per caller and per authorization (issue 10).

`desk` answers its callers (alice, bob) by calling `quotes` on their behalf (delegation), through one node:
the place where one caller's cached answer could reach another. `upper` answers depend on who asks (the
default); `fields` answers are the same for everyone (its owner marks it `cache_shareable`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hivemesh.mesh.errors import AgentUnavailableError, HivemeshError
from hivemesh.mesh.etcd import EtcdServer
from hivemesh.sdk import Agent, AgentServer, Context, MeshClient, capability
from tests.support.agents_for_tests import Text
from tests.support.meshenv import ALLOW_ALL_AUTHZ, TRUST_DOMAIN, MeshEnv, start_mesh_env, stop_mesh_env
from tests.support.resilience_rig import apply

TD = f"spiffe://{TRUST_DOMAIN}"
GRANTS = {"grants": [
    {"name": "people", "subjects": [f"{TD}/client/alice", f"{TD}/client/bob"], "capabilities": ["*"]},
    {"name": "desk", "subjects": [f"{TD}/agent/desk"], "capabilities": ["upper", "fields"]},
]}
ROUTES = """
kind: routes
name: quotes-cache
spec:
  capabilities: [upper, fields]
  cache: {ttl_s: 300}
"""
DENY_BOB_FIELDS = ALLOW_ALL_AUTHZ + f"""
    - name: bob-may-not-read-fields
      action: DENY
      from:
        principals: ["{TD}/client/bob"]
      to:
        capabilities: [fields]
"""


class Quotes(Agent):
    """The backend: answers with who asked, or is down (UNAVAILABLE) on command."""

    name = "quotes"
    version = "1.0.0"

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise AgentUnavailableError("quotes is down on purpose")

    @capability(idempotent=True)
    async def upper(self, req: Text, ctx: Context) -> dict[str, str]:
        """A personal answer: it names the principal it was computed for."""
        self._check()
        return {"text": req["text"].upper(), "for": ctx.principal}

    @capability(idempotent=True, cache_shareable=True)
    async def fields(self, req: Text) -> dict[str, str]:
        """A public answer: the same for every caller."""
        self._check()
        return {"fields": req["text"]}


class Desk(Agent):
    """Calls quotes on behalf of whoever called it."""

    name = "desk"
    version = "1.0.0"

    @capability(idempotent=True)
    async def ask(self, req: dict[str, str], ctx: Context) -> dict[str, Any]:
        """Ask quotes' capability `cap` with `text`, acting for this call's principal."""
        out: dict[str, Any] = await ctx.call_capability(req["cap"], {"text": req["text"]}, on_behalf=True)
        return out


@pytest.fixture
async def env(etcd: Any, etcd_server: EtcdServer, tmp_path: Path) -> AsyncIterator[MeshEnv]:
    e = await start_mesh_env(tmp_path, etcd_server.endpoint, GRANTS)
    try:
        yield e
    finally:
        await stop_mesh_env(e)


async def _ask(client: MeshClient, cap: str, text: str) -> dict[str, Any] | HivemeshError:
    try:
        out: dict[str, Any] = await client.call("ask", {"cap": cap, "text": text}, timeout=10)
        return out
    except HivemeshError as err:
        return err


async def test_a_cached_answer_goes_only_to_its_caller_unless_shareable_and_only_if_allowed_now(
    env: MeshEnv, etcd: Any
) -> None:
    quotes, desk = Quotes(), Desk()
    quotes_server = AgentServer(quotes, await env.settings_for("quotes"))
    await quotes_server.start()
    try:
        async with AgentServer(desk, await env.settings_for("desk")) as desk_server, \
                MeshClient.connect(name="alice", settings=await env.settings_for("alice", "client")) as alice, \
                MeshClient.connect(name="bob", settings=await env.settings_for("bob", "client")) as bob:
            desk_node = desk_server.node
            for cap in ("ask", "upper", "fields"):
                assert await alice.node.registry.wait_for_capability(cap, 1, timeout=10)
                assert await desk_node.registry.wait_for_capability(cap, 1, timeout=10)
            await apply(etcd, ROUTES, [desk_node])
            # Healthy: alice's answers pass through desk and are remembered by desk's node.
            assert await _ask(alice, "upper", "hi") == {"text": "HI", "for": f"{TD}/client/alice"}
            assert await _ask(alice, "fields", "f1") == {"fields": "f1"}

            quotes.down = True
            # alice gets her own cached answers.
            assert await _ask(alice, "upper", "hi") == {"text": "HI", "for": f"{TD}/client/alice"}
            assert await _ask(alice, "fields", "f1") == {"fields": "f1"}
            # bob never gets alice's personal answer: the error stands.
            bobs = await _ask(bob, "upper", "hi")
            assert isinstance(bobs, HivemeshError) and bobs.reason == "AGENT_UNAVAILABLE", bobs
            # ... but the public one, marked shareable by its owner, while bob may make that call.
            assert await _ask(bob, "fields", "f1") == {"fields": "f1"}

            # quotes goes away entirely (its own authz can no longer refuse anyone), and an authz rule now
            # denies bob `fields`: desk's node withholds the cached answer from him, by the policy in force now.
            await quotes_server.stop()
            assert await desk_node.registry.cache.wait_for(
                lambda _snap: not desk_node.registry.instances("fields"), 10)
            refused_before = desk_node.outbound.cached_answers_refused
            await apply(etcd, DENY_BOB_FIELDS, [desk_node])
            denied = await _ask(bob, "fields", "f1")
            assert isinstance(denied, HivemeshError) and denied.reason == "NO_LIVE_INSTANCE", denied
            assert desk_node.outbound.cached_answers_refused == refused_before + 1
            # alice is still allowed, so she still gets it.
            assert await _ask(alice, "fields", "f1") == {"fields": "f1"}
    finally:
        await quotes_server.stop()

"""Each decision about a call is made once (issue 9): on one real in-process call through the whole inbound
chain (TLS, token, authz, guard, budget, audit, the SDK servicer), the bearer token is parsed by one function
once, the call id is minted once and is the same id the handler and the audit record see, and "does this
capability exist" is answered once, by the input guard. The real functions are wrapped with counters."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any, TypedDict

import pytest

from hivemesh.mesh import callcontext
from hivemesh.mesh.layers import base
from hivemesh.mesh.layers.guard import InputGuardLayer
from hivemesh.sdk import Agent, AgentServer, AgentServerConfig, Context, MeshClient, capability
from hivemesh.sdk import client as client_module
from hivemesh.sdk import servicer as servicer_module
from tests.support.meshenv import MeshEnv


class Empty(TypedDict):
    pass


class Seen(TypedDict):
    call_id: str


class Probe(Agent):
    name = "probe"
    version = "1.0.0"

    @capability(description="The call id the handler sees", idempotent=True)
    async def seen(self, req: Empty, ctx: Context) -> Seen:
        return {"call_id": ctx.call.call_id}


async def test_one_call_parses_its_token_mints_its_id_and_checks_its_capability_once(
    mesh_env: MeshEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counts: Counter[str] = Counter()
    minted: list[str] = []

    def counting(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    def mint() -> str:
        minted.append(callcontext.new_call_id())
        return minted[-1]

    monkeypatch.setattr(base, "bearer_from_metadata", counting("bearer", base.bearer_from_metadata))
    monkeypatch.setattr(client_module, "new_call_id", mint)
    monkeypatch.setattr(servicer_module, "new_call_id", counting("servicer mint", servicer_module.new_call_id))
    monkeypatch.setattr(InputGuardLayer, "check", counting("guard", InputGuardLayer.check))

    async with AgentServer(Probe(), await mesh_env.settings_for("probe"),
                           AgentServerConfig(audit_dir=tmp_path / "audit")) as server:
        async with MeshClient.connect(name="tester", settings=await mesh_env.settings_for("tester", "client")) as mesh:
            assert await mesh.node.registry.wait_for_capability("seen", 1, timeout=10)
            counts.clear()
            seen = await mesh.call("seen", {}, timeout=10)
            one_call = dict(counts)
            assert server.audit is not None
            records: list[dict[str, Any]] = []
            for _ in range(200):  # the record is appended as the call settles: a bounded wait
                records = [json.loads(x) for x in server.audit.spool.lines()]
                if any(r.get("capability") == "seen" for r in records):
                    break
                await asyncio.sleep(0.05)

    assert one_call == {"bearer": 1, "guard": 1}, one_call  # one parse, one lookup, no second mint
    (call_id,) = minted[:1]
    assert seen["call_id"] == call_id  # the id the client minted is the one the handler sees...
    (record,) = [r for r in records if r.get("capability") == "seen"]
    assert record["call_id"] == call_id  # ...and the one the audit record carries

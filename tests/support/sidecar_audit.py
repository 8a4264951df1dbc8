"""A plain agent behind a sidecar, for the answer-size tests, and what they read of the sidecar: the bytes its hop
adds to an answer, and its audit records of one caller's inbound calls."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
from hivemesh.mesh.wire import hop_suffix
from hivemesh.sdk import MeshClient
from hivemesh.v1 import agent_pb2
from tests.support.meshenv import MeshEnv
from tests.support.plain_agent import PlainAgent


def hop_bytes(sidecar: Sidecar, identity: str) -> int:
    """The bytes sidecar (serving the agent identity) appends to an agent's answer or final chunk: its hop."""
    hop = agent_pb2.Hop(kind="sidecar", identity=identity, instance=sidecar.instance_id, endpoint=sidecar.endpoint)
    return len(hop_suffix(hop))


def inbound_records(sidecar: Sidecar, caller: str) -> list[dict[str, Any]]:
    """sidecar's audit records of the inbound calls caller made, oldest first."""
    assert sidecar.audit is not None, "the sidecar's audit log is off"
    return [r for r in (json.loads(line) for line in sidecar.audit.spool.lines())
            if r.get("kind") == "inbound" and caller in r.get("caller", "")]


@contextlib.asynccontextmanager
async def behind_sidecar(
    env: MeshEnv, agent: PlainAgent, spools: Path, capability: str, callers: Sequence[tuple[str, bool]],
) -> AsyncIterator[tuple[Sidecar, list[MeshClient]]]:
    """agent (a plain gRPC agent, identity "plain") running behind a sidecar that audits into spools, and one
    MeshClient per (name, link) in callers, each once it sees capability: (the sidecar, the clients)."""
    async with agent, contextlib.AsyncExitStack() as stack:
        # No direct link: the tests watch the one Agent/Link their linked caller keeps (test_link_direct*.py test
        # the direct one).
        sidecar = Sidecar(SidecarConfig(agent=agent.endpoint, audit_dir=str(spools), link_direct=False),
                          await env.settings_for("plain"))
        await stack.enter_async_context(sidecar)
        clients = [await stack.enter_async_context(MeshClient.connect(
            name=name, settings=await env.settings_for(name, "client"), link=link)) for name, link in callers]
        for mesh in clients:
            assert await mesh.node.registry.wait_for_capability(capability, 1, timeout=10)
        yield sidecar, clients

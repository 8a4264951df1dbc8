"""Putting an SDK agent on the mesh: `await serve(agent)` or, from a script, `run(agent)`.

In-process packaging: the agent's own gRPC server runs the mesh's inbound layers as an interceptor (no
sidecar hop), registers in etcd under a lease, and hands the agent a MeshClient for onward calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hivemesh.mesh.audit import AuditLog
from hivemesh.mesh.cert_presence import cert_labels, follow_certificate
from hivemesh.mesh.front import FrontDoor, open_front_door
from hivemesh.mesh.handshake_audit import start_tee
from hivemesh.mesh.inbound import DecisionObserver
from hivemesh.mesh.layers.guard import DEFAULT_MAX_INPUT_BYTES
from hivemesh.mesh.layers.screen import DEFAULT_SCREEN, ContentScreen
from hivemesh.mesh.node import MeshNode
from hivemesh.mesh.registry import Registration, default_instance_id, drain_after_deregistration
from hivemesh.mesh.settings import MeshSettings
from hivemesh.sdk.agent import Agent
from hivemesh.sdk.budget import TokenBudgets
from hivemesh.sdk.budget_ledger import SpendLedger
from hivemesh.sdk.client import MeshClient
from hivemesh.sdk.idempotency import DedupeStore, IdempotencyCache
from hivemesh.sdk.servicer import AgentServicer
from hivemesh.v1 import agent_pb2, agent_pb2_grpc, mesh_pb2

log = logging.getLogger(__name__)


class AgentServer:
    """One SDK agent serving on the mesh. Use `async with AgentServer(agent, settings) as s:` or start/stop."""

    def __init__(
        self,
        agent: Agent,
        settings: MeshSettings | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        instance_id: str | None = None,
        lease_ttl_s: int = 10,
        max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
        labels: dict[str, str] | None = None,
        observers: Sequence[DecisionObserver] = (),
        dedupe: DedupeStore | None = None,
        budgets: TokenBudgets | None = None,
        audit: bool = True,
        audit_dir: Path | str | None = None,
        content_screen: ContentScreen | None = DEFAULT_SCREEN,
        screen_exempt: Sequence[str] = (),
    ) -> None:
        """dedupe: how keyed calls to non-idempotent capabilities are deduplicated (default: in memory).
        budgets: per-caller token budgets (default: the `budgets` policies, when the node mirrors policies).
        audit: record every inbound decision in the audit spool under audit_dir (default
        `<HIVEMESH_HOME>/audit`), shipped to the control plane; on by default.
        content_screen: the prompt-injection screen of inbound text fields (None: off); screen_exempt: the
        capabilities it skips. Per-capability size limits come from `@capability(max_input_bytes=...)`."""
        self.agent = agent
        self.dedupe = dedupe if dedupe is not None else IdempotencyCache()
        self.budgets = budgets
        self.settings = settings or MeshSettings.resolve()
        self.host = host
        self.requested_port = port
        self.instance_id = instance_id or default_instance_id()
        self.lease_ttl_s = lease_ttl_s
        self.max_input_bytes = max_input_bytes
        self.labels = dict(labels or {})
        self.observers = tuple(observers)
        self.content_screen = content_screen
        self.screen_exempt = tuple(screen_exempt)
        self.audit_enabled = audit
        self.audit_dir = audit_dir
        self.audit: AuditLog | None = None
        self.node = MeshNode(
            self.settings, name=agent.name, kind="agent", verify_inbound=True, instance_id=self.instance_id
        )
        self.mesh = MeshClient(self.node)
        self._server: FrontDoor | None = None
        self._registration: Registration | None = None
        self._ledger: SpendLedger | None = None
        self.token_budgets: TokenBudgets | None = None
        """The token budgets in force once started (given, or from the `budgets` policies; None: none)."""
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        await asyncio.to_thread(start_tee)  # before the first handshake: see hivemesh.mesh.handshake_audit
        await self.node.start()
        try:
            card = self.agent.card()
            front = open_front_door(
                self.node,
                capabilities=card.capabilities,
                agent_name=self.agent.name,
                instance_id=self.instance_id,
                max_input_bytes=self.max_input_bytes,
                limits={n: s.max_input_bytes for n, s in self.agent.capabilities.items() if s.max_input_bytes},
                screen=self.content_screen,
                screen_exempt=self.screen_exempt,
                audit=self.audit_enabled,
                audit_dir=self.audit_dir,
                observers=self.observers,
            )
            self.audit, server = front.audit, front.server
            self.port = server.add_secure_port(f"{self.host}:{self.requested_port}", self.node.server_credentials())
            hop = agent_pb2.Hop(
                kind="agent", identity=self.node.workload.spiffe_id, instance=self.instance_id, endpoint=self.endpoint
            )
            budgets = self.budgets
            if budgets is None:  # the `budgets` policies, counting what every replica spent
                ledger = SpendLedger(self.settings.etcd, self.instance_id)
                budgets = _policy_budgets(self.node, ledger)
                if budgets is not None:
                    self._ledger = ledger
                    await ledger.start()
            self.token_budgets = budgets
            servicer = AgentServicer(self.agent, hop=hop, mesh=self.mesh, dedupe=self.dedupe, budgets=budgets)
            agent_pb2_grpc.add_AgentServicer_to_server(servicer, server.server)
            self._server = front
            await front.start(self.host, self.port)
            instance = mesh_pb2.AgentInstance(
                card=card,
                instance_id=self.instance_id,
                endpoint=self.endpoint,
                identity=self.node.workload.spiffe_id,
                packaging="in-process",
                labels={**dict(card.labels), **self.labels, **cert_labels(self.node.workload)},
            )
            self._registration = Registration(self.settings.etcd, instance, ttl_s=self.lease_ttl_s)
            await self._registration.start()
            follow_certificate(self.node, self._registration, [front.server])
            await self.agent.on_start()
        except BaseException:
            await self.stop()
            raise
        log.info("agent %s serving on %s as %s", self.agent.name, self.endpoint, self.node.workload.spiffe_id)

    async def stop(self, grace: float = 2.0) -> None:
        """Deregister first (callers stop choosing this instance), then drain, then leave the mesh."""
        if self._registration is not None:
            key = self._registration.key
            await self._registration.stop()
            self._registration = None
            if self.node is not None:
                await drain_after_deregistration(self.node, key)
        with contextlib.suppress(Exception):
            await self.agent.on_stop()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._ledger is not None:
            await self._ledger.stop()  # publishes what this replica spent last
            self._ledger = None
        if self.audit is not None:
            await self.audit.close()  # ships what it can (bounded), keeps the rest in the spool
            self.audit = None
        await self.node.stop()

    async def __aenter__(self) -> AgentServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _policy_budgets(node: MeshNode, ledger: SpendLedger) -> TokenBudgets | None:
    """Token budgets from the node's policy mirror (`budgets` documents), if this node keeps one, counting the
    spend of every replica through ledger."""
    from hivemesh.sdk.budget import BUDGETS

    policies = getattr(node, "policies", None)
    if BUDGETS is None or policies is None or not hasattr(policies, "get"):
        return None
    return TokenBudgets(lambda: policies.get(BUDGETS), ledger=ledger)


async def serve(agent: Agent, settings: MeshSettings | None = None, **kwargs: Any) -> AgentServer:
    """Start serving agent on the mesh and return the running server (stop it with `await server.stop()`)."""
    server = AgentServer(agent, settings, **kwargs)
    await server.start()
    return server


async def serve_until_signal(agent: Agent, settings: MeshSettings | None = None, **kwargs: Any) -> None:
    """Serve until SIGINT or SIGTERM, then deregister and drain."""
    server = await serve(agent, settings, **kwargs)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()


def run(agent: Agent, settings: MeshSettings | None = None, **kwargs: Any) -> None:
    """Blocking entry point for an agent script: `run(MyAgent())`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve_until_signal(agent, settings, **kwargs))

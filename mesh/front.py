"""The mesh's front door for one agent, built the same way for both packagings.

The sidecar (a raw-bytes forwarder behind it) and the SDK's in-process server (the agent's own servicer
behind it) differ only in what serves the calls; the inbound chain, the token budgets and their spend ledger,
the audit log and the server around them come from here, so the two packagings cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hivemesh.mesh.audit import AuditLog, open_node_audit
from hivemesh.mesh.audit.handshake import HandshakeAudit, tracer_events
from hivemesh.mesh.authz import AUTHZ
from hivemesh.mesh.budget import BUDGETS, TokenBudgets
from hivemesh.mesh.budget_ledger import SpendLedger
from hivemesh.mesh.inbound import AGENT_SERVICE, DecisionObserver, MeshInboundInterceptor, build_inbound_chain
from hivemesh.mesh.layers.fence import FenceLayer
from hivemesh.mesh.layers.loopguard import DEFAULT_MAX_CALL_DEPTH
from hivemesh.mesh.layers.output_screen import DEFAULT_CLASSIFIER, Classifier
from hivemesh.mesh.layers.screen import ContentScreen
from hivemesh.mesh.node import MeshNode
from hivemesh.mesh.readiness import Readiness
from hivemesh.mesh.server import ManagedServer
from hivemesh.mesh.signing import Signer
from hivemesh.v1 import agent_pb2


@dataclass
class FrontDoor:
    """A started node's inbound server (not yet listening) and its audit log, if on."""

    server: ManagedServer
    audit: AuditLog | None
    node: MeshNode | None = None
    handshakes: HandshakeAudit | None = None
    """Audits the TLS handshakes the server refuses (set by `start`, when the audit log is on)."""
    budgets: TokenBudgets | None = None
    """The token budgets the chain enforces (None: none)."""
    ledger: SpendLedger | None = None
    """Shares the budgets' spend with the other replicas; started before serving, stopped after."""
    inbound: MeshInboundInterceptor | None = None
    """The interceptor that runs the chain: a Link serves each of its calls through it (mesh/link_server.py)."""
    fence: FenceLayer | None = None
    """The chain's fence: the packaging has it `follow` the instance's registration once registered."""

    async def start(self, host: str, port: int) -> None:
        """Start serving on the port already added, and auditing the handshakes refused there."""
        if self.ledger is not None:
            await self.ledger.start()  # everyone's spend is known before the first call is checked
        await self.server.start()
        if self.audit is not None:
            self.handshakes = HandshakeAudit(self.audit, host, port, events=tracer_events())
            await self.handshakes.start()
            if self.node is not None and self.node.metrics is not None:
                self.node.metrics.watch_handshakes(self.handshakes)
            if self.node is not None:  # `hivemesh status` shows whether that audit is live
                self.node.status_extras.append(self.handshakes.fill_status)

    async def stop(self, grace: float) -> None:
        await self.server.stop(grace)
        if self.handshakes is not None:
            if self.node is not None and self.handshakes.fill_status in self.node.status_extras:
                self.node.status_extras.remove(self.handshakes.fill_status)
            await self.handshakes.close()
            self.handshakes = None
        if self.ledger is not None:
            await self.ledger.stop()  # publishes what this replica spent last


def open_front_door(
    node: MeshNode,
    *,
    capabilities: Iterable[agent_pb2.Capability],
    agent_name: str,
    instance_id: str,
    max_input_bytes: int,
    limits: Mapping[str, int],
    screen: ContentScreen | None,
    screen_exempt: Sequence[str],
    audit: bool,
    audit_dir: Path | str | None,
    observers: Sequence[DecisionObserver] = (),
    budgets: TokenBudgets | None = None,
    max_call_depth: int = DEFAULT_MAX_CALL_DEPTH,
    readiness: Readiness | None = None,
    output_classifier: Classifier | None = None,
) -> FrontDoor:
    """The inbound chain for node's agent, its audit log (on by default), and the server that runs them.

    budgets: the token budgets to enforce; default: the `budgets` policies in force, counting the spend of
    every replica of the agent through a `SpendLedger`. readiness: the node's (its health says what it decides).
    output_classifier: what the output screens of the capabilities that declare one act on; default patterns."""
    policies = node.policies
    ledger: SpendLedger | None = None
    if budgets is None:
        ledger = SpendLedger(node.etcd, instance_id, agent=agent_name)
        budgets = TokenBudgets(lambda: policies.get(BUDGETS), ledger=ledger)
    metrics = node.metrics
    verifier = node.verifier()
    if metrics is not None:
        metrics.watch_verifier(verifier)
    fence = FenceLayer()
    chain = build_inbound_chain(
        trust_domain=node.settings.trust_domain,
        verifier=verifier,
        capabilities=capabilities,
        agent_name=agent_name,
        max_input_bytes=max_input_bytes,
        traffic=node.traffic,
        instances=node.live_instances_of,
        authz=lambda: policies.get(AUTHZ),
        limits=dict(limits),
        screen=screen,
        screen_exempt=screen_exempt,
        budgets=budgets,
        max_call_depth=max_call_depth,
        meters=[metrics.usage_layer()] if metrics is not None else (),
        signer=lambda: Signer(node.workload.key_pem, node.workload.cert_pem),
        instance_id=instance_id,
        output_classifier=output_classifier or DEFAULT_CLASSIFIER,
        fence=fence,
    )
    log = (
        open_node_audit(node, spiffe_id=node.workload.spiffe_id, instance=instance_id, directory=audit_dir)
        if audit
        else None
    )
    if log is not None:
        node.outbound.observer = log.outbound  # refusals decided on the way out, e.g. circuit open
        node.outbound.signed_recorder = log.signed  # signed answers it verified as a caller
        if metrics is not None:
            metrics.watch_audit(log)
    if metrics is not None:
        observers = [metrics.inbound_observer(capabilities), *observers]
    inbound = MeshInboundInterceptor(chain, observers=[*observers, *([log] if log is not None else [])])
    server = ManagedServer(services=[AGENT_SERVICE], interceptors=[inbound], readiness=readiness)
    return FrontDoor(server=server, audit=log, node=node, budgets=budgets, ledger=ledger, inbound=inbound,
                     fence=fence)

"""Run one reference agent as its own process: `python -m hivemesh.agents.run <agent>`.

    python -m hivemesh.agents.run ocr            # SDK agents: in-process mesh layers, settings from
    python -m hivemesh.agents.run extractor      # HIVEMESH_* variables or the `hivemesh up` state file
    python -m hivemesh.agents.run storage        # (see MeshSettings.resolve)
    python -m hivemesh.agents.run validator --listen 127.0.0.1:7001   # plain gRPC; front it with a sidecar
    python -m hivemesh.agents.run papers news wiki research   # several in one process: join tokens from
                                                               # HIVEMESH_JOIN_TOKENS='{"papers": "...", ...}'

SDK agents are imported only when chosen, so `validator` runs with no hivemesh runtime loaded at all.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SDK_AGENTS = {
    "ocr": ("hivemesh.agents.ocr", "OcrAgent"),
    "extractor": ("hivemesh.agents.extract", "ExtractorAgent"),
    "storage": ("hivemesh.agents.store", "StorageAgent"),
    # research compilation (fan-out)
    "papers": ("hivemesh.agents.research", "PapersSearchAgent"),
    "news": ("hivemesh.agents.research", "NewsSearchAgent"),
    "wiki": ("hivemesh.agents.research", "WikiSearchAgent"),
    "research": ("hivemesh.agents.research", "ResearchAgent"),
    # IT helpdesk (router, handoff)
    "network-desk": ("hivemesh.agents.helpdesk", "NetworkSpecialist"),
    "security-desk": ("hivemesh.agents.helpdesk", "SecuritySpecialist"),
    "application-desk": ("hivemesh.agents.helpdesk", "ApplicationSpecialist"),
    # customer-service escalation (supervisor)
    "tier1": ("hivemesh.agents.customer_service", "Tier1Agent"),
    "tier2": ("hivemesh.agents.customer_service", "Tier2Agent"),
    "cs-supervisor": ("hivemesh.agents.customer_service", "SupervisorDeskAgent"),
    # content creation loop (peer review)
    "writer": ("hivemesh.agents.content", "WriterAgent"),
    "editor": ("hivemesh.agents.content", "EditorAgent"),
    "fact-checker": ("hivemesh.agents.content", "FactCheckerAgent"),
    # contract review peers
    "contract-drafter": ("hivemesh.agents.contract", "ContractDrafter"),
    "legal": ("hivemesh.agents.contract", "LegalReviewer"),
    "finance": ("hivemesh.agents.contract", "FinanceReviewer"),
    "business": ("hivemesh.agents.contract", "BusinessReviewer"),
    # lead qualification (pipeline)
    "lead-scorer": ("hivemesh.agents.leads", "LeadScorer"),
    "lead-researcher": ("hivemesh.agents.leads", "LeadResearcher"),
    "lead-enricher": ("hivemesh.agents.leads", "LeadEnricher"),
    "lead-router": ("hivemesh.agents.leads", "LeadRouter"),
    # risk assessment (fan-out + combine)
    "credit-analyst": ("hivemesh.agents.risk", "CreditAnalyst"),
    "market-analyst": ("hivemesh.agents.risk", "MarketAnalyst"),
    "compliance-analyst": ("hivemesh.agents.risk", "ComplianceAnalyst"),
    # sales support (router)
    "product-specialist": ("hivemesh.agents.sales", "ProductSpecialist"),
    "pricing-specialist": ("hivemesh.agents.sales", "PricingSpecialist"),
    "technical-specialist": ("hivemesh.agents.sales", "TechnicalSpecialist"),
    # the tool-calling loop: a model calls a local tool and the pricing specialist
    "sales-assistant": ("hivemesh.agents.sales_assistant", "SalesAssistant"),
}
PLAIN_AGENTS = {"validator": "hivemesh.agents.validate_plain"}
AGENT_NAMES = (*SDK_AGENTS, *PLAIN_AGENTS)


TOKENS_ENV = "HIVEMESH_JOIN_TOKENS"
"""JSON {agent: one-time join token}, for several agents served by one process."""


async def _serve_many(names: Sequence[str]) -> None:
    """Several SDK agents in one process (each its own identity, server and registration): how `hivemesh up`
    keeps the demo's many small agents cheap. Stops them all on SIGINT/SIGTERM. They bind and advertise what
    `AgentServerConfig` reads from the environment ($HIVEMESH_LISTEN, $HIVEMESH_ADVERTISE), as `up` sets it."""
    import asyncio
    import dataclasses
    import os
    import signal

    from hivemesh.mesh import json_depth
    from hivemesh.sdk import AgentServer, AgentServerConfig, MeshSettings

    base = MeshSettings.resolve()
    tokens = json_depth.loads(os.environ.get(TOKENS_ENV) or "{}")
    servers = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for name in names:
            module, cls_name = SDK_AGENTS[name]
            agent = getattr(importlib.import_module(module), cls_name)()
            settings = dataclasses.replace(base, join_token=tokens.get(name) or base.join_token)
            server = AgentServer(agent, settings, AgentServerConfig())
            await server.start()
            servers.append(server)
            health = f" health={server.health_address}" if server.health_address is not None else ""
            sys.stdout.write(f"serving {name} on {server.endpoint} metrics={server.metrics_address or 'off'}{health}\n")
            sys.stdout.flush()
        await stop.wait()
    finally:
        for server in reversed(servers):
            await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    from hivemesh.mesh.lifeline import die_with_parent_if_asked  # stdlib only: no runtime for 'validator'

    die_with_parent_if_asked()
    args = list(sys.argv[1:] if argv is None else argv)
    names = [a for a in args if not a.startswith("-")]
    if len(names) > 1 and all(n in SDK_AGENTS for n in names):
        import logging

        from hivemesh.mesh.audit.handshake.switch import enable

        enable()  # before gRPC is imported (it reads GRPC_TRACE then): audit the TLS handshakes it refuses

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from hivemesh.mesh import loop

        loop.run(_serve_many(names))
        return 0
    if args and args[0] in PLAIN_AGENTS:
        plain = importlib.import_module(PLAIN_AGENTS[args[0]])
        return int(plain.main(args[1:]))
    parser = argparse.ArgumentParser(
        prog="python -m hivemesh.agents.run",
        description="Run a hivemesh reference agent until SIGINT/SIGTERM.",
        epilog="'validator' takes the options of python -m hivemesh.agents.validate_plain.",
    )
    parser.add_argument("agent", choices=AGENT_NAMES)
    parser.add_argument("--host", default=None,
                        help="address to serve on (default: $HIVEMESH_LISTEN, else 127.0.0.1; advertised as "
                             "$HIVEMESH_ADVERTISE, else this). `hivemesh up --listen 0.0.0.0` sets both: a fixed "
                             "127.0.0.1 here left its agents unreachable from other hosts")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    parser.add_argument("--instance-id", default=None, help="registry instance id (default: generated)")
    parser.add_argument("--health-listen", default=None, metavar="HOST:PORT",
                        help="plaintext grpc.health.v1 port for probes, or 'off' (default: $HIVEMESH_HEALTH_LISTEN, "
                             "else off)")
    parser.add_argument("--max-call-depth", type=int, default=8, metavar="N",
                        help="most agents one call chain may pass through before this agent refuses it "
                             "(DEPTH_EXCEEDED; default %(default)s)")
    parser.add_argument("--output-classifier", default=None, metavar="MODULE:CALLABLE",
                        help="what the output screens of the agent's capabilities act on, by name (default: the "
                             "pattern classifier)")
    parsed = parser.parse_args(args)
    if parsed.max_call_depth < 1:
        parser.error("--max-call-depth must be at least 1")

    from hivemesh.mesh.audit.handshake.switch import enable

    enable()  # before gRPC is imported (it reads GRPC_TRACE then): audit the TLS handshakes it refuses
    from hivemesh.sdk import AgentServerConfig, MeshSettings, run

    try:
        where = {"host": parsed.host} if parsed.host is not None else {}  # else the environment's, as the SDK's
        config = AgentServerConfig(**where, port=parsed.port, instance_id=parsed.instance_id,
                                   health_listen=parsed.health_listen, max_call_depth=parsed.max_call_depth,
                                   output_classifier=parsed.output_classifier)
        settings = MeshSettings.resolve()
    except ValueError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    module, cls_name = SDK_AGENTS[parsed.agent]
    agent = getattr(importlib.import_module(module), cls_name)()
    run(agent, settings, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Putting an SDK agent on the mesh: `await serve(agent)` or, from a script, `run(agent)`.

In-process packaging: the agent's own gRPC server runs the mesh's inbound layers as an interceptor (no
sidecar hop), registers in etcd under a lease, and hands the agent a MeshClient for onward calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn, TypeVar

import grpc

from hivemesh.mesh import loop
from hivemesh.mesh.advertise import advertised_host, env_advertise_host, env_listen_host, join_host_port
from hivemesh.mesh.audit import AuditLog
from hivemesh.mesh.audit.handshake import tracer_events
from hivemesh.mesh.budget import TokenBudgets
from hivemesh.mesh.cert_presence import cert_labels
from hivemesh.mesh.front import FrontDoor, open_front_door
from hivemesh.mesh.health_port import parse_health_listen
from hivemesh.mesh.inbound import AGENT_SERVICE, DecisionObserver
from hivemesh.mesh.layers.guard import DEFAULT_MAX_INPUT_BYTES
from hivemesh.mesh.layers.loopguard import DEFAULT_MAX_CALL_DEPTH
from hivemesh.mesh.layers.output_classifier import resolve_classifier
from hivemesh.mesh.layers.output_screen import Classifier
from hivemesh.mesh.layers.screen import DEFAULT_SCREEN, ContentScreen
from hivemesh.mesh.link_listener import DirectLinkListener, direct_enabled, open_direct_listener
from hivemesh.mesh.link_server import LinkServer
from hivemesh.mesh.logjson import basic_config
from hivemesh.mesh.node import MeshNode
from hivemesh.mesh.node_health import NodeHealth
from hivemesh.mesh.node_metrics import OWNED_DEFAULT, NodeMetrics, metrics_listen, parse_listen
from hivemesh.mesh.readiness import DEFAULT_INTERVAL_S
from hivemesh.mesh.registry import INSTANCE_ID_RE, Registration, default_instance_id, drain_after_deregistration
from hivemesh.mesh.server import SDK_AGENT, ManagedServer
from hivemesh.mesh.settings import MeshLocationError, MeshSettings, check_seconds, check_whole
from hivemesh.sdk.agent import Agent
from hivemesh.sdk.client import MeshClient
from hivemesh.sdk.idempotency import DedupeStore, IdempotencyCache
from hivemesh.sdk.servicer import AgentServicer, add_to_server, invoke_handler
from hivemesh.v1 import agent_pb2, mesh_pb2

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentServerConfig:
    """How one SDK agent serves: where it listens, what it registers, and the inbound checks it runs.

    Validated on construction, so a mistake fails where it is written rather than at start or registration."""

    host: str = field(default_factory=env_listen_host)
    """The address the agent's mutual-TLS server binds: a name or an IP, no port (0.0.0.0: every interface,
    then give advertise); default $HIVEMESH_LISTEN, else 127.0.0.1."""
    advertise: str | None = field(default_factory=env_advertise_host)
    """The host the registry tells callers to dial (with the bound port); default $HIVEMESH_ADVERTISE, else
    host."""
    port: int = 0
    """0: a free port, chosen at start (`AgentServer.port` tells which)."""
    instance_id: str | None = None
    """The registry instance id; default `<hostname>-<pid>-<6 hex>`."""
    lease_ttl_s: int = 10
    """TTL of the registration lease: how long a killed agent stays listed."""
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES
    """Input size limit for capabilities without their own `@capability(max_input_bytes=...)`."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Registered with the instance, over the card's own labels."""
    observers: tuple[DecisionObserver, ...] = ()
    """Told about every inbound decision (besides the audit log)."""
    dedupe: DedupeStore | None = None
    """How keyed calls to non-idempotent capabilities are deduplicated; default: in memory."""
    budgets: TokenBudgets | None = None
    """Per-caller token budgets; default: the `budgets` policies, when the node mirrors policies."""
    audit: bool = True
    """Record every inbound decision in the audit spool, shipped to the control plane."""
    audit_dir: Path | str | None = None
    """Where the audit spool lives; default `<HIVEMESH_HOME>/audit`."""
    content_screen: ContentScreen | None = DEFAULT_SCREEN
    """The prompt-injection screen of inbound text fields; None: off."""
    screen_exempt: tuple[str, ...] = ()
    """Capabilities the content screen skips."""
    max_call_depth: int = DEFAULT_MAX_CALL_DEPTH
    """Most agents one call chain may pass through (this one included) before a call is DEPTH_EXCEEDED."""
    metrics_listen: str | None = None
    """HOST:PORT of the plaintext Prometheus `/metrics` port ("off": none); default $HIVEMESH_METRICS_LISTEN,
    else 127.0.0.1:0 (a free loopback port; `AgentServer.metrics_address` tells which)."""
    health_listen: str | None = None
    """HOST:PORT of the plaintext grpc.health.v1 port for probes ("off": none); default $HIVEMESH_HEALTH_LISTEN,
    else off (`AgentServer.health_address` tells which)."""
    health_interval_s: float = DEFAULT_INTERVAL_S
    """How often health checks that the registry entry is there."""
    output_classifier: Classifier | str | None = None
    """What the output screens of capabilities that declare one act on: a callable or its `module:callable` name
    (loaded here, so a bad name fails now); default: the pattern classifier."""
    link: bool | None = None
    """Serve `Link` (a caller's unary calls as frames on one stream, each through the same inbound chain) and
    call other agents over links; None: $HIVEMESH_LINK, else on."""
    link_direct: bool | None = None
    """With `link`, also serve direct links (`mesh/link_direct.py`: Link without gRPC, on a free port of host,
    advertised in the registry); None: $HIVEMESH_LINK_DIRECT, else on."""

    def __post_init__(self) -> None:
        # Sequences are accepted (a list is natural to write) and kept as tuples, so the config stays frozen.
        for name in ("observers", "screen_exempt"):
            value = getattr(self, name)
            if isinstance(value, str | bytes):
                raise ValueError(f"{name} must be a sequence, not the single string {value!r}: write ({value!r},)")
            object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))
        bracketed = self.host.startswith("[") and self.host.endswith("]") and len(self.host) > 2
        if not bracketed and (not self.host or ":" in self.host):
            raise ValueError(f"host must be a host name or an IP address, without a port (give it as port=; "
                             f"IPv6 as [addr]): {self.host!r}")
        advertised_host(self.host, self.advertise)  # raises on a wildcard or a port, saying what to give
        # Whole numbers where whole numbers are meant, checked as such: NaN passes every `<` check, and a NaN
        # max_input_bytes turned the size limit off (`size > nan` is never true).
        check_whole("port", self.port, 0, 65535, "(0: a free port)")
        if self.instance_id is not None and not INSTANCE_ID_RE.fullmatch(self.instance_id):
            raise ValueError(f"instance_id must match [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}: {self.instance_id!r}")
        check_whole("lease_ttl_s", self.lease_ttl_s, 2, 3600, "seconds")
        check_whole("max_input_bytes", self.max_input_bytes, 1, 2**31 - 1, "bytes")
        check_whole("max_call_depth", self.max_call_depth, 1, 1000)
        for key, value in self.labels.items():
            if not isinstance(key, str) or not key or not isinstance(value, str):
                raise ValueError(f"labels must map non-empty strings to strings: {key!r}: {value!r}")
        for observer in self.observers:
            if not callable(observer):
                raise ValueError(f"observers must be callables (inbound decision observers): {observer!r}")
        for cap in self.screen_exempt:
            if not isinstance(cap, str) or not cap:
                raise ValueError(f"screen_exempt must name capabilities: {cap!r}")
        if self.metrics_listen is not None:
            parse_listen(self.metrics_listen)  # raises, saying what is wrong
        if self.health_listen is not None:
            parse_health_listen(self.health_listen)
        check_seconds("health_interval_s", self.health_interval_s, 0.05, 3600)
        object.__setattr__(self, "output_classifier", resolve_classifier(self.output_classifier))

    @property
    def classifier(self) -> Classifier | None:
        """output_classifier as loaded (a name was resolved on construction)."""
        return None if isinstance(self.output_classifier, str) else self.output_classifier


def _bind(server: ManagedServer, host: str, port: int, credentials: grpc.ServerCredentials) -> int:
    """Bind server to host:port (the bound port), or raise a `ListenError` that says why not and what to do
    (`hivemesh.mesh.server.bind_port`): gRPC's own "Failed to bind to address ...; set GRPC_VERBOSITY=debug" says
    neither."""
    return server.add_secure_port(f"{host}:{port}", credentials, SDK_AGENT)


class AgentServer:
    """One SDK agent serving on the mesh. Use `async with AgentServer(agent, settings, config) as s:` or
    start/stop."""

    def __init__(
        self,
        agent: Agent,
        settings: MeshSettings | None = None,
        config: AgentServerConfig | None = None,
    ) -> None:
        self.agent = agent
        self.config = config if config is not None else AgentServerConfig()
        self.settings = settings or MeshSettings.resolve()
        self.dedupe = self.config.dedupe if self.config.dedupe is not None else IdempotencyCache()
        self.instance_id = self.config.instance_id or default_instance_id()
        self.audit: AuditLog | None = None
        listen = metrics_listen(self.config.metrics_listen, OWNED_DEFAULT)
        self.node = MeshNode(
            self.settings, name=agent.name, kind="agent", verify_inbound=True, instance_id=self.instance_id,
            metrics=None if listen is None else NodeMetrics(
                packaging="in-process", node=f"{agent.name}/{self.instance_id}", listen=listen),
            link=self.config.link,
        )
        self.mesh = MeshClient(self.node)
        self._server: FrontDoor | None = None
        self._link: LinkServer | None = None
        self._direct: DirectLinkListener | None = None
        self._registration: Registration | None = None
        self.health = NodeHealth(self.config.health_listen, self.config.health_interval_s)
        """Whether this agent can do its job, as its health services say (and its plaintext health port)."""
        self.token_budgets: TokenBudgets | None = None
        """The token budgets in force once started (given, or from the `budgets` policies; None: none)."""
        self.port = 0

    @property
    def host(self) -> str:
        return self.config.host

    @property
    def endpoint(self) -> str:
        """The advertised host:port (registry, hops); the port is the bound one."""
        return join_host_port(advertised_host(self.host, self.config.advertise), self.port)

    @property
    def link_endpoint(self) -> str:
        """The advertised host:port of this agent's direct links ("": it serves none)."""
        if self._direct is None:
            return ""
        return join_host_port(advertised_host(self.host, self.config.advertise), self._direct.port)

    @property
    def instance_key(self) -> str:
        """"agent/instance id": how callers' status, metrics and breakers name this instance (an instance id is
        unique only under its agent)."""
        return f"{self.agent.name}/{self.instance_id}"

    @property
    def registration(self) -> Registration | None:
        """This agent's entry in the registry once started: whether its lease is held (`registered`) and the
        revision that created it (`revision`, the fence of the calls routed by it). None before start and after
        stop."""
        return self._registration

    @property
    def metrics_address(self) -> str | None:
        """HOST:PORT serving `/metrics` once started (None: metrics off)."""
        m = self.node.metrics
        return m.address if m is not None and m.server.port else None

    @property
    def health_address(self) -> str | None:
        """HOST:PORT of the plaintext health port once started (None: off)."""
        return self.health.address

    async def start(self) -> None:
        await asyncio.to_thread(tracer_events().start)  # before the first handshake: see its docstring
        await self.node.start()
        try:
            card = self.agent.card()
            front = open_front_door(
                self.node,
                capabilities=card.capabilities,
                agent_name=self.agent.name,
                instance_id=self.instance_id,
                max_input_bytes=self.config.max_input_bytes,
                limits={n: s.max_input_bytes for n, s in self.agent.capabilities.items() if s.max_input_bytes},
                screen=self.config.content_screen,
                screen_exempt=self.config.screen_exempt,
                audit=self.config.audit,
                audit_dir=self.config.audit_dir,
                observers=self.config.observers,
                budgets=self.config.budgets,
                max_call_depth=self.config.max_call_depth,
                readiness=self.health.readiness,
                output_classifier=self.config.classifier,
            )
            self.audit, server = front.audit, front.server
            self.port = _bind(server, self.host, self.config.port, self.node.server_credentials())
            hop = agent_pb2.Hop(
                kind="agent", identity=self.node.workload.spiffe_id, instance=self.instance_id, endpoint=self.endpoint
            )
            self.token_budgets = front.budgets
            servicer = AgentServicer(self.agent, hop=hop, mesh=self.mesh, dedupe=self.dedupe)
            if self.node.link and front.inbound is not None:
                servicer.link = self._link = LinkServer(front.inbound, invoke_handler(servicer))
            add_to_server(servicer, server.server)
            self._server = front
            await front.start(self.host, self.port)
            if self._link is not None and direct_enabled(self.config.link_direct):
                self._direct = await open_direct_listener(self._link, self.node, self.host.strip("[]"),
                                                          front.audit)
            instance = mesh_pb2.AgentInstance(
                card=card,
                instance_id=self.instance_id,
                endpoint=self.endpoint,
                link_endpoint=self.link_endpoint,
                identity=self.node.workload.spiffe_id,
                packaging="in-process",
                labels={**dict(card.labels), **self.config.labels, **cert_labels(self.node.workload)},
            )
            self._registration = Registration(self.node.etcd, instance, ttl_s=self.config.lease_ttl_s)
            await self._registration.start()
            if front.fence is not None:
                front.fence.follow(self._registration.fence_problem)
            self.health.follow(self.node, self._registration)
            await self.agent.on_start()
            await self.health.open([AGENT_SERVICE])
        except BaseException:
            await self.stop()
            raise
        log.info("agent %s serving on %s as %s (metrics %s, health %s)", self.agent.name, self.endpoint,
                 self.node.workload.spiffe_id, self.metrics_address or "off", self.health_address or "off")

    async def stop(self, grace: float = 2.0) -> None:
        """Say NOT_SERVING and deregister first (callers stop choosing this instance), then drain, then leave the
        mesh."""
        await self.health.drain()
        if self._registration is not None:
            key = self._registration.key
            await self._registration.stop()
            self._registration = None
            if self.node is not None:
                await drain_after_deregistration(self.node, key)
        with contextlib.suppress(Exception):
            await self.agent.on_stop()
        if self._link is not None:
            self._link.drain()  # open links end once answered, not after the whole grace
        # Both ports drain at once: one grace for the stop, not one after the other.
        direct, self._direct = self._direct, None
        await asyncio.gather(*(() if direct is None else (direct.close(grace),)),
                             *(() if self._server is None else (self._server.stop(grace),)))
        self._server = None
        if self.audit is not None:
            await self.audit.close()  # ships what it can (bounded), keeps the rest in the spool
            self.audit = None
        await self.health.close()
        await self.node.stop()

    async def __aenter__(self) -> AgentServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve(
    agent: Agent, settings: MeshSettings | None = None, config: AgentServerConfig | None = None
) -> AgentServer:
    """Start serving agent on the mesh and return the running server (stop it with `await server.stop()`)."""
    server = AgentServer(agent, settings, config)
    await server.start()
    return server


async def serve_until_signal(
    agent: Agent, settings: MeshSettings | None = None, config: AgentServerConfig | None = None
) -> None:
    """Serve until SIGINT or SIGTERM, then deregister and drain."""
    server = await serve(agent, settings, config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()


def _setup_error(exc: ValueError) -> NoReturn:
    """End a script whose settings are wrong as a command-line program does (`hivemesh.agents.run` too): the
    message, which says what to do, and exit code 2; a traceback would bury it."""
    sys.stderr.write(f"{os.path.basename(sys.argv[0]) or 'hivemesh'}: error: {exc}\n")
    raise SystemExit(2)


def run(agent: Agent, settings: MeshSettings | None = None, config: AgentServerConfig | None = None) -> None:
    """Blocking entry point for an agent script: `run(MyAgent())`. Settings that cannot be resolved (no mesh
    found, a bad HIVEMESH_* value) end it with their message and exit code 2."""
    basic_config(logging.INFO)  # HIVEMESH_LOG_FORMAT=json: JSON lines with trace ids (hivemesh.mesh.logjson)
    if settings is None:
        try:
            settings = MeshSettings.resolve()
        except ValueError as exc:
            _setup_error(exc)
    loop.run(serve_until_signal(agent, settings, config))


def run_main(main: Coroutine[Any, Any, T]) -> T:
    """Run a program's main coroutine (one that calls the mesh with a MeshClient) on the mesh's event loop:
    `run_main(main())` in place of `asyncio.run(main())` (uvloop where installed: `hivemesh.mesh.loop`). A
    `MeshClient` that cannot find the mesh ends the program with the message and exit code 2, as `run` does."""
    try:
        return loop.run(main)
    except MeshLocationError as exc:
        _setup_error(exc)

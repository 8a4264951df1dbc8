"""The sidecar: all the mesh work for an agent in any language, which only serves plain gRPC on loopback.

    agent (any language, 127.0.0.1:7001, plaintext)  ⇄  sidecar  ⇄  mesh (mutual TLS + capability tokens)

Inbound, it terminates mutual TLS, runs the same inbound chain as the SDK's in-process server, and forwards
the caller's bytes unchanged to the agent. Outbound, it serves the `Mesh` service on a Unix socket only its own
user can open (`hivemesh.mesh.local_socket`; loopback TCP only when asked) so the agent can call capabilities by
name, through the same outbound pipeline as the SDK's MeshClient.

Delegation: each inbound call reaches the agent with `x-hivemesh-call-handle`, an unguessable value valid only
while that call is in flight and mapped here to the caller's verified token. The agent never sees the token;
when it calls `Mesh.Call` with the handle in its metadata, the sidecar acts for the caller's principal (RFC 8693
exchange, as `ctx.call_capability(..., on_behalf=True)` does in the SDK).

Caller only (`SidecarConfig(client=NAME)`, `hivemesh sidecar --client NAME`): a program that only calls the mesh
needs no agent behind it. The sidecar joins as the client identity NAME and serves `Mesh` alone: no Agent
service, no inbound mutual-TLS port, no registration.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import secrets
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from hivemesh.mesh import batch, tracing
from hivemesh.mesh.advertise import advertised_host, join_host_port
from hivemesh.mesh.answer_size import answer_too_large
from hivemesh.mesh.audit import AuditLog, open_node_audit
from hivemesh.mesh.audit.handshake import tracer_events
from hivemesh.mesh.budget import TokenBudgets
from hivemesh.mesh.callcontext import inbound_call
from hivemesh.mesh.cert_presence import cert_labels
from hivemesh.mesh.errors import (
    AgentUnavailableError,
    CallHandleInvalidError,
    HivemeshError,
    InvalidInputError,
    InvalidOutputError,
    PayloadTooLargeError,
    abort,
    agents_own,
    to_status,
)
from hivemesh.mesh.front import FrontDoor, open_front_door
from hivemesh.mesh.health_port import parse_health_listen
from hivemesh.mesh.inbound import AGENT_SERVICE, DecisionObserver
from hivemesh.mesh.layers import Inbound
from hivemesh.mesh.layers.guard import DEFAULT_MAX_INPUT_BYTES
from hivemesh.mesh.layers.loopguard import DEFAULT_MAX_CALL_DEPTH
from hivemesh.mesh.layers.output_classifier import load_classifier, resolve_classifier
from hivemesh.mesh.layers.screen import DEFAULT_SCREEN
from hivemesh.mesh.link_listener import DirectLinkListener, direct_enabled, open_direct_listener
from hivemesh.mesh.link_server import LinkServer, link_handler
from hivemesh.mesh.local_call import CALL_HANDLE_KEY, read_local_metadata
from hivemesh.mesh.local_socket import bind_private_socket, default_socket_path, remove_socket
from hivemesh.mesh.node import MeshNode
from hivemesh.mesh.node_health import NodeHealth
from hivemesh.mesh.node_metrics import OWNED_DEFAULT, NodeMetrics, metrics_listen, parse_listen
from hivemesh.mesh.outbound.attempts import MAY_HAVE_RUN, gone_message, resend_advice
from hivemesh.mesh.outbound.link import LinkedInvoke
from hivemesh.mesh.outbound.pipeline import connect_failed
from hivemesh.mesh.output_check import OutputCheck, note_refusal
from hivemesh.mesh.pki import validate_name
from hivemesh.mesh.queue_rpc import NOT_QUEUEABLE, SidecarQueue, queue_for_s
from hivemesh.mesh.readiness import DEFAULT_INTERVAL_S
from hivemesh.mesh.registry import Registration, default_instance_id, drain_after_deregistration
from hivemesh.mesh.schema import compile_schema
from hivemesh.mesh.server import SIDECAR_INBOUND, SIDECAR_MESH, ManagedServer
from hivemesh.mesh.settings import MeshSettings, check_seconds, check_whole, state_dir
from hivemesh.mesh.tls import MAX_MESSAGE_BYTES, STREAM_WINDOW_OPTIONS
from hivemesh.mesh.token_source import on_behalf_of
from hivemesh.mesh.wire import chain_entries, chain_suffix, hop_suffix, with_context
from hivemesh.v1 import agent_pb2, agent_pb2_grpc, mesh_pb2

log = logging.getLogger(__name__)

MESH_SERVICE = "hivemesh.v1.Mesh"
_CALLER_KEY = "x-hivemesh-caller"
# The token is the mesh's business: never leak it to the agent. The caller and handle headers are the sidecar's
# to set: a caller's own copy would let it claim any identity to an agent that reads the first value.
_DROP_METADATA = frozenset({"authorization", _CALLER_KEY, CALL_HANDLE_KEY})
_HandleEntry = tuple[str, "agent_pb2.InvokeRequest | None"]
"""What a call handle names: the verified token of its inbound call and that call's decoded request (whose
call chain an onward call continues; read only then)."""
_has_field = agent_pb2.InvokeRequest.HasField
"""`_onward`'s test for a caller's context, on every Mesh.Call: half the cost of the bound `req.HasField`."""


@dataclass(frozen=True)
class SidecarConfig:
    """What one sidecar fronts and where it listens."""

    agent: str | None = None
    """The agent's plaintext address: loopback host:port, or unix:PATH. None with `client`."""
    client: str | None = None
    """Caller only: join as this client identity and serve only `Mesh` (give this or agent, not both)."""
    listen: str = "127.0.0.1:0"
    """Inbound mutual-TLS listener, host:port (0.0.0.0: every interface; then give advertise)."""
    advertise: str | None = None
    """The host the registry tells callers to dial, with the bound port; default: listen's host."""
    mesh_socket: str | None = None
    """Unix socket serving `Mesh` (plaintext) for local callers (the agent's own outbound calls), 0600 in a 0700
    folder; default
    `<state folder>/run/sidecar-<pid>.sock`. Only the sidecar's user can connect."""
    mesh_listen: str | None = None
    """Serve `Mesh` on this loopback TCP host:port instead of the socket, only when asked: then ANY local process
    can call the mesh as this sidecar's identity (a shared host's other users included)."""
    name: str | None = None
    """Agent name; default: the name in the agent's card."""
    instance_id: str | None = None
    lease_ttl_s: int = 10
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES
    agent_wait_s: float = 30.0
    audit: bool = True
    """Record every inbound decision in the audit spool (shipped to the control plane)."""
    audit_dir: str | None = None
    """Where the audit spool lives; default `<HIVEMESH_HOME>/audit`."""
    limits: tuple[tuple[str, int], ...] = ()
    """Per-capability input size limits, (capability, bytes); others get max_input_bytes."""
    content_screen: bool = True
    """Screen inbound text fields for prompt-injection patterns (the default rule set)."""
    screen_exempt: tuple[str, ...] = ()
    """Capabilities the content screen skips."""
    max_call_depth: int = DEFAULT_MAX_CALL_DEPTH
    """Most agents one call chain may pass through (this one included) before a call is DEPTH_EXCEEDED."""
    metrics_listen: str | None = None
    """HOST:PORT of the plaintext Prometheus `/metrics` port ("off": none); default $HIVEMESH_METRICS_LISTEN,
    else 127.0.0.1:0."""
    health_listen: str | None = None
    """HOST:PORT of the plaintext grpc.health.v1 port for probes ("off": none); default $HIVEMESH_HEALTH_LISTEN,
    else off."""
    health_interval_s: float = DEFAULT_INTERVAL_S
    """How often health checks that the agent answers and that the registry entry is there."""
    output_classifier: str | None = None
    """`module:callable` naming what the output screens act on (checked here); default: the pattern classifier."""
    max_held_calls: int = 100
    """Most calls this identity may hold queued at once (`queue_for_ms`); one more is QUEUE_FULL."""
    link: bool | None = None
    """Serve `Link` on the inbound port (a caller's unary calls as frames on one stream, each through the same
    chain) and send outbound calls over links; None: $HIVEMESH_LINK, else on."""
    link_direct: bool | None = None
    """With `link`, also serve direct links (`mesh/link_direct.py`: Link without gRPC, on a free port of listen's
    host, advertised in the registry); None: $HIVEMESH_LINK_DIRECT, else on."""

    def __post_init__(self) -> None:
        if (self.agent is None) == (self.client is None):
            raise ValueError("give agent (an agent to front) or client (a caller-only sidecar), exactly one")
        for name in ("agent", "mesh_listen"):
            value = getattr(self, name)
            if value is None or (name == "agent" and value.startswith("unix:")):
                continue
            if value.rpartition(":")[0] not in ("127.0.0.1", "localhost", "[::1]"):
                raise ValueError(f"{name} must be a loopback address (the link is plaintext): {value}")
        if self.mesh_socket is not None and self.mesh_listen is not None:
            raise ValueError("give mesh_socket or mesh_listen, not both: the Mesh service has one listener")
        if self.agent is not None:
            advertised_host(self.listen.rpartition(":")[0], self.advertise)  # no wildcard reaches the registry
        check_whole("lease_ttl_s", self.lease_ttl_s, 2, 3600, "seconds")
        check_whole("max_held_calls", self.max_held_calls, 1, 100_000)
        check_whole("max_input_bytes", self.max_input_bytes, 1, 2**31 - 1, "bytes")
        check_whole("max_call_depth", self.max_call_depth, 1, 1000)
        for capability, limit in self.limits:
            check_whole(f"the input limit of {capability!r}", limit, 1, 2**31 - 1, "bytes")
        if self.metrics_listen is not None:
            parse_listen(self.metrics_listen)  # raises, saying what is wrong
        if self.health_listen is not None:
            parse_health_listen(self.health_listen)
        check_seconds("health_interval_s", self.health_interval_s, 0.05, 3600)
        check_seconds("agent_wait_s", self.agent_wait_s, 0, 86400)
        if self.output_classifier is not None:
            load_classifier(self.output_classifier)  # raises, saying what is wrong


def _forward_metadata(
    context: grpc.aio.ServicerContext[Any, Any], caller: str | None, handle: str | None = None
) -> grpc.aio.Metadata:
    """The caller's metadata for the agent, minus the token and the headers only the sidecar sets, plus the
    verified caller and the call handle. A grpc.aio.Metadata, which gRPC takes as is (a list it copies)."""
    md = grpc.aio.Metadata()
    for k, v in context.invocation_metadata() or ():
        if k not in _DROP_METADATA and not k.startswith("grpc-"):
            md.add(k, v)
    if caller is not None:
        md.add(_CALLER_KEY, caller)
    if handle is not None:
        md.add(CALL_HANDLE_KEY, handle)
    return md


def _stream_chunk(capability: str, raw: bytes) -> agent_pb2.InvokeChunk:
    """One chunk of the agent's InvokeStream answer, decoded; bytes that are not an InvokeChunk are the agent's
    bad output (as `OutputCheck.check_response` says of a unary answer), never the caller's UNKNOWN."""
    try:
        return agent_pb2.InvokeChunk.FromString(raw)
    except DecodeError:
        raise InvalidOutputError(
            f"the agent's stream for {capability!r} sent a chunk that is not an InvokeChunk message",
            metadata={"capability": capability[:128]},
        ) from None


_PIN_NOT_HELD = ("the queue delivers a held call to any agent serving the capability, so the pin would not hold; "
                 "send it pinned without queue_for_ms, or queued without agent")


def _agent_pin(req: agent_pb2.InvokeRequest) -> str:
    """A local call's `InvokeRequest.agent` ("": unpinned), checked as `CallOptions.agent` is (the same name rule;
    not with queue_for_ms): InvalidInputError naming the field, before anything is sent or held."""
    agent = req.agent
    if not agent:
        return ""
    try:
        validate_name(agent, "agent")
    except ValueError as exc:
        raise InvalidInputError(str(exc), field_violations={"agent": str(exc)}) from None
    if req.queue_for_ms:
        raise InvalidInputError(f"agent {agent!r} cannot be combined with queue_for_ms: {_PIN_NOT_HELD}",
                                field_violations={"agent": f"not with queue_for_ms: {_PIN_NOT_HELD}"})
    return agent


_MARGIN_SHARE = 0.05
_MARGIN_MIN_S = 0.02
_MARGIN_MAX_S = 0.25


def _onward_timeout(remaining: float | None) -> float | None:
    """The deadline a local caller's call goes on with: its own (remaining; None: none) less a margin, so the mesh's
    DEADLINE_EXCEEDED (its message naming the agent and the deadline, its ErrorInfo) is back before the caller's own
    timer fires. Sent on with the caller's whole deadline, the two raced and the caller's won: it got gRPC's bare
    client-side "Deadline Exceeded", no ErrorInfo. The margin is 5% of the time left (the error's way back grows with
    a busy host, not with the deadline, but a long call can spare more), at least 20 ms (the way back over loopback
    through two event loops) and at most 250 ms (the queue's margin for its answer, `queue_rpc`: more only takes
    time from the call); never over a quarter of the time left, so a very short deadline keeps most of itself. No
    deadline, no margin: the capability's timeouts policy (or none) applies, as without a sidecar."""
    if remaining is None:
        return None
    return remaining - min(max(remaining * _MARGIN_SHARE, _MARGIN_MIN_S), _MARGIN_MAX_S, remaining / 4)


async def _relay_error(
    context: grpc.aio.ServicerContext[Any, Any], exc: grpc.aio.AioRpcError,
    gone: Callable[[grpc.aio.AioRpcError], HivemeshError],
) -> None:
    """Pass the agent's own status through: a failure of the connection to it (UNAVAILABLE without trailers:
    gRPC's, not the agent's) becomes AGENT_UNAVAILABLE, in gone's words (`Sidecar._agent_gone`); the agent's own
    failure with no details (an agent in another language answering a plain INTERNAL, or a handler that threw)
    becomes AGENT_ERROR with its code and message (`agents_own`), which a caller reads as the agent's, not as a
    reason the mesh decided; anything else goes on unchanged."""
    trailing = tuple(exc.trailing_metadata() or ())
    if exc.code() == grpc.StatusCode.UNAVAILABLE and not trailing:
        await abort(context, gone(exc))
    own = agents_own(exc.code(), exc.details() or "", trailing)
    if own is not None:  # the agent's other trailers go on with it
        status = to_status(own)
        await context.abort(status.code, status.details, (*status.trailing_metadata, *trailing))
    # grpc.aio's abort takes a tuple of pairs, not the Metadata object the client side hands out.
    await context.abort(exc.code(), exc.details() or "", trailing)


class Sidecar:
    """One sidecar process's worth of work; `async with Sidecar(config, settings):` or start/stop."""

    def __init__(
        self,
        config: SidecarConfig,
        settings: MeshSettings | None = None,
        *,
        observers: Sequence[DecisionObserver] = (),
    ) -> None:
        self.config = config
        self.observers = tuple(observers)
        self.settings = settings or MeshSettings.resolve()
        self.instance_id = config.instance_id or default_instance_id()
        self.node: MeshNode | None = None
        self.card: agent_pb2.AgentCard | None = None
        self._agent_channel: grpc.aio.Channel | None = None
        self._inbound: FrontDoor | None = None
        self._link: LinkServer | None = None
        self._direct: DirectLinkListener | None = None
        """Agent.Link on the inbound port: callers' frames, each through the inbound chain."""
        self._mesh_link: LinkServer | None = None
        """Mesh.Link on the local Mesh service: the local caller's frames, each a Mesh.Call."""
        self._agent_link: LinkedInvoke | None = None
        """Calls to the agent as frames on its Agent.Link (unary once it answers UNIMPLEMENTED)."""
        self._mesh: ManagedServer | None = None
        self._registration: Registration | None = None
        self.health = NodeHealth(config.health_listen, config.health_interval_s)
        """Whether this sidecar can do its job, as its health services say (and its plaintext health port)."""
        self._hop_bytes = b""
        self._outputs = OutputCheck(())
        """The card's output schemas, checked on the agent's relayed answers."""
        self._handles: dict[str, _HandleEntry] = {}
        """Call handle → the verified token and the request of the inbound call it names, while in flight."""
        self._own_chain = b""
        """The bytes that add this agent to an onward request's call chain (the common case, built once)."""
        self._own_entry = b""
        """This agent as a `CallContext.chain` entry, for an onward request with a context of its own."""
        self.audit: AuditLog | None = None
        self.token_budgets: TokenBudgets | None = None
        """The token budgets the inbound chain enforces once started (the `budgets` policies)."""
        self.port = 0
        self.mesh_port = 0
        """The `Mesh` service's TCP port, only with mesh_listen (0 on the default Unix socket)."""
        self.mesh_socket: Path | None = None
        """The `Mesh` service's Unix socket (None with mesh_listen)."""
        self.queue: SidecarQueue | None = None
        """Local callers' held calls (`queue_for_ms`), delivered by this sidecar."""

    @property
    def endpoint(self) -> str:
        """The advertised host:port (registry, hops); the bound port."""
        return join_host_port(advertised_host(self.config.listen.rpartition(":")[0], self.config.advertise),
                              self.port)

    @property
    def link_endpoint(self) -> str:
        """The advertised host:port of this sidecar's direct links ("": it serves none)."""
        if self._direct is None:
            return ""
        return join_host_port(advertised_host(self.config.listen.rpartition(":")[0], self.config.advertise),
                              self._direct.port)

    @property
    def mesh_endpoint(self) -> str:
        """Where the agent dials the `Mesh` service: `unix:PATH` (default) or loopback host:port."""
        if self.mesh_socket is not None:
            return f"unix:{self.mesh_socket}"
        return f"{(self.config.mesh_listen or '').rpartition(':')[0]}:{self.mesh_port}"

    async def _describe_agent(self) -> agent_pb2.AgentCard:
        assert self._agent_channel is not None
        stub = agent_pb2_grpc.AgentStub(self._agent_channel)
        deadline = time.monotonic() + self.config.agent_wait_s
        while True:
            try:
                return await stub.Describe(agent_pb2.DescribeRequest(), timeout=2.0, wait_for_ready=True)
            except grpc.aio.AioRpcError as exc:
                if time.monotonic() >= deadline:
                    raise AgentUnavailableError(
                        f"the agent at {self.config.agent} did not answer Describe within "
                        f"{self.config.agent_wait_s:.0f} s: {exc.details()}"
                    ) from None
                await asyncio.sleep(0.2)

    async def start(self) -> None:
        # Before the first gRPC connection (the agent's Describe, joining the mesh), caller-only or not: every
        # line gRPC's handshaker tracer writes before its tee is in place reaches the log. A no-op when the tee
        # runs already (`hivemesh sidecar` starts it first thing) or when this process did not consent.
        await asyncio.to_thread(tracer_events().start)
        if self.config.client is not None:
            await self._start_client(self.config.client)
            return
        cfg = self.config
        assert cfg.agent is not None
        # The mesh's message limit (gRPC's default refused an agent's answers over 4 MiB) and stream window (as
        # on every mesh channel: one Agent.Link stream carries all calls). No keepalive: the agent is on loopback
        # (the health checks watch it), and its server's ping policy is its own: one stricter than the pings
        # sent would end an idle link with GOAWAY.
        self._agent_channel = grpc.aio.insecure_channel(cfg.agent, options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            *STREAM_WINDOW_OPTIONS,
        ])
        try:
            self.card = await self._describe_agent()
            name = cfg.name or self.card.name
            if cfg.name and self.card.name and cfg.name != self.card.name:
                raise InvalidInputError(f"--name {cfg.name} differs from the agent card's name {self.card.name}")
            if not self.card.capabilities:
                raise InvalidInputError(f"the agent at {cfg.agent} declares no capabilities")
            # Before joining: a schema in an unknown dialect refuses the card (SchemaError names the capability).
            for cap in self.card.capabilities:
                compile_schema(cap.input_schema, where=f"capability {cap.name} input")
            self._outputs = OutputCheck(self.card.capabilities)
            listen = metrics_listen(cfg.metrics_listen, OWNED_DEFAULT)
            self.node = MeshNode(
                self.settings, name=name, kind="agent", verify_inbound=True, instance_id=self.instance_id,
                metrics=None if listen is None else NodeMetrics(
                    packaging="sidecar", node=f"{name}/{self.instance_id}", listen=listen),
                link=cfg.link,
            )
            await self.node.start()
            front = open_front_door(
                self.node,
                capabilities=self.card.capabilities,
                agent_name=name,
                instance_id=self.instance_id,
                max_input_bytes=cfg.max_input_bytes,
                limits=dict(cfg.limits),
                screen=DEFAULT_SCREEN if cfg.content_screen else None,
                screen_exempt=cfg.screen_exempt,
                max_call_depth=cfg.max_call_depth,
                audit=cfg.audit,
                audit_dir=cfg.audit_dir,
                observers=self.observers,
                readiness=self.health.readiness,
                output_classifier=resolve_classifier(cfg.output_classifier),
            )
            self.audit, inbound = front.audit, front.server
            self.token_budgets = front.budgets
            inbound.add_generic(self._agent_handler(front.inbound))
            self.port = inbound.add_secure_port(cfg.listen, self.node.server_credentials(), SIDECAR_INBOUND)
            self._hop_bytes = hop_suffix(
                agent_pb2.Hop(
                    kind="sidecar", identity=self.node.workload.spiffe_id, instance=self.instance_id,
                    endpoint=self.endpoint,
                )
            )
            self._inbound = front
            mesh = self._bind_mesh()
            await front.start(cfg.listen.rpartition(":")[0], self.port)
            if self._link is not None and direct_enabled(cfg.link_direct):
                self._direct = await open_direct_listener(self._link, self.node,
                                                          cfg.listen.rpartition(":")[0].strip("[]"), front.audit)
            await self._open_queue()
            await mesh.start()
            self._mesh = mesh
            instance = mesh_pb2.AgentInstance(
                card=self.card,
                instance_id=self.instance_id,
                endpoint=self.endpoint,
                link_endpoint=self.link_endpoint,
                identity=self.node.workload.spiffe_id,
                packaging="sidecar",
                labels={**dict(self.card.labels), **cert_labels(self.node.workload)},
            )
            self._registration = Registration(self.node.etcd, instance, ttl_s=cfg.lease_ttl_s)
            await self._registration.start()
            if front.fence is not None:
                front.fence.follow(self._registration.fence_problem)
            self.health.follow(self.node, self._registration)
            self.health.watch_agent(self._agent_channel, cfg.agent)
            await self.health.open([AGENT_SERVICE])
        except BaseException:
            await self.stop()
            raise
        log.info("sidecar for %s: inbound %s (mTLS), agent %s, Mesh for local callers on %s",
                 self.card.name, self.endpoint, cfg.agent, self.mesh_endpoint)

    def _bind_mesh(self) -> ManagedServer:
        """The `Mesh` service for local callers, bound (not started) to the private socket or loopback TCP."""
        assert self.node is not None
        cfg = self.config
        mesh = ManagedServer(services=[MESH_SERVICE], readiness=self.health.readiness)
        self._own_chain = chain_suffix([str(self.node.workload.spiffe_id)])
        self._own_entry = chain_entries([str(self.node.workload.spiffe_id)])
        self.queue = SidecarQueue(self.node, self._subject_token, self._chained, max_held=cfg.max_held_calls)
        mesh.add_generic(self._mesh_handler())
        if cfg.mesh_listen is not None:
            self.mesh_port = mesh.add_insecure_port(cfg.mesh_listen, SIDECAR_MESH)
            log.warning("the Mesh service listens on TCP %s: any local process can call the mesh as %s through "
                        "it; the default Unix socket admits only this user", self.mesh_endpoint,
                        self.node.workload.spiffe_id)
        else:
            path = Path(cfg.mesh_socket) if cfg.mesh_socket else default_socket_path(state_dir())
            bind_private_socket(mesh.server, path)
            self.mesh_socket = path.absolute()
        return mesh

    async def _open_queue(self) -> None:
        """Resume the held calls of this identity (a restarted sidecar delivers what its predecessor held)."""
        assert self.node is not None and self.queue is not None
        waiting = await self.queue.start()
        if waiting:
            log.info("resumed %d held call(s) of %s", waiting, self.node.workload.spiffe_id)

    async def _start_client(self, name: str) -> None:
        """Caller only: join as client `name` and serve `Mesh`; nothing inbound, nothing registered."""
        try:
            self.node = MeshNode(self.settings, name=name, kind="client", instance_id=self.instance_id,
                                 link=self.config.link)
            await self.node.start()
            if self.config.audit:
                # Refusals decided on the way out (no grant, circuit open) are audited as a MeshClient's are.
                self.audit = open_node_audit(self.node, spiffe_id=self.node.workload.spiffe_id,
                                             instance=self.instance_id, directory=self.config.audit_dir)
                self.node.outbound.observer = self.audit.outbound
                self.node.outbound.signed_recorder = self.audit.signed
                self.node.outbound.shadow.recorder = self.audit.record  # differing shadow answers
            mesh = self._bind_mesh()
            await self._open_queue()
            await mesh.start()
            self._mesh = mesh
            await self.health.open([MESH_SERVICE])
        except BaseException:
            await self.stop()
            raise
        log.info("caller-only sidecar for client %s: Mesh for local callers on %s", name, self.mesh_endpoint)

    @property
    def ready_line(self) -> str:
        """What `hivemesh sidecar` prints once serving: each port named for what it is (`inbound=` the mutual-TLS
        port the mesh calls the agent on, absent for a caller-only sidecar; `mesh=` the local Mesh service;
        `metrics=` the plaintext Prometheus port, or off; `health=` the plaintext health port, when on; `link=` the
        direct-link port, when it serves one)."""
        inbound = "" if self.config.client is not None else f" inbound={self.endpoint}"
        metrics = self.node.metrics if self.node is not None else None
        health = f" health={self.health.address}" if self.health.address is not None else ""
        link = f" link={self.link_endpoint}" if self.link_endpoint else ""
        return (f"sidecar ready{inbound} mesh={self.mesh_endpoint} "
                f"metrics={metrics.address if metrics is not None else 'off'}{health}{link}")

    async def stop(self, grace: float = 2.0) -> None:
        await self.health.drain()  # probes see NOT_SERVING before the entry goes and the ports drain
        if self._registration is not None:
            key = self._registration.key
            await self._registration.stop()
            self._registration = None
            if self.node is not None:
                await drain_after_deregistration(self.node, key)
        for link in (self._link, self._mesh_link):
            if link is not None:
                link.drain()  # open links end once answered, not after the whole grace
        async def stop_servers() -> None:
            for server in (self._inbound, self._mesh):
                if server is not None:
                    await server.stop(grace)

        # The direct port drains beside the gRPC ones: one grace for the stop, not one after the other.
        direct, self._direct = self._direct, None
        await asyncio.gather(*(() if direct is None else (direct.close(grace),)), stop_servers())
        self._inbound = self._mesh = None
        if self.queue is not None:
            await self.queue.stop()  # what is still held stays in etcd for the next sidecar of this identity
            self.queue = None
        if self.mesh_socket is not None:
            remove_socket(self.mesh_socket)
        if self.audit is not None:
            await self.audit.close()  # ships what it can (bounded), keeps the rest in the spool
            self.audit = None
        if self.node is not None:
            await self.node.stop()
        await self.health.close()
        if self._agent_link is not None:
            self._agent_link.close()
            self._agent_link = None
        if self._agent_channel is not None:
            await self._agent_channel.close()
            self._agent_channel = None

    async def __aenter__(self) -> Sidecar:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- delegation handles ----------------------------------------------------------------------------------
    def _open_handle(self, inbound: Inbound) -> str | None:
        """A fresh handle for the inbound call being forwarded (None when it carries no token); the forwarder
        forgets it (in its `finally`) as soon as the call ends, so a leaked handle is worthless afterwards.
        A plain try/finally at the call site, not a context manager: this runs on every forwarded call."""
        if inbound.claims is None:
            return None
        token = inbound.bearer()  # the token layer verified it for this very call
        handle = secrets.token_urlsafe(32)
        self._handles[handle] = (token, inbound.request)  # its chain is read only if the handle is used
        return handle

    def _handle_entry(self, handles: list[Any]) -> _HandleEntry | None:
        """The in-flight inbound call the handles sent with an agent's outbound call name (None without one)."""
        if not handles:
            return None
        if len(handles) > 1:
            raise CallHandleInvalidError(f"more than one {CALL_HANDLE_KEY} was sent; send the one of the call "
                                         "to act for")
        entry = self._handles.get(handles[0]) if isinstance(handles[0], str) else None
        if entry is None:
            raise CallHandleInvalidError()
        return entry

    def _subject_token(self, context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
        """The token an agent's outbound call acts for (its call handle's), None without a handle."""
        entry = self._handle_entry(read_local_metadata(context.invocation_metadata())[0])
        return None if entry is None else entry[0]

    def _onward(self, request: bytes, req: agent_pb2.InvokeRequest, entry: _HandleEntry | None) -> bytes:
        """The agent's onward request carrying the call chain (the one it sent, else the one of the inbound call
        its handle names) with this agent added, so the callee's loop guard sees A -> B -> A. The request keeps ONE
        `context` field: protobufjs (grpc-js agents) and other decoders keep only the last of two, losing the
        agent's idempotency key and ids. Without a context of the agent's (the common case) the chain is appended
        as encoded bytes; with one, only that context is re-encoded. Never the payload; req is not changed."""
        inbound = entry[1] if entry is not None and not req.context.chain else None
        if inbound is None or not inbound.context.chain:
            if not _has_field(req, "context"):
                return request + self._own_chain
            added = self._own_entry
        else:
            assert self.node is not None
            chain = [*inbound.context.chain, str(self.node.workload.spiffe_id)]
            if not _has_field(req, "context"):
                return request + chain_suffix(chain)
            added = chain_entries(chain)
        return with_context(request, req.context.SerializeToString() + added)

    def _chained(
        self, request: bytes, req: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        """`_onward` for a call whose handle is read from its context (the queue's Enqueue). A pinned call is
        refused here, before it is held: the queue would deliver it to any agent."""
        if req.agent:
            raise InvalidInputError(f"Enqueue cannot hold a call pinned to agent {req.agent[:128]!r}: {_PIN_NOT_HELD}",
                                    field_violations={"agent": f"not with Enqueue: {_PIN_NOT_HELD}"})
        return self._onward(request, req, self._handle_entry(read_local_metadata(context.invocation_metadata())[0]))

    # --- inbound: mesh → agent, bytes unchanged -------------------------------------------------------------
    def _answer_refusal(self, capability: str, response: bytes) -> PayloadTooLargeError | None:
        """The PAYLOAD_TOO_LARGE the caller would get for this answer (None when it goes out): one the hop pushed
        past one message (gRPC's own refusal named neither capability nor limit), or, on a link, one whose answer
        frame does not fit. Decided here, under the chain, so the call's audit record is the refusal the caller
        gets; refused after it (by gRPC, or by the link server's own check), it was on record as answered."""
        if len(response) > MAX_MESSAGE_BYTES:
            return answer_too_large(capability, len(response), MAX_MESSAGE_BYTES)
        return None if self._link is None else self._link.answer_refusal(capability, response)

    def _forward_span(self, inbound: Inbound, method: str) -> tuple[tracing.Span, object]:
        """The span of one forward to the agent (a client call over loopback), current until finished."""
        req = inbound.request
        return tracing.start(f"forward {req.capability if req is not None else method}", tracing.SpanKind.CLIENT,
                             tracing.rpc_attributes(
                                 tracing.AGENT_SERVICE, method, packaging="sidecar",
                                 capability=req.capability if req is not None else None,
                                 agent=self.card.name if self.card is not None else None, instance=self.instance_id,
                                 caller=None if inbound.peer is None else str(inbound.peer.spiffe_id)))

    def _agent_gone(
        self, exc: grpc.aio.AioRpcError, req: agent_pb2.InvokeRequest | None, streamed: int | None = None
    ) -> AgentUnavailableError:
        """The AGENT_UNAVAILABLE of a call whose connection to this sidecar's agent failed (exc), naming the agent
        and this instance (as the caller knows them: the agent's loopback address is only in gRPC's words after),
        and telling apart what the caller must: could not connect (nothing ran; ErrorInfo `may_have_run` "false",
        which a caller's mesh fails over as never sent) from a connection that broke after the call left (it may
        have run: `went_away`'s words, with when sending it again is safe; "true"). A caller's mesh passes either
        on as it is (it has a reason). streamed: the chunks a stream had relayed (None: not a stream)."""
        capability = req.capability if req is not None else ""
        identity = str(self.node.workload.spiffe_id) if self.node is not None else ""
        name = (self.card.name if self.card is not None else "") or self.config.name or identity
        metadata = {"capability": capability[:128], "agent": identity, "instance": self.instance_id}
        if connect_failed(exc):
            return AgentUnavailableError(
                f"agent {name} (instance {self.instance_id}) cannot be reached by its sidecar (its process is not "
                f"running or not listening): the call to {capability!r} reached no agent, so nothing ran and sending "
                f"it again is safe (gRPC: {exc.details() or ''})", metadata={**metadata, MAY_HAVE_RUN: "false"})
        declared = [c for c in self.card.capabilities if c.name == capability] if self.card is not None else []
        resend = resend_advice(capability, idempotent=bool(declared) and declared[0].idempotent,
                               keyed=req is not None and bool(req.context.idempotency_key), streamed=streamed)
        return AgentUnavailableError(
            gone_message(name, self.instance_id, capability, resend=resend, streamed=streamed,
                         said=exc.details() or "", broke="its connection to its sidecar broke"),
            metadata={**metadata, MAY_HAVE_RUN: "true"})

    def _agent_handler(self, interceptor: grpc.aio.ServerInterceptor | None) -> grpc.GenericRpcHandler:
        """The Agent service in front of the agent; interceptor (the chain's) serves Link, when on, per call."""
        assert self._agent_channel is not None
        channel = self._agent_channel
        handles = self._handles
        outputs = self._outputs
        unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/hivemesh.v1.Agent/Invoke")
        invoke: Callable[..., Awaitable[bytes]] = unary
        if self.node is not None and self.node.link:
            # An agent that serves Agent.Link gets its calls as frames on one stream (an agent in any language
            # may; the SDK's does); one that answers UNIMPLEMENTED gets unary calls from then on.
            invoke = self._agent_link = LinkedInvoke(channel, unary)
        invoke_stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
            "/hivemesh.v1.Agent/InvokeStream"
        )

        def caller_of(inbound: Inbound) -> str | None:
            return None if inbound.peer is None else str(inbound.peer.spiffe_id)

        async def describe(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            assert self.card is not None
            return self.card.SerializeToString()

        async def forward(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            inbound = inbound_call(context)  # what the inbound chain established about this call
            handle = self._open_handle(inbound)
            metadata: Any = _forward_metadata(context, caller_of(inbound), handle)
            span = None if tracing.TRACER is None else self._forward_span(inbound, "Invoke")
            if span is not None:
                metadata = tracing.with_headers(metadata)  # the agent's parent is this forward
            code = grpc.StatusCode.OK
            try:
                raw: bytes = await invoke(request, timeout=context.time_remaining(), metadata=metadata)
                if span is not None:
                    tracing.note_response_usage(span[0], raw)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                await _relay_error(context, exc, lambda e: self._agent_gone(e, inbound.request))
            finally:
                if handle is not None:
                    del handles[handle]
                if span is not None:
                    tracing.finish(span, None, code)
            capability = inbound.request.capability if inbound.request is not None else ""
            if outputs.declared(capability):  # decoded only when there is a schema to check
                try:
                    outputs.check_response(capability, raw)
                except HivemeshError as err:
                    note_refusal(inbound, err)
                    await abort(context, err)
            response = raw + self._hop_bytes
            refused = self._answer_refusal(capability, response)
            if refused is not None:
                note_refusal(inbound, refused)
                await abort(context, refused)
            return response

        async def forward_stream(
            request: bytes, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[bytes]:
            inbound = inbound_call(context)  # what the inbound chain established about this call
            handle = self._open_handle(inbound)
            try:
                metadata: Any = _forward_metadata(context, caller_of(inbound), handle)
                if tracing.TRACER is not None:  # the server span is current: the agent's parent
                    metadata = tracing.with_headers(metadata)
                call = invoke_stream(request, timeout=context.time_remaining(), metadata=metadata)
                capability = inbound.request.capability if inbound.request is not None else ""
                checked = outputs.declares_items(capability)
                relayed = 0
                try:
                    # The agent's framing is enforced, not trusted: every chunk an InvokeChunk, nothing relayed
                    # after the first final one (the agent's call is cancelled then), and a stream that ends
                    # without one refused, not passed on as a silently truncated answer.
                    async for chunk in call:
                        decoded = _stream_chunk(capability, chunk)
                        if checked:
                            outputs.check_chunk(capability, decoded)  # each item, before it is relayed
                        if not decoded.final:
                            yield chunk
                            relayed += 1
                            continue
                        # Only the final chunk carries hops; appending to it keeps every other chunk untouched.
                        if tracing.TRACER is not None:  # the stream's server span is current
                            tracing.note_usage(tracing.current(), decoded.usage)
                        final = chunk + self._hop_bytes
                        if len(final) > MAX_MESSAGE_BYTES:
                            # The hop pushed the agent's final chunk past one message: refused here, under the
                            # chain, it is on record as the refusal; gRPC's own, after it, named nothing.
                            raise answer_too_large(capability, len(final), MAX_MESSAGE_BYTES,
                                                   on=" in its final stream chunk", streamed=True)
                        inbound.final_sent = True
                        yield final
                        break
                    else:
                        raise InvalidOutputError(
                            f"the agent's stream for {capability!r} ended without a final chunk",
                            metadata={"capability": capability[:128]},
                        )
                except grpc.aio.AioRpcError as exc:
                    await _relay_error(context, exc, lambda e: self._agent_gone(e, inbound.request, relayed))
                except HivemeshError as err:
                    note_refusal(inbound, err)
                    await abort(context, err)
                finally:
                    call.cancel()
            finally:
                if handle is not None:
                    del handles[handle]

        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "Describe": grpc.unary_unary_rpc_method_handler(describe),
            "Invoke": grpc.unary_unary_rpc_method_handler(forward),
            "InvokeStream": grpc.unary_stream_rpc_method_handler(forward_stream),
        }
        if interceptor is not None and self.node is not None and self.node.link:
            self._link = LinkServer(interceptor, handlers["Invoke"])  # each frame: the chain, then forward
            handlers["Link"] = link_handler(self._link)
        return grpc.method_handlers_generic_handler(AGENT_SERVICE, handlers)

    # --- outbound: the agent's calls by capability name -----------------------------------------------------
    def _mesh_handler(self) -> grpc.GenericRpcHandler:
        def decoded(request: bytes) -> agent_pb2.InvokeRequest:
            try:
                return agent_pb2.InvokeRequest.FromString(request)
            except Exception:  # noqa: BLE001 - any decode failure is the caller's bad input
                raise InvalidInputError("the request is not a valid hivemesh.v1.InvokeRequest message") from None

        async def call(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            assert self.node is not None
            try:
                req = decoded(request)
                if tracing.TRACER is not None:
                    tracing.set_attributes({"hivemesh.capability": req.capability})
                queue_for = queue_for_s(req)
                agent = _agent_pin(req)
                handles, trace = read_local_metadata(context.invocation_metadata())  # one pass for both
                entry = self._handle_entry(handles)
                reset = on_behalf_of.set(None if entry is None else entry[0])  # None: the sidecar's own token
                request = self._onward(request, req, entry)
                try:
                    # No decoded request handed on: req lacks the chain just appended; a policy needing a field
                    # decodes the onward bytes (lazily, once).
                    raw, _ = await self.node.outbound.invoke(
                        request, capability=req.capability, idempotency_key=req.context.idempotency_key,
                        timeout=_onward_timeout(context.time_remaining()), metadata=trace, agent=agent,
                    )
                except NOT_QUEUEABLE:
                    if not queue_for or self.queue is None:
                        raise
                    raw = await self.queue.hold_and_wait(request, queue_for, context)
                finally:
                    on_behalf_of.reset(reset)
            except HivemeshError as err:
                if tracing.TRACER is not None:
                    tracing.mark_error(tracing.current(), err)
                await abort(context, err)
            return raw

        async def call_stream(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
            assert self.node is not None
            try:
                req = decoded(request)
                capability = req.capability
                agent = _agent_pin(req)
                handles, trace = read_local_metadata(context.invocation_metadata())
                entry = self._handle_entry(handles)
                on_behalf_of.set(None if entry is None else entry[0])  # this RPC's own task context; None: own token
                request = self._onward(request, req, entry)
                # aclosing: a local caller that goes away ends the onward stream now, not when it is collected.
                async with contextlib.aclosing(self.node.outbound.invoke_stream(
                    request, capability=capability, timeout=_onward_timeout(context.time_remaining()),
                    metadata=trace, agent=agent,
                )) as chunks:
                    async for raw, _ in chunks:
                        yield raw
            except HivemeshError as err:
                await abort(context, err)

        async def call_batch(
            request: mesh_pb2.CallBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
        ) -> mesh_pb2.CallBatchResponse:
            assert self.node is not None
            node = self.node
            # Refusals of the whole batch (its bounds, its call handle) get their own status, as Mesh.Call's do.
            try:
                concurrency = batch.check_bounds(len(request.items), request.concurrency)
                handles, metadata = read_local_metadata(context.invocation_metadata())
                entry = self._handle_entry(handles)
            except HivemeshError as err:
                await abort(context, err)
            on_behalf_of.set(None if entry is None else entry[0])  # this RPC's own task context; None: own token

            async def one(i: int) -> bytes:
                item = request.items[i]
                agent = _agent_pin(item)  # a bad pin is this item's INVALID_ARGUMENT, not the batch's
                raw, _ = await node.outbound.invoke(
                    self._onward(item.SerializeToString(), item, entry), capability=item.capability,
                    idempotency_key=item.context.idempotency_key, timeout=_onward_timeout(context.time_remaining()),
                    metadata=metadata, agent=agent,
                )
                return raw

            # Answers are bounded together (one response message): once full, the rest are refused, not started.
            outcomes = await batch.run_items(len(request.items), concurrency, one, size=batch.result_size)
            return batch.response(outcomes)

        async def list_capabilities(
            request: mesh_pb2.ListCapabilitiesRequest, context: grpc.aio.ServicerContext[Any, Any]
        ) -> mesh_pb2.ListCapabilitiesResponse:
            assert self.node is not None
            entries = [
                mesh_pb2.CapabilityEntry(capability=c.capability, agents=list(c.agents), instances=c.instances)
                for c in self.node.registry.capabilities()
                if not request.tag or request.tag in c.capability.tags
            ]
            return mesh_pb2.ListCapabilitiesResponse(capabilities=entries)

        async def resolve(
            request: mesh_pb2.ResolveRequest, context: grpc.aio.ServicerContext[Any, Any]
        ) -> mesh_pb2.ResolveResponse:
            assert self.node is not None
            return mesh_pb2.ResolveResponse(instances=list(self.node.registry.instances(request.capability)))

        if tracing.TRACER is not None:  # the node started (and configured tracing) before this is built
            # The agent's traceparent parents the server span, so its outbound call continues its trace.
            call = tracing.server_unary(call, MESH_SERVICE, "Call", "sidecar")
            call_stream = tracing.server_stream(call_stream, MESH_SERVICE, "CallStream", "sidecar")
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
                "Call": grpc.unary_unary_rpc_method_handler(call),
                "CallStream": grpc.unary_stream_rpc_method_handler(call_stream),
                "CallBatch": grpc.unary_unary_rpc_method_handler(
                    call_batch,
                    request_deserializer=mesh_pb2.CallBatchRequest.FromString,
                    response_serializer=mesh_pb2.CallBatchResponse.SerializeToString,
                ),
                **(self.queue.handlers() if self.queue is not None else {}),
                "ListCapabilities": grpc.unary_unary_rpc_method_handler(
                    list_capabilities,
                    request_deserializer=mesh_pb2.ListCapabilitiesRequest.FromString,
                    response_serializer=mesh_pb2.ListCapabilitiesResponse.SerializeToString,
                ),
                "Resolve": grpc.unary_unary_rpc_method_handler(
                    resolve,
                    request_deserializer=mesh_pb2.ResolveRequest.FromString,
                    response_serializer=mesh_pb2.ResolveResponse.SerializeToString,
                ),
        }
        if self.node is not None and self.node.link:
            # Each frame is one Mesh.Call, through exactly Call's handler (tracing, queueing, errors included).
            self._mesh_link = LinkServer(None, handlers["Call"], path=f"/{MESH_SERVICE}/Call")
            handlers["Link"] = link_handler(self._mesh_link)
        return grpc.method_handlers_generic_handler(MESH_SERVICE, handlers)


async def run_sidecar(config: SidecarConfig, settings: MeshSettings | None = None) -> None:
    """Run a sidecar until SIGINT/SIGTERM (what `hivemesh sidecar` does)."""
    sidecar = Sidecar(config, settings)
    await sidecar.start()
    # Everything built so far (modules, the node, channels, compiled policies) lives as long as the process:
    # move it out of the collector's generations, so the full collections that call garbage triggers do not
    # walk the whole start-up heap again and again. Only the collector's bookkeeping changes.
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(sidecar.ready_line, flush=True)  # noqa: T201
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await sidecar.stop()


__all__ = ["CALL_HANDLE_KEY", "Sidecar", "SidecarConfig", "run_sidecar"]

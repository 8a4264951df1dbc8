"""Building and stopping gRPC servers the hivemesh way: health and reflection always on, graceful drain."""

from __future__ import annotations

import errno
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from hivemesh.mesh.decode_guard import DecodeGuard
from hivemesh.mesh.inbound import MeshInboundInterceptor
from hivemesh.mesh.readiness import Readiness
from hivemesh.mesh.reflection import enable_reflection
from hivemesh.mesh.tls import MAX_MESSAGE_BYTES, SERVER_PING_OPTIONS, STREAM_WINDOW_OPTIONS

MAX_METADATA_BYTES: Final = 128 * 1024
"""Request metadata every mesh server accepts (all headers together). gRPC's default is a soft limit of 8 KiB
and a hard one of 16 KiB, and between them it refuses requests at random before any mesh code runs, so an
oversized token left no audit record. With the soft and hard limits equal and well above the token layer's own
bound (8 KiB, `hivemesh.mesh.tokens`), every token up to here reaches the token layer and is refused on record."""
METADATA_OPTIONS: Final[tuple[tuple[str, int], ...]] = (
    ("grpc.max_metadata_size", MAX_METADATA_BYTES),
    ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
)


@dataclass(frozen=True, slots=True)
class Listener:
    """One of the mesh's listeners as a failure to bind it names it: which it is, and where its user gives another
    address. gRPC says "Failed to bind to address ...; set GRPC_VERBOSITY=debug" (neither which server, nor why,
    nor what to do), and a port taken under prometheus-client's HTTP server a bare "[Errno 98] Address already in
    use"."""

    what: str
    """Which listener: "the control plane's join port" ("": the caller's own message says it)."""
    port_choice: str
    """Where another port is given: a flag, a config field, an environment variable."""
    host_choice: str
    """Where another host is given."""
    any_port: str = "port 0"
    """How any free port is asked for there."""


def _one_flag(what: str, *choices: str) -> Listener:
    """A listener whose host and port are given together (HOST:PORT), in any of choices."""
    where = ", ".join(choices)
    return Listener(what, where, where)


_HEALTH_ENV = "$HIVEMESH_HEALTH_LISTEN"
_METRICS_ENV = "$HIVEMESH_METRICS_LISTEN"
SDK_AGENT: Final = Listener("", "AgentServerConfig(port=...)", "AgentServerConfig(host=...), $HIVEMESH_LISTEN",
                            "port=0")
"""An SDK agent's mutual-TLS port (`hivemesh.sdk.serve`): its message says "cannot listen on H:P" unnamed."""
SIDECAR_INBOUND: Final = _one_flag("the sidecar's inbound port", "hivemesh sidecar --listen HOST:PORT")
SIDECAR_MESH: Final = _one_flag("the sidecar's Mesh port", "hivemesh sidecar --mesh-listen HOST:PORT")
CONTROLPLANE_MAIN: Final = Listener("the control plane's mTLS port",
                                    "hivemesh controlplane --port, ControlPlaneConfig(port=...)",
                                    "hivemesh controlplane --host, ControlPlaneConfig(host=...)")
CONTROLPLANE_JOIN: Final = Listener("the control plane's join port",
                                    "hivemesh controlplane --join-port, ControlPlaneConfig(join_port=...)",
                                    "hivemesh controlplane --host, ControlPlaneConfig(host=...)")
NODE_HEALTH: Final = _one_flag("the health port", "hivemesh sidecar --health-listen HOST:PORT",
                               "AgentServerConfig(health_listen=...) of an SDK agent", _HEALTH_ENV)
"""The plaintext health port of a sidecar or an SDK agent (`hivemesh.mesh.node_health` does not say which)."""
CONTROLPLANE_HEALTH: Final = _one_flag("the control plane's health port", "hivemesh controlplane --health-listen "
                                       "HOST:PORT", "ControlPlaneConfig(health_listen=...)", _HEALTH_ENV)
METRICS: Final[Mapping[str, Listener]] = {
    "in-process": _one_flag("the agent's metrics port", "AgentServerConfig(metrics_listen=...)", _METRICS_ENV),
    "sidecar": _one_flag("the sidecar's metrics port", "hivemesh sidecar --metrics-listen HOST:PORT", _METRICS_ENV),
    "client": _one_flag("the MeshClient's metrics port", "MeshClient.create(metrics_listen=...)", _METRICS_ENV),
    "controlplane": _one_flag("the control plane's metrics port", "hivemesh controlplane --metrics-listen HOST:PORT",
                              "ControlPlaneConfig(metrics_listen=...)", _METRICS_ENV),
}
"""The metrics port of each packaging (`NodeMetrics(packaging=...)`; the control plane's)."""
ANY_LISTENER: Final = _one_flag("", "in the address given")
"""A listener no one named."""


class ListenError(OSError):
    """A listener that could not bind: errno as the system said it (EADDRINUSE, ...), and as text the message
    alone (the CLI prints `str()`, which for a plain OSError starts "[Errno 98]")."""

    def __str__(self) -> str:
        return self.strerror if self.strerror else super().__str__()


def split_address(address: str) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 as [addr]:port) -> (host without brackets, port); a port that is no number is -1."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else -1


def listen_failure(address: str, listener: Listener, *, cause: OSError | None = None, said: str = "") -> ListenError:
    """Why address cannot be listened on, worded for listener: cause when the system said it (a Python socket),
    else found by binding it here as gRPC does (SO_REUSEADDR, so a port held only by closed connections binds),
    since gRPC keeps the system's error to its log; said: what gRPC said, kept when the reason is another."""
    host, port = split_address(address)
    where = f"{address}{f' ({listener.what})' if listener.what else ''}"
    problem = cause
    if problem is None:
        try:
            found = socket.getaddrinfo(host, max(port, 0), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except (socket.gaierror, UnicodeError) as exc:
            problem = exc if isinstance(exc, socket.gaierror) else socket.gaierror(socket.EAI_NONAME, str(exc))
        else:
            for family, kind, proto, _name, sockaddr in found:
                with socket.socket(family, kind, proto) as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        probe.bind(sockaddr)
                    except OSError as exc:
                        problem = exc
                        break
    gave = f" (gRPC: {said})" if said else ""
    if isinstance(problem, socket.gaierror):
        return ListenError(errno.EADDRNOTAVAIL, f"cannot listen on {where}: the host {host!r} does not resolve "
                                                f"({problem.strerror}); give an address of this machine "
                                                f"({listener.host_choice})")
    code = problem.errno if problem is not None else None
    if code == errno.EADDRINUSE:
        return ListenError(code, f"cannot listen on {where}: port {port} is already in use by another process (or "
                                 f"another server in this one); choose another port ({listener.port_choice}), or "
                                 f"{listener.any_port} for any free one")
    if code == errno.EADDRNOTAVAIL:
        return ListenError(code, f"cannot listen on {where}: {host} is not an address of this machine; give one of "
                                 f"its addresses ({listener.host_choice})")
    if code == errno.EACCES:
        return ListenError(code, f"cannot listen on {where}: port {port} needs privileges this process does not "
                                 f"have; choose a port from 1024 up ({listener.port_choice}), or {listener.any_port} "
                                 "for any free one")
    if problem is None:  # it binds now: gRPC's reason was another, or passed
        return ListenError(errno.EIO, f"cannot listen on {where}{gave}")
    return ListenError(code or errno.EIO, f"cannot listen on {where}: {problem.strerror or problem}{gave}")


def bind_port(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None,
              listener: Listener) -> int:
    """Bind server to address (plaintext when credentials is None): the bound port, or a `ListenError` naming
    listener, the address, the cause and where to give another. The mesh's gRPC servers bind their TCP ports here
    (`ManagedServer`, the control plane's, the plaintext health port)."""
    try:
        port = (server.add_insecure_port(address) if credentials is None
                else server.add_secure_port(address, credentials))
    except (RuntimeError, OSError) as exc:
        raise listen_failure(address, listener, said=str(exc)) from None
    if port == 0:  # how gRPC said it before it raised
        raise listen_failure(address, listener, said="no port bound")
    return port


def server_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    """Every mesh gRPC server's options (`ManagedServer`, the control plane's): the message bound, one server per
    port (gRPC's SO_REUSEPORT let a second bind the same port and take half its connections), the metadata bound,
    the stream window, and the ping rate the mesh's own channels' keepalive needs."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
        *METADATA_OPTIONS,
        *STREAM_WINDOW_OPTIONS,
        *SERVER_PING_OPTIONS,
    ]


class ManagedServer:
    """A grpc.aio server plus its health servicer; `stop()` flips health to NOT_SERVING before draining. Its
    interceptors run after a `DecodeGuard` (undecodable requests refused INVALID_ARGUMENT); when one is the
    inbound chain's, the guard's refusals (health checking and reflection, which the chain passes by) are
    recorded through it, like the chain's own, with the sender's verified identity.

    Its health says what readiness decides: a node's own (shared by all its servers and its plaintext health
    port) or, when none is given, one that serves from `start()` to `stop()`."""

    def __init__(
        self,
        *,
        services: Sequence[str],
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        handlers: Sequence[grpc.GenericRpcHandler] = (),
        readiness: Readiness | None = None,
    ) -> None:
        inbound = next((i for i in interceptors if isinstance(i, MeshInboundInterceptor)), None)
        self.server = grpc.aio.server(
            # The decode guard first: a typed request that does not decode is INVALID_ARGUMENT (not UNKNOWN)
            # before any other interceptor sees it, and on the audit record when the inbound chain keeps one.
            interceptors=[DecodeGuard(inbound.record_refusal if inbound is not None else None), *interceptors],
            handlers=list(handlers) or None,
            options=server_options(max_message_bytes),
        )
        self.health = health.aio.HealthServicer()
        self._owns_readiness = readiness is None
        self.readiness = Readiness() if readiness is None else readiness
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._services = list(services)
        enable_reflection(self.server, self._services)
        self.port = 0

    def add_secure_port(self, address: str, creds: grpc.ServerCredentials, listener: Listener | None = None) -> int:
        """Bind address with TLS (`bind_port`); listener: what a failure names."""
        self.port = bind_port(self.server, address, creds, listener or ANY_LISTENER)
        return self.port

    def add_insecure_port(self, address: str, listener: Listener | None = None) -> int:
        """Plaintext, for loopback-only links (a sidecar to its own agent); never for mesh traffic."""
        host = address.rpartition(":")[0].strip("[]")
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"plaintext listeners are loopback-only; refusing {address}")
        return bind_port(self.server, address, None, listener or ANY_LISTENER)

    @property
    def services(self) -> tuple[str, ...]:
        """The services this server names to health and reflection (besides those two)."""
        return tuple(self._services)

    async def start(self) -> None:
        await self.readiness.attach(self.health, self._services)
        await self.server.start()
        if self._owns_readiness:
            await self.readiness.ready()

    async def stop(self, grace: float = 2.0) -> None:
        """Say NOT_SERVING first (so balancers stop sending), then let in-flight calls finish within grace."""
        await self.readiness.drain()
        await self.health.enter_graceful_shutdown()  # also when it never started (and so was never attached)
        await self.server.stop(grace)

    def add_generic(self, handler: Any) -> None:
        self.server.add_generic_rpc_handlers((handler,))

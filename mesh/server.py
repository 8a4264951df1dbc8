"""Building and stopping gRPC servers the hivemesh way: health and reflection always on, graceful drain."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from hivemesh.mesh.decode_guard import DecodeGuard
from hivemesh.mesh.inbound import MeshInboundInterceptor
from hivemesh.mesh.readiness import Readiness
from hivemesh.mesh.reflection import enable_reflection
from hivemesh.mesh.tls import MAX_MESSAGE_BYTES, STREAM_WINDOW_OPTIONS

MAX_METADATA_BYTES: Final = 128 * 1024
"""Request metadata every mesh server accepts (all headers together). gRPC's default is a soft limit of 8 KiB
and a hard one of 16 KiB, and between them it refuses requests at random before any mesh code runs, so an
oversized token left no audit record. With the soft and hard limits equal and well above the token layer's own
bound (8 KiB, `hivemesh.mesh.tokens`), every token up to here reaches the token layer and is refused on record."""
METADATA_OPTIONS: Final[tuple[tuple[str, int], ...]] = (
    ("grpc.max_metadata_size", MAX_METADATA_BYTES),
    ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
)


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
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.so_reuseport", 0),
                *METADATA_OPTIONS,
                *STREAM_WINDOW_OPTIONS,
            ],
        )
        self.health = health.aio.HealthServicer()
        self._owns_readiness = readiness is None
        self.readiness = Readiness() if readiness is None else readiness
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._services = list(services)
        enable_reflection(self.server, self._services)
        self.port = 0

    def add_secure_port(self, address: str, creds: grpc.ServerCredentials) -> int:
        self.port = self.server.add_secure_port(address, creds)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        return self.port

    def add_insecure_port(self, address: str) -> int:
        """Plaintext, for loopback-only links (a sidecar to its own agent); never for mesh traffic."""
        host = address.rpartition(":")[0].strip("[]")
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"plaintext listeners are loopback-only; refusing {address}")
        port = self.server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        return port

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

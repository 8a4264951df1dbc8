"""A plaintext port serving `grpc.health.v1` alone, on an address of its own (like Istio's status port).

Kubernetes' gRPC probes speak plaintext and carry no certificate: against a mutual-TLS port every probe is a
refused handshake, and every refusal an audit record. This port answers health and nothing else (no reflection,
no mesh service, no audit), with the same state as the node's mutual-TLS ports (one `Readiness`). Its one
interceptor is the `DecodeGuard`, so a probe that does not decode is INVALID_ARGUMENT, not UNKNOWN. It is off
unless asked: `--health-listen HOST:PORT` or $HIVEMESH_HEALTH_LISTEN.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Final

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from hivemesh.mesh.decode_guard import DecodeGuard
from hivemesh.mesh.readiness import Readiness
from hivemesh.mesh.server import NODE_HEALTH, Listener, bind_port

HEALTH_LISTEN_ENV: Final = "HIVEMESH_HEALTH_LISTEN"


def parse_health_listen(text: str) -> tuple[str, int] | None:
    """'HOST:PORT' (IPv6 as [addr]:port; port 0: a free one) -> (host, port); 'off' or '' -> None.
    Raises ValueError, saying what is wrong."""
    text = text.strip()
    if text in ("", "off", "none"):
        return None
    host, sep, port_s = text.rpartition(":")
    if not sep or not host or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"a health listen address is HOST:PORT (port 0: a free one) or 'off': {text!r}")
    return host, int(port_s)


def health_listen(given: str | None) -> str | None:
    """Where a node serves plaintext health: given (config or flag), else $HIVEMESH_HEALTH_LISTEN, else off.
    Validated here, so a mistake fails at start with the address in the message."""
    chosen = given if given is not None else os.environ.get(HEALTH_LISTEN_ENV)
    if chosen is None or parse_health_listen(chosen) is None:
        return None
    return chosen.strip()


class HealthPort:
    """One plaintext health listener; `start(readiness, services)`, `stop()`. listener: what a port that cannot
    be bound is named (a sidecar's or an SDK agent's, by default)."""

    def __init__(self, listen: str, listener: Listener = NODE_HEALTH) -> None:
        parsed = parse_health_listen(listen)
        if parsed is None:
            raise ValueError(f"the health port needs an address, not {listen!r}")
        self._host = parsed[0]
        self._listen = listen.strip()
        self._listener = listener
        # Unaudited by design (no observer). No SO_REUSEPORT (gRPC's default): with it, a second health port on
        # the same address bound too, and the kernel split the probes between two nodes.
        self.server = grpc.aio.server(interceptors=[DecodeGuard()], options=[("grpc.so_reuseport", 0)])
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = 0

    @property
    def address(self) -> str:
        """HOST:PORT it listens on (the port chosen, when 0 was asked)."""
        return f"{self._host}:{self.port}"

    async def start(self, readiness: Readiness, services: Sequence[str]) -> None:
        """Bind and serve, answering for "" and services as readiness decides."""
        self.port = bind_port(self.server, self._listen, None, self._listener)
        await readiness.attach(self.health, services)
        await self.server.start()

    async def stop(self, grace: float = 0.5) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

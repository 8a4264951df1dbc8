"""A ControlPlane servicer of a test's own, served as a control-plane replica is: over mutual TLS on 127.0.0.1 with
the control plane's certificate, so a real `ControlPlaneClient` talks to it unchanged."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from hivemesh.v1 import control_pb2_grpc


@contextlib.asynccontextmanager
async def serving_replica(certs: Path, servicer: control_pb2_grpc.ControlPlaneServicer) -> AsyncIterator[str]:
    """Serve servicer with the certificates `init_ca` wrote to certs; yields its address, stops it on exit."""
    server = grpc.aio.server()
    control_pb2_grpc.add_ControlPlaneServicer_to_server(servicer, server)
    creds = grpc.ssl_server_credentials(
        [((certs / "controlplane.key").read_bytes(), (certs / "controlplane.pem").read_bytes())],
        root_certificates=(certs / "ca.pem").read_bytes(), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)

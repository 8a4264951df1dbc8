"""A bare gRPC server with mutual TLS and nothing of the mesh, for reading what gRPC itself logs:
`python -m tests.support.tls_server_main CA_DIR`. Prints `port N` when it listens and serves until stdin closes."""

from __future__ import annotations

import sys
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from hivemesh.controlplane.ca import load_ca
from hivemesh.mesh.tls import server_credentials


def main() -> None:
    ca = load_ca(Path(sys.argv[1]))
    cert, key = ca.issue_with_new_key("spiffe://hivemesh.local/agent/bare", common_name="bare",
                                      dns_names=["bare.agent.hivemesh.local"], ttl_s=600)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(cert, key, ca.bundle_pem()))
    server.start()
    sys.stdout.write(f"port {port}\n")
    sys.stdout.flush()
    sys.stdin.read()  # until the test closes our stdin
    server.stop(None).wait(5)


if __name__ == "__main__":
    main()

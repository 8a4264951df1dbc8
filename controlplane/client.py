"""A typed asyncio client for the control plane's mTLS API (used by the CLI, sidecars and the SDK).

Every failed call raises the typed hivemesh error the server raised (`from_rpc_error`), so callers catch
`GrantDeniedError`, `PermissionDeniedError` and so on rather than inspecting status codes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from hivemesh.controlplane.ca import CaFiles
from hivemesh.mesh.errors import from_rpc_error
from hivemesh.mesh.pki import controlplane_dns_name, new_key_and_csr
from hivemesh.mesh.tls import Workload, load_workload_files, secure_channel
from hivemesh.v1 import control_pb2, control_pb2_grpc, mesh_pb2


class ControlPlaneClient:
    """Calls ControlPlane at address as `workload`, verifying the server as `controlplane.<trust_domain>`."""

    def __init__(
        self, address: str, workload: Workload, trust_domain: str | None = None, *, timeout_s: float = 10.0
    ) -> None:
        self.address = address
        self.workload = workload
        self.trust_domain = trust_domain or workload.trust_domain
        self.timeout_s = timeout_s
        self._channel = self._open(workload)
        self._stub = control_pb2_grpc.ControlPlaneStub(self._channel)

    @classmethod
    def from_certs_dir(
        cls, address: str, certs_dir: Path | str, *, identity: str = "operator"
    ) -> ControlPlaneClient:
        """A client using `<identity>.pem/.key` and `ca.pem` from certs_dir (the operator's CLI setup)."""
        d = Path(certs_dir)
        files = CaFiles.in_dir(d)
        workload = load_workload_files(d / f"{identity}.pem", d / f"{identity}.key", files.ca_cert)
        return cls(address, workload)

    def _open(self, workload: Workload) -> grpc.aio.Channel:
        return secure_channel(
            self.address, workload.channel_credentials(), server_name=controlplane_dns_name(self.trust_domain)
        )

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc

    async def issue_token(
        self, audience: str, scopes: Sequence[str] = (), ttl_s: int = 0
    ) -> control_pb2.IssueTokenResponse:
        """A capability token for audience (an agent SPIFFE id), bound to this client's certificate."""
        resp: control_pb2.IssueTokenResponse = await self._call(
            self._stub.IssueToken,
            control_pb2.IssueTokenRequest(audience=audience, scopes=list(scopes), ttl_seconds=ttl_s),
        )
        return resp

    async def create_join_token(
        self, name: str, kind: str = "agent", ttl_s: int = 0
    ) -> control_pb2.CreateJoinTokenResponse:
        """A one-time join token for a workload (operators only)."""
        resp: control_pb2.CreateJoinTokenResponse = await self._call(
            self._stub.CreateJoinToken,
            control_pb2.CreateJoinTokenRequest(name=name, kind=kind, ttl_seconds=ttl_s),
        )
        return resp

    async def list_agents(self) -> list[mesh_pb2.AgentInstance]:
        resp: control_pb2.ListAgentsResponse = await self._call(
            self._stub.ListAgents, control_pb2.ListAgentsRequest()
        )
        return list(resp.instances)

    async def get_jwks(self) -> str:
        resp: control_pb2.GetJwksResponse = await self._call(self._stub.GetJwks, control_pb2.GetJwksRequest())
        return resp.jwks_json

    async def renew(self) -> Workload:
        """A fresh key and certificate for this client's own identity; the client switches to it."""
        key_pem, csr_pem = new_key_and_csr(self.workload.spiffe_id)
        resp: control_pb2.SignCertificateResponse = await self._call(
            self._stub.RenewCertificate, control_pb2.SignCertificateRequest(csr_pem=csr_pem)
        )
        bundle = resp.ca_bundle_pem or self.workload.bundle_pem
        workload = Workload.from_pems(resp.certificate_pem, key_pem, bundle)
        old = self._channel
        self.workload = workload
        self._channel = self._open(workload)
        self._stub = control_pb2_grpc.ControlPlaneStub(self._channel)
        await old.close(grace=1.0)
        return workload

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> ControlPlaneClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

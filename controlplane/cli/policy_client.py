"""A typed asyncio client of the control plane's `Policies` service (what `hivemesh policy` and `hivemesh
status` use). Failed calls raise the typed hivemesh error the server raised."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.controlplane_errors import rpc_failure
from hivemesh.mesh.errors import InvalidInputError
from hivemesh.v1 import policy_pb2, policy_pb2_grpc


def document_to_proto(raw: Mapping[str, Any]) -> policy_pb2.Policy:
    """A parsed YAML/JSON document as the wire message (the server validates it; nothing is checked here)."""
    p = policy_pb2.Policy(
        kind=str(raw.get("kind", "")), name=str(raw.get("name", "")), description=str(raw.get("description", "")),
    )
    if "spec" in raw:
        p.spec_json = json.dumps(raw["spec"], default=str)
    version = raw.get("version")
    if isinstance(version, int) and not isinstance(version, bool):
        p.version = version
    return p


class PolicyClient:
    """Policies over the control-plane client's mutual-TLS channel (as its identity: the operator)."""

    def __init__(self, cp: ControlPlaneClient) -> None:
        self._cp = cp

    def _stub(self) -> policy_pb2_grpc.PoliciesStub:
        # The channel is replaced when the client renews its certificate: take the current one per call.
        return policy_pb2_grpc.PoliciesStub(self._cp.channel)

    async def _call(self, name: str, request: Any) -> Any:
        try:
            return await getattr(self._stub(), name)(request, timeout=self._cp.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise rpc_failure(exc, self._cp.address, timeout_s=self._cp.timeout_s) from exc

    async def apply(self, documents: Sequence[Mapping[str, Any]], *, dry_run: bool = False
                    ) -> policy_pb2.ApplyPoliciesResponse:
        for i, d in enumerate(documents):
            if not isinstance(d, Mapping):
                where = f"documents[{i}]" if len(documents) > 1 else "document"
                raise InvalidInputError(f"{where}: a policy document must be a mapping with kind, name and spec",
                                        field_violations={where: "must be a mapping"})
        request = policy_pb2.ApplyPoliciesRequest(
            policies=[document_to_proto(d) for d in documents], dry_run=dry_run
        )
        resp: policy_pb2.ApplyPoliciesResponse = await self._call("ApplyPolicies", request)
        return resp

    async def get(self, kind: str, name: str) -> policy_pb2.Policy:
        resp: policy_pb2.Policy = await self._call("GetPolicy", policy_pb2.GetPolicyRequest(kind=kind, name=name))
        return resp

    async def list_policies(self, kind: str = "") -> list[policy_pb2.Policy]:
        resp: policy_pb2.ListPoliciesResponse = await self._call(
            "ListPolicies", policy_pb2.ListPoliciesRequest(kind=kind)
        )
        return list(resp.policies)

    async def delete(self, kind: str, name: str, *, version: int | None = None) -> int:
        req = policy_pb2.DeletePolicyRequest(kind=kind, name=name)
        if version is not None:
            req.version = version
        resp: policy_pb2.DeletePolicyResponse = await self._call("DeletePolicy", req)
        return resp.revision

    async def kinds(self) -> list[policy_pb2.PolicyKindInfo]:
        resp: policy_pb2.ListPolicyKindsResponse = await self._call(
            "ListPolicyKinds", policy_pb2.ListPolicyKindsRequest()
        )
        return list(resp.kinds)

    async def status(self) -> list[policy_pb2.NodeTraffic]:
        resp: policy_pb2.GetTrafficStatusResponse = await self._call(
            "GetTrafficStatus", policy_pb2.GetTrafficStatusRequest()
        )
        return list(resp.nodes)


"""The `Policies` service (protos/hivemesh/v1/policy.proto): the policy store and the traffic status over gRPC,
so operators manage policies from any language. Operators only: policies steer all traffic."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import grpc

from hivemesh.controlplane import json_text, rollouts
from hivemesh.controlplane import policies as store
from hivemesh.controlplane.server import _rpc
from hivemesh.mesh.errors import PermissionDeniedError
from hivemesh.mesh.policy import PolicyDoc
from hivemesh.mesh.resilience.kinds import ROLLOUTS
from hivemesh.mesh.status import read_status
from hivemesh.v1 import policy_pb2, policy_pb2_grpc

if TYPE_CHECKING:
    from hivemesh.controlplane.server import Core


def to_proto(doc: PolicyDoc) -> policy_pb2.Policy:
    return policy_pb2.Policy(
        kind=doc.kind, name=doc.name, description=doc.description,
        spec_json=json.dumps(doc.spec, sort_keys=True), version=doc.version,
    )


def _raw_document(p: policy_pb2.Policy, where: str) -> dict[str, Any]:
    """The proto as the raw document `validate_documents` checks (spec_json parsed here)."""
    spec = json_text.load(p.spec_json, f"{where}spec_json") if p.spec_json else None
    raw: dict[str, Any] = {"kind": p.kind, "name": p.name, "spec": spec}
    if p.description:
        raw["description"] = p.description
    if p.HasField("version"):
        raw["version"] = p.version
    return raw


class PoliciesServicer(policy_pb2_grpc.PoliciesServicer):
    def __init__(self, core: Core) -> None:
        self._core = core

    def _operator(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        peer = self._core.peer(context)
        if peer.spiffe_id.kind != "operator":
            raise PermissionDeniedError(f"only operators may manage policies; {peer.spiffe_id} is not one")

    @_rpc
    async def ApplyPolicies(
        self, request: policy_pb2.ApplyPoliciesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> policy_pb2.ApplyPoliciesResponse:
        self._operator(context)
        many = len(request.policies) > 1
        raws = [_raw_document(p, f"documents[{i}]." if many else "") for i, p in enumerate(request.policies)]
        result = await store.apply_policies(
            self._core.etcd, store.validate_documents(raws), dry_run=request.dry_run
        )
        return policy_pb2.ApplyPoliciesResponse(
            applied=[policy_pb2.AppliedPolicy(kind=a.kind, name=a.name, action=a.action, version=a.version)
                     for a in result.applied],
            revision=result.revision,
            dry_run=result.dry_run,
        )

    @_rpc
    async def GetPolicy(
        self, request: policy_pb2.GetPolicyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> policy_pb2.Policy:
        self._operator(context)
        return to_proto(await store.get_policy(self._core.etcd, request.kind, request.name))

    @_rpc
    async def ListPolicies(
        self, request: policy_pb2.ListPoliciesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> policy_pb2.ListPoliciesResponse:
        self._operator(context)
        docs = await store.list_policies(self._core.etcd, request.kind or None)
        return policy_pb2.ListPoliciesResponse(policies=[to_proto(d) for d in docs])

    @_rpc
    async def DeletePolicy(
        self, request: policy_pb2.DeletePolicyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> policy_pb2.DeletePolicyResponse:
        self._operator(context)
        version = request.version if request.HasField("version") else None
        if request.kind == ROLLOUTS.name:  # its state and target record go with it, in one transaction (its rule stays)
            revision = await rollouts.delete_rollout(self._core.etcd, request.name, expected_version=version)
        else:
            revision = await store.delete_policy(self._core.etcd, request.kind, request.name,
                                                 expected_version=version)
        return policy_pb2.DeletePolicyResponse(revision=revision)

    @_rpc
    async def ListPolicyKinds(
        self, request: policy_pb2.ListPolicyKindsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> policy_pb2.ListPolicyKindsResponse:
        self._operator(context)
        return policy_pb2.ListPolicyKindsResponse(kinds=[
            policy_pb2.PolicyKindInfo(name=k.name, description=k.description,
                                      spec_schema_json=json.dumps(k.spec_schema, sort_keys=True))
            for _n, k in sorted(store.KINDS.items())
        ])

    @_rpc
    async def GetTrafficStatus(
        self, request: policy_pb2.GetTrafficStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> policy_pb2.GetTrafficStatusResponse:
        self._operator(context)
        return policy_pb2.GetTrafficStatusResponse(nodes=await read_status(self._core.etcd, self._core.trust_domain))


def install(core: Core, server: grpc.aio.Server) -> None:
    """Serve Policies on the control plane's mutual-TLS port."""
    policy_pb2_grpc.add_PoliciesServicer_to_server(PoliciesServicer(core), server)

"""Signed payloads on the caller's side: sign the request of a capability whose card declares
`signed_payloads`, and verify the agent's answer signature against the certificate the mesh CA issued to that
agent (`hivemesh.mesh.signing`). Only such capabilities pay anything: the card is checked first."""

from __future__ import annotations

from hivemesh.mesh.errors import SignatureInvalidError
from hivemesh.mesh.outbound.call import Metadata, OutboundCall
from hivemesh.mesh.signing import (
    ANSWER,
    REQUEST,
    SIGNATURE_HEADER,
    Signer,
    answer_digest,
    audience,
    request_digest,
    verify,
)
from hivemesh.mesh.tls import Workload
from hivemesh.v1 import agent_pb2, mesh_pb2


def signs(instance: mesh_pb2.AgentInstance, capability: str) -> bool:
    """Does instance's card declare capability signed?"""
    for c in instance.card.capabilities:  # noqa: SIM110 - a loop, not any(<generator>): this runs on every call
        if c.name == capability and c.signed_payloads:
            return True
    return False


def _request_digest(call: OutboundCall, instance: mesh_pb2.AgentInstance) -> bytes:
    req = call.request()
    return request_digest(req.capability, req.content_type, req.input,
                          audience(instance.identity, instance.instance_id))


def sign_request(workload: Workload, call: OutboundCall, instance: mesh_pb2.AgentInstance,
                 metadata: Metadata) -> Metadata:
    """metadata with this attempt's request signature (each attempt gets a fresh nonce)."""
    jws = Signer(workload.key_pem, workload.cert_pem).sign(REQUEST, _request_digest(call, instance))
    return [*metadata, (SIGNATURE_HEADER, jws)]


def verify_answer(workload: Workload, call: OutboundCall, instance: mesh_pb2.AgentInstance, raw: bytes) -> None:
    """Raise SignatureInvalidError unless the answer is signed by instance's agent over this request."""
    try:
        resp = agent_pb2.InvokeResponse.FromString(raw)
    except Exception:  # noqa: BLE001 - any decode failure: the answer cannot be proven
        raise SignatureInvalidError("the signed capability's answer cannot be read") from None
    if not resp.signature:
        raise SignatureInvalidError(f"the answer of signed capability {call.capability!r} carries no signature")
    d = answer_digest(_request_digest(call, instance), resp.output, resp.content_type, int(resp.state))
    verify(resp.signature, ANSWER, d, expect_id=instance.identity, bundle_pem=workload.bundle_pem)


__all__ = ["sign_request", "signs", "verify_answer"]

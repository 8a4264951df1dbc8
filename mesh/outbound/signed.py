"""Signed payloads on the caller's side: sign the request of a capability whose card declares
`signed_payloads`, and verify the agent's answer signature against the certificate the mesh CA issued to that
agent (`hivemesh.mesh.signing`); a streamed answer is verified chunk by chunk into its running digest and at its
signed final chunk (`hivemesh.mesh.stream_signing`). What was verified becomes the caller's own audit record
(`Proof.record`): the request digest it signed, the answer digest and the agent's signature, so the agent cannot
later deny its answer. Only such capabilities pay anything: the card is checked first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hivemesh.mesh.errors import SignatureInvalidError
from hivemesh.mesh.outbound.call import Metadata, OutboundCall
from hivemesh.mesh.outbound.card_flags import capability_flags
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
from hivemesh.mesh.stream_signing import STREAM, StreamDigest
from hivemesh.mesh.tls import Workload
from hivemesh.v1 import agent_pb2, mesh_pb2


def signs(instance: mesh_pb2.AgentInstance, capability: str) -> bool:
    """Does instance's card declare capability signed?"""
    return capability_flags(instance, capability).signed


def _request_digest(call: OutboundCall, instance: mesh_pb2.AgentInstance) -> bytes:
    req = call.request()
    return request_digest(req.capability, req.content_type, req.input,
                          audience(instance.identity, instance.instance_id))


def sign_request(workload: Workload, call: OutboundCall, instance: mesh_pb2.AgentInstance,
                 metadata: Metadata) -> Metadata:
    """metadata with this attempt's request signature (each attempt gets a fresh nonce)."""
    jws = Signer(workload.key_pem, workload.cert_pem).sign(REQUEST, _request_digest(call, instance))
    return [*metadata, (SIGNATURE_HEADER, jws)]


@dataclass(frozen=True)
class Proof:
    """A verified signed call, as the caller keeps it: the digests and the agent's signature over its answer."""

    method: str
    capability: str
    instance: mesh_pb2.AgentInstance
    request: bytes
    answer: bytes
    signature: str
    chunks: int = 0

    def record(self) -> dict[str, Any]:
        """The caller's audit record of this call (the recorder adds time, node and instance)."""
        signed: dict[str, Any] = {"signer": self.instance.identity, "request": self.request.hex(),
                                  "answer": self.answer.hex(), "signature": self.signature}
        if self.method == "InvokeStream":
            signed["chunks"] = self.chunks
        return {"kind": "outbound", "method": self.method, "capability": self.capability[:128], "decision": "allow",
                "status": "OK", "reason": "", "callee": self.instance.identity,
                "callee_instance": self.instance.instance_id, "signed": signed}


def verify_answer(workload: Workload, call: OutboundCall, instance: mesh_pb2.AgentInstance, raw: bytes) -> Proof:
    """The proof of the answer; raises SignatureInvalidError unless instance's agent signed it over this request."""
    try:
        resp = agent_pb2.InvokeResponse.FromString(raw)
    except Exception:  # noqa: BLE001 - any decode failure: the answer cannot be proven
        raise SignatureInvalidError("the signed capability's answer cannot be read") from None
    if not resp.signature:
        raise SignatureInvalidError(f"the answer of signed capability {call.capability!r} carries no signature")
    req = _request_digest(call, instance)
    d = answer_digest(req, resp.output, resp.content_type, int(resp.state))
    verify(resp.signature, ANSWER, d, expect_id=instance.identity, bundle_pem=workload.bundle_pem)
    return Proof("Invoke", call.capability, instance, req, d, resp.signature)


class StreamCheck:
    """Verifies one signed stream as it arrives: `chunk` each one before it is handed on (the final one is
    refused unless its signature covers every chunk in order), `end` once the stream ended."""

    def __init__(self, workload: Workload, call: OutboundCall, instance: mesh_pb2.AgentInstance) -> None:
        self._workload = workload
        self._call = call
        self._instance = instance
        self._request = _request_digest(call, instance)
        self._running = StreamDigest(self._request)
        self.proof: Proof | None = None

    def chunk(self, raw: bytes) -> bool:
        """Check one chunk; returns whether it is the final one."""
        try:
            msg = agent_pb2.InvokeChunk.FromString(raw)
        except Exception:  # noqa: BLE001 - any decode failure: the chunk cannot be proven
            raise SignatureInvalidError("a chunk of the signed stream cannot be read") from None
        self._running.add(msg)
        if not msg.final:
            return False
        if not msg.signature:
            raise SignatureInvalidError(
                f"the final chunk of signed capability {self._call.capability!r} carries no signature")
        d = self._running.value()
        verify(msg.signature, STREAM, d, expect_id=self._instance.identity, bundle_pem=self._workload.bundle_pem)
        self.proof = Proof("InvokeStream", self._call.capability, self._instance, self._request, d, msg.signature,
                           self._running.count)
        return True

    def end(self) -> Proof:
        """The stream's proof; SignatureInvalidError when it ended before its signed final chunk (cut short)."""
        if self.proof is None:
            raise SignatureInvalidError(
                f"the signed stream of {self._call.capability!r} ended after {self._running.count} chunks without "
                "its signed final chunk (cut short)")
        return self.proof


__all__ = ["Proof", "StreamCheck", "sign_request", "signs", "verify_answer"]

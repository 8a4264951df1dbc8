"""Signed payloads on the agent's side: verify the caller's request signature, sign the answer.

For a capability whose card declares `signed_payloads`, a request must carry the caller's detached JWS
(`hivemesh-signature` metadata, `hivemesh.mesh.signing`) made with the key of the very certificate it
presented in the mTLS handshake, within the time window and with a nonce not seen before; otherwise it is
refused (UNAUTHENTICATED / SIGNATURE_INVALID, or INVALID_ARGUMENT / REPLAYED). The answer is signed with this
workload's key into `InvokeResponse.signature`, bound to the request's digest; both digests are noted on
the call (`signed`) so the audit record keeps them: neither side can later deny what it sent.

Runs after authz and the loop guard (a stranger learns nothing and costs no signature check), before the rate
limit (a replay spends no one's quota). A streamed answer is signed once, on its final chunk, over the running
digest of all its chunks (`hivemesh.mesh.stream_signing`, which says why).

The signature (a JWS carrying the signer's certificate, over a kilobyte) is added after the handler's own size checks,
so the answer is measured again here, signed: one past one message (or, on a Link, whose answer frame does not fit) is
refused PAYLOAD_TOO_LARGE naming the capability. Refused in the chain, the call's audit record is that refusal; sent
on, gRPC refused it with its own "Sent message larger than max", naming nothing, after the record said answered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Final

from google.protobuf.message import DecodeError

from hivemesh.mesh import answer_size
from hivemesh.mesh.errors import PeerUnauthenticatedError, SignatureInvalidError
from hivemesh.mesh.layers.base import Inbound
from hivemesh.mesh.signing import (
    ANSWER,
    REQUEST,
    SIGNATURE_HEADER,
    NonceCache,
    Signer,
    answer_digest,
    audience,
    request_digest,
    verify,
)
from hivemesh.mesh.stream_signing import STREAM, StreamDigest
from hivemesh.mesh.tls import MAX_MESSAGE_BYTES
from hivemesh.v1 import agent_pb2

NOTE: Final = "signed"
"""`Inbound.notes` key: {"signer", "request", "answer"} (hex SHA-256 digests; "chunks" for a stream), "nonce" and
"signature" (the caller's JWS), kept in the audit record."""
_RUNNING: Final = "signed_stream"
"""`Inbound.notes` key of a stream's running digest (not recorded: the audit keeps the final digest)."""


class PayloadSigningLayer:
    """Checks request signatures (`check`) and signs answers (`answer`) of the signed capabilities."""

    name = "payload-signing"

    def __init__(self, signed: frozenset[str], me: str, signer: Callable[[], Signer],
                 nonces: NonceCache | None = None, *, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        """signed: the capabilities that declare signed_payloads; me: the audience a request is signed for (this
        instance, `hivemesh.mesh.signing.audience`); signer: this workload's current key and certificate
        (renewals included); max_message_bytes: the most one message the server sends may carry (its
        `grpc.max_send_message_length`), which a signed answer must still fit."""
        self.signed = signed
        self.me = me
        self.signer = signer
        self.nonces = nonces if nonces is not None else NonceCache()
        self.max_message_bytes = max_message_bytes

    def check(self, call: Inbound) -> None:
        req = call.request
        if req is None or req.capability not in self.signed:
            return
        peer = call.peer
        if peer is None:  # ordering guard: the identity layer runs first
            raise PeerUnauthenticatedError()
        jws = call.metadata.get(SIGNATURE_HEADER)
        if not isinstance(jws, str):
            raise SignatureInvalidError(
                f"capability {req.capability!r} takes signed requests only: sign it (hivemesh-signature metadata)",
                metadata={"capability": req.capability[:128]})
        d = request_digest(req.capability, req.content_type, call.input, self.me)
        ok = verify(jws, REQUEST, d, peer_cert=peer.cert_pem, nonces=self.nonces)
        # The caller's JWS too: with it the record proves what the caller sent, not only what this agent says.
        call.notes[NOTE] = {"signer": ok.signer, "request": ok.digest_hex, "nonce": ok.nonce, "signature": jws}

    def answer(self, call: Inbound, response: Any) -> Any:
        note = call.notes.get(NOTE)
        if note is None:
            return response
        if call.method == "InvokeStream":
            return self._chunk(call, note, response)
        if call.method != "Invoke":
            return response
        raw = isinstance(response, bytes)
        msg = response
        if raw:
            try:
                msg = agent_pb2.InvokeResponse.FromString(response)
            except DecodeError:
                return response
        if not isinstance(msg, agent_pb2.InvokeResponse):
            return response
        d = answer_digest(bytes.fromhex(note["request"]), msg.output, msg.content_type, int(msg.state))
        msg.signature = self.signer().sign(ANSWER, d)
        signed = msg.SerializeToString() if raw else msg
        self._fits(call, signed, msg, "")
        note["answer"] = d.hex()  # only for an answer that goes out: a refused one was never sent
        return signed

    def _chunk(self, call: Inbound, note: dict[str, Any], chunk: Any) -> Any:
        """Feed a streamed chunk into the running digest; sign the final one (raw bytes stay bytes)."""
        raw = isinstance(chunk, bytes)
        try:
            msg = agent_pb2.InvokeChunk.FromString(chunk) if raw else chunk
        except DecodeError:
            raise SignatureInvalidError("the agent's streamed chunk cannot be read, so it cannot be signed") from None
        if not isinstance(msg, agent_pb2.InvokeChunk):
            return chunk
        running = call.notes.get(_RUNNING)
        if running is None:
            running = call.notes[_RUNNING] = StreamDigest(bytes.fromhex(note["request"]))
        running.add(msg)
        if not msg.final:
            return chunk
        d = running.value()
        msg.signature = self.signer().sign(STREAM, d)
        signed = msg.SerializeToString() if raw else msg
        del call.notes[_RUNNING]
        self._fits(call, signed, msg, " in its final stream chunk", streamed=True)
        note["answer"], note["chunks"] = d.hex(), running.count
        return signed

    def _fits(self, call: Inbound, signed: Any, msg: Any, on: str, *, streamed: bool = False) -> None:
        """Raise PAYLOAD_TOO_LARGE (naming the capability, its size and the limit) for a signed answer (its bytes,
        or the message msg) that one message cannot carry or, on a Link, whose answer frame does not fit: what the
        handler checked did not count the signature. Before the answer's digest is noted: a refused one never left."""
        limit = self.max_message_bytes
        size = len(signed) if isinstance(signed, bytes) else msg.ByteSize()
        if size + answer_size.ANSWER_HEADS <= limit:
            return
        req = call.request
        refused = answer_size.refusal(req.capability if req is not None else "",
                                      signed if isinstance(signed, bytes) else msg.SerializeToString(), limit,
                                      on=f"{on} with its signature", streamed=streamed)
        if refused is not None:
            raise refused

def payload_signing_layer(
    capabilities: Iterable[agent_pb2.Capability], me: str, signer: Callable[[], Signer] | None,
    instance_id: str = "", *, max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> PayloadSigningLayer | None:
    """The layer for the capabilities that declare signed_payloads; None when none does. ValueError when one
    does but there is no workload key to sign answers with (never serve a signed capability unsigned).
    max_message_bytes: the most one message the server sends may carry (`PayloadSigningLayer`)."""
    signed = frozenset(c.name for c in capabilities if c.signed_payloads)
    if not signed:
        return None
    if signer is None:
        raise ValueError(f"capabilities {sorted(signed)} declare signed_payloads, but no workload key is given")
    return PayloadSigningLayer(signed, audience(me, instance_id), signer, max_message_bytes=max_message_bytes)


__all__ = ["NOTE", "PayloadSigningLayer", "payload_signing_layer"]

"""Signed streamed answers without a network: the agent's payload-signing layer signs the final chunk over the
running digest of every chunk (sidecar bytes and SDK messages alike), and the caller's StreamCheck accepts the
stream as sent and refuses a tampered, reordered, dropped, cut-short or unsigned one (SIGNATURE_INVALID)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hivemesh.controlplane.ca import init_ca, load_ca
from hivemesh.mesh.errors import SignatureInvalidError
from hivemesh.mesh.layers.base import Inbound
from hivemesh.mesh.layers.payload_signing import NOTE, PayloadSigningLayer
from hivemesh.mesh.outbound.call import OutboundCall, encode_request
from hivemesh.mesh.outbound.signed import StreamCheck
from hivemesh.mesh.signing import Signer, audience, request_digest
from hivemesh.mesh.tls import Workload
from hivemesh.v1 import agent_pb2, mesh_pb2

TD = "hivemesh.local"
AGENT = f"spiffe://{TD}/agent/scribe"
CALLER = f"spiffe://{TD}/client/alice"
Chunk = agent_pb2.InvokeChunk


def _workload(ca_dir: Path, uri: str) -> Workload:
    ca = load_ca(ca_dir)
    cert, key = ca.issue_with_new_key(uri, common_name=uri.rsplit("/", 1)[1], dns_names=[], ttl_s=3600)
    return Workload.from_pems(cert, key, ca.bundle_pem())


def _chunks() -> list[agent_pb2.InvokeChunk]:
    working = agent_pb2.TASK_STATE_WORKING
    return [Chunk(data=b'"one"', content_type="application/json", state=working),
            Chunk(data=b'"two"', content_type="application/json", state=working),
            Chunk(data=b'"three"', content_type="application/json", state=working),
            Chunk(final=True, state=agent_pb2.TASK_STATE_COMPLETED)]


def test_signed_stream_verifies_and_every_alteration_is_refused(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca", TD)
    init_ca(tmp_path / "other", TD)
    agent, caller = _workload(tmp_path / "ca", AGENT), _workload(tmp_path / "ca", CALLER)
    instance = mesh_pb2.AgentInstance(identity=AGENT, instance_id="i-1")
    raw_request = encode_request("narrate", b'{"topic":"bees"}')
    call = OutboundCall("narrate", raw_request, (), None, None)
    req = agent_pb2.InvokeRequest.FromString(raw_request)
    req_digest = request_digest("narrate", req.content_type, req.input, audience(AGENT, "i-1"))

    def signed_by(signer: Workload, raw: bool) -> list[bytes]:
        """What the agent's layer sends: bytes as in the sidecar (raw) or messages as in the SDK."""
        layer = PayloadSigningLayer(frozenset({"narrate"}), audience(AGENT, "i-1"),
                                    lambda: Signer(signer.key_pem, signer.cert_pem))
        inbound = Inbound(method="InvokeStream", request=req, wire_size=0, metadata={}, auth_context={},
                          notes={NOTE: {"signer": CALLER, "request": req_digest.hex()}})
        out = []
        for c in _chunks():
            sent = layer.answer(inbound, c.SerializeToString() if raw else c)
            out.append(sent if raw else sent.SerializeToString())
        note = inbound.notes[NOTE]
        assert note["chunks"] == 4 and len(note["answer"]) == 64  # what the agent's audit record keeps
        assert set(inbound.notes) == {NOTE}  # the running digest is gone once signed
        return out

    def check(chunks: list[bytes]) -> Any:
        c = StreamCheck(caller, call, instance)
        for raw in chunks:
            c.chunk(raw)
        return c.end()

    sdk_sent, sidecar_sent = signed_by(agent, raw=False), signed_by(agent, raw=True)
    for sent in (sdk_sent, sidecar_sent):
        assert [Chunk.FromString(r).signature != "" for r in sent] == [False, False, False, True]
        proof = check(sent)
        assert proof.chunks == 4 and proof.request == req_digest
        rec = proof.record()
        assert rec["signed"]["signer"] == AGENT and rec["signed"]["request"] == req_digest.hex()
        assert rec["signed"]["answer"] == proof.answer.hex() and rec["method"] == "InvokeStream"
    assert sdk_sent[:3] == sidecar_sent[:3]  # a non-final chunk's bytes pass through untouched

    # A hop appended after signing (a forwarder on the way back) changes nothing.
    hopped = [*sdk_sent[:3], sdk_sent[3] + Chunk(hops=[agent_pb2.Hop(kind="sidecar")]).SerializeToString()]
    assert check(hopped).chunks == 4

    def tampered(i: int) -> list[bytes]:
        msg = Chunk.FromString(sdk_sent[i])
        msg.data = b'"TWO"'
        return [*sdk_sent[:i], msg.SerializeToString(), *sdk_sent[i + 1:]]

    def unsigned_final() -> list[bytes]:
        msg = Chunk.FromString(sdk_sent[3])
        msg.signature = ""
        return [*sdk_sent[:3], msg.SerializeToString()]

    cases: list[tuple[str, Callable[[], list[bytes]]]] = [
        ("altered or forged", lambda: tampered(1)),                                        # a chunk altered
        ("altered or forged", lambda: [sdk_sent[1], sdk_sent[0], *sdk_sent[2:]]),          # reordered
        ("altered or forged", lambda: [sdk_sent[0], *sdk_sent[2:]]),                       # one dropped
        ("altered or forged", lambda: [*sdk_sent[:3], sdk_sent[2], sdk_sent[3]]),          # one repeated
        ("cut short", lambda: sdk_sent[:3]),                                               # final dropped
        ("carries no signature", unsigned_final),
        ("after its final chunk", lambda: [*sdk_sent, sdk_sent[0]]),
        ("not issued by the mesh CA", lambda: signed_by(_workload(tmp_path / "other", AGENT), raw=False)),
        ("not spiffe://", lambda: signed_by(_workload(tmp_path / "ca", f"spiffe://{TD}/agent/other"), raw=True)),
    ]
    for why, chunks in cases:
        with pytest.raises(SignatureInvalidError, match=why):
            check(chunks())
    # The same chunks signed for another request (or another replica) are refused too.
    other = OutboundCall("narrate", encode_request("narrate", b'{"topic":"ants"}'), (), None, None)
    c = StreamCheck(caller, other, instance)
    with pytest.raises(SignatureInvalidError, match="altered or forged"):
        for raw in sdk_sent:
            c.chunk(raw)

"""Integrity over the real mesh (in-process SDK agent, real etcd, TLS and control plane): a signed capability
called through the SDK (request signed by the caller, answer signed by the agent and verified, both digests in
the agent's audit record and in the caller's), its streamed answer signed on the final chunk and verified; an
unsigned, a tampered and a replayed request refused; an answer carrying a fake API key refused or redacted as its
capability's output screen says, by a classifier named in the configuration (the default patterns plus a
deployment's own rule); and the same behind a sidecar (a relayed stream signed too)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from hivemesh.mesh.errors import OutputScreenedError, ReplayedError, SignatureInvalidError, from_rpc_error
from hivemesh.mesh.outbound.call import encode_request
from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
from hivemesh.mesh.signing import ANSWER, REQUEST, SIGNATURE_HEADER, Signer, audience, request_digest, verify
from hivemesh.mesh.stream_signing import STREAM
from hivemesh.sdk import Agent, AgentServer, AgentServerConfig, MeshClient, capability
from hivemesh.v1 import agent_pb2, agent_pb2_grpc, audit_pb2
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv

FAKE_KEY = "sk-proj-" + "Zq81Lm0pXv93Rt5Yw2Kd7Hn4"
AGENT_ID = f"spiffe://{TRUST_DOMAIN}/agent/notary"
CLASSIFIER = "tests.support.classifiers:with_project_codes"


class Notary(Agent):
    name = "notary"

    @capability(name="notarize", signed_payloads=True)
    async def notarize(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"notarized": req["text"]}

    @capability(name="recite", signed_payloads=True)
    async def recite(self, req: dict[str, Any]) -> AsyncIterator[str]:
        for word in req["text"].split():
            yield word

    @capability(name="leak-refused", output_screen="refuse")
    async def leak_refused(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"config": f"OPENAI_API_KEY={FAKE_KEY}"}

    @capability(name="leak-redacted", output_screen="redact")
    async def leak_redacted(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"config": f"key {FAKE_KEY}", "contact": "ops@example.com", "ticket": "see PRJ-1234"}


async def _audit(env: MeshEnv, agent: str = AGENT_ID, kind: str = "") -> list[dict[str, Any]]:
    resp = await env.operator.call(env.operator.audit.Query,
                                   audit_pb2.AuditQueryRequest(limit=1000, agent=agent, kind=kind))
    return [json.loads(e)["record"] for e in resp.entries]


def _proofs(recs: list[dict[str, Any]], capability: str, method: str) -> list[dict[str, Any]]:
    """The signed digests of capability's method calls in recs."""
    return [r["signed"] for r in recs if r["capability"] == capability and r.get("method") == method
            and "signed" in r]


async def test_signed_payloads_and_output_screen(mesh_env: MeshEnv, tmp_path: Path) -> None:
    env = mesh_env
    async with AgentServer(Notary(), await env.settings_for("notary"),
                           AgentServerConfig(audit_dir=tmp_path / "audit", output_classifier=CLASSIFIER)) as server:
        async with MeshClient.connect(name="alice", settings=await env.settings_for("alice", "client")) as mesh:
            assert await mesh.node.registry.wait_for_capability("notarize", 1, timeout=10)
            # 1. Signed through the SDK: the caller signs, the agent verifies and signs, the caller verifies.
            assert await mesh.call("notarize", {"text": "I owe Bob 10"}, timeout=5) == {"notarized": "I owe Bob 10"}
            # ... and streamed: the final chunk's signature covers every chunk, verified by the caller.
            assert [w async for w in mesh.stream("recite", {"text": "I owe Bob"}, timeout=5)] == ["I", "owe", "Bob"]

            # 2. Unsigned, tampered and replayed requests, sent straight to the instance.
            node = mesh.node
            (instance,) = node.registry.instances("notarize")
            signer = Signer(node.workload.key_pem, node.workload.cert_pem)
            body = b'{"text": "I owe Bob 10"}'
            to = audience(AGENT_ID, instance.instance_id)
            other = audience(AGENT_ID, "another-replica")
            jws = signer.sign(REQUEST, request_digest("notarize", "application/json", body, to))
            elsewhere = signer.sign(REQUEST, request_digest("notarize", "application/json", body, other))

            async def send(payload: bytes, md: list[tuple[str, str]]) -> bytes:
                """Straight to the instance with a valid token, bypassing the caller's own signing."""
                token = await node.outbound.tokens.get(instance.identity, "notarize")
                endpoint = node.outbound.channels.get(instance.endpoint, instance.identity, instance.link_endpoint)
                try:
                    raw: bytes = await endpoint.invoke(encode_request("notarize", payload), timeout=5,
                                                       metadata=[*md, ("authorization", f"Bearer {token}")])
                except grpc.aio.AioRpcError as exc:
                    raise from_rpc_error(exc) from None
                return raw

            with pytest.raises(SignatureInvalidError, match="signed requests only"):
                await send(body, [])
            for md in ([(SIGNATURE_HEADER, jws)], [(SIGNATURE_HEADER, elsewhere)]):  # altered; for another replica
                with pytest.raises(SignatureInvalidError, match="altered or forged"):
                    await send(b'{"text": "I owe Bob 1000"}' if md[0][1] == jws else body, md)
            answer = agent_pb2.InvokeResponse.FromString(await send(body, [(SIGNATURE_HEADER, jws)]))
            assert answer.signature.count(".") == 2  # the agent signed its answer
            with pytest.raises(ReplayedError):
                await send(body, [(SIGNATURE_HEADER, jws)])
            # A fan-out (invoke_on) signs and verifies as a routed call does.
            fanned = await node.outbound.invoke_on(encode_request("notarize", body), instance,
                                                   capability="notarize", timeout=5)
            assert json.loads(agent_pb2.InvokeResponse.FromString(fanned).output) == {"notarized": "I owe Bob 10"}

            # 3. The output screen: refused, then redacted.
            with pytest.raises(OutputScreenedError, match="api-key") as refused:
                await mesh.call("leak-refused", {}, timeout=5)
            assert FAKE_KEY not in refused.value.message
            redacted = await mesh.call("leak-redacted", {}, timeout=5)
            assert redacted == {"config": "key [REDACTED:api-key]", "contact": "[REDACTED:email]",
                                "ticket": "see [REDACTED:project-code]"}
            bundle = mesh.node.workload.bundle_pem
            assert mesh.audit is not None and mesh.audit.shipper is not None
            assert await mesh.audit.shipper.wait_shipped(timeout=10)
        assert server.audit is not None and server.audit.shipper is not None
        assert await server.audit.shipper.wait_shipped(timeout=10)

    recs = await _audit(env)
    # Both sides keep the same digests: the caller the agent's signature over its answer, the agent the caller's.
    caller_recs = await _audit(env, f"spiffe://{TRUST_DOMAIN}/client/alice", "outbound")
    for method, cap in (("Invoke", "notarize"), ("InvokeStream", "recite")):
        (theirs,) = _proofs(recs, cap, method)[:1]
        mine = _proofs(caller_recs, cap, method)[0]
        assert (mine["request"], mine["answer"]) == (theirs["request"], theirs["answer"]), method
        assert mine["signer"] == AGENT_ID and mine["signature"].count(".") == 2
        # Later, an auditor with the trust bundle alone checks each side's proof of what the other sent.
        alice = f"spiffe://{TRUST_DOMAIN}/client/alice"
        typ = ANSWER if method == "Invoke" else STREAM
        assert verify(mine["signature"], typ, bytes.fromhex(mine["answer"]), expect_id=AGENT_ID, bundle_pem=bundle,
                      window_s=3600).signer == AGENT_ID
        assert verify(theirs["signature"], REQUEST, bytes.fromhex(theirs["request"]), expect_id=alice,
                      bundle_pem=bundle, window_s=3600).signer == alice
    assert _proofs(recs, "recite", "InvokeStream")[0]["chunks"] == 4  # three words and the final chunk
    assert len(_proofs(caller_recs, "notarize", "Invoke")) == 2  # the routed call and the fan-out
    by_reason: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        by_reason.setdefault(r["reason"] or r["decision"], []).append(r)
    signed_ok = [r for r in by_reason["allow"] if r["capability"] == "notarize"]
    assert len(signed_ok) == 3
    for r in signed_ok:
        assert r["signed"]["signer"] == f"spiffe://{TRUST_DOMAIN}/client/alice"
        assert len(r["signed"]["request"]) == 64 and len(r["signed"]["answer"]) == 64
    assert signed_ok[1]["signed"]["request"] == request_digest("notarize", "application/json", body, to).hex()
    assert len(by_reason["SIGNATURE_INVALID"]) == 3 and len(by_reason["REPLAYED"]) == 1
    (screened,) = by_reason["OUTPUT_SCREENED"]
    assert screened["output_screen"] == {"action": "refuse", "rules": ["api-key"], "count": 1}
    (redact,) = [r for r in by_reason["allow"] if r["capability"] == "leak-redacted"]
    assert redact["output_screen"]["rules"] == ["api-key", "email", "project-code"]


class PlainLeaker(agent_pb2_grpc.AgentServicer):
    """An agent behind a sidecar (plain gRPC): its card asks for signed payloads and a redacting output screen."""

    def card(self) -> agent_pb2.AgentCard:
        return agent_pb2.AgentCard(name="plain", capabilities=[
            agent_pb2.Capability(name="plain-leak", signed_payloads=True, output_screen=agent_pb2.OUTPUT_SCREEN_REDACT),
            agent_pb2.Capability(name="plain-recite", signed_payloads=True, streaming=True)])

    async def Describe(self, request: Any, context: Any) -> agent_pb2.AgentCard:
        return self.card()

    async def Invoke(self, request: agent_pb2.InvokeRequest, context: Any) -> agent_pb2.InvokeResponse:
        return agent_pb2.InvokeResponse(output=json.dumps({"card": "4111 1111 1111 1111", "p": "PRJ-0042"}).encode(),
                                        content_type="application/json")

    async def InvokeStream(self, request: agent_pb2.InvokeRequest,
                           context: Any) -> AsyncIterator[agent_pb2.InvokeChunk]:
        for word in json.loads(request.input)["text"].split():
            yield agent_pb2.InvokeChunk(data=json.dumps(word).encode(), content_type="application/json",
                                        state=agent_pb2.TASK_STATE_WORKING)
        yield agent_pb2.InvokeChunk(final=True, state=agent_pb2.TASK_STATE_COMPLETED)


async def test_sidecar_packaging_signs_and_redacts(mesh_env: MeshEnv) -> None:
    """The same layers behind a sidecar, on the relayed bytes: the answer is redacted, then signed (the caller's
    verification passes only if the signature covers the redacted bytes it received)."""
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServicer_to_server(PlainLeaker(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        config = SidecarConfig(agent=f"127.0.0.1:{port}", audit=False, output_classifier=CLASSIFIER)
        sidecar = Sidecar(config, await mesh_env.settings_for("plain"))
        async with sidecar, MeshClient.connect(name="carol",
                                               settings=await mesh_env.settings_for("carol", "client")) as mesh:
            assert await mesh.node.registry.wait_for_capability("plain-leak", 1, timeout=10)
            assert await mesh.call("plain-leak", {}, timeout=5) == {"card": "[REDACTED:card-number]",
                                                                    "p": "[REDACTED:project-code]"}
            # The sidecar signs the relayed stream's final chunk (after appending its hop); the caller verifies.
            got = [w async for w in mesh.stream("plain-recite", {"text": "a b c"}, timeout=5)]
            assert got == ["a", "b", "c"]
            (instance,) = mesh.node.registry.instances("plain-leak")
            token = await mesh.node.outbound.tokens.get(instance.identity, "plain-leak")
            endpoint = mesh.node.outbound.channels.get(instance.endpoint, instance.identity, instance.link_endpoint)
            with pytest.raises(grpc.aio.AioRpcError) as unsigned:
                await endpoint.invoke(encode_request("plain-leak", b"{}"), timeout=5,
                                      metadata=[("authorization", f"Bearer {token}")])
            assert from_rpc_error(unsigned.value).reason == "SIGNATURE_INVALID"
    finally:
        await server.stop(0.5)

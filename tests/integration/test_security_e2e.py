"""Negative security matrix over real sockets: each refusal's exact gRPC status and ErrorInfo reason, and
that the agent's handler never ran. Raw grpc.aio calls to `/hivemesh.v1.Agent/Invoke` stand in for the
attacker wherever the SDK client would refuse to send the attack. The same matrix runs against both
packagings: the SDK's in-process server and a plain gRPC agent behind a `Sidecar`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from google.rpc import error_details_pb2, status_pb2

from hivemesh.controlplane.ca import init_ca, load_ca
from hivemesh.controlplane.issuer import SigningKeys
from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.errors import from_rpc_error
from hivemesh.mesh.pki import cert_expiry, controlplane_id, parse_spiffe_id
from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
from hivemesh.mesh.tls import Workload, channel_credentials, join, secure_channel
from hivemesh.sdk import AgentServer, AgentServerConfig, capability
from hivemesh.v1 import agent_pb2
from tests.support.agents_for_tests import EchoAgent, Text
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv
from tests.support.plain_agent import PlainAgent

INVOKE = "/hivemesh.v1.Agent/Invoke"
LIMIT = 1024  # max_input_bytes of the agent under test
OK = grpc.StatusCode.OK
_DETAILS_KEY = "grpc-status-details-bin"


class CountingEchoAgent(EchoAgent):
    """EchoAgent whose `restricted` handler also counts, so 'never invoked' covers the scope case too."""

    @capability(description="A capability no grant gives to agents")
    async def restricted(self, req: Text) -> Text:
        self.calls += 1
        return req


@dataclass
class Target:
    """The agent under attack, whichever packaging serves it."""

    packaging: str
    endpoint: str
    identity: str
    calls: Callable[[], int]

    @property
    def server_name(self) -> str:
        return parse_spiffe_id(self.identity).dns_name


@dataclass
class Caller:
    """A workload that joined the mesh, with its control-plane client (to get real tokens)."""

    workload: Workload
    cp: ControlPlaneClient

    @property
    def creds(self) -> grpc.ChannelCredentials:
        return self.workload.channel_credentials()

    async def token(self, audience: str, scopes: tuple[str, ...] = ()) -> str:
        return (await self.cp.issue_token(audience, scopes)).token


@pytest.fixture(params=["in-process", "sidecar"])
async def target(request: pytest.FixtureRequest, mesh_env: MeshEnv) -> AsyncIterator[Target]:
    if request.param == "in-process":
        agent = CountingEchoAgent()
        async with AgentServer(agent, await mesh_env.settings_for("echo"),
                               AgentServerConfig(max_input_bytes=LIMIT)) as server:
            yield Target("in-process", server.endpoint, server.node.workload.spiffe_id, lambda: agent.calls)
        return
    plain = PlainAgent("plain")
    async with plain:
        config = SidecarConfig(agent=plain.endpoint, max_input_bytes=LIMIT)
        async with Sidecar(config, await mesh_env.settings_for("plain")) as sidecar:
            assert sidecar.node is not None
            yield Target("sidecar", sidecar.endpoint, sidecar.node.workload.spiffe_id, lambda: plain.calls)


@pytest.fixture
async def joiner(mesh_env: MeshEnv) -> AsyncIterator[Callable[[str, str], Any]]:
    """Join workloads by name and kind (one-time join tokens from the real control plane)."""
    opened: list[ControlPlaneClient] = []

    async def make(name: str, kind: str = "client") -> Caller:
        resp = await mesh_env.operator.create_join_token(name, kind, 120)
        workload = await join(
            mesh_env.controlplane.join_address, mesh_env.certs.ca_cert.read_bytes(), resp.token, name, kind,
            trust_domain=TRUST_DOMAIN,
        )
        cp = ControlPlaneClient(mesh_env.controlplane.address, workload, TRUST_DOMAIN)
        opened.append(cp)
        return Caller(workload, cp)

    try:
        yield make
    finally:
        for cp in opened:
            await cp.close()


# --- helpers ------------------------------------------------------------------------------------------------
def invoke_request(capability: str, payload: Any = None, *, raw_input: bytes | None = None) -> bytes:
    data = raw_input if raw_input is not None else json.dumps(payload).encode()
    req = agent_pb2.InvokeRequest(capability=capability, input=data, content_type="application/json")
    return req.SerializeToString()


async def raw_invoke(
    target: Target, creds: grpc.ChannelCredentials | None, request: bytes, token: str | None = None
) -> bytes:
    """One raw Invoke on a fresh channel (creds None: plaintext)."""
    md = [("authorization", f"Bearer {token}")] if token is not None else []
    if creds is None:
        channel = grpc.aio.insecure_channel(target.endpoint)
    else:
        channel = secure_channel(target.endpoint, creds, server_name=target.server_name)
    async with channel:
        invoke: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(INVOKE)
        return await invoke(request, metadata=md, timeout=10)


def error_info_reason(exc: grpc.aio.AioRpcError) -> str | None:
    """The ErrorInfo reason the server really sent (None when the status carries no ErrorInfo)."""
    for key, value in exc.trailing_metadata() or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return str(info.reason)
    return None


async def expect_refused(
    target: Target, call: Any, code: grpc.StatusCode, reason: str | None
) -> grpc.aio.AioRpcError:
    """Await call; it must fail with exactly code and ErrorInfo reason, and the agent must not have run.

    reason None means a refusal in the TLS handshake: no gRPC status from the server at all.
    """
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    exc = info.value
    assert exc.code() == code, f"{target.packaging}: expected {code}, got {exc.code()}: {exc.details()}"
    if reason is None:
        assert "failed to connect" in (exc.details() or ""), exc.details()
    assert error_info_reason(exc) == reason, f"{target.packaging}: {exc.details()}"
    if reason is not None:
        err = from_rpc_error(exc)
        assert (err.code, err.reason) == (code, reason)
    assert target.calls() == 0, f"{target.packaging}: the agent's handler ran for a refused call"
    return exc


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_for(caller: Caller, target: Target, *, scope: str = "echo", **over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": controlplane_id(TRUST_DOMAIN),
        "sub": caller.workload.spiffe_id,
        "aud": target.identity,
        "scope": scope,
        "iat": now,
        "nbf": now,
        "exp": now + 120,
        "jti": uuid.uuid4().hex,
        "cnf": {"x5t#S256": caller.workload.thumbprint},
    }
    claims.update(over)
    return claims


def real_signing_key(state_dir: Path) -> tuple[str, ec.EllipticCurvePrivateKey]:
    """The control plane's active signing key, read from its state dir as an insider would."""
    key = SigningKeys.load_or_create(state_dir).active
    return key.kid, key.private_key


def sign(claims: dict[str, Any], key: ec.EllipticCurvePrivateKey, kid: str) -> str:
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid, "typ": "JWT"})


# --- the control: a valid call is accepted, so every refusal below is the mesh's doing --------------------
async def test_valid_call_is_accepted(target: Target, joiner: Any) -> None:
    tester: Caller = await joiner("tester")
    token = await tester.token(target.identity)
    raw = await raw_invoke(target, tester.creds, invoke_request("echo", {"text": "hi"}), token)
    resp = agent_pb2.InvokeResponse.FromString(raw)
    out = json.loads(resp.output)
    assert out["text"] == "hi"
    assert out["caller"] == tester.workload.spiffe_id
    assert target.calls() == 1
    assert [h.kind for h in resp.hops] == (["agent"] if target.packaging == "in-process" else ["sidecar"])


# --- transport: mutual TLS ---------------------------------------------------------------------------------
async def test_no_client_certificate(target: Target, joiner: Any, mesh_env: MeshEnv) -> None:
    tester: Caller = await joiner("tester")
    token = await tester.token(target.identity)
    server_only = channel_credentials(mesh_env.certs.ca_cert.read_bytes())
    call = raw_invoke(target, server_only, invoke_request("echo", {"text": "hi"}), token)
    await expect_refused(target, call, grpc.StatusCode.UNAVAILABLE, None)


async def test_plaintext_client(target: Target, joiner: Any) -> None:
    tester: Caller = await joiner("tester")
    token = await tester.token(target.identity)
    call = raw_invoke(target, None, invoke_request("echo", {"text": "hi"}), token)
    await expect_refused(target, call, grpc.StatusCode.UNAVAILABLE, None)


async def test_client_certificate_from_another_ca(
    target: Target, joiner: Any, mesh_env: MeshEnv, tmp_path: Path
) -> None:
    tester: Caller = await joiner("tester")
    token = await tester.token(target.identity)
    # Same trust domain name, same SPIFFE id as the real tester, but signed by a CA the mesh does not trust.
    init_ca(tmp_path / "rogue-ca", TRUST_DOMAIN)
    rogue = load_ca(tmp_path / "rogue-ca")
    sid = parse_spiffe_id(tester.workload.spiffe_id)
    cert_pem, key_pem = rogue.issue_with_new_key(
        str(sid), common_name=sid.name, dns_names=[sid.dns_name], ttl_s=600
    )
    creds = channel_credentials(mesh_env.certs.ca_cert.read_bytes(), cert_pem, key_pem)
    call = raw_invoke(target, creds, invoke_request("echo", {"text": "hi"}), token)
    await expect_refused(target, call, grpc.StatusCode.UNAVAILABLE, None)


async def test_client_certificate_outside_the_trust_domain(
    target: Target, joiner: Any, mesh_env: MeshEnv
) -> None:
    # Signed by the mesh's own CA (so the handshake succeeds), but naming another trust domain.
    tester: Caller = await joiner("tester")
    token = await tester.token(target.identity)
    ca = load_ca(mesh_env.certs.certs_dir)
    cert_pem, key_pem = ca.issue_with_new_key(
        "spiffe://elsewhere.example/client/tester", common_name="tester", dns_names=["localhost"], ttl_s=600
    )
    creds = channel_credentials(mesh_env.certs.ca_cert.read_bytes(), cert_pem, key_pem)
    call = raw_invoke(target, creds, invoke_request("echo", {"text": "hi"}), token)
    await expect_refused(target, call, grpc.StatusCode.UNAUTHENTICATED, "PEER_UNAUTHENTICATED")


async def test_ca_certificate_used_as_client_certificate(
    target: Target, joiner: Any, mesh_env: MeshEnv
) -> None:
    tester: Caller = await joiner("tester")
    token = await tester.token(target.identity)
    files = mesh_env.certs
    ca_pem = files.ca_cert.read_bytes()
    creds = channel_credentials(ca_pem, ca_pem, files.ca_key.read_bytes())
    call = raw_invoke(target, creds, invoke_request("echo", {"text": "hi"}), token)
    # The root is its own trust anchor, so the handshake passes; the identity layer refuses a CA:TRUE peer.
    exc = await expect_refused(target, call, grpc.StatusCode.UNAUTHENTICATED, "PEER_UNAUTHENTICATED")
    assert "CA certificate" in (exc.details() or "")


async def test_expired_client_certificate(target: Target, joiner: Any, mesh_env: MeshEnv) -> None:
    tester: Caller = await joiner("tester")
    token = await tester.token(target.identity)
    ca = load_ca(mesh_env.certs.certs_dir)
    sid = parse_spiffe_id(tester.workload.spiffe_id)
    cert_pem, key_pem = ca.issue_with_new_key(
        str(sid), common_name=sid.name, dns_names=[sid.dns_name], ttl_s=1
    )
    # The certificate lives one second: wait (bounded) until it has certainly expired.
    await asyncio.sleep(max(0.0, cert_expiry(cert_pem) + 0.5 - time.time()))
    creds = channel_credentials(mesh_env.certs.ca_cert.read_bytes(), cert_pem, key_pem)
    call = raw_invoke(target, creds, invoke_request("echo", {"text": "hi"}), token)
    await expect_refused(target, call, grpc.StatusCode.UNAVAILABLE, None)


# --- tokens ------------------------------------------------------------------------------------------------
async def test_no_token(target: Target, joiner: Any) -> None:
    tester: Caller = await joiner("tester")
    call = raw_invoke(target, tester.creds, invoke_request("echo", {"text": "hi"}), None)
    await expect_refused(target, call, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING")


async def test_expired_token(target: Target, joiner: Any, mesh_env: MeshEnv) -> None:
    tester: Caller = await joiner("tester")
    kid, key = real_signing_key(mesh_env.controlplane.config.state_dir)
    now = int(time.time())
    # exp 120 s ago: well past the verifier's 30 s leeway; lifetime 120 s, inside the 300 s cap.
    token = sign(claims_for(tester, target, iat=now - 240, nbf=now - 240, exp=now - 120), key, kid)
    call = raw_invoke(target, tester.creds, invoke_request("echo", {"text": "hi"}), token)
    await expect_refused(target, call, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED")


async def test_token_signed_by_unknown_key(target: Target, joiner: Any) -> None:
    tester: Caller = await joiner("tester")
    forged = ec.generate_private_key(ec.SECP256R1())
    token = sign(claims_for(tester, target), forged, "not-in-the-jwks")
    call = raw_invoke(target, tester.creds, invoke_request("echo", {"text": "hi"}), token)
    await expect_refused(target, call, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")


async def test_token_signed_by_unknown_key_reusing_a_real_kid(
    target: Target, joiner: Any, mesh_env: MeshEnv
) -> None:
    tester: Caller = await joiner("tester")
    kid, _ = real_signing_key(mesh_env.controlplane.config.state_dir)
    forged = ec.generate_private_key(ec.SECP256R1())
    token = sign(claims_for(tester, target), forged, kid)
    call = raw_invoke(target, tester.creds, invoke_request("echo", {"text": "hi"}), token)
    await expect_refused(target, call, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")


@pytest.mark.parametrize("alg", ["none", "None", "nOnE"])
async def test_alg_none(target: Target, joiner: Any, mesh_env: MeshEnv, alg: str) -> None:
    tester: Caller = await joiner("tester")
    kid, _ = real_signing_key(mesh_env.controlplane.config.state_dir)
    header = _b64(json.dumps({"alg": alg, "typ": "JWT", "kid": kid}).encode())
    payload = _b64(json.dumps(claims_for(tester, target)).encode())
    for token in (f"{header}.{payload}.", f"{header}.{payload}.{_b64(b'x' * 64)}"):
        call = raw_invoke(target, tester.creds, invoke_request("echo", {"text": "hi"}), token)
        await expect_refused(target, call, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")


async def test_scope_lacks_capability(target: Target, joiner: Any) -> None:
    # Agents are granted echo/shout/slow/... but never 'restricted' (meshenv DEFAULT_GRANTS): a real token,
    # issued by the control plane, covers what the grant allows and nothing more.
    peer: Caller = await joiner("peer-agent", "agent")
    issued = await peer.cp.issue_token(target.identity)
    assert "echo" in issued.scopes and "restricted" not in issued.scopes
    call = raw_invoke(target, peer.creds, invoke_request("restricted", {"text": "hi"}), issued.token)
    await expect_refused(target, call, grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING")


async def test_token_for_another_audience(target: Target, joiner: Any) -> None:
    tester: Caller = await joiner("tester")
    other = f"spiffe://{TRUST_DOMAIN}/agent/other"
    token = await tester.token(other, ("echo",))
    call = raw_invoke(target, tester.creds, invoke_request("echo", {"text": "hi"}), token)
    await expect_refused(target, call, grpc.StatusCode.UNAUTHENTICATED, "AUDIENCE_MISMATCH")


async def test_stolen_token_with_another_certificate(target: Target, joiner: Any) -> None:
    victim: Caller = await joiner("victim")
    thief: Caller = await joiner("thief")
    stolen = await victim.token(target.identity)
    call = raw_invoke(target, thief.creds, invoke_request("echo", {"text": "hi"}), stolen)
    exc = await expect_refused(target, call, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")
    assert "another certificate" in (exc.details() or "")


# --- the request itself (authenticated caller, bad input) ---------------------------------------------------
async def test_unknown_capability(target: Target, joiner: Any, mesh_env: MeshEnv) -> None:
    tester: Caller = await joiner("tester")
    # A control-plane token never names a capability the agent does not offer, so with one the token layer
    # answers first (SCOPE_MISSING: unauthorised callers learn nothing about the agent's capabilities) ...
    real = await tester.token(target.identity)
    call = raw_invoke(target, tester.creds, invoke_request("no-such-capability", {"text": "hi"}), real)
    await expect_refused(target, call, grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING")
    # ... and with a genuine token that names it (signed with the real key), the input guard says NOT_FOUND.
    kid, key = real_signing_key(mesh_env.controlplane.config.state_dir)
    token = sign(claims_for(tester, target, scope="echo no-such-capability"), key, kid)
    call = raw_invoke(target, tester.creds, invoke_request("no-such-capability", {"text": "hi"}), token)
    await expect_refused(target, call, grpc.StatusCode.NOT_FOUND, "UNKNOWN_CAPABILITY")


async def test_malformed_json(target: Target, joiner: Any) -> None:
    tester: Caller = await joiner("tester")
    token = await tester.token(target.identity)
    request = invoke_request("echo", raw_input=b'{"text": "unterminated')
    call = raw_invoke(target, tester.creds, request, token)
    await expect_refused(target, call, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")


async def test_schema_violation(target: Target, joiner: Any) -> None:
    tester: Caller = await joiner("tester")
    token = await tester.token(target.identity)
    call = raw_invoke(target, tester.creds, invoke_request("echo", {"txt": "no text field"}), token)
    await expect_refused(target, call, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")


async def test_payload_over_the_size_limit(target: Target, joiner: Any) -> None:
    tester: Caller = await joiner("tester")
    token = await tester.token(target.identity)
    call = raw_invoke(target, tester.creds, invoke_request("echo", {"text": "x" * (LIMIT * 4)}), token)
    await expect_refused(target, call, grpc.StatusCode.RESOURCE_EXHAUSTED, "PAYLOAD_TOO_LARGE")


@pytest.mark.parametrize(
    "garbage",
    [b"\xff\xff\xff\xff", b"\x0a\xff\x01abc", b"\x12\x05ab", b"\x0a\x02\xff\xfe"],
    ids=["ff", "long-len", "short", "bad-utf8"],
)
async def test_garbage_bytes_not_an_invoke_request(target: Target, joiner: Any, garbage: bytes) -> None:
    tester: Caller = await joiner("tester")
    token = await tester.token(target.identity)
    call = raw_invoke(target, tester.creds, garbage, token)
    await expect_refused(target, call, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")

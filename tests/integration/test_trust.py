"""Tokens in depth over the real mesh: delegation chains (RFC 8693) that only narrow, revocation on every node
within a second, signing-key rotation with no failed call, and a key set that cannot be refreshed."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypedDict

import grpc
import jwt
import pytest

from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.errors import (
    AudienceMismatchError,
    DelegationDeniedError,
    GrantDeniedError,
    HivemeshError,
    TokenInvalidError,
    TokenRevokedError,
)
from hivemesh.mesh.etcd import EtcdServer
from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
from hivemesh.mesh.tls import Workload, join
from hivemesh.sdk import Agent, AgentServer, AgentServerConfig, Context, MeshClient, capability
from hivemesh.v1 import audit_pb2, trust_pb2
from tests.support.agents_for_tests import EchoAgent, Text
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, start_mesh_env, stop_mesh_env
from tests.support.plain_agent import PlainAgent

TD = f"spiffe://{TRUST_DOMAIN}"

GRANTS = {
    "grants": [
        {"name": "ops", "subjects": [f"{TD}/operator/*"], "capabilities": ["*"]},
        {"name": "user", "subjects": [f"{TD}/client/user"], "capabilities": ["relay", "whoami", "echo", "x", "y"]},
        {"name": "stranger", "subjects": [f"{TD}/client/stranger"], "capabilities": ["relay"]},
        {"name": "loader", "subjects": [f"{TD}/client/loader"], "capabilities": ["echo"]},
        {"name": "agents", "subjects": [f"{TD}/agent/*"], "capabilities": ["whoami", "echo", "x", "y"]},
    ]
}


class WhoAmIOut(TypedDict):
    caller: str
    principal: str
    chain: list[str]


class WhoAmI(Agent):
    """Says who called it, for whom, and through whom."""

    name = "whoami"
    version = "1.0.0"

    @capability(description="who is calling")
    async def whoami(self, req: Text, ctx: Context) -> WhoAmIOut:
        return {"caller": ctx.caller, "principal": ctx.principal, "chain": list(ctx.chain)}


class Relay(Agent):
    """Calls whoami on behalf of its caller."""

    name = "relay"
    version = "1.0.0"

    @capability(description="relay to whoami on behalf of the caller")
    async def relay(self, req: Text, ctx: Context) -> WhoAmIOut:
        out: WhoAmIOut = await ctx.call_capability("whoami", req, on_behalf=True)
        return out


@pytest.fixture
async def env(etcd: Any, etcd_server: EtcdServer, tmp_path: Path) -> AsyncIterator[MeshEnv]:
    e = await start_mesh_env(tmp_path, etcd_server.endpoint, GRANTS, token_ttl_s=60)
    try:
        yield e
    finally:
        await stop_mesh_env(e)


@pytest.fixture
async def joiner(env: MeshEnv) -> AsyncIterator[Callable[[str, str], Awaitable[tuple[Workload, ControlPlaneClient]]]]:
    opened: list[ControlPlaneClient] = []

    async def make(name: str, kind: str = "client") -> tuple[Workload, ControlPlaneClient]:
        resp = await env.operator.create_join_token(name, kind, 120)
        w = await join(env.controlplane.join_address, env.certs.ca_cert.read_bytes(), resp.token, name, kind,
                       trust_domain=TRUST_DOMAIN)
        cp = ControlPlaneClient(env.controlplane.address, w, TRUST_DOMAIN)
        opened.append(cp)
        return w, cp

    try:
        yield make
    finally:
        for cp in opened:
            await cp.close()


def _claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


# --- delegation: the exchange RPC ----------------------------------------------------------------------------------
async def test_delegation_chain_narrows_and_never_widens(env: MeshEnv, joiner: Any) -> None:
    _, user = await joiner("user")
    a_w, a = await joiner("a", "agent")
    _, b = await joiner("b", "agent")
    t0 = (await user.issue_token(f"{TD}/agent/a", ["x", "y"])).token
    # A acts for the user towards B: only x, and only x may be delegated further.
    t1 = await a.exchange_token(t0, f"{TD}/agent/b", ["x"], delegable=["x"])
    c1 = _claims(t1.token)
    assert c1["sub"] == f"{TD}/client/user" and c1["act"]["sub"] == f"{TD}/agent/a"
    assert c1["scope"] == "x" and c1["dlg"] == "x" and c1["cnf"]["x5t#S256"] == a_w.thumbprint
    assert c1["exp"] <= _claims(t0)["exp"]
    # B may narrow further ...
    t2 = await b.exchange_token(t1.token, f"{TD}/agent/c", ["x"])
    c2 = _claims(t2.token)
    assert c2["act"] == {"sub": f"{TD}/agent/b", "dlg": "x", "act": c1["act"]}
    # ... but never widen what the chain may do: refused, not silently narrowed.
    with pytest.raises(DelegationDeniedError) as widened:
        await b.exchange_token(t1.token, f"{TD}/agent/c", ["x", "y"])
    assert "y" in widened.value.message
    with pytest.raises(DelegationDeniedError):
        await b.exchange_token(t1.token, f"{TD}/agent/c", ["x"], delegable=["x", "y"])
    # Only the audience of a token may exchange it.
    with pytest.raises(AudienceMismatchError):
        await a.exchange_token(t1.token, f"{TD}/agent/c", ["x"])
    # The first hop is bounded by the principal's own grants.
    _, stranger = await joiner("stranger")
    ts = (await stranger.issue_token(f"{TD}/agent/a", ["relay"])).token
    with pytest.raises(GrantDeniedError):
        await a.exchange_token(ts, f"{TD}/agent/b", ["x"])
    with pytest.raises(DelegationDeniedError):
        await a.exchange_token(ts, f"{TD}/agent/b", [], delegable=["whoami"])
    # Every exchange, granted or refused, is in the control plane's audit log with who asked.
    resp = await env.operator.call(env.operator.audit.Query, audit_pb2.AuditQueryRequest(
        caller=f"{TD}/agent/*", limit=100))
    recs = [json.loads(e)["record"] for e in resp.entries if b"ExchangeToken" in e]
    assert [r["status"] for r in recs].count("OK") == 2
    assert {r["reason"] for r in recs} >= {"DELEGATION_DENIED", "AUDIENCE_MISMATCH", "GRANT_DENIED"}


async def test_delegation_depth_is_bounded(env: MeshEnv, joiner: Any) -> None:
    _, user = await joiner("user")
    hops = [await joiner(f"h{i}", "agent") for i in range(7)]
    token = (await user.issue_token(f"{TD}/agent/h0", ["x"])).token
    depth = 0
    with pytest.raises(DelegationDeniedError) as info:
        for i in range(6):
            token = (await hops[i][1].exchange_token(token, f"{TD}/agent/h{i + 1}", ["x"])).token
            depth += 1
    assert depth == 5 and "at most 5" in info.value.message


async def test_on_behalf_call_carries_the_chain_to_the_agent_and_the_audit_log(
    env: MeshEnv, tmp_path: Path
) -> None:
    async with AgentServer(WhoAmI(), await env.settings_for("whoami"),
                           AgentServerConfig(audit_dir=tmp_path / "a")) as who, \
            AgentServer(Relay(), await env.settings_for("relay"), AgentServerConfig(audit_dir=tmp_path / "b")):
        async with MeshClient.connect(name="user", settings=await env.settings_for("user", "client")) as mesh:
            for cap in ("relay", "whoami"):
                assert await mesh.node.registry.wait_for_capability(cap, 1, timeout=10)
            out = await mesh.call("relay", {"text": "hi"}, timeout=10)
            assert out == {"caller": f"{TD}/agent/relay", "principal": f"{TD}/client/user",
                           "chain": [f"{TD}/client/user", f"{TD}/agent/relay"]}
        async with MeshClient.connect(name="stranger", settings=await env.settings_for("stranger", "client")) as mesh:
            assert await mesh.node.registry.wait_for_capability("relay", 1, timeout=10)
            # The stranger may call relay, but relay cannot reach whoami for it: the principal lacks the grant.
            with pytest.raises(HivemeshError) as info:
                await mesh.call("relay", {"text": "hi"}, timeout=10)
            assert info.value.reason in ("GRANT_DENIED", "AGENT_ERROR")
        assert who.audit is not None and who.audit.shipper is not None
        assert await who.audit.shipper.wait_shipped(timeout=10)
    resp = await env.operator.call(env.operator.audit.Query, audit_pb2.AuditQueryRequest(
        agent=f"{TD}/agent/whoami", limit=10))
    rec = json.loads(resp.entries[0])["record"]
    assert rec["chain"] == [f"{TD}/client/user", f"{TD}/agent/relay"]
    assert rec["principal"] == f"{TD}/client/user" and rec["caller"] == f"{TD}/agent/relay"


class PlainRelay(PlainAgent):
    """A plain gRPC agent (no hivemesh code) that serves `relay` by calling `whoami` through its sidecar's
    loopback Mesh service with the call handle the sidecar gave it: on behalf of its caller."""

    def __init__(self) -> None:
        super().__init__("plainrelay")
        self.mesh_endpoint = ""
        self.handles: list[str] = []

    def card(self) -> Any:
        from hivemesh.v1 import agent_pb2

        card = super().card()
        card.capabilities.append(agent_pb2.Capability(name="relay", description="whoami on behalf of the caller",
                                                      input_modes=["application/json"],
                                                      output_modes=["application/json"]))
        return card

    async def Invoke(self, request: Any, context: Any) -> Any:
        import grpc

        from hivemesh.mesh.sidecar import CALL_HANDLE_KEY
        from hivemesh.v1 import agent_pb2

        if request.capability != "relay":
            return await super().Invoke(request, context)
        handle = next(str(v) for k, v in self._record(context) if k == CALL_HANDLE_KEY)
        self.handles.append(handle)
        async with grpc.aio.insecure_channel(self.mesh_endpoint) as ch:
            call = ch.unary_unary("/hivemesh.v1.Mesh/Call",
                                  request_serializer=agent_pb2.InvokeRequest.SerializeToString,
                                  response_deserializer=agent_pb2.InvokeResponse.FromString)
            try:
                out = await call(agent_pb2.InvokeRequest(capability="whoami", input=request.input,
                                                         content_type="application/json"),
                                 timeout=context.time_remaining(), metadata=[(CALL_HANDLE_KEY, handle)])
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ()))
        return agent_pb2.InvokeResponse(output=out.output, content_type=out.content_type,
                                        state=agent_pb2.TASK_STATE_COMPLETED)


async def test_a_plain_agent_behind_a_sidecar_calls_on_behalf_of_its_caller_with_the_call_handle(
    env: MeshEnv, tmp_path: Path
) -> None:
    import grpc

    from hivemesh.mesh.errors import CallHandleInvalidError, from_rpc_error
    from hivemesh.mesh.sidecar import CALL_HANDLE_KEY
    from hivemesh.v1 import agent_pb2

    relay = PlainRelay()
    async with AgentServer(WhoAmI(), await env.settings_for("whoami"),
                           AgentServerConfig(audit_dir=tmp_path / "a")) as who, relay:
        async with Sidecar(SidecarConfig(agent=relay.endpoint, audit_dir=str(tmp_path / "b")),
                           await env.settings_for("plainrelay")) as sidecar:
            relay.mesh_endpoint = sidecar.mesh_endpoint
            async with MeshClient.connect(name="user", settings=await env.settings_for("user", "client")) as mesh:
                for cap in ("relay", "whoami"):
                    assert await mesh.node.registry.wait_for_capability(cap, 1, timeout=10)
                out = await mesh.call("relay", {"text": "hi"}, timeout=10)
            assert out == {"caller": f"{TD}/agent/plainrelay", "principal": f"{TD}/client/user",
                           "chain": [f"{TD}/client/user", f"{TD}/agent/plainrelay"]}
            assert relay.handles and not sidecar._handles  # the handle died with the inbound call
            async with grpc.aio.insecure_channel(sidecar.mesh_endpoint) as ch:
                call = ch.unary_unary("/hivemesh.v1.Mesh/Call",
                                      request_serializer=agent_pb2.InvokeRequest.SerializeToString,
                                      response_deserializer=agent_pb2.InvokeResponse.FromString)
                req = agent_pb2.InvokeRequest(capability="whoami", input=b'{"text":"x"}',
                                              content_type="application/json")
                own = json.loads((await call(req, timeout=10)).output)  # no handle: the sidecar's own identity
                assert own["chain"] == [f"{TD}/agent/plainrelay"]
                for handle in (relay.handles[0], "not-a-handle"):  # expired, unknown
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call(req, timeout=10, metadata=[(CALL_HANDLE_KEY, handle)])
                    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
                    err = from_rpc_error(info.value)
                    assert isinstance(err, CallHandleInvalidError) and "in flight" in err.message
                stream = ch.unary_stream("/hivemesh.v1.Mesh/CallStream",
                                         request_serializer=agent_pb2.InvokeRequest.SerializeToString)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in stream(req, timeout=10, metadata=[(CALL_HANDLE_KEY, "not-a-handle")]):
                        pass
                assert isinstance(from_rpc_error(info.value), CallHandleInvalidError)
        assert who.audit is not None and who.audit.shipper is not None
        assert await who.audit.shipper.wait_shipped(timeout=10)
    resp = await env.operator.call(env.operator.audit.Query, audit_pb2.AuditQueryRequest(
        agent=f"{TD}/agent/whoami", limit=10))
    records = [json.loads(e)["record"] for e in resp.entries]
    delegated = [r for r in records if r.get("chain") == [f"{TD}/client/user", f"{TD}/agent/plainrelay"]]
    assert len(delegated) == 1, records
    assert delegated[0]["principal"] == f"{TD}/client/user" and delegated[0]["caller"] == f"{TD}/agent/plainrelay"


# --- revocation ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
async def test_revocation_takes_effect_on_every_node_within_a_second(
    env: MeshEnv, joiner: Any, tmp_path: Path
) -> None:
    import grpc

    from tests.integration.test_security_e2e import INVOKE, invoke_request

    plain = PlainAgent("plain")
    async with AgentServer(EchoAgent(), await env.settings_for("echo"),
                           AgentServerConfig(audit_dir=tmp_path / "a", metrics_listen="127.0.0.1:0")) as inproc, plain:
        async with Sidecar(SidecarConfig(agent=plain.endpoint, audit_dir=str(tmp_path / "b")),
                           await env.settings_for("plain")) as sidecar:
            assert sidecar.node is not None
            user_w, user = await joiner("user")
            targets = [(inproc.endpoint, inproc.node.workload.identity), (sidecar.endpoint,
                                                                          sidecar.node.workload.identity)]
            from hivemesh.mesh.tls import secure_channel

            channels = [secure_channel(ep, user_w.channel_credentials(), server_name=sid.dns_name)
                        for ep, sid in targets]
            tokens = [(await user.issue_token(str(sid), ["echo"])) for _, sid in targets]

            async def attempt(i: int) -> str:
                call = channels[i].unary_unary(INVOKE)
                try:
                    await call(invoke_request("echo", {"text": "x"}), timeout=5,
                               metadata=[("authorization", f"Bearer {tokens[i].token}")])
                    return "OK"
                except grpc.aio.AioRpcError as exc:
                    from hivemesh.mesh.errors import from_rpc_error

                    return from_rpc_error(exc).reason

            assert [await attempt(0), await attempt(1)] == ["OK", "OK"]
            figures = []
            for kind in ("jti", "subject"):
                if kind == "jti":
                    await asyncio.gather(*(env.operator.call(env.operator.trust.Revoke, trust_pb2.RevokeRequest(
                        jti=t.jti)) for t in tokens))
                else:
                    tokens = [(await user.issue_token(str(sid), ["echo"])) for _, sid in targets]
                    assert [await attempt(0), await attempt(1)] == ["OK", "OK"]
                    await asyncio.sleep(1.05)  # iat has a one-second resolution: revoke strictly after it
                    await env.operator.call(env.operator.trust.Revoke, trust_pb2.RevokeRequest(
                        subject=user_w.spiffe_id))
                started = time.monotonic()
                pending = {0, 1}
                while pending and time.monotonic() - started < 5:
                    for i in list(pending):
                        if await attempt(i) == "TOKEN_REVOKED":
                            pending.discard(i)
                    await asyncio.sleep(0.005)
                took = time.monotonic() - started
                assert not pending, f"revocation by {kind} not in force after 5 s"
                assert took < 1.0, f"revocation by {kind} took {took:.3f} s"
                figures.append(f"{kind} {took * 1000:.0f} ms")
            # A revoked subject gets no new token either while its revocation lasts.
            with pytest.raises(TokenRevokedError):
                await user.issue_token(str(targets[0][1]), ["echo"])
            for ch in channels:
                await ch.close()
            listed = await env.operator.call(env.operator.trust.ListRevocations, trust_pb2.ListRevocationsRequest())
            assert len(listed.revocations) == 3
            # The node's metrics say how many revocations it holds in force (what it refuses tokens by).
            from tests.integration.test_metrics_mesh import sample, scrape

            assert inproc.metrics_address is not None
            assert sample(await asyncio.to_thread(scrape, inproc.metrics_address), "hivemesh_revocations_in_force") == 3
            print(f"\nFIGURE revocation in force on both nodes (in-process + sidecar) after: {', '.join(figures)}")


# --- signing-key rotation ------------------------------------------------------------------------------------------
@pytest.mark.slow
async def test_signing_key_rotation_under_load_fails_no_call(
    etcd: Any, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    env = await start_mesh_env(tmp_path, etcd_server.endpoint, GRANTS, token_ttl_s=4)
    try:
        cp = env.controlplane
        assert cp.keys is not None
        cp.keys.retire_after_s = 4 + 3  # the token lifetime here (4 s) plus margin: a compressed timeline
        first_kid = cp.keys.active.kid
        async with AgentServer(EchoAgent(), await env.settings_for("echo"),
                               AgentServerConfig(audit_dir=tmp_path / "a")) as server:
            async with MeshClient.connect(name="loader", settings=await env.settings_for("loader", "client")) as mesh:
                assert await mesh.node.registry.wait_for_capability("echo", 1, timeout=10)
                ok = failed = 0
                errors: list[str] = []
                stop = asyncio.Event()

                async def load() -> None:
                    nonlocal ok, failed
                    while not stop.is_set():
                        try:
                            await mesh.call("echo", {"text": "k"}, timeout=5)
                            ok += 1
                        except HivemeshError as exc:
                            failed += 1
                            errors.append(f"{exc.reason}: {exc.message}")

                workers = [asyncio.ensure_future(load()) for _ in range(4)]
                kids = []
                for _ in range(2):
                    await asyncio.sleep(1.5)
                    resp = await env.operator.call(env.operator.trust.RotateSigningKey,
                                                   trust_pb2.RotateSigningKeyRequest(activate_after_seconds=1))
                    kids.append([k.kid for k in resp.keys])
                await asyncio.sleep(10)  # both rotations activate, the first key retires and leaves the JWKS
                stop.set()
                await asyncio.gather(*workers)
                assert failed == 0, errors[:5]
                assert cp.keys.active.kid != first_kid
                published = {k["kid"] for k in json.loads(cp.keys.jwks_json())["keys"]}
                assert first_kid not in published
                assert set(server.node.keyset.kids) == published
                print(f"\nFIGURE signing-key rotation: 2 rotations, {ok} calls during them, {failed} failed; "
                      f"first key retired from the JWKS")
    finally:
        await stop_mesh_env(env)


# --- the key set cannot be refreshed ----------------------------------------------------------------------------
@pytest.mark.slow
async def test_cached_keys_work_while_etcd_is_down_and_an_unknown_kid_fails_closed(
    own_etcd: EtcdServer, tmp_path: Path
) -> None:
    import grpc

    from hivemesh.mesh.errors import from_rpc_error
    from hivemesh.mesh.tls import secure_channel
    from tests.integration.test_security_e2e import INVOKE, invoke_request

    env = await start_mesh_env(tmp_path, own_etcd.endpoint, GRANTS)
    try:
        async with AgentServer(EchoAgent(), await env.settings_for("echo"),
                               AgentServerConfig(audit_dir=tmp_path / "a")) as server:
            resp = await env.operator.create_join_token("loader", "client", 120)
            w = await join(env.controlplane.join_address, env.certs.ca_cert.read_bytes(), resp.token, "loader",
                           "client", trust_domain=TRUST_DOMAIN)
            async with ControlPlaneClient(env.controlplane.address, w, TRUST_DOMAIN) as cp:
                good = (await cp.issue_token(server.node.workload.spiffe_id, ["echo"])).token
                own_etcd.stop()  # nobody can refresh the key set now
                keys = env.controlplane.keys
                assert keys is not None
                keys.rotate(0)  # a new key the agent cannot learn while etcd is down
                fresh = env.controlplane.keys
                from hivemesh.controlplane.issuer import TokenIssuer

                new_token = TokenIssuer(fresh, TRUST_DOMAIN).issue(
                    w.spiffe_id, server.node.workload.spiffe_id, ["echo"], cnf_thumbprint=w.thumbprint
                ).token
                assert jwt.get_unverified_header(new_token)["kid"] not in server.node.keyset.kids
                async with secure_channel(server.endpoint, w.channel_credentials(),
                                          server_name=server.node.workload.identity.dns_name) as ch:
                    call = ch.unary_unary(INVOKE)
                    for _ in range(3):  # the cached key keeps working ...
                        await call(invoke_request("echo", {"text": "x"}), timeout=5,
                                   metadata=[("authorization", f"Bearer {good}")])
                    with pytest.raises(grpc.aio.AioRpcError) as info:  # ... and an unknown kid fails closed
                        await call(invoke_request("echo", {"text": "x"}), timeout=5,
                                   metadata=[("authorization", f"Bearer {new_token}")])
                    err = from_rpc_error(info.value)
                    assert isinstance(err, TokenInvalidError) and "unknown key" in err.message
                # The node's metrics count the registry watch that broke, and say etcd is not connected.
                cache = server.node.registry.cache
                assert await _wait_until(lambda: cache.reconnects >= 1 and not cache.connected, 15)
                metrics = server.node.metrics
                assert metrics is not None  # on by default for an agent
                text = metrics.metrics.exposition().decode()
                assert "hivemesh_etcd_connected 0.0" in text
                assert f"hivemesh_etcd_errors_total {float(cache.reconnects)}" in text
    finally:
        own_etcd.start()
        await stop_mesh_env(env)


async def _wait_until(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_a_forged_key_set_written_to_etcd_is_refused_and_the_last_good_one_kept(
    env: MeshEnv, etcd: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An attacker with etcd write access publishes a key set holding their own key: nodes keep the last key
    set a trusted root signed, so the attacker's tokens are refused and real ones keep working."""
    import datetime

    import grpc
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from hivemesh.controlplane.issuer import SigningKeys, TokenIssuer
    from hivemesh.mesh.errors import from_rpc_error
    from hivemesh.mesh.tls import secure_channel
    from hivemesh.mesh.tokens import JWKS_KEY
    from hivemesh.mesh.trustdoc import sign_jwks
    from tests.integration.test_security_e2e import INVOKE, invoke_request

    forged_keys = SigningKeys.load_or_create(tmp_path / "attacker")
    forged_kid = forged_keys.active.kid
    real = json.loads((await etcd.get(JWKS_KEY)).value)
    forged_jwks = json.dumps({"keys": real["keys"] + json.loads(forged_keys.jwks_json())["keys"]})
    # The attacker's own "root", self-signed: its signature must count for nothing.
    root_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker root")])
    now = datetime.datetime.now(datetime.UTC)
    root = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(root_key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(root_key, hashes.SHA256()))
    forgeries = [
        forged_jwks.encode(),  # unsigned
        sign_jwks(forged_jwks, time.time_ns() + 10**12, [(root, root_key)]),  # signed by a root nobody trusts
        # the real signature, with the forged key added after signing
        json.dumps({**real, "keys": json.loads(forged_jwks)["keys"]}).encode(),
    ]
    async with AgentServer(EchoAgent(), await env.settings_for("echo"),
                           AgentServerConfig(audit_dir=tmp_path / "a")) as server:
        node = server.node
        good_kids = set(node.keyset.kids)
        assert node.metrics is not None  # an agent's metrics are on by default

        def jwks_age() -> float:
            """What the node's /metrics says: seconds since the key set it verifies with was issued."""
            assert node.metrics is not None
            age = node.metrics.metrics.registry.get_sample_value("hivemesh_jwks_age_seconds")
            assert age is not None, "no hivemesh_jwks_age_seconds"
            return age

        first_age = jwks_age()
        resp = await env.operator.create_join_token("loader", "client", 120)
        w = await join(env.controlplane.join_address, env.certs.ca_cert.read_bytes(), resp.token, "loader",
                       "client", trust_domain=TRUST_DOMAIN)
        async with ControlPlaneClient(env.controlplane.address, w, TRUST_DOMAIN) as cp:
            good = (await cp.issue_token(node.workload.spiffe_id, ["echo"])).token
            bad = TokenIssuer(forged_keys, TRUST_DOMAIN).issue(
                w.spiffe_id, node.workload.spiffe_id, ["echo"], cnf_thumbprint=w.thumbprint
            ).token
            assert jwt.get_unverified_header(bad)["kid"] == forged_kid
            async with secure_channel(server.endpoint, w.channel_credentials(),
                                      server_name=node.workload.identity.dns_name) as ch:
                call = ch.unary_unary(INVOKE)
                for i, forged in enumerate(forgeries, start=1):
                    with caplog.at_level("ERROR", logger="hivemesh.mesh.node"):
                        await etcd.put(JWKS_KEY, forged)
                        assert await _wait_until(lambda i=i: node.jwks_rejections >= i, 10), i  # type: ignore[misc]
                    assert set(node.keyset.kids) == good_kids  # the last good key set is kept
                    await call(invoke_request("echo", {"text": "x"}), timeout=5,
                               metadata=[("authorization", f"Bearer {good}")])
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call(invoke_request("echo", {"text": "x"}), timeout=5,
                                   metadata=[("authorization", f"Bearer {bad}")])
                    err = from_rpc_error(info.value)
                    assert isinstance(err, TokenInvalidError) and "unknown key" in err.message
                assert "keeping the last good one" in caplog.text and "not signed" in caplog.text
                assert jwks_age() >= first_age  # a refused key set (one claims a later issue time) is not "fresh"
                # A rotation by the control plane is signed, so it is adopted again past the forgeries, and the
                # node's JWKS age restarts from it: the set in force was issued after `asked`.
                asked = time.time()
                rotated = await env.operator.call(env.operator.trust.RotateSigningKey,
                                                  trust_pb2.RotateSigningKeyRequest(activate_after_seconds=1))
                new_kids = {k.kid for k in rotated.keys}
                assert await _wait_until(lambda: set(node.keyset.kids) == new_kids, 10)
                assert forged_kid not in node.keyset.kids and good_kids < new_kids
                assert 0 <= jwks_age() < time.time() - asked
                await call(invoke_request("echo", {"text": "x"}), timeout=5,
                           metadata=[("authorization", f"Bearer {good}")])


async def test_trust_cli_commands(env: MeshEnv) -> None:
    from tests.support.meshenv import run_cli

    code, out, err = await run_cli(env, "keys", "list", "--json")
    assert code == 0, err
    (only,) = json.loads(out)
    assert only["state"] == "active" and only["retires_at"] == 0
    code, out, err = await run_cli(env, "keys", "rotate", "--activate-after", "30", "--json")
    assert code == 0, err
    keys = json.loads(out)
    assert [k["state"] for k in keys] == ["pending", "active"] and keys[1]["retires_at"] > keys[0]["activates_at"]
    code, out, err = await run_cli(env, "tokens", "revoke", "--jti", "abc123", "--note", "leaked in a log")
    assert code == 0 and "revoked token abc123" in out, err
    code, out, err = await run_cli(env, "tokens", "revoke", "--subject", "not-a-spiffe-id")
    assert code == 1 and "INVALID_ARGUMENT" in err
    code, out, err = await run_cli(env, "tokens", "revocations", "--json")
    assert [r["jti"] for r in json.loads(out)] == ["abc123"]
    code, out, err = await run_cli(env, "ca", "status", "--json")
    assert json.loads(out)["phase"] == "steady"
    code, out, err = await run_cli(env, "ca", "rotate", "--step", "finish")
    assert code == 1 and "FAILED_PRECONDITION" in err and "prepare" in err


async def test_a_revoked_subject_gets_no_token_while_its_revocation_cannot_be_read(
    env: MeshEnv, joiner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard in front of every issuing RPC fails closed: when the read of the caller's revocation fails (a
    timeout, a cut-off member) while the grants still read, it cannot tell a revoked subject from another, so it
    answers UNAVAILABLE (retried elsewhere) rather than issue a token that no node would refuse (issued after the
    revocation, its iat is past it)."""
    from aetcd.exceptions import ConnectionTimeoutError

    from hivemesh.controlplane import trust_service

    w, cp = await joiner("loader")
    audience = f"spiffe://{TRUST_DOMAIN}/agent/echo"
    await cp.issue_token(audience, ["echo"])
    await asyncio.sleep(1.05)  # iat has a one-second resolution: revoke strictly after it
    await env.operator.call(env.operator.trust.Revoke, trust_pb2.RevokeRequest(subject=w.spiffe_id))
    with pytest.raises(TokenRevokedError):
        await cp.issue_token(audience, ["echo"])

    async def read_times_out(etcd: Any, subject: str) -> None:
        raise ConnectionTimeoutError("etcd did not answer in time")

    monkeypatch.setattr(trust_service, "subject_revoked", read_times_out)  # this read only: the grants still read
    with pytest.raises(HivemeshError) as refused:
        await cp.issue_token(audience, ["echo"])
    assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.UNAVAILABLE, "REGISTRY_UNAVAILABLE")
    assert "revocation" in refused.value.message


async def test_a_node_restarted_over_an_older_signed_key_set_refuses_it(
    env: MeshEnv, etcd: Any, tmp_path: Path
) -> None:
    """Nodes never go back to an older key set (or trust bundle), and a restart must not reset that: a node keeps
    the newest it adopted beside its identity. Here etcd holds a validly signed but older key set (a replay) while
    the node restarts: it refuses it, and starts once the current one is back."""
    import dataclasses

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from hivemesh.mesh.tokens import JWKS_KEY
    from hivemesh.mesh.trustdoc import sign_jwks

    settings = dataclasses.replace(await env.settings_for("echo"), identity_dir=tmp_path / "identity")
    config = AgentServerConfig(audit_dir=tmp_path / "a")
    async with AgentServer(EchoAgent(), settings, config) as first:
        kids = set(first.node.keyset.kids)
    current = (await etcd.get(JWKS_KEY)).value
    doc = json.loads(current)
    root = x509.load_pem_x509_certificate(env.certs.ca_cert.read_bytes())
    root_key = serialization.load_pem_private_key(env.certs.ca_key.read_bytes(), None)
    older = sign_jwks(json.dumps({"keys": doc["keys"]}), doc["hivemesh_iat"] - 10**9, [(root, root_key)])  # type: ignore[list-item]
    await etcd.put(JWKS_KEY, older)
    again = AgentServer(EchoAgent(), settings, config)  # the stored identity: no join token needed
    starting = asyncio.create_task(again.start())
    try:
        assert await _wait_until(lambda: again.node.jwks_rejections >= 1, 15), "the older key set was adopted"
        assert not again.node.keyset.kids and not starting.done()
        await etcd.put(JWKS_KEY, current)
        await asyncio.wait_for(starting, 30)
        assert set(again.node.keyset.kids) == kids
    finally:
        if not starting.done():
            starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await again.stop()

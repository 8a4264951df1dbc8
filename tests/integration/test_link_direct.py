"""Direct links (`mesh/link_direct.py`, `mesh/link_listener.py`): the Link protocol on its own mutual-TLS connection.

An agent serving links also serves direct links and advertises them (AgentInstance.link_endpoint); a caller's calls
go over them, through the same inbound chain (the caller's verified identity, its token, the audit record). The
listener takes only a client certificate of the mesh's CA, presents the node's current certificate after a renewal,
and a caller refuses a direct port that presents another identity. A direct port that cannot be reached costs a
caller nothing: its calls go over Agent/Link on gRPC. Real etcd, control plane, CA, TLS 1.3 on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from hivemesh.controlplane.ca import init_ca, load_ca
from hivemesh.mesh.errors import DeadlineExceededError, HivemeshError
from hivemesh.mesh.link_conn import GO, PREAMBLE
from hivemesh.mesh.link_direct import DirectStream, client_context, split_address
from hivemesh.mesh.outbound.link import DIRECT_RETRY_S, LinkedInvoke
from hivemesh.mesh.pki import load_cert
from hivemesh.sdk import Agent, AgentServer, AgentServerConfig, MeshClient, capability
from tests.support.meshenv import TRUST_DOMAIN
from tests.support.orch_env import Orch
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(120)


class Echo(Agent):
    name = "direct-echo"

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.held = 0
        self.cancelled = 0

    @capability()
    async def echo(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"text": req.get("text", "")}

    @capability()
    async def big(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"blob": "x" * int(req.get("n", 0))}

    @capability()
    async def hold(self, req: dict[str, Any]) -> str:
        self.held += 1
        try:
            await asyncio.wait_for(self.release.wait(), 60)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return "released"


def _invoke(client: MeshClient, server: AgentServer) -> LinkedInvoke:
    invoke = client.node.outbound.channels.get(server.endpoint, server.node.workload.spiffe_id,
                                               server.link_endpoint).invoke
    assert isinstance(invoke, LinkedInvoke)
    return invoke


def _over_direct(invoke: LinkedInvoke) -> bool:
    link = invoke._link
    return link is not None and link.direct and not link.broken


async def _until_direct(client: MeshClient, server: AgentServer, bound: int = 100) -> int:
    """Call echo until the caller's link to server is a direct one (opened in the background meanwhile; at most
    bound calls, 20 s): the calls made before it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    for n in range(bound):
        if _over_direct(_invoke(client, server)):
            return n
        assert (await client.call("echo", {"text": f"w{n}"}, timeout=10))["text"] == f"w{n}"
        if loop.time() > deadline:
            break
        await asyncio.sleep(0.01)
    raise AssertionError("the caller never moved to the direct link")


def _audit(server: AgentServer, caller: str) -> list[tuple[str, str, str]]:
    assert server.audit is not None
    return [(r["capability"], r["decision"], r["caller"]) for r in (json.loads(x) for x in server.audit.spool.lines())
            if r.get("kind") == "inbound" and caller in r.get("caller", "")]


async def test_an_agent_advertises_its_direct_link_and_callers_call_over_it(orch: Orch, tmp_path: Path) -> None:
    server = await orch.serve(Echo(), AgentServerConfig(link=True, audit_dir=tmp_path / "spools"))
    host, port = split_address(server.link_endpoint)
    assert host == "127.0.0.1" and port not in (0, server.port)
    client = await orch.client("direct-caller")
    assert await client.node.registry.wait_for_capability("echo", 1, timeout=10)
    (entry,) = client.node.registry.instances("echo")
    assert entry.link_endpoint == server.link_endpoint
    # The first calls go over Agent/Link on gRPC while the direct link connects in the background; then over it.
    before = await _until_direct(client, server)
    assert before >= 1
    answers = await asyncio.gather(*(client.call("echo", {"text": f"t{i}"}, timeout=10) for i in range(20)))
    assert [a["text"] for a in answers] == [f"t{i}" for i in range(20)]
    assert _over_direct(_invoke(client, server)), "the calls did not go over the direct link"
    assert server._link is not None and server._link.links == 2 and server._link.calls == before + 20
    # The inbound chain saw the caller's verified identity: its certificate's, read from the direct connection.
    caller = f"spiffe://{TRUST_DOMAIN}/client/direct-caller"
    assert await until(lambda: len(_audit(server, caller)) >= before + 20, 10)
    assert set(_audit(server, caller)) == {("echo", "allow", caller)}


async def test_an_agent_with_direct_links_off_advertises_none_and_is_called_over_agent_link(orch: Orch) -> None:
    server = await orch.serve(Echo(), AgentServerConfig(link=True, link_direct=False))
    assert server.link_endpoint == ""
    client = await orch.client("grpc-caller")
    assert await client.node.registry.wait_for_capability("echo", 1, timeout=10)
    assert client.node.registry.instances("echo")[0].link_endpoint == ""
    assert (await client.call("echo", {"text": "x"}, timeout=10))["text"] == "x"
    invoke = _invoke(client, server)
    assert invoke._link is not None and not invoke._link.direct and invoke._direct is None
    assert server._link is not None and server._link.links == 1


def _handshake(port: int, context: ssl.SSLContext, server_name: str | None) -> bytes:
    """Connect, handshake, send the preamble; what the server answers ("" when it closes or refuses)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        assert raw.recv(1) == GO  # the server's TLS layer is in place
        try:
            with context.wrap_socket(raw, server_hostname=server_name) as tls:
                tls.sendall(PREAMBLE + b"\x01")
                return tls.recv(len(PREAMBLE) + 1)
        except (ssl.SSLError, OSError):
            return b""


async def test_the_direct_port_takes_only_a_client_certificate_of_the_mesh(orch: Orch, tmp_path: Path) -> None:
    """Each refusal is also on the agent's audit record, as a refused handshake on its gRPC port is."""
    server = await orch.serve(Echo(), AgentServerConfig(link=True, audit_dir=tmp_path / "spools"))
    _, port = split_address(server.link_endpoint)
    name = server.node.workload.identity.dns_name
    client = await orch.client("handshaker")
    good = client_context(client.node.workload)
    assert await asyncio.to_thread(_handshake, port, good, name) == PREAMBLE + b"\x01"

    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.load_verify_locations(cadata=client.node.workload.bundle_pem.decode())
    assert await asyncio.to_thread(_handshake, port, no_cert, name) == b""

    rogue = load_ca(init_ca(tmp_path / "rogue", TRUST_DOMAIN).certs_dir)
    sid = f"spiffe://{TRUST_DOMAIN}/client/handshaker"
    cert, key = rogue.issue_with_new_key(sid, common_name="handshaker", dns_names=["handshaker.client." + TRUST_DOMAIN],
                                         ttl_s=600)
    (tmp_path / "rogue.pem").write_bytes(cert)
    (tmp_path / "rogue.key").write_bytes(key)
    foreign = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    foreign.load_verify_locations(cadata=client.node.workload.bundle_pem.decode())
    foreign.load_cert_chain(tmp_path / "rogue.pem", tmp_path / "rogue.key")
    assert await asyncio.to_thread(_handshake, port, foreign, name) == b""

    # Without SNI (dialled by address) the handshake gets the node's context all the same, client check included.
    by_address = client_context(client.node.workload)
    by_address.check_hostname = False
    assert await asyncio.to_thread(_handshake, port, by_address, None) == PREAMBLE + b"\x01"
    no_cert.check_hostname = False
    assert await asyncio.to_thread(_handshake, port, no_cert, None) == b""
    await _until_direct(client, server)
    assert server._direct is not None and server._direct.refused == 4  # these three, and the audit's probe

    def refusals() -> list[str]:
        assert server.audit is not None
        return sorted(r["reason"] for r in (json.loads(x) for x in server.audit.spool.lines())
                      if r.get("kind") == "handshake" and r.get("listener", "").endswith(f":{port}"))

    assert await until(lambda: len(refusals()) >= 3, 10), refusals()
    assert refusals() == ["TLS_CERT_MISSING", "TLS_CERT_MISSING", "TLS_CERT_UNTRUSTED"]
    status = server.node._status_snapshot()  # what `hivemesh status` shows of the node: both ports' refusals
    assert status.handshakes_refused == 3, status  # (this embedded agent's gRPC port is not audited: see below)
    assert status.handshake_audit.startswith("off: not enabled in this process"), status.handshake_audit
    assert status.handshake_audit.endswith(f"; port {port}: live"), status.handshake_audit


async def test_a_caller_refuses_a_direct_port_that_presents_another_identity(orch: Orch) -> None:
    """A direct port is dialled for the identity the registry lists: one presenting another (a process holding
    another agent's address) fails the handshake's host name check, as a gRPC channel's does."""
    server = await orch.serve(Echo(), AgentServerConfig(link=True))
    host, port = split_address(server.link_endpoint)
    client = await orch.client("wary")
    stream = DirectStream(host, port, f"someone-else.agent.{TRUST_DOMAIN}", client_context(client.node.workload))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stream.initial_metadata()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "cannot open a direct link" in (refused.value.details() or "")
    assert not stream.connected


async def test_a_direct_port_that_cannot_be_reached_leaves_the_calls_to_agent_link(orch: Orch) -> None:
    server = await orch.serve(Echo(), AgentServerConfig(link=True))
    assert server._direct is not None
    await server._direct.close()  # still advertised: as a port a firewall holds, or a listener gone
    client = await orch.client("fallback")
    assert await client.node.registry.wait_for_capability("echo", 1, timeout=10)
    invoke = _invoke(client, server)
    for i in range(100):  # every call answered, none waiting on the direct port, until the caller gives up on it
        assert (await client.call("echo", {"text": f"f{i}"}, timeout=10))["text"] == f"f{i}"
        if invoke._direct_after > 0:
            break
        await asyncio.sleep(0.02)
    assert invoke._direct_after > time.monotonic(), "the caller tries the direct link again only later"
    assert invoke._direct_after <= time.monotonic() + DIRECT_RETRY_S
    assert invoke._link is not None and not invoke._link.direct, "the calls went over Agent/Link"
    assert server._link is not None and server._link.links == 1 and server._link.calls == i + 1


async def test_a_renewed_certificate_is_presented_on_the_next_direct_handshake(orch: Orch) -> None:
    server = await orch.serve(Echo(), AgentServerConfig(link=True))
    _, port = split_address(server.link_endpoint)
    name = server.node.workload.identity.dns_name
    client = await orch.client("renewal-watcher")
    context = client_context(client.node.workload)

    def presented() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            assert raw.recv(1) == GO
            with context.wrap_socket(raw, server_hostname=name) as tls:
                der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der

    before = server.node.workload.cert_pem
    assert load_cert(ssl.DER_cert_to_PEM_cert(await asyncio.to_thread(presented)).encode()) == load_cert(before)
    server.node._renew_now.set()
    assert await until(lambda: server.node.renewals >= 1, 30), "the agent did not renew"
    assert server.node.workload.cert_pem != before
    got = load_cert(ssl.DER_cert_to_PEM_cert(await asyncio.to_thread(presented)).encode())
    assert got == load_cert(server.node.workload.cert_pem)
    assert (await client.call("echo", {"text": "renewed"}, timeout=10))["text"] == "renewed"


async def test_a_stopping_agent_answers_the_calls_its_direct_links_hold(orch: Orch) -> None:
    agent = Echo()
    server = AgentServer(agent, await orch.env.settings_for(agent.name), AgentServerConfig(link=True))
    await server.start()
    try:
        client = await orch.client("patient")
        assert await client.node.registry.wait_for_capability("hold", 1, timeout=10)
        await _until_direct(client, server)
        held = asyncio.ensure_future(client.call("hold", {}, timeout=30))
        assert await until(lambda: agent.held == 1, 10)
        assert _over_direct(_invoke(client, server))
        link = server._link
        assert link is not None
        stopping = asyncio.ensure_future(server.stop(grace=10))
        assert await until(lambda: link._draining, 20), "the agent never began to drain its links"
        agent.release.set()
        assert await asyncio.wait_for(held, 20) == "released"
        await asyncio.wait_for(stopping, 20)
    finally:
        agent.release.set()
        await server.stop()


async def test_calls_on_a_direct_link_behave_as_unary_calls(orch: Orch) -> None:
    """Refusals, deadlines, cancels and batching on a direct link, each as on Agent/Link (test_link.py)."""
    agent = Echo()
    server = await orch.serve(agent, AgentServerConfig(link=True))
    client = await orch.client("parity")
    plain = await orch.stack.enter_async_context(MeshClient.connect(
        name="parity-unary", settings=await orch.env.settings_for("parity-unary", "client"), link=False))
    for c in (client, plain):
        assert await c.node.registry.wait_for_capability("echo", 1, timeout=10)
    await _until_direct(client, server)
    invoke = _invoke(client, server)
    # A refusal of the inbound chain: the same code, reason and message as a unary call's.
    with pytest.raises(HivemeshError) as direct_refusal:
        await client.call("echo", "not an object", timeout=10)
    with pytest.raises(HivemeshError) as unary_refusal:
        await plain.call("echo", "not an object", timeout=10)
    assert (direct_refusal.value.code, direct_refusal.value.reason) == (unary_refusal.value.code,
                                                                         unary_refusal.value.reason)
    # A deadline: DEADLINE_EXCEEDED, and the agent's handler is cancelled; then a caller's own cancel.
    with pytest.raises(DeadlineExceededError):
        await client.call("hold", {}, timeout=0.5)
    assert await until(lambda: agent.cancelled == 1, 10), "the late call still runs at the agent"
    held = asyncio.ensure_future(client.call("hold", {}, timeout=30))
    assert await until(lambda: agent.held == 2, 10)
    held.cancel()
    assert await until(lambda: agent.cancelled == 2, 10), "the cancelled call still runs at the agent"
    # 50 calls at once share messages, and every answer is its own call's.
    link = invoke._link
    assert link is not None and link.direct
    sent = link.messages
    texts = [f"b{i}" for i in range(50)]
    answers = await asyncio.gather(*(client.call("echo", {"text": t}, timeout=20) for t in texts))
    assert [a["text"] for a in answers] == texts
    assert link.messages - sent < 50, "the 50 calls were not batched"
    assert invoke._link is link and not link.broken, "the direct link did not carry them all"

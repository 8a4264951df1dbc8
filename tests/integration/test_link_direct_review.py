"""What a review of the direct link found, each reproduced over real TLS, etcd and sockets before it was fixed:

- a client of a CA taken out of the trust bundle still reached the inbound chain by resuming a TLS 1.3 session it
  got before the rotation (a resumed session checks no certificate): the listener issues no session tickets;
- a link's last answers and its end status were dropped when the listener aborted the connection while they were
  still buffered (a slow caller counted answered calls as failed): it flushes and closes TLS first;
- a cancel on the gRPC link a caller had retired (moving to a direct one) was queued behind the link's end and
  never sent: a retired link ends only once its last call has settled;
- a caller that stopped within 30 s of renewing its certificate left its old direct link open: the channel pool
  closes the endpoints it was retiring.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest

from hivemesh.controlplane.ca import init_ca, load_ca
from hivemesh.mesh import link_direct
from hivemesh.mesh.link_conn import GO, HEADER, PREAMBLE, STATUS_BIT
from hivemesh.mesh.link_direct import client_context, split_address
from hivemesh.mesh.outbound.link import LinkedInvoke
from hivemesh.mesh.tls import Workload
from hivemesh.sdk import AgentServerConfig, MeshClient
from hivemesh.v1 import agent_pb2
from tests.integration.test_link_direct import Echo
from tests.support.meshenv import TRUST_DOMAIN
from tests.support.orch_env import Orch
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(120)


def _recv_exact(tls: ssl.SSLSocket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        got = tls.recv(n - len(out))
        if not got:
            raise EOFError(out)
        out += got
    return out


def _session(port: int, ctx: ssl.SSLContext, name: str, session: ssl.SSLSession | None, frame: bytes | None
             ) -> tuple[ssl.SSLSession | None, bool, str]:
    """Connect (resuming session if given), open the link, maybe send one call: (session, reused, outcome)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        assert raw.recv(1) == GO
        try:
            with ctx.wrap_socket(raw, server_hostname=name, session=session) as tls:
                tls.sendall(PREAMBLE + b"\x00")
                got = _recv_exact(tls, len(PREAMBLE) + 1)
                assert got[:-1] == PREAMBLE
                outcome = "preamble"
                if frame is not None:
                    tls.sendall(HEADER.pack(len(frame)) + frame + HEADER.pack(0))
                    (length,) = HEADER.unpack(_recv_exact(tls, 4))
                    body = _recv_exact(tls, length & ~STATUS_BIT)
                    answer = agent_pb2.LinkFrame.FromString(body).answer
                    outcome = f"answer code={answer.code} response={answer.response[:80]!r} msg={answer.message!r}"
                return tls.session, tls.session_reused, outcome
        except (ssl.SSLError, OSError, EOFError) as exc:
            return None, False, f"refused: {exc!r}"


async def test_a_session_from_before_a_ca_rotation_cannot_be_resumed(orch: Orch, tmp_path: Path) -> None:
    server = await orch.serve(Echo(), AgentServerConfig(link=True))
    listener = server._direct
    assert listener is not None
    _, port = split_address(server.link_endpoint)
    name = server.node.workload.identity.dns_name
    mallory = await orch.client("mallory")
    ctx = client_context(mallory.node.workload)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the old-CA holder need not check the server: only the server's check matters
    token = await mallory.node.outbound.tokens.get(server.node.workload.spiffe_id, "echo")

    session, reused, outcome = await asyncio.to_thread(_session, port, ctx, name, None, None)


    # The trust bundle rotates to a new CA only (the old one is removed): what MeshNode._use_workload tells it.
    new = load_ca(init_ca(tmp_path / "newca", TRUST_DOMAIN).certs_dir)
    cert, key = new.issue_with_new_key(server.node.workload.spiffe_id, common_name="resume-echo",
                                       dns_names=[name], ttl_s=600)
    rotated = Workload.from_pems(cert, key, new.bundle_pem())
    for tell in list(server.node.workload_listeners):
        tell(rotated)

    _, reused, outcome = await asyncio.to_thread(_session, port, ctx, name, None, None)

    assert outcome.startswith("refused")

    call = agent_pb2.LinkFrame(id=1, call=agent_pb2.LinkCall(
        request=agent_pb2.InvokeRequest(capability="echo", input=json.dumps({"text": "old CA"}).encode())
        .SerializeToString()))
    call.call.metadata.add(key="authorization", value=f"Bearer {token}")
    _, reused, outcome = await asyncio.to_thread(_session, port, ctx, name, session, call.SerializeToString())

    assert not reused and outcome.startswith("refused"), outcome


def _run(port: int, ctx: ssl.SSLContext, name: str, frames: list[bytes], calls: int) -> tuple[int, str]:
    """Send every call and the end of calls at once, then read slowly: (answers read, how it ended)."""
    got = 0
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        assert raw.recv(1) == GO
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall(PREAMBLE + b"\x00")
            buf = b""

            def need(n: int) -> bytes:
                nonlocal buf
                while len(buf) < n:
                    chunk = tls.recv(16 * 1024)
                    if not chunk:
                        raise EOFError
                    buf += chunk
                    time.sleep(0.001)  # a slow reader (a busy caller)
                out, buf = buf[:n], buf[n:]
                return out

            assert need(len(PREAMBLE) + 1)[:-1] == PREAMBLE
            tls.sendall(b"".join(HEADER.pack(len(f)) + f for f in frames) + HEADER.pack(0))
            try:
                while True:
                    (length,) = HEADER.unpack(need(4))
                    body = need(length & ~STATUS_BIT)
                    if length & STATUS_BIT:
                        return got, "end status"
                    frame = agent_pb2.LinkFrame.FromString(body)
                    got += len(frame.batch) or 1
            except (EOFError, OSError, ssl.SSLError) as exc:
                return got, f"connection ended without the end status ({exc!r})"


async def test_the_last_answers_and_the_end_status_reach_a_slow_caller(orch: Orch) -> None:
    server = await orch.serve(Echo(), AgentServerConfig(link=True))
    _, port = split_address(server.link_endpoint)
    name = server.node.workload.identity.dns_name
    caller = await orch.client("slow-reader")
    token = await caller.node.outbound.tokens.get(server.node.workload.spiffe_id, "big")
    calls = 80
    frames = []
    for i in range(1, calls + 1):
        call = agent_pb2.LinkCall(request=agent_pb2.InvokeRequest(
            capability="big", input=json.dumps({"n": 250_000}).encode()).SerializeToString())
        call.metadata.add(key="authorization", value=f"Bearer {token}")
        frames.append(agent_pb2.LinkFrame(id=i, call=call).SerializeToString())
    results = []
    for _ in range(3):
        results.append(await asyncio.to_thread(_run, port, client_context(caller.node.workload), name, frames, calls))

    assert all(r == (calls, "end status") for r in results), results


async def test_a_cancel_on_a_retired_link_reaches_the_agent(orch: Orch, monkeypatch: pytest.MonkeyPatch) -> None:
    original = link_direct.DirectStream._connect

    async def slow_connect(self: Any) -> None:  # a direct port slower to answer than the gRPC one (a busy peer)
        await asyncio.sleep(1.0)
        await original(self)

    monkeypatch.setattr(link_direct.DirectStream, "_connect", slow_connect)
    agent = Echo()
    server = await orch.serve(agent, AgentServerConfig(link=True))
    client = await orch.client("retire-caller")
    assert await client.node.registry.wait_for_capability("hold", 1, timeout=10)
    assert (await client.call("echo", {"text": "a"}, timeout=10))["text"] == "a"   # proven; direct link opening
    held = asyncio.ensure_future(client.call("hold", {}, timeout=60))               # over the gRPC link
    assert await until(lambda: agent.held == 1, 10)
    invoke = client.node.outbound.channels.get(server.endpoint, server.node.workload.spiffe_id,
                                               server.link_endpoint).invoke
    assert isinstance(invoke, LinkedInvoke) and invoke._link is not None and not invoke._link.direct
    assert await until(lambda: invoke._opening is not None and invoke._opening.settled, 10)
    assert (await client.call("echo", {"text": "b"}, timeout=10))["text"] == "b"   # moves to the direct link
    assert invoke._link is not None and invoke._link.direct
    held.cancel()
    cancelled = await until(lambda: agent.cancelled == 1, 5)
    assert server._link is not None

    agent.release.set()
    assert cancelled, "the cancelled call still runs at the agent (its cancel frame was never sent)"
    assert await until(lambda: server._link is not None and server._link.open_links == 1, 10), "the retired link"


async def test_a_stopped_caller_leaves_no_direct_link_open(orch: Orch) -> None:
    server = await orch.serve(Echo(), AgentServerConfig(link=True))
    client = MeshClient.connect(name="leaky", settings=await orch.env.settings_for("leaky", "client"))
    await client.__aenter__()
    try:
        assert await client.node.registry.wait_for_capability("echo", 1, timeout=10)
        listener = server._direct
        assert listener is not None
        for i in range(200):
            await client.call("echo", {"text": str(i)}, timeout=10)
            inv = client.node.outbound.channels.get(server.endpoint, server.node.workload.spiffe_id,
                                                    server.link_endpoint).invoke
            if inv._link is not None and inv._link.direct:
                break
            await asyncio.sleep(0.02)
        assert listener._connections, "never went direct"
        client.node._renew_now.set()
        assert await until(lambda: client.node.renewals >= 1, 30)
    finally:
        await client.__aexit__(None, None, None)
    def link_tasks() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if "_Link._" in repr(t) or "DirectStream" in repr(t)]

    assert await until(lambda: not listener._connections and not link_tasks(), 10), (listener._connections,
                                                                                     link_tasks())

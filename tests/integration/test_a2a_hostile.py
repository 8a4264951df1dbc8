"""The A2A gateway and bridge against hostile or broken peers: oversized and deep bodies, long names, cancels
after a restart, answers too large to keep, and external A2A agents that fail in every way they can."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.types import AgentSkill, CancelTaskRequest, GetTaskRequest, TaskState
from google.protobuf.json_format import MessageToDict

from hivemesh.mesh.errors import AgentError, HivemeshError, InvalidInputError
from hivemesh.sdk import AgentServer, MeshClient
from hivemesh.sdk.a2a.bridge import A2ABridgeAgent, fetch_card
from hivemesh.sdk.a2a.gateway import MAX_BODY_BYTES, A2AGateway
from hivemesh.sdk.escalation import EscalationClient
from tests.integration import test_a2a_gateway as gateway_tests
from tests.integration.test_a2a_gateway import Rig, client_for
from tests.support.a2a_rig import send_request, tools_card
from tests.support.meshenv import MeshEnv, run_cli

pytestmark = pytest.mark.timeout(180)
rig = gateway_tests.rig  # the gateway tests' fixture: a mesh, its agents, the gateway, alice and bob


# --- raw HTTP over TLS: what a client that does not play by the rules sends ----------------------------------------
def _tls(rig: Rig, who: MeshClient | None, folder: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=rig.gateway.mesh.node.workload.bundle_pem.decode())
    ctx.check_hostname = False
    if who is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cert.pem").write_bytes(who.node.workload.cert_pem)
        (folder / "key.pem").write_bytes(who.node.workload.key_pem)
        ctx.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return ctx


@contextlib.asynccontextmanager
async def _raw(rig: Rig, who: MeshClient | None) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    ctx = _tls(rig, who, rig.tmp / f"raw-{who.node.name if who else 'anon'}")
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.gateway.port, ssl=ctx)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await asyncio.wait_for(writer.wait_closed(), 5)


async def _head(rig: Rig, who: MeshClient | None, extra: str) -> str:
    token = ""
    if who is not None:
        token = (await who.node.controlplane.issue_token(rig.gateway.spiffe_id, ["echo"])).token
    return ("POST / HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            + (f"Authorization: Bearer {token}\r\n" if token else "") + extra + "\r\n")


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of the answer; bounded: a gateway still waiting for the body never answers."""
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode()
    status = int(head.split(" ", 2)[1])
    length = next(int(line.split(":", 1)[1]) for line in head.split("\r\n")
                  if line.lower().startswith("content-length"))
    return status, json.loads(await asyncio.wait_for(reader.readexactly(length), 10))


async def _send_chunks(writer: asyncio.StreamWriter, total: int) -> None:
    """A chunked body of total bytes (a JSON string, so a gateway reading it all would try to parse it); the
    gateway may close the connection midway, which is what a refusal looks like from here."""
    chunk = b"a" * (64 * 1024)
    with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
        writer.write(b'%x\r\n{"x":"\r\n' % 6)
        for _ in range(total // len(chunk)):
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
        writer.write(b'2\r\n"}\r\n0\r\n\r\n')
        await writer.drain()


async def test_an_unauthenticated_request_is_refused_without_its_body_being_read(rig: Rig) -> None:
    # A declared body of several MiB, never sent: the 401 comes at once (the body was waited for before).
    async with _raw(rig, None) as (reader, writer):
        writer.write((await _head(rig, None, f"Content-Length: {MAX_BODY_BYTES * 4}\r\n")).encode() + b'{"id": 7')
        status, body = await _response(reader)
        assert status == 401 and body["error"]["code"] == -32600 and body["id"] is None
        assert "present a client certificate" in body["error"]["message"]
    # A chunked body that never ends: the same.
    async with _raw(rig, None) as (reader, writer):
        writer.write((await _head(rig, None, "Transfer-Encoding: chunked\r\n")).encode() + b"5\r\n[1,2,\r\n")
        status, body = await _response(reader)
        assert status == 401 and body["error"]["data"]["reason"] == "UNAUTHENTICATED"
    # A caller with a certificate but no token: refused before its body too.
    async with _raw(rig, rig.alice) as (reader, writer):
        writer.write(b"POST / HTTP/1.1\r\nHost: g\r\nContent-Length: 1000000\r\n\r\n{")
        status, body = await _response(reader)
        assert status == 401 and "Bearer" in body["error"]["message"]


async def test_a_body_over_the_bound_is_refused_413(rig: Rig) -> None:
    # Declared too large: refused on the header, the body never sent.
    async with _raw(rig, rig.alice) as (reader, writer):
        writer.write((await _head(rig, rig.alice, f"Content-Length: {MAX_BODY_BYTES + 1}\r\n")).encode())
        status, body = await _response(reader)
        assert status == 413 and body["error"]["code"] == -32600 and str(MAX_BODY_BYTES) in body["error"]["message"]
    # Chunked (no length said): counted as it comes, refused once past the bound.
    async with _raw(rig, rig.alice) as (reader, writer):
        writer.write((await _head(rig, rig.alice, "Transfer-Encoding: chunked\r\n")).encode())
        sending = asyncio.get_running_loop().create_task(_send_chunks(writer, MAX_BODY_BYTES + 256 * 1024))
        try:
            status, body = await _response(reader)
        finally:
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sending
        assert status == 413, body
    # Under the bound, the same client is served as usual.
    async with await rig.http_for(rig.alice) as http:
        ok = await _rpc(http, rig, "message/send", {"message": _msg({"text": "hi"}, "echo")})
        assert ok["result"]["status"]["state"] == "completed", ok


def _msg(data: Any, skill: str, mid: str = "m1") -> dict[str, Any]:
    return {"role": "user", "messageId": mid, "kind": "message", "parts": [{"kind": "data", "data": data}],
            "metadata": {"skill": skill}}


async def _rpc(http: httpx.AsyncClient, rig: Rig, method: str, params: dict[str, Any]) -> dict[str, Any]:
    version = "0.3" if "/" in method else "1.0"
    r = await http.post(f"{rig.gateway.url}/", json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params},
                        headers={"A2A-Version": version})
    assert r.status_code == 200, r.text[:300]
    return r.json()  # type: ignore[no-any-return]


async def test_a_long_skill_name_is_not_echoed_whole(rig: Rig) -> None:
    async with await rig.http_for(rig.alice) as http:
        err = (await _rpc(http, rig, "message/send", {"message": _msg({"text": "x"}, "x" * 200_000)}))["error"]
        assert err["code"] == -32602 and "no skill 'xxxx" in err["message"]
        assert len(err["message"]) < 1000, len(err["message"])


async def test_data_nested_past_what_protobuf_parses_is_invalid_params(rig: Rig) -> None:
    async with await rig.http_for(rig.alice) as http:
        for method in ("message/send", "SendMessage"):
            for depth in (50, 400):
                deep: Any = 1
                for _ in range(depth):
                    deep = [deep]
                err = (await _rpc(http, rig, method, {"message": _msg({"text": "x", "deep": deep}, "echo")}))
                assert err["error"]["code"] == -32602, (method, depth, err)
                assert "nests" in err["error"]["message"]
        # Nesting well within the bound is served (by a capability taking any object).
        deep = 1
        for _ in range(10):
            deep = [deep]
        ok = await _rpc(http, rig, "message/send", {"message": _msg({"deep": deep}, "whoami", "m2")})
        assert ok["result"]["status"]["state"] == "completed", ok["result"]["status"]


async def test_a_cancel_after_a_gateway_restart_cancels_the_run_and_its_escalation(rig: Rig) -> None:
    async with await rig.http_for(rig.alice) as http:
        client = await client_for(http, f"{rig.gateway.url}/agents/desk/.well-known/agent-card.json")
        asked = [e async for e in client.send_message(
            send_request({"question": "refund order 9?"}, skill="approve-refund"))][-1].task
    assert asked.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
    escalation_id = MessageToDict(asked.status.message.metadata)["hivemesh"]["escalation_id"]
    await rig.gateway.stop()
    async with A2AGateway(await rig.env.settings_for("a2a-gateway")) as second:
        rig.gateway = second
        async with await rig.http_for(rig.alice) as http:
            client = await client_for(http, f"{second.url}/agents/desk/.well-known/agent-card.json")
            canceled = await client.cancel_task(CancelTaskRequest(id=asked.id))
            assert canceled.status.state == TaskState.TASK_STATE_CANCELED
            run = await second.executor.engine.get(asked.id)
            assert run.state == "CANCELED", run.state
            assert not (await EscalationClient(rig.env.operator).get(escalation_id)).pending
            got = await client.get_task(GetTaskRequest(id=asked.id))
            assert got.status.state == TaskState.TASK_STATE_CANCELED


async def test_an_input_too_large_to_keep_is_refused_before_any_run(rig: Rig) -> None:
    async with await rig.http_for(rig.alice) as http:
        before = len(await rig.gateway.executor.engine.list())
        err = (await _rpc(http, rig, "message/send", {"message": _msg({"text": "z" * 600_000}, "echo")}))["error"]
        assert err["code"] == -32602 and "at most" in err["message"], err
        assert len(await rig.gateway.executor.engine.list()) == before  # no run was started


async def test_an_answer_too_large_to_keep_leaves_the_task_failed_and_listable(rig: Rig) -> None:
    async with await rig.http_for(rig.alice) as http:
        small = (await _rpc(http, rig, "message/send", {"message": _msg({"text": "s"}, "echo", "m0")}))["result"]
        # The input fits; with the echoed answer the task would be ~600 KB, more than a task keeps.
        sent = await asyncio.wait_for(_rpc(http, rig, "message/send", {"message": _msg({"text": "y" * 300_000},
                                                                                        "echo")}), 60)
        assert "result" in sent, str(sent)[:300]
        big_id = sent["result"]["id"]
        got = (await _rpc(http, rig, "tasks/get", {"id": big_id}))["result"]
        assert got["status"]["state"] == "failed", str(got)[:300]
        words = got["status"]["message"]["parts"][0]["text"]
        assert "PAYLOAD_TOO_LARGE" in words and "answer" in words
        again = (await _rpc(http, rig, "tasks/get", {"id": big_id}))["result"]  # stays so (not re-synced)
        assert again["status"]["state"] == "failed"
        listed = await _rpc(http, rig, "ListTasks", {})
        assert {big_id, small["id"]} <= {t["id"] for t in listed["result"]["tasks"]}, str(listed)[:300]


async def test_one_unreadable_task_does_not_break_list_tasks(rig: Rig) -> None:
    async with await rig.http_for(rig.alice) as http:
        kept = [(await _rpc(http, rig, "message/send", {"message": _msg({"text": n}, "echo", n)}))["result"]["id"]
                for n in ("a", "b")]
        key = f"/hivemesh/workflows/{rig.gateway.executor.engine.owner_segment}/{kept[0]}/a2a-task"
        await rig.gateway.executor.engine.store.etcd.put(key.encode(), b"not a task")  # damaged in etcd
        listed = await _rpc(http, rig, "ListTasks", {})
        assert "result" in listed, str(listed)[:300]
        assert {t["id"] for t in listed["result"]["tasks"]} == {kept[1]}


# --- the bridge: an external A2A agent that fails --------------------------------------------------------------
@contextlib.contextmanager
def _hostile_agent() -> Iterator[ThreadingHTTPServer]:
    """An "A2A agent" on 127.0.0.1 whose skills fail: JSON-RPC invalid params, HTML, HTTP 500."""
    card = tools_card()
    del card.skills[:]
    for sid in ("rpcerr", "html", "http500", "declares-100mib", "floods"):
        card.skills.append(AgentSkill(id=sid, name=sid, description=sid, tags=["t"]))
    served: dict[str, bytes] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._send(200, served["card"])

        def do_POST(self) -> None:
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            skill = json.dumps(req).split('"skill": "')[1].split('"')[0]
            if skill == "rpcerr":
                self._send(200, json.dumps({"jsonrpc": "2.0", "id": req.get("id"), "error": {
                    "code": -32602, "message": "invalid params: a must be a number"}}).encode())
            elif skill == "html":
                self._send(200, b"<html>maintenance</html>", "text/html")
            elif skill == "declares-100mib":  # then sends nothing: a client that waits for the body hangs
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(100 << 20))
                self.end_headers()
            elif skill == "floods":  # an endless answer, chunk after chunk (at most 20 MiB, if nobody stops it)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunk = b"x" * (256 << 10)
                with contextlib.suppress(OSError):
                    for _ in range(80):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            else:
                self._send(500, b"oops", "text/plain")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    card.supported_interfaces.add(url=f"http://127.0.0.1:{server.server_address[1]}/", protocol_binding="JSONRPC",
                                  protocol_version="1.0")
    served["card"] = json.dumps(agent_card_to_dict(card)).encode()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextlib.asynccontextmanager
async def _bridged(mesh_env: MeshEnv, server: ThreadingHTTPServer,
                   http: httpx.AsyncClient) -> AsyncIterator[MeshClient]:
    """The hostile agent bridged onto the mesh (its card read through http), and a client calling it."""
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    bridge = await A2ABridgeAgent.from_card(await fetch_card(url, http), http, name="hostile")
    try:
        async with AgentServer(bridge, await mesh_env.settings_for("hostile")), \
                MeshClient.connect(name="tester", settings=await mesh_env.settings_for("tester", "client")) as mesh:
            assert await mesh.node.registry.wait_for_capability("floods", 1, timeout=10)
            yield mesh
    finally:
        await bridge.close()


async def test_the_bridges_client_refuses_an_answer_too_large_to_hold(mesh_env: MeshEnv) -> None:
    """httpx reads a body whole: an external agent declaring 100 MiB, or streaming without end, made the bridge
    wait for it, or hold it all. The bridge's client (`http_client`, what `hivemesh a2a register` uses) refuses
    past MAX_ANSWER_BYTES."""
    from hivemesh.sdk.a2a.bridge import http_client

    with _hostile_agent() as server:
        async with http_client(timeout=30) as http, _bridged(mesh_env, server, http) as mesh:
            for skill in ("declares-100mib", "floods"):
                with pytest.raises(AgentError) as refused:
                    await mesh.call(skill, {"a": 1}, timeout=20)
                assert "answered too much" in refused.value.message, refused.value.message


async def test_the_bridge_maps_an_a2a_agents_failures(mesh_env: MeshEnv) -> None:
    with _hostile_agent() as server:
        async with httpx.AsyncClient(timeout=10) as http, _bridged(mesh_env, server, http) as mesh:
            with pytest.raises(InvalidInputError) as bad:
                await mesh.call("rpcerr", {"a": "x"}, timeout=10)
            assert "a must be a number" in bad.value.message
            with pytest.raises(AgentError) as html:
                await mesh.call("html", {"a": "x"}, timeout=10)
            assert "not A2A JSON-RPC" in html.value.message and len(html.value.message) < 300
            with pytest.raises(AgentError) as http500:
                await mesh.call("http500", {"a": "x"}, timeout=10)
            assert "HTTP 500" in http500.value.message and len(http500.value.message) < 300
            server.shutdown()
            server.server_close()  # the A2A agent goes away
            with pytest.raises(HivemeshError) as down:
                await mesh.call("rpcerr", {"a": 1}, timeout=10)
            assert down.value.code == grpc.StatusCode.UNAVAILABLE, down.value
            assert "unreachable" in down.value.message


@contextlib.contextmanager
def _card_server(body: bytes) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/card.json"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


async def test_a_card_that_is_json_but_not_a_card_is_refused_clearly(mesh_env: MeshEnv) -> None:
    for body in (b"[1, 2]", b'{"name": 5, "skills": "x"}'):
        with _card_server(body) as url:
            async with httpx.AsyncClient(timeout=10) as http:
                with pytest.raises(InvalidInputError) as bad:
                    await fetch_card(url, http)
                assert "could not read an A2A agent card" in bad.value.message
            code, out, err = await run_cli(mesh_env, "a2a", "register", url)
            assert code == 1, (code, out, err)
            assert "could not read an A2A agent card" in err and "Traceback" not in err, err

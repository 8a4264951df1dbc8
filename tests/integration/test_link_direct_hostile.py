"""The direct-link port (`mesh/link_direct.py`, `mesh/link_listener.py`) attacked over real TLS sockets on
127.0.0.1, by a stranger (no certificate, another CA's, TLS 1.2, a mesh certificate without SNI) and by a peer
holding a valid workload certificate of the mesh (wire-format breaks, hostile frames, floods, abandoned
connections, another identity's token).

Every attack must end clearly: the handshake is refused, or the connection ends (with an INVALID_ARGUMENT end
status where the protocol has one), a refusal is on the agent's audit record as Agent/Link's are, the agent holds
nothing for the attacker afterwards, and it still serves a normal caller over its direct link."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import status_pb2

from hivemesh.controlplane.ca import init_ca, load_ca
from hivemesh.mesh.link_conn import FLAG_BATCHES, GO, HEADER, PREAMBLE, STATUS_BIT
from hivemesh.mesh.link_direct import client_context, split_address
from hivemesh.mesh.link_server import MAX_HELD_BYTES, MAX_OPEN_CALLS
from hivemesh.mesh.outbound.link import LinkedInvoke
from hivemesh.mesh.tls import MAX_MESSAGE_BYTES, Workload
from hivemesh.sdk import Agent, AgentServer, AgentServerConfig, MeshClient, capability
from hivemesh.v1 import agent_pb2
from tests.support.links import raw_direct_tls
from tests.support.meshenv import TRUST_DOMAIN
from tests.support.orch_env import Orch
from tests.support.waiting import until

HANDSHAKE_S = 5.0
"""The agent's handshake (and preamble) timeout here: the silent peers' tests wait it out, and 10 s each added up."""

pytestmark = pytest.mark.timeout(180)

MALLORY = f"spiffe://{TRUST_DOMAIN}/client/mallory"
_NOT_A_FRAME = b"\xff\xff\xff"
"""Not a LinkFrame: a field tag whose varint never ends."""


class Target(Agent):
    """The agent attacked: an echo, an answer of any size, and a call that waits until released (counted)."""

    name = "target"
    version = "1.0.0"

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.holding = 0
        self.held_calls = 0
        self.cancelled = 0

    @capability(description="echo", idempotent=True)
    async def echo(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"text": req.get("text", "")}

    @capability(description="an answer of n bytes")
    async def big(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"blob": "x" * int(req.get("n", 0))}

    @capability(description="wait until the test releases it")
    async def hold(self, req: dict[str, Any]) -> dict[str, Any]:
        self.holding += 1
        self.held_calls += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.holding -= 1
        return {}


@dataclass
class Rig:
    orch: Orch
    server: AgentServer
    agent: Target
    mallory: MeshClient

    @property
    def workload(self) -> Workload:
        return self.mallory.node.workload

    @property
    def address(self) -> tuple[str, int]:
        return split_address(self.server.link_endpoint)

    @property
    def server_name(self) -> str:
        return self.server.node.workload.identity.dns_name

    async def token(self, client: MeshClient | None = None, capability: str = "echo") -> str:
        client = client or self.mallory
        return await client.node.outbound.tokens.get(self.server.node.workload.spiffe_id, capability)

    def inbound(self) -> list[dict[str, Any]]:
        """The agent's inbound audit records, as written to its spool."""
        assert self.server.audit is not None, "the agent's audit log is off"
        records = [json.loads(line) for line in self.server.audit.spool.lines()]
        return [r for r in records if r.get("kind") == "inbound"]

    def held_nothing(self) -> bool:
        """The agent holds nothing for attackers: no open direct connection, no open link, no call running."""
        listener = self.server._direct
        link = self.server._link
        assert listener is not None and link is not None
        return not listener._connections and link.open_links == 0 and self.agent.holding == 0

    async def still_serves(self) -> None:
        """A normal caller's calls succeed, and go over the agent's direct link (a caller may send its first calls
        over Agent/Link while its direct link connects: a bounded few calls)."""
        invoke: Any = None
        for n in range(50):
            got = await self.orch.mesh.call("echo", {"text": f"still here {n}"}, timeout=15)
            assert got == {"text": f"still here {n}"}, got
            invoke = self.orch.mesh.node.outbound.channels.get(
                self.server.endpoint, self.server.node.workload.spiffe_id, self.server.link_endpoint).invoke
            assert isinstance(invoke, LinkedInvoke)
            if await until(functools.partial(_over_direct_link, invoke), 0.2):
                return
        raise AssertionError(f"a normal caller's calls never went over the direct link: {invoke._link!r}")


def _over_direct_link(invoke: LinkedInvoke) -> bool:
    """Whether the caller's link to the agent is a direct link that connected."""
    link = invoke._link
    return link is not None and link.direct and not link.broken  # made direct only once its DirectStream connected


@pytest.fixture
async def rig(orch: Orch, tmp_path: Path) -> AsyncIterator[Rig]:
    agent = Target()
    server = await orch.serve(agent, AgentServerConfig(link=True, link_direct=True, audit_dir=tmp_path / "spools"))
    assert server.link_endpoint and server._direct is not None, "the agent serves no direct link"
    server._direct.handshake_timeout_s = HANDSHAKE_S  # the silent peers' tests wait it out
    mallory = await orch.client("mallory")
    try:
        yield Rig(orch, server, agent, mallory)
    finally:
        agent.release.set()


# --- wire helpers (the attacker's side, written by hand) ----------------------------------------------------


def _context(workload: Workload | None, tmp: Path, *, cert: bytes | None = None, key: bytes | None = None,
             tls12: bool = False) -> ssl.SSLContext:
    """A client context that does not check the server and offers cert/key (a workload's, or given)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if workload is not None:
        cert, key = workload.cert_pem, workload.key_pem
    if cert is not None and key is not None:
        (tmp / "attacker.pem").write_bytes(cert)
        (tmp / "attacker.key").write_bytes(key)
        ctx.load_cert_chain(tmp / "attacker.pem", tmp / "attacker.key")
    return ctx


async def _connect(rig: Rig, ctx: ssl.SSLContext, *, sni: str | None = "") -> tuple[
        asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS connection to the agent's direct port ("" SNI: the agent's DNS name; None: no SNI at all)."""
    host, port = rig.address
    return await raw_direct_tls(host, port, ctx, rig.server_name if sni == "" else sni)


async def _hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flags: int = FLAG_BATCHES) -> int:
    writer.write(PREAMBLE + bytes([flags]))
    got = await asyncio.wait_for(reader.readexactly(len(PREAMBLE) + 1), 10)
    assert got[:-1] == PREAMBLE, got
    return got[-1]


async def _open(rig: Rig, tmp: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A direct link opened with mallory's valid workload certificate, preambles exchanged."""
    reader, writer = await _connect(rig, client_context(rig.workload))
    await _hello(reader, writer)
    return reader, writer


def _send(writer: asyncio.StreamWriter, message: bytes, *, status: bool = False) -> None:
    writer.write(HEADER.pack(len(message) | (STATUS_BIT if status else 0)) + message)


def _call(call_id: int, capability: str, payload: Any, token: str = "", timeout_s: float = 0.0,
          request: bytes | None = None) -> agent_pb2.LinkFrame:
    if request is None:
        request = agent_pb2.InvokeRequest(capability=capability, input=json.dumps(payload).encode()).SerializeToString()
    call = agent_pb2.LinkCall(request=request, timeout_s=timeout_s)
    if token:
        call.metadata.add(key="authorization", value=f"Bearer {token}")
    return agent_pb2.LinkFrame(id=call_id, call=call)


@dataclass
class Ending:
    answers: dict[int, agent_pb2.LinkAnswer]
    status: Any  # google.rpc.Status, or None: the connection ended without one
    broke: str = ""


async def _read_to_end(reader: asyncio.StreamReader, limit_s: float = 20.0, *, stop_after: int = 0) -> Ending:
    """Every answer until the end status (or the connection's end); stop_after > 0: return once that many answers
    came (status None)."""
    answers: dict[int, agent_pb2.LinkAnswer] = {}

    async def run() -> Ending:
        for _ in range(100_000):
            try:
                head = await reader.readexactly(HEADER.size)
            except (asyncio.IncompleteReadError, OSError, ssl.SSLError) as exc:
                return Ending(answers, None, repr(exc))
            (length,) = HEADER.unpack(head)
            body = await reader.readexactly(length & ~STATUS_BIT)
            if length & STATUS_BIT:
                return Ending(answers, status_pb2.Status.FromString(body))
            frame = agent_pb2.LinkFrame.FromString(body)
            for one in (frame.batch or [frame]):
                answers[one.id] = one.answer
            if stop_after and len(answers) >= stop_after:
                return Ending(answers, None)
        raise AssertionError("too many messages")

    return await asyncio.wait_for(run(), limit_s)


async def _one_call(rig: Rig, ctx: ssl.SSLContext, text: str, *, sni: str | None = "") -> Ending:
    """One echo call of text (with a valid token) on a new connection made with ctx, then the end of calls: how the
    link ended."""
    reader, writer = await _connect(rig, ctx, sni=sni)
    try:
        await _hello(reader, writer)
        _send(writer, _call(1, "echo", {"text": text}, await rig.token()).SerializeToString())
        _send(writer, b"")
        return await _read_to_end(reader)
    finally:
        _close(writer)


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.transport.abort()


async def _refused(rig: Rig, ctx: ssl.SSLContext, *, sni: str | None = "") -> str:
    """One connection the port must refuse before it ever answers a preamble: how it was refused."""
    try:
        reader, writer = await _connect(rig, ctx, sni=sni)
    except (ssl.SSLError, OSError) as exc:  # TLS 1.2: refused inside the handshake, on the client's side
        return repr(exc)
    try:
        writer.write(PREAMBLE + bytes([FLAG_BATCHES]))
        try:
            got = await asyncio.wait_for(reader.readexactly(len(PREAMBLE) + 1), HANDSHAKE_S * 1.5)
        except (asyncio.IncompleteReadError, ssl.SSLError, OSError) as exc:  # TLS 1.3: the verdict after Finished
            return repr(exc)
        raise AssertionError(f"the direct port accepted the connection (it answered {got!r})")
    finally:
        _close(writer)


# --- (a) strangers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["no-certificate", "no-certificate-no-sni", "another-ca", "tls12-valid-cert"])
async def test_a_stranger_is_refused_in_the_handshake(rig: Rig, tmp_path: Path, who: str) -> None:
    listener = rig.server._direct
    assert listener is not None
    sni: str | None = ""
    if who == "no-certificate":
        ctx = _context(None, tmp_path)
    elif who == "no-certificate-no-sni":
        ctx, sni = _context(None, tmp_path), None
    elif who == "another-ca":
        init_ca(tmp_path / "rogue", TRUST_DOMAIN)
        cert, key = load_ca(tmp_path / "rogue").issue_with_new_key(
            MALLORY, common_name="mallory", dns_names=[f"mallory.client.{TRUST_DOMAIN}"], ttl_s=600)
        ctx = _context(None, tmp_path, cert=cert, key=key)
    else:
        ctx = _context(rig.workload, tmp_path, tls12=True)
    how = await _refused(rig, ctx, sni=sni)
    assert how
    assert await until(rig.held_nothing, 10), "the agent still holds the refused connection"
    assert rig.server._link is not None and rig.server._link.links == 0, "a refused stranger got a link"
    await rig.still_serves()


async def test_a_mesh_certificate_without_sni_is_served_as_with_it(rig: Rig, tmp_path: Path) -> None:
    """No SNI (a client connecting by IP without a name): the listener still switches to the node's context (the
    callback runs with no name), so a valid workload is served, and identified by its certificate alone."""
    end = await _one_call(rig, _context(rig.workload, tmp_path), "no sni", sni=None)
    assert end.status is not None and end.status.code == 0, end
    assert end.answers[1].code == 0, end.answers
    assert rig.inbound()[-1]["caller"] == MALLORY, rig.inbound()[-1]
    assert await until(rig.held_nothing, 10)
    await rig.still_serves()


async def test_the_mesh_ca_certificate_as_a_client_certificate_is_refused_per_call(rig: Rig, tmp_path: Path) -> None:
    """The trust anchor itself, presented as a client certificate (the holder has its key): TLS accepts it (it
    chains to the bundle), but it names no workload, so every call on the link is refused by the identity layer,
    and recorded."""
    certs = rig.orch.env.certs
    ctx = _context(None, tmp_path, cert=certs.ca_cert.read_bytes(), key=certs.ca_key.read_bytes())
    end = await _one_call(rig, ctx, "i am the ca")
    assert end.status is not None and end.status.code == 0, end
    assert end.answers[1].code == grpc.StatusCode.UNAUTHENTICATED.value[0], end.answers
    record = rig.inbound()[-1]
    assert record["method"] == "Invoke" and record["status"] == "UNAUTHENTICATED", record
    assert await until(rig.held_nothing, 10)
    await rig.still_serves()


# --- (b) a peer with a valid workload certificate: before and around the preamble ---------------------------


@pytest.mark.parametrize("opening", ["silence", "wrong-preamble", "http2-preface"])
async def test_a_verified_peer_that_does_not_open_the_link_is_dropped_and_recorded(
    rig: Rig, tmp_path: Path, opening: str
) -> None:
    """TLS completes with a valid certificate, then no preamble (silence, other bytes): the connection is dropped
    within the handshake timeout, nothing is held, and the refusal is on the agent's audit record with the
    sender's verified identity, as Agent/Link's refusals of bytes it cannot read are."""
    listener = rig.server._direct
    assert listener is not None
    before = listener.refused
    records = len(rig.inbound())
    reader, writer = await _connect(rig, client_context(rig.workload))
    try:
        if opening == "wrong-preamble":
            writer.write(b"hivemesh-link/9\n\x01")
        elif opening == "http2-preface":
            writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        got = await asyncio.wait_for(reader.read(64), HANDSHAKE_S + 5)
    finally:
        _close(writer)
    assert got == b"", f"the agent answered a peer that did not open the link: {got!r}"
    assert listener.refused == before + 1
    assert await until(rig.held_nothing, 10)
    assert await until(lambda: len(rig.inbound()) > records, 10), "the refused opening left no audit record"
    record = rig.inbound()[-1]
    assert (record["method"], record["status"], record["caller"]) == ("Link", "INVALID_ARGUMENT", MALLORY), record
    await rig.still_serves()


# --- (b) a verified peer breaking the wire format after the preamble ----------------------------------------


_NESTED = agent_pb2.LinkFrame(batch=[agent_pb2.LinkFrame(batch=[agent_pb2.LinkFrame(id=5, cancel=True)])])


@pytest.mark.parametrize("attack, problem", [
    ("over-limit", "a direct-link message of"),
    ("status-bit", "a client sent a direct-link end status"),
    ("not-a-frame", "a Link message does not decode as hivemesh.v1.LinkFrame"),
    ("an-answer", "link frame 7 is neither a call nor a cancel"),
    ("nested-batch", "link frame 0 is neither a call nor a cancel"),
])
async def test_a_wire_break_ends_the_link_invalid_argument_after_its_calls_and_is_recorded(
    rig: Rig, tmp_path: Path, attack: str, problem: str
) -> None:
    token = await rig.token()
    reader, writer = await _open(rig, tmp_path)
    records = len(rig.inbound())
    try:
        _send(writer, _call(1, "echo", {"text": "before"}, token).SerializeToString())
        first = await _read_to_end(reader, stop_after=1)
        assert first.answers[1].code == 0, first
        if attack == "over-limit":
            writer.write(HEADER.pack(MAX_MESSAGE_BYTES + 1) + b"\0" * 1024)
        elif attack == "status-bit":
            _send(writer, b"\x08\x01", status=True)
        elif attack == "not-a-frame":
            _send(writer, _NOT_A_FRAME)
        elif attack == "an-answer":
            _send(writer, agent_pb2.LinkFrame(id=7, answer=agent_pb2.LinkAnswer(code=0)).SerializeToString())
        else:
            _send(writer, _NESTED.SerializeToString())
        end = await _read_to_end(reader)
    finally:
        _close(writer)
    assert end.status is not None, f"the link ended without an end status: {end.broke}"
    assert end.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], end.status
    assert end.status.message.startswith(problem), end.status
    assert await until(lambda: len(rig.inbound()) > records, 10), "the refused link left no audit record"
    link_records = [r for r in rig.inbound()[records:] if r["method"] == "Link"]
    assert len(link_records) == 1, rig.inbound()[records:]
    record = link_records[0]
    assert (record["decision"], record["status"], record["reason"]) == (
        "invalid", "INVALID_ARGUMENT", "INVALID_INPUT"), record
    assert record["caller"] == MALLORY and "caller_unverified" not in record, record
    assert record["message"].startswith(problem), record
    assert await until(rig.held_nothing, 10)
    await rig.still_serves()


async def test_half_a_message_then_close_holds_nothing(rig: Rig, tmp_path: Path) -> None:
    _, writer = await _open(rig, tmp_path)
    frame = _call(1, "echo", {"text": "cut"}, await rig.token()).SerializeToString()
    writer.write(HEADER.pack(len(frame)) + frame[: len(frame) // 2])
    await writer.drain()
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 5)
    assert await until(rig.held_nothing, 10), "the agent still holds a connection cut inside a message"
    assert rig.agent.held_calls == 0
    await rig.still_serves()


# --- (b) hostile frames on a well-formed link ---------------------------------------------------------------


async def test_hostile_call_frames_are_answered_one_by_one_and_the_link_goes_on(rig: Rig, tmp_path: Path) -> None:
    """A request that is not an InvokeRequest, cancels of unknown ids, a duplicate id of a running call: each is
    that call's own refusal (INVALID_ARGUMENT), the link goes on, and ends OK once its calls are answered."""
    token = await rig.token()
    hold_token = await rig.token(capability="hold")
    reader, writer = await _open(rig, tmp_path)
    records = len(rig.inbound())
    try:
        _send(writer, _call(1, "", None, token, request=_NOT_A_FRAME).SerializeToString())
        for unknown in (99, 2**63, 0):
            _send(writer, agent_pb2.LinkFrame(id=unknown, cancel=True).SerializeToString())
        _send(writer, _call(2, "hold", {}, hold_token).SerializeToString())
        assert await until(lambda: rig.agent.holding == 1, 10), "the held call did not start"
        _send(writer, _call(2, "echo", {"text": "dup"}, token).SerializeToString())
        got = await _read_to_end(reader, stop_after=2)
        rig.agent.release.set()
        _send(writer, _call(3, "echo", {"text": "after"}, token).SerializeToString())
        _send(writer, b"")
        end = await _read_to_end(reader)
    finally:
        _close(writer)
    assert got.answers[1].code == grpc.StatusCode.INVALID_ARGUMENT.value[0], got.answers
    assert got.answers[2].code == grpc.StatusCode.INVALID_ARGUMENT.value[0], got.answers
    assert "already in use" in got.answers[2].message, got.answers
    assert end.status is not None and end.status.code == 0, end
    assert end.answers[2].code == 0 and end.answers[3].code == 0, end.answers
    new = rig.inbound()[records:]
    assert any(r["method"] == "Invoke" and r["status"] == "INVALID_ARGUMENT" and r["caller"] == MALLORY
               for r in new), new
    assert await until(rig.held_nothing, 10)
    await rig.still_serves()


async def test_a_token_of_another_identity_is_refused_on_the_direct_link(rig: Rig, tmp_path: Path) -> None:
    """Mallory presents her certificate with the orchestrator's token (bound to the orchestrator's certificate):
    refused as on Agent/Link, recorded with mallory as the caller, never served as the orchestrator."""
    stolen = await rig.token(rig.orch.mesh)
    reader, writer = await _open(rig, tmp_path)
    records = len(rig.inbound())
    try:
        _send(writer, _call(1, "echo", {"text": "as the orchestrator"}, stolen).SerializeToString())
        _send(writer, _call(2, "echo", {"text": "sticky?"}).SerializeToString())  # the link's last token, reused
        _send(writer, b"")
        end = await _read_to_end(reader)
    finally:
        _close(writer)
    assert end.status is not None and end.status.code == 0, end
    for call_id in (1, 2):
        assert end.answers[call_id].code == grpc.StatusCode.UNAUTHENTICATED.value[0], end.answers
    new = rig.inbound()[records:]
    assert len(new) == 2, new
    for record in new:
        assert record["caller"] == MALLORY and record["status"] == "UNAUTHENTICATED", record
    assert await until(rig.held_nothing, 10)
    await rig.still_serves()


# --- (b) floods and abandoned connections -------------------------------------------------------------------


async def test_a_peer_that_never_reads_its_answers_is_not_buffered_for(rig: Rig, tmp_path: Path) -> None:
    """Thousands of calls of 256 KiB answers, never read: the link stops reading at its bound (it pauses, it
    does not serve them all), holds at most MAX_HELD_BYTES plus the running calls' answers, and ends when the
    peer goes."""
    link = rig.server._link
    assert link is not None
    token = await rig.token(capability="big")
    _, writer = await _open(rig, tmp_path)
    sent = 3000
    answer_bytes = 256 * 1024
    try:
        one = _call(0, "big", {"n": answer_bytes}, token)
        for call_id in range(1, sent + 1):
            one.id = call_id
            _send(writer, one.SerializeToString())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(writer.drain(), 5)  # the agent may stop reading before all are sent: fine
        assert await until(lambda: link.pauses > 0, 20), "the link never stopped reading"
        calls = link.calls
        assert calls < sent, "the link served every call of a peer that reads nothing"
        held = link.held()[1]
        assert held <= MAX_HELD_BYTES + MAX_OPEN_CALLS * (answer_bytes + 1024), held
        assert held < 64 * 1024 * 1024, f"the link held {held} bytes of answers for a peer that reads nothing"
    finally:
        _close(writer)
    assert await until(rig.held_nothing, 20), "the agent still holds the flooding link"
    assert link.held() == (0, 0)
    await rig.still_serves()


async def test_a_connection_closed_with_calls_running_cancels_them(rig: Rig, tmp_path: Path) -> None:
    """A peer sends calls that do not end on their own and goes (it closes the connection, as DirectStream.cancel
    does: no end of calls said): its calls are cancelled, as a gRPC Link stream's are when the caller cancels
    it, instead of running on for a caller that cannot get their answers. Else a peer could open link after
    link, each with MAX_OPEN_CALLS calls, and leave them all running."""
    hold_token = await rig.token(capability="hold")
    for round_ in range(2):
        _, writer = await _open(rig, tmp_path)
        for call_id in range(1, 21):
            _send(writer, _call(call_id, "hold", {}, hold_token).SerializeToString())
        await writer.drain()
        assert await until(lambda: rig.agent.holding == 20, 10), f"round {round_}: {rig.agent.holding} calls started"
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 5)
        assert await until(lambda: rig.agent.holding == 0, 10), (
            f"round {round_}: {rig.agent.holding} calls of a closed direct link still run")
        assert await until(rig.held_nothing, 10)
    assert rig.agent.cancelled == 40
    await rig.still_serves()


async def test_many_connections_opened_and_abandoned_hold_nothing(rig: Rig, tmp_path: Path) -> None:
    """Bare TCP connections, TLS without a preamble, links opened then dropped, stranger handshakes: none is
    held after the handshake timeout, and the agent still serves."""
    host, port = rig.address
    token = await rig.token()
    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(10):
            _, raw = await asyncio.open_connection(host, port)
            writers.append(raw)
        for _ in range(10):
            _, tls = await _connect(rig, client_context(rig.workload))
            writers.append(tls)
        for n in range(10):
            _, link = await _open(rig, tmp_path)
            _send(link, _call(1, "echo", {"text": f"hi {n}"}, token).SerializeToString())
            writers.append(link)
        for _ in range(5):
            await _refused(rig, _context(None, tmp_path))
        listener = rig.server._direct
        assert listener is not None
        assert await until(lambda: len(listener._connections) >= 20, 10)
    finally:
        for w in writers:
            _close(w)
    assert await until(rig.held_nothing, HANDSHAKE_S + 10), "abandoned connections are still held"
    await rig.still_serves()


async def test_a_bare_tcp_connection_that_never_starts_tls_is_dropped(rig: Rig) -> None:
    """A port scanner's connection (TCP, then nothing): closed by the agent within the handshake timeout."""
    host, port = rig.address
    reader, writer = await asyncio.open_connection(host, port)
    try:
        got = await asyncio.wait_for(reader.read(64), HANDSHAKE_S + 5)  # GO: it may begin TLS
        rest = await asyncio.wait_for(reader.read(64), HANDSHAKE_S + 5)  # then the close
    finally:
        _close(writer)
    assert (got, rest) == (GO, b""), (got, rest)
    assert await until(rig.held_nothing, 10)
    await rig.still_serves()


async def test_handshakes_in_progress_are_capped_and_the_one_over_is_closed_and_audited(rig: Rig) -> None:
    """Connections that never finish TLS hold at most max_handshakes places; one more is closed at once, without
    GO, and audited as a refused handshake; once they go, the port serves again."""
    listener = rig.server._direct
    assert listener is not None
    listener.max_handshakes = 3
    host, port = rig.address
    held: list[asyncio.StreamWriter] = []
    try:
        for _ in range(3):
            reader, writer = await asyncio.open_connection(host, port)
            held.append(writer)
            assert await asyncio.wait_for(reader.readexactly(1), 10) == GO  # accepted: its handshake is pending
        refused = listener.refused
        reader, writer = await asyncio.open_connection(host, port)
        try:
            got = await asyncio.wait_for(reader.read(64), 10)
        except ConnectionResetError:
            got = b""
        finally:
            _close(writer)
        assert got == b"", f"the connection over the cap was served ({got!r})"
        assert listener.refused == refused + 1
    finally:
        for w in held:
            _close(w)

    def full() -> list[dict[str, Any]]:
        assert rig.server.audit is not None
        return [r for r in (json.loads(x) for x in rig.server.audit.spool.lines())
                if r.get("kind") == "handshake" and r.get("reason") == "TLS_HANDSHAKES_FULL"]

    assert await until(lambda: len(full()) == 1, 10), full()
    assert full()[0]["listener"].endswith(f":{port}"), full()
    assert await until(rig.held_nothing, 10), "the held connections are still held"
    await rig.still_serves()


async def test_an_agent_stops_in_bounded_time_under_a_peer_that_holds_calls_and_reads_nothing(
    orch: Orch, tmp_path: Path
) -> None:
    """A verified peer holds calls that never end and floods answers it never reads: the agent's stop still ends
    within its grace (plus a bound), cancelling the held calls, instead of waiting on the peer."""
    agent = Target()
    server = AgentServer(agent, await orch.env.settings_for("target"),
                         AgentServerConfig(link=True, link_direct=True, audit_dir=tmp_path / "spools"))
    await server.start()
    stopped = False
    writer: asyncio.StreamWriter | None = None
    try:
        mallory = await orch.client("mallory")
        assert await orch.mesh.node.registry.wait_for_capability("hold", 1, timeout=10)
        rig = Rig(orch, server, agent, mallory)
        hold_token, big_token = await rig.token(capability="hold"), await rig.token(capability="big")
        _, writer = await _open(rig, tmp_path)
        for call_id in range(1, 11):
            _send(writer, _call(call_id, "hold", {}, hold_token).SerializeToString())
        big = _call(0, "big", {"n": 256 * 1024}, big_token)
        for call_id in range(11, 200):
            big.id = call_id
            _send(writer, big.SerializeToString())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(writer.drain(), 5)
        assert await until(lambda: agent.holding == 10, 10), agent.holding
        link = server._link
        assert link is not None
        assert await until(lambda: link.held()[1] > 0, 10), "no answer is waiting on the peer"
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(server.stop(), 30)
        stopped = True
        took = loop.time() - started
        assert took < 2.0 + 1.0 + 10.0, f"the agent took {took:.1f} s to stop"
        assert agent.holding == 0, f"{agent.holding} held calls still run after the agent stopped"
    finally:
        agent.release.set()
        if writer is not None:
            _close(writer)
        if not stopped:
            await server.stop()

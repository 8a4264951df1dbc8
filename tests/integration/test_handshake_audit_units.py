"""HandshakeAudit's parts on a real audit spool and real sockets: which failures it records, how it coalesces
a flood without losing count, its liveness probe, and why it says it is off. Failures come in through the
HandshakeEvents interface: `PushedEvents` is a second, in-memory source (what a gRPC verifier callback would
be), so the audit is shown to work on any source, not only gRPC's tracer."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hivemesh.mesh.audit import AuditLog, verify_chain
from hivemesh.mesh.audit.handshake import ENV, HandshakeAudit, HandshakeFailure, Listener, child_environment
from hivemesh.mesh.audit.handshake.tracer import TracerEvents
from hivemesh.v1 import policy_pb2

REPO = Path(__file__).resolve().parents[2]
NODE = "spiffe://hivemesh.local/agent/echo"
EXPIRED = ("UNKNOWN: Ssl handshake failed: SSL_ERROR_SSL: OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: "
           "certificate has expired")
CLOSED = "UNAVAILABLE: Handshake read failed (Socket closed)"


class PushedEvents:
    """A HandshakeEvents source the test feeds by hand: `push` reports one failure to every listener."""

    def __init__(self, problem: str = "") -> None:
        self.problem = problem
        self.started = 0
        self._listeners: list[Listener] = []

    def start(self) -> str:
        self.started += 1
        return self.problem

    def listen(self, fn: Listener) -> Callable[[], None]:
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn)

    def push(self, failure: HandshakeFailure) -> None:
        for fn in list(self._listeners):
            fn(failure)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def log(tmp_path: Path) -> Iterator[AuditLog]:
    audit = AuditLog.open(tmp_path / "spool", node=NODE, instance="i-1")
    try:
        yield audit
    finally:
        audit.spool.close()


def _records(log: AuditLog) -> list[dict[str, Any]]:
    return [json.loads(x) for x in log.spool.lines()]


def _fail(peer: str, error: str = EXPIRED, port: int = 7000) -> HandshakeFailure:
    return HandshakeFailure(local=f"ipv4:127.0.0.1:{port}", peer=peer, error=error)


def test_one_record_per_refusal_on_its_own_port(log: AuditLog) -> None:
    audit = HandshakeAudit(log, "127.0.0.1", 7000, events=PushedEvents(), clock=Clock())
    audit.on_failure(_fail("ipv4:127.0.0.1:50001", port=7001))  # another front door's port
    audit.on_failure(_fail("ipv4:127.0.0.1:50002"))
    [rec] = _records(log)
    assert {k: rec[k] for k in ("kind", "decision", "status", "reason", "remote", "listener", "count", "node")} == {
        "kind": "handshake", "decision": "deny", "status": "UNAVAILABLE", "reason": "TLS_CERT_EXPIRED",
        "remote": "ipv4:127.0.0.1:50002", "listener": "127.0.0.1:7000", "count": 1, "node": NODE,
    }
    assert rec["message"].startswith("the client certificate has expired")
    assert verify_chain(log.spool.read(1, max_records=10))[1] is None


def test_a_flood_is_coalesced_per_host_and_reason_and_every_refusal_counted(log: AuditLog) -> None:
    clock = Clock()
    audit = HandshakeAudit(log, "127.0.0.1", 7000, events=PushedEvents(), window_s=1.0, clock=clock)
    for i in range(50):
        audit.on_failure(_fail(f"ipv4:10.0.0.1:{40000 + i}"))
    audit.on_failure(_fail("ipv4:10.0.0.1:41000", CLOSED))  # another reason: its own record
    audit.on_failure(_fail("ipv4:10.0.0.2:41001"))  # another host: its own record
    assert [(r["remote"], r["reason"], r["count"]) for r in _records(log)] == [
        ("ipv4:10.0.0.1:40000", "TLS_CERT_EXPIRED", 1),
        ("ipv4:10.0.0.1:41000", "TLS_CONNECTION_CLOSED", 1),
        ("ipv4:10.0.0.2:41001", "TLS_CERT_EXPIRED", 1),
    ]
    audit.flush()
    assert len(_records(log)) == 3  # the window has not ended yet
    clock.now += 1.0
    audit.flush()
    recs = _records(log)
    assert [(r["remote"], r["count"]) for r in recs[3:]] == [("ipv4:10.0.0.1:40049", 49)]
    assert sum(r["count"] for r in recs) == 52 == audit.recorded
    # After the window, the next refusal is written at once again.
    audit.on_failure(_fail("ipv4:10.0.0.1:42000"))
    assert _records(log)[-1]["count"] == 1


def test_a_new_window_writes_what_the_old_one_held(log: AuditLog) -> None:
    clock = Clock()
    audit = HandshakeAudit(log, "127.0.0.1", 7000, events=PushedEvents(), clock=clock)
    for i in range(3):
        audit.on_failure(_fail(f"ipv4:10.0.0.1:{40000 + i}"))
    clock.now += 5
    audit.on_failure(_fail("ipv4:10.0.0.1:45000"))  # before any flush ran
    assert [r["count"] for r in _records(log)] == [1, 2, 1]


async def test_close_writes_what_is_pending(log: AuditLog) -> None:
    audit = HandshakeAudit(log, "127.0.0.1", 7000, events=PushedEvents(), clock=Clock())
    for i in range(4):
        audit.on_failure(_fail(f"ipv4:10.0.0.1:{40000 + i}"))
    await audit.close()
    assert [r["count"] for r in _records(log)] == [1, 3]


def test_many_hosts_share_one_bucket_past_the_key_limit(log: AuditLog) -> None:
    audit = HandshakeAudit(log, "127.0.0.1", 7000, events=PushedEvents(), clock=Clock())
    for i in range(4096 + 10):
        audit.on_failure(_fail(f"ipv4:10.{i // 65536}.{i // 256 % 256}.{i % 256}:1"))
    audit.flush(force=True)
    recs = _records(log)
    assert sum(r["count"] for r in recs) == 4106
    assert len(recs) == 4096 + 2  # one per tracked host, then the shared bucket: its first, then the rest


def test_an_unwritable_spool_is_reported_not_raised(log: AuditLog, caplog: pytest.LogCaptureFixture) -> None:
    audit = HandshakeAudit(log, "127.0.0.1", 7000, events=PushedEvents(), clock=Clock())
    log.spool.close()
    audit.on_failure(_fail("ipv4:10.0.0.1:1"))
    assert audit.recorded == 0
    assert "cannot record a TLS handshake refusal" in caplog.text


async def test_the_probe_proves_the_reports_arrive(log: AuditLog) -> None:
    """A real listener stands in for the server; the report the tee would send is made when the probe's
    connection arrives and closes. It is not recorded: it is the mesh's own."""
    accepted: asyncio.Queue[int] = asyncio.Queue()

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the probe hangs up
        accepted.put_nowait(int(writer.get_extra_info("peername")[1]))
        writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    try:
        audit = HandshakeAudit(log, "0.0.0.0", port, events=PushedEvents(), probe_timeout_s=20)
        probing = asyncio.create_task(audit.probe())
        peer = await asyncio.wait_for(accepted.get(), 20)
        audit.on_failure(HandshakeFailure(local=f"ipv4:127.0.0.1:{port}", peer=f"ipv4:127.0.0.1:{peer}", error=CLOSED))
        assert await probing is True and audit.active.is_set()
        assert _records(log) == []

        silent = HandshakeAudit(log, "127.0.0.1", port, events=PushedEvents(), probe_timeout_s=0.5)
        assert await silent.probe() is False
        assert "not seen within" in silent.problem and not silent.active.is_set()
        late = await asyncio.wait_for(accepted.get(), 20)
        # A report that comes after the probe gave up still proves the audit works.
        silent.on_failure(HandshakeFailure(local=f"ipv4:127.0.0.1:{port}", peer=f"ipv4:127.0.0.1:{late}",
                                           error=CLOSED))
        await asyncio.wait_for(silent.active.wait(), 20)
        assert silent.problem == "" and _records(log) == []
    finally:
        server.close()
        await server.wait_closed()


async def test_events_in_records_out_from_any_source(log: AuditLog) -> None:
    """The audit needs nothing of gRPC's tracer: started on another source, it proves it is live with its probe
    and records what that source reports; closing it stops listening."""
    accepted: asyncio.Queue[int] = asyncio.Queue()

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        accepted.put_nowait(int(writer.get_extra_info("peername")[1]))
        writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    events = PushedEvents()
    audit = HandshakeAudit(log, "127.0.0.1", port, events=events, probe_timeout_s=20)
    try:
        await audit.start()
        assert events.started == 1 and audit.state == "starting"
        probe = await asyncio.wait_for(accepted.get(), 20)
        events.push(HandshakeFailure(local=f"ipv4:127.0.0.1:{port}", peer=f"ipv4:127.0.0.1:{probe}", error=CLOSED))
        await asyncio.wait_for(audit.active.wait(), 20)
        assert audit.state == "live"
        events.push(_fail("ipv4:10.1.2.3:4444", port=port))
        [rec] = _records(log)
        assert (rec["kind"], rec["reason"], rec["remote"], rec["listener"]) == (
            "handshake", "TLS_CERT_EXPIRED", "ipv4:10.1.2.3:4444", f"127.0.0.1:{port}")
    finally:
        await audit.close()
        server.close()
        await server.wait_closed()
    events.push(_fail("ipv4:10.1.2.3:4445", port=port))
    assert len(_records(log)) == 1  # no longer listening


async def test_a_source_that_cannot_report_is_named_in_the_state(log: AuditLog) -> None:
    audit = HandshakeAudit(log, "127.0.0.1", 7000, events=PushedEvents("the verifier is not installed"))
    await audit.start()
    assert audit.state == "off: the verifier is not installed" and not audit.active.is_set()


async def test_the_tracer_source_says_why_it_is_off(log: AuditLog, monkeypatch: pytest.MonkeyPatch) -> None:
    """This test process never consented (no enable(), no HIVEMESH_AUDIT_HANDSHAKES=1): the tracer source
    leaves its stderr alone and says so; with consent but no GRPC_TRACE it names the variable; =0 wins."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("GRPC_TRACE", "handshaker")
    audit = HandshakeAudit(log, "127.0.0.1", 7000, events=TracerEvents())
    await audit.start()
    assert audit.problem.startswith("not enabled in this process"), audit.problem
    monkeypatch.setenv(ENV, "1")
    monkeypatch.delenv("GRPC_TRACE")
    audit = HandshakeAudit(log, "127.0.0.1", 7000, events=TracerEvents())
    await audit.start()
    assert "GRPC_TRACE=handshaker" in audit.problem
    monkeypatch.setenv(ENV, "0")
    audit = HandshakeAudit(log, "127.0.0.1", 7000, events=TracerEvents())
    await audit.start()
    assert ENV in audit.problem and "turned off" in audit.problem


def _run(code: str, env: dict[str, str]) -> list[str]:
    proc = subprocess.Popen([sys.executable, "-c", code, "a1", "a2"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    words = out.decode().split()
    assert words[0] == str(proc.pid), "the process that answered is not the one started"
    return words[1:]


def test_enable_turns_the_tracer_on_in_process_before_grpc_loads() -> None:
    """enable() first thing: GRPC_TRACE is set in this very process (same pid, same argv: no restart) before
    gRPC loads, and the tee starts. After `import grpc` it is too late (gRPC read the variable already), so
    enable() leaves GRPC_TRACE alone and the source names it. HIVEMESH_AUDIT_HANDSHAKES=0 wins."""
    code = ("import os, sys\n"
            "pid, argv = os.getpid(), list(sys.argv)\n"
            "if os.environ.get('LOAD_GRPC_FIRST'): import grpc\n"
            "from hivemesh.mesh.audit.handshake import enable, tracer_events\n"
            "on = enable()\n"
            "import grpc\n"
            "problem = tracer_events().start()\n"
            "from hivemesh.mesh.audit.handshake.tee import StderrTee\n"
            "assert os.getpid() == pid and sys.argv == argv\n"
            "print(pid, os.environ.get('GRPC_TRACE'), ','.join(sys.argv[1:]), on, StderrTee._shared is not None,\n"
            "      problem.split(':')[0].replace(' ', '_') or '-')")
    base = {k: v for k, v in os.environ.items() if k not in ("GRPC_TRACE", ENV)}
    assert _run(code, base) == ["handshaker", "a1,a2", "True", "True", "-"]
    assert _run(code, {**base, "GRPC_TRACE": "api"}) == ["api,handshaker", "a1,a2", "True", "True", "-"]
    assert _run(code, {**base, ENV: "0"}) == [
        "None", "a1,a2", "False", "False", "turned_off_(HIVEMESH_AUDIT_HANDSHAKES=0)"]
    assert _run(code, {**base, "LOAD_GRPC_FIRST": "1"}) == [
        "None", "a1,a2", "False", "False", "gRPC's_handshaker_tracer_is_off"]


def test_launchers_set_the_tracer_and_the_consent() -> None:
    assert child_environment({"X": "1"}, inherit={"GRPC_TRACE": "tcp"}) == {
        "X": "1", "GRPC_TRACE": "tcp,handshaker", ENV: "1"}
    assert child_environment({"X": "1"}, inherit={ENV: "off"}) == {"X": "1"}


async def test_its_state_for_hivemesh_status(log: AuditLog) -> None:
    audit = HandshakeAudit(log, "127.0.0.1", 7000, events=PushedEvents(), clock=Clock())
    status = policy_pb2.NodeTraffic()
    audit.fill_status(status)
    assert (status.handshake_audit, status.handshakes_refused) == ("starting", 0)
    audit.on_failure(_fail("ipv4:10.0.0.1:1"))
    audit._loop = asyncio.get_running_loop()
    audit._proven()
    audit.fill_status(status)
    assert (status.handshake_audit, status.handshakes_refused) == ("live", 1)
    off = HandshakeAudit(log, "127.0.0.1", 7001, events=TracerEvents())
    await off.start()
    off.fill_status(status)
    assert status.handshake_audit.startswith("off: not enabled in this process")

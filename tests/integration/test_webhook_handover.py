"""Escalation webhook retries survive a leader change: two control-plane replicas in one process over the session
etcd and a local HTTP receiver on 127.0.0.1:0 that always answers 500. The leader makes two attempts and stops;
the other replica takes over and makes the third and last after the stored backoff (not a fresh count from one,
not at once), records the give-up in its own audit log, and a write fenced by the old term is refused."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from hivemesh.controlplane.audit.store import audit_store
from hivemesh.controlplane.escalations import EscalationStore
from hivemesh.controlplane.server import ControlPlaneConfig, ControlPlaneServer
from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.etcd import EtcdServer
from hivemesh.mesh.keyspace import CONTROLPLANE_LEADER
from hivemesh.v1 import escalation_pb2 as pb
from hivemesh.v1 import escalation_pb2_grpc
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, apply_policies_text


class DownReceiver:
    """Answers every POST with 500 and notes when each came, and its delivery id and attempt number."""

    def __init__(self) -> None:
        self.posts: list[float] = []
        self.headers: list[tuple[str, str]] = []
        posts, headers = self.posts, self.headers

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                posts.append(time.monotonic())
                headers.append((self.headers["X-Hivemesh-Delivery"], self.headers["X-Hivemesh-Attempt"]))
                self.send_response(500)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


async def _until(what: str, check: Callable[[], Awaitable[Any]], timeout: float = 15.0) -> Any:
    end = time.monotonic() + timeout
    while not (value := await check()):
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
    return value


async def test_a_new_leader_continues_the_webhook_backoff(
    mesh_env: MeshEnv, etcd: Any, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    a = mesh_env.controlplane
    receiver = DownReceiver()
    receiver.thread.start()
    secret = tmp_path / "hook.secret"
    secret.write_text("s3cret")
    b = ControlPlaneServer(ControlPlaneConfig(
        etcd_endpoints=etcd_server.endpoint, certs_dir=mesh_env.certs.certs_dir, state_dir=tmp_path / "b-state",
        trust_domain=TRUST_DOMAIN, leader_ttl_s=2,
    ))
    await b.start()
    op_b = ControlPlaneClient.from_certs_dir(b.address, mesh_env.certs.certs_dir)
    try:
        assert a.replica is not None and b.replica is not None and a.replica.election.is_leader
        old_term = a.replica.election.term
        await apply_policies_text(mesh_env.etcd, f"""
kind: escalations
name: oncall
spec:
  url: {receiver.url}/down
  secret: {{file: {secret}}}
  max_attempts: 3
  backoff_s: 0.75
""")
        await escalation_pb2_grpc.EscalationsStub(mesh_env.operator.channel).CreateEscalation(
            pb.CreateEscalationRequest(id="esc-1", reason="approve the refund"), timeout=5)
        on_b = escalation_pb2_grpc.EscalationsStub(op_b.channel)  # either replica answers reads

        async def get() -> pb.Escalation:
            esc: pb.Escalation = await on_b.GetEscalation(pb.GetEscalationRequest(id="esc-1"), timeout=5)
            return esc

        async def two_tries() -> pb.Escalation | None:
            esc = await get()
            return esc if esc.notification.retry_attempts == 2 else None

        # The leader's two attempts, stored with the next one's time (1.5 s after the second: 0.75 s doubled).
        tried = await _until("the leader's second attempt", two_tries)
        assert tried.notification.retry_event == "escalation.opened" and len(receiver.posts) == 2
        assert tried.notification.next_attempt_unix_ms > time.time() * 1000 + 500
        stopping = time.monotonic()
        await a.stop(0.2)  # a clean stop hands leadership to b at once
        assert len(receiver.posts) == 2  # a stopped before its third attempt was due
        stopped = time.monotonic() - stopping

        async def b_leads() -> bool:
            return b.replica is not None and b.replica.election.is_leader

        await _until("b leading", b_leads)

        async def gave_up() -> pb.Escalation | None:
            esc = await get()
            return esc if esc.notification.gave_up else None

        done = await _until("the new leader's last attempt", gave_up)
        # b made attempt 3 (not 1 again), after the stored backoff (not at once), and then stopped.
        assert len(receiver.posts) == 3, receiver.posts
        gap = receiver.posts[2] - receiver.posts[1]
        assert [h[1] for h in receiver.headers] == ["1", "2", "3"]  # what the receiver is told
        assert len({h[0] for h in receiver.headers}) == 1  # one event: one delivery id, whoever sends it
        assert gap >= 1.45, receiver.posts
        n = done.notification
        assert n.attempts == 3 and n.retry_event == "" and n.retry_attempts == 0 and "HTTP 500" in n.last_error
        store_b = audit_store(b._core)  # type: ignore[arg-type]
        await store_b.sync()  # its own records commit to the mesh-wide log in groups: read after they land
        records = [json.loads(line)["record"] for line in store_b.lines()]
        (gave,) = [r for r in records if r.get("id") == "esc-1" and r.get("action") == "notify-gave-up"]
        assert gave["attempts"] == 3

        # A write fenced by the old leader's term cannot land any more; the new leader's can.
        store = EscalationStore(etcd)
        esc, rev = await store.read("esc-1") or (None, 0)
        assert esc is not None
        t = etcd.transactions
        assert not await store.swap(esc, rev, fence=[t.create(CONTROLPLANE_LEADER.encode()) == old_term])
        assert await store.swap(esc, rev, fence=b.replica.election.fence())
        print(f"\nFIGURE webhook handover: the leader stopped in {stopped:.2f} s; the new leader's attempt 3 came "
              f"{gap:.2f} s after attempt 2 (stored backoff 1.5 s)")
    finally:
        await op_b.close()
        await b.stop(0.2)
        receiver.server.shutdown()
        receiver.server.server_close()
        receiver.thread.join(timeout=5)

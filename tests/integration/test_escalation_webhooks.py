"""Escalation webhooks against a real control plane (etcd with TLS) and a local HTTP receiver on 127.0.0.1:0
that checks each delivery's HMAC: delivered with a valid signature on open and as a reminder, retried after a
500, and an escalation nobody could be told about held (pending, with the reason recorded) at its deadline
instead of being rejected unseen; each outcome is in the control plane's audit log."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from hivemesh.controlplane.audit.store import audit_store
from hivemesh.controlplane.escalation_webhooks import ESCALATION_WEBHOOKS, sign, verify
from hivemesh.mesh.policy import PolicyDoc, PolicyError
from hivemesh.v1 import escalation_pb2 as pb
from hivemesh.v1 import escalation_pb2_grpc
from tests.support.meshenv import MeshEnv, apply_policies_text

SECRET = b"s3cret-for-tests"


class Receiver:
    """An HTTP receiver that verifies signatures; /down answers 500 always, and the first POST about an
    escalation listed in fail_first answers 500 too."""

    def __init__(self, fail_first: set[str]) -> None:
        self.got: list[dict[str, Any]] = []
        self.bad_signatures = 0
        self.fail_first = set(fail_first)
        self.flaky_down = True
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if not verify(SECRET, self.headers["X-Hivemesh-Timestamp"], self.headers["X-Hivemesh-Signature"],
                              body):
                    receiver.bad_signatures += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                doc = json.loads(body)
                doc["_path"] = self.path
                receiver.got.append(doc)
                eid = doc["escalation"]["id"]
                failing = (self.path == "/down" or eid in receiver.fail_first
                           or (self.path == "/flaky" and receiver.flaky_down))
                receiver.fail_first.discard(eid)
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def events(self, eid: str) -> list[tuple[str, str]]:
        return [(d["event"], d["_path"]) for d in self.got if d["escalation"]["id"] == eid]


async def _until(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = await check() if asyncio.iscoroutinefunction(check) else check()
        if value:
            return value
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def test_signature_verification() -> None:
    body = b'{"event":"escalation.opened"}'
    now = int(time.time())
    sig = sign(SECRET, now, body)
    assert verify(SECRET, str(now), sig, body)
    assert not verify(SECRET, str(now), sig, body + b" ")  # tampered body
    assert not verify(b"other", str(now), sig, body)  # wrong secret
    assert not verify(SECRET, str(now - 600), sign(SECRET, now - 600, body), body)  # replayed, too old
    assert not verify(SECRET, "yesterday", sig, body)


async def test_webhooks_notify_retry_and_hold(mesh_env: MeshEnv, tmp_path: Path) -> None:
    env = mesh_env
    receiver = Receiver(fail_first={"esc-retry"})
    receiver.thread.start()
    secret_file = tmp_path / "hook.secret"
    secret_file.write_text(SECRET.decode() + "\n")
    try:
        await apply_policies_text(env.etcd, f"""
kind: escalations
name: oncall
spec:
  match: {{labels: {{team: ops}}}}
  url: {receiver.url}/ok
  secret: {{file: {secret_file}}}
  remind_at: 0.5
  max_attempts: 3
  backoff_s: 0.2
---
kind: escalations
name: broken
spec:
  match: {{labels: {{team: down}}, reason: "^urgent"}}
  url: {receiver.url}/down
  secret: {{file: {secret_file}}}
  max_attempts: 2
  backoff_s: 0.1
---
kind: escalations
name: flaky
spec:
  match: {{labels: {{team: flaky}}}}
  url: {receiver.url}/flaky
  secret: {{file: {secret_file}}}
  max_attempts: 10
  backoff_s: 0.1
""")
        stub = escalation_pb2_grpc.EscalationsStub(env.operator.channel)

        async def create(eid: str, team: str, deadline: int = 0, reason: str = "urgent: approve the refund") -> None:
            await stub.CreateEscalation(pb.CreateEscalationRequest(
                id=eid, reason=reason, deadline_seconds=deadline, labels={"team": team}), timeout=5)

        async def get(eid: str) -> pb.Escalation:
            esc: pb.Escalation = await stub.GetEscalation(pb.GetEscalationRequest(id=eid), timeout=5)
            return esc

        await create("esc-open", "ops", deadline=4)  # room for the reminder at 2 s on a loaded machine
        await create("esc-retry", "ops")
        await create("esc-held", "down", deadline=1)
        await create("esc-quiet", "nobody")
        await create("esc-late", "flaky", deadline=1)

        # Opened: delivered once with a valid signature; the reminder at half the deadline.
        await _until("esc-open's reminder", lambda: len(receiver.events("esc-open")) >= 2)
        assert receiver.events("esc-open") == [("escalation.opened", "/ok"), ("escalation.reminder", "/ok")]
        first = next(d for d in receiver.got if d["escalation"]["id"] == "esc-open")
        assert first["rule"] == "oncall" and first["escalation"]["labels"] == {"team": "ops"}
        assert "context_json" not in first["escalation"]
        # The reminder is recorded once its delivery returned, after the receiver saw it: wait for the record.
        opened = await _until("esc-open's reminder recorded", _reminded(get, "esc-open"))
        assert opened.notification.required and opened.notification.delivered_at_unix_ms
        assert opened.notification.attempts == 2

        # A 500, then a retry after the backoff that is delivered.
        retried = await _until("esc-retry delivered",
                               _delivered(get, "esc-retry"))
        assert receiver.events("esc-retry") == [("escalation.opened", "/ok")] * 2
        assert retried.notification.attempts == 2 and retried.notification.last_error == ""

        # Nobody reachable: given up after max_attempts, and held at the deadline instead of rejected.
        held = await _until("esc-held held", _held(get, "esc-held"))
        assert held.status == pb.ESCALATION_STATUS_PENDING and held.notification.gave_up
        assert "no webhook reached anyone" in held.notification.held
        assert "HTTP 500" in held.notification.last_error
        assert receiver.events("esc-held") == [("escalation.opened", "/down")] * 2

        # Held while its receiver is down; delivered on a later retry, its deadline restarts from then.
        await _until("esc-late held", _held(get, "esc-late"))
        receiver.flaky_down = False
        late = await _until("esc-late delivered", _delivered(get, "esc-late"))
        assert late.status == pb.ESCALATION_STATUS_PENDING and late.notification.held == ""
        assert late.deadline_unix_ms >= late.notification.delivered_at_unix_ms + 1000

        # No rule matched: not required, never posted, and its (absent) deadline policy is untouched.
        quiet = await get("esc-quiet")
        assert not quiet.notification.required and receiver.events("esc-quiet") == []

        # A notified escalation still meets its deadline policy.
        expired = await _until("esc-open expired",
                               _status(get, "esc-open", pb.ESCALATION_STATUS_REJECTED))
        assert expired.resolution.resolved_by == "policy:deadline"
        assert receiver.bad_signatures == 0

        store = audit_store(env.controlplane._core)  # type: ignore[arg-type] # the control plane's own log
        await store.sync()  # its own records commit to the mesh-wide log in groups: read after they land
        actions = {(r["record"].get("id"), r["record"].get("action"))
                   for r in (json.loads(line) for line in store.lines())
                   if r["record"].get("event") == "escalation"}
        assert {("esc-open", "notified"), ("esc-open", "reminded"), ("esc-retry", "notified"),
                ("esc-held", "notify-gave-up"), ("esc-held", "held"), ("esc-late", "held"),
                ("esc-late", "notified-deadline-restarted")} <= actions
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
        receiver.thread.join(timeout=5)


def _reminded(get: Callable[[str], Any], eid: str) -> Callable[[], Any]:
    async def check() -> pb.Escalation | None:
        esc: pb.Escalation = await get(eid)
        return esc if esc.notification.reminded else None
    return check


def _delivered(get: Callable[[str], Any], eid: str) -> Callable[[], Any]:
    async def check() -> pb.Escalation | None:
        esc: pb.Escalation = await get(eid)
        return esc if esc.notification.delivered_at_unix_ms else None
    return check


def _held(get: Callable[[str], Any], eid: str) -> Callable[[], Any]:
    async def check() -> pb.Escalation | None:
        esc: pb.Escalation = await get(eid)
        return esc if esc.notification.held else None
    return check


def _status(get: Callable[[str], Any], eid: str, status: int) -> Callable[[], Any]:
    async def check() -> pb.Escalation | None:
        esc: pb.Escalation = await get(eid)
        return esc if esc.status == status else None
    return check


def test_rules_are_validated() -> None:
    good = {"url": "https://hooks.example/x", "secret": {"env": "HOOK_SECRET"}}
    ESCALATION_WEBHOOKS.validate(PolicyDoc("escalations", "ok", good))
    for spec, path in (({**good, "match": {"reason": "("}}, "spec.match.reason"),
                       ({"url": "ftp://x", "secret": {"env": "S"}}, "spec.url"),
                       ({"url": "https://x"}, "spec"),
                       ({**good, "secret": {"env": "S", "file": "/x"}}, "spec.secret"),
                       ({**good, "max_attempts": 100}, "spec.max_attempts")):
        with pytest.raises(PolicyError) as err:
            ESCALATION_WEBHOOKS.validate(PolicyDoc("escalations", "bad", spec))
        assert any(p.startswith(path) for p in err.value.violations), (spec, err.value.violations)

"""Tell people about escalations: per-rule webhooks (HTTP POST, HMAC-SHA256-signed JSON), run by the leader.

A rule is an `escalations` policy document (one rule per document):

    kind: escalations
    name: billing-oncall
    spec:
      match: {labels: {team: billing}, reason: "refund|chargeback"}   # all given must match; {} matches all
      url: https://hooks.example.com/hivemesh
      secret: {env: BILLING_HOOK_SECRET}      # or {file: /etc/hivemesh/hook.secret}; never stored in etcd
      remind_at: 0.8                          # share of the deadline at which a reminder is sent (0: none)
      max_attempts: 5                         # per event, with exponential backoff from backoff_s (capped 30 s)
      backoff_s: 0.5
      timeout_s: 5

Events: `escalation.opened` when an escalation opens, `escalation.reminder` at remind_at of its deadline. An
event is delivered when any matching rule's receiver answers 2xx; each outcome (delivered, or given up after
max_attempts) is recorded in the control plane's audit log and on the escalation (`Escalation.notification`).

Nobody notified, no silent rejection: an escalation a rule matched when it opened is *held* at its deadline,
pending with a recorded reason, while no delivery has succeeded (`escalations.EscalationStore.settle`). We hold
rather than extend the deadline once: an extension still ends in a silent rejection when the receiver is down
for longer than it, and the run waiting is no worse off pending than rejected unseen. When a delivery succeeds
later, the deadline restarts from then with a fifth of its original length (at least one second), so the person
told has time to answer.

Signature (verify with `verify`): headers `X-Hivemesh-Timestamp: <unix seconds>` and
`X-Hivemesh-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>`. A receiver recomputes the HMAC
over the raw body, compares in constant time, and refuses timestamps more than 5 minutes from its clock (a
replayed delivery). `X-Hivemesh-Delivery` names the event (the same on every attempt, whichever leader makes it),
for deduplication; `X-Hivemesh-Attempt` counts the attempts at it from 1.

Only the control-plane leader delivers (`replicas.is_leader`), so several replicas notify once. The retry state
(the event being retried, its attempts, the time of the next) lives on the escalation in etcd
(`Notification.retry_*`), written with each attempt's outcome in one transaction fenced by the leader's term: a
new leader continues the count and waits out the backoff instead of starting over, and a deposed leader's late
write is refused. Delivery is at least once: an attempt whose POST went out but whose outcome was not yet stored
when its leader stopped is made again by the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import http.client
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from hivemesh.controlplane.escalations import (
    EXTENSION,
    EscalationStore,
    Recorder,
    _audit,
    audit_fields,
)
from hivemesh.controlplane.leader import leader_duty
from hivemesh.mesh.policy import PolicyDoc, PolicyError, PolicyKind, kind_prefix
from hivemesh.mesh.watch import cancel_and_wait
from hivemesh.v1 import escalation_pb2

if TYPE_CHECKING:
    from hivemesh.controlplane.server import Core

log = logging.getLogger(__name__)

E = escalation_pb2
KIND_NAME: Final = "escalations"
ACTOR: Final = "policy:webhook"
OPENED: Final = "escalation.opened"
REMINDER: Final = "escalation.reminder"
SIGNATURE_TOLERANCE_S: Final = 300
MAX_BACKOFF_S: Final = 30.0
POLL_S: Final = 0.5

SPEC_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["url", "secret"],
    "additionalProperties": False,
    "properties": {
        "match": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "labels": {"type": "object", "maxProperties": 32, "additionalProperties": {"type": "string"}},
                "reason": {"type": "string", "maxLength": 500},
            },
        },
        "url": {"type": "string", "pattern": "^https?://[^\\s]+$", "maxLength": 2000},
        "secret": {
            "type": "object", "minProperties": 1, "maxProperties": 1, "additionalProperties": False,
            "properties": {"env": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                           "file": {"type": "string", "minLength": 1}},
        },
        "remind_at": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
        "max_attempts": {"type": "integer", "minimum": 1, "maximum": 10},
        "backoff_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 60},
        "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 30},
    },
}


@dataclass(frozen=True)
class Rule:
    """One compiled webhook rule."""

    name: str
    url: str
    secret_env: str = ""
    secret_file: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    reason: re.Pattern[str] | None = None
    remind_at: float = 0.8
    max_attempts: int = 5
    backoff_s: float = 0.5
    timeout_s: float = 5.0

    def matches(self, esc: escalation_pb2.Escalation) -> bool:
        if any(esc.labels.get(k) != v for k, v in self.labels):
            return False
        return self.reason is None or self.reason.search(esc.reason) is not None

    def secret(self) -> bytes:
        """The HMAC key, read at each delivery (so a rotated secret applies at once); ValueError if missing."""
        if self.secret_env:
            value = os.environ.get(self.secret_env, "")
            if not value:
                raise ValueError(f"rule {self.name}: environment variable {self.secret_env} is not set")
            return value.encode()
        try:
            value = Path(self.secret_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"rule {self.name}: cannot read secret file {self.secret_file}: {exc}") from None
        if not value:
            raise ValueError(f"rule {self.name}: secret file {self.secret_file} is empty")
        return value.encode()

    def backoff(self, attempt: int) -> float:
        """Seconds before retry number attempt (1-based): backoff_s doubling, capped."""
        return float(min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))


def _check(doc: PolicyDoc) -> None:
    pattern = doc.spec.get("match", {}).get("reason")
    if pattern:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise PolicyError("spec.match.reason", f"not a regular expression: {exc}") from None


def compile_rules(docs: Mapping[str, PolicyDoc]) -> tuple[Rule, ...]:
    out = []
    for name in sorted(docs):
        spec = docs[name].spec
        match = spec.get("match", {})
        out.append(Rule(
            name=name, url=spec["url"], secret_env=spec["secret"].get("env", ""),
            secret_file=spec["secret"].get("file", ""), labels=tuple(sorted(match.get("labels", {}).items())),
            reason=re.compile(match["reason"]) if match.get("reason") else None,
            remind_at=float(spec.get("remind_at", 0.8)), max_attempts=int(spec.get("max_attempts", 5)),
            backoff_s=float(spec.get("backoff_s", 0.5)), timeout_s=float(spec.get("timeout_s", 5)),
        ))
    return tuple(out)


ESCALATION_WEBHOOKS: Final[PolicyKind[tuple[Rule, ...]]] = PolicyKind(
    name=KIND_NAME, spec_schema=SPEC_SCHEMA, compile=compile_rules, check=_check,
    description="webhooks (HMAC-signed HTTP POST) that tell people when an escalation opens and nears its deadline",
)


# --- signing ------------------------------------------------------------------------------------------------------
def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The X-Hivemesh-Signature value for body sent at timestamp (unix seconds)."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"v1={mac}"


def verify(secret: bytes, timestamp: str, signature: str, body: bytes, *, now: float | None = None,
           tolerance_s: int = SIGNATURE_TOLERANCE_S) -> bool:
    """What a receiver does: the signature matches the raw body and the timestamp is recent."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A 3xx is an answer, not a delivery: followed, the signed headers went (as a GET, without the body) wherever
    the receiver pointed, loopback included, and that address's 200 counted as delivered."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None  # urllib then raises HTTPError(code)


class _Tracked:
    """The HTTP connections one delivery opens, so its deadline can close them: a socket timeout bounds each read,
    not the delivery, and a receiver sending a byte a second held a 2 s delivery (and the notifier) for good."""

    def __init__(self) -> None:
        self.connections: list[http.client.HTTPConnection] = []
        self.lock = threading.Lock()
        self.closed = False

    def factory(self, cls: type[http.client.HTTPConnection]) -> Callable[..., http.client.HTTPConnection]:
        def make(host: str, **kwargs: Any) -> http.client.HTTPConnection:
            conn = cls(host, **kwargs)
            with self.lock:
                self.connections.append(conn)
                if self.closed:
                    raise TimeoutError("the delivery's deadline passed")
            return conn

        return make

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for conn in self.connections:
                sock = conn.sock
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)  # the blocked read returns at once


def _opener(tracked: _Tracked) -> urllib.request.OpenerDirector:
    class Http(urllib.request.HTTPHandler):
        def http_open(self, req: Any) -> Any:
            return self.do_open(tracked.factory(http.client.HTTPConnection), req)

    class Https(urllib.request.HTTPSHandler):
        def https_open(self, req: Any) -> Any:
            return self.do_open(tracked.factory(http.client.HTTPSConnection), req, context=ssl.create_default_context())

    return urllib.request.build_opener(_NoRedirect, Http, Https)  # proxies from the environment still apply


def _post(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> str:
    """POST body; "" on a 2xx answer, else why not (blocking: run in a thread). timeout bounds the whole delivery;
    a redirect is not followed (it is an undelivered answer)."""
    req = urllib.request.Request(url, data=body, method="POST", headers=dict(headers))
    tracked = _Tracked()
    deadline = threading.Timer(timeout, tracked.close)
    deadline.daemon = True
    deadline.start()
    try:
        with _opener(tracked).open(req, timeout=timeout) as resp:  # the schema allows http(s) only
            return "" if 200 <= resp.status < 300 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}" + (" (redirects are not followed)" if 300 <= exc.code < 400 else "")
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        if tracked.closed:
            return f"no answer within {timeout:g} s"
        return f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
    finally:
        deadline.cancel()
        tracked.close()


def delivery_id(esc: escalation_pb2.Escalation, event: str) -> str:
    """The same id on every attempt at one event of one escalation (its creation time tells apart an escalation
    created again under the same id), so a receiver can drop a repeated delivery."""
    return hashlib.sha256(f"{esc.id}|{esc.created_at_unix_ms}|{event}".encode()).hexdigest()[:32]


def payload(event: str, rule: str, esc: escalation_pb2.Escalation) -> dict[str, Any]:
    """What a receiver gets (never the context: it may hold personal data; `hivemesh escalations show ID`)."""
    return {
        "event": event, "rule": rule, "sent_at_unix_ms": int(time.time() * 1000),
        "escalation": {
            "id": esc.id, "reason": esc.reason, "requested_by": esc.requested_by, "workflow_id": esc.workflow_id,
            "step_id": esc.step_id, "labels": dict(esc.labels), "created_at_unix_ms": esc.created_at_unix_ms,
            "deadline_unix_ms": esc.deadline_unix_ms, "answerer": esc.answerer,
            "on_deadline": E.DeadlinePolicy.Name(esc.on_deadline).removeprefix("DEADLINE_POLICY_"),
        },
    }


# --- the notifier -------------------------------------------------------------------------------------------------
Fence = Callable[[], "Sequence[Any] | None"]
"""etcd compares that hold only while this replica's term lasts ([] without replicas; None: not leading now)."""


def term_fence(core: Core) -> Sequence[Any] | None:
    """The leader's term as etcd compares; None once this replica does not lead (it must write nothing then)."""
    from hivemesh.controlplane.replicas import EXTENSION as REPLICAS

    replicas = core.extensions.get(REPLICAS)
    if replicas is None:
        return []
    return replicas.election.fence() or None


class Notifier:
    """The delivery loop (a control-plane feature): each pass, every pending escalation a rule matched gets
    its due events, retried with backoff; only while `leading()`, each outcome written under `fence()`."""

    def __init__(self, store: EscalationStore, *, leading: Callable[[], bool] = lambda: True,
                 fence: Fence = lambda: [], poll_s: float = POLL_S) -> None:
        self.store = store
        self.leading = leading
        self.fence = fence
        self.poll_s = poll_s
        self._task: asyncio.Task[None] | None = None

    async def rules(self) -> tuple[Rule, ...]:
        docs = {}
        for kv in await self.store.etcd.get_prefix(kind_prefix(KIND_NAME).encode()):
            name = kv.key.decode().rsplit("/", 1)[-1]
            try:
                docs[name] = ESCALATION_WEBHOOKS.load(name, kv.value)
            except PolicyError as exc:
                log.warning("skipping invalid escalations policy %s: %s", name, exc)
        return compile_rules(docs)

    async def matches(self, esc: escalation_pb2.Escalation) -> bool:
        """Whether a rule will notify about esc (the store asks when esc is created)."""
        return any(r.matches(esc) for r in await self.rules())

    async def start(self) -> None:
        self.store.notice_check = self.matches
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="hivemesh-escalation-webhooks")

    async def stop(self) -> None:
        if self.store.notice_check == self.matches:
            self.store.notice_check = None
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)

    async def _loop(self) -> None:
        await leader_duty("escalation webhook", self.leading, self.run_once, self.poll_s)

    async def run_once(self) -> None:
        """One pass over the pending escalations that need telling (settling due deadlines on the way). Without
        any rule it reads no escalation: a mesh that notifies nobody pays one small read per pass."""
        rules = await self.rules()
        if not rules:
            return
        pending = [e for e in await self.store.all()
                   if e.status == E.ESCALATION_STATUS_PENDING and e.notification.required]
        await asyncio.gather(*(self._one(esc, rules) for esc in pending))

    @staticmethod
    def _due(esc: escalation_pb2.Escalation, matching: list[Rule], now_ms: int) -> str:
        """The event esc needs now ("" for none): opened until delivered, then the reminder once due."""
        n = esc.notification
        if not n.delivered_at_unix_ms:
            return "" if n.gave_up else OPENED
        shares = [r.remind_at for r in matching if r.remind_at]
        if n.reminded or not esc.deadline_unix_ms or not shares:
            return ""
        remind_at = esc.created_at_unix_ms + int((esc.deadline_unix_ms - esc.created_at_unix_ms) * min(shares))
        return REMINDER if now_ms >= remind_at else ""

    async def _one(self, esc: escalation_pb2.Escalation, rules: tuple[Rule, ...]) -> None:
        matching = [r for r in rules if r.matches(esc)]
        event = self._due(esc, matching, int(time.time() * 1000))
        if not event:
            return
        n = esc.notification
        retrying = n.retry_event == event  # as stored by whichever leader made the earlier attempts
        if retrying and time.time() * 1000 < n.next_attempt_unix_ms:
            return
        attempts = (n.retry_attempts if retrying else 0) + 1
        errors = []
        for rule in matching:
            err = await self._deliver(rule, event, esc, attempts)
            if not err:
                break
            errors.append(f"{rule.name}: {err}")
        else:
            if not matching:
                errors.append("no escalations rule matches it any more")
        delivered = not errors or len(errors) < len(matching)
        limit = max((r.max_attempts for r in matching), default=1)
        gave_up = not delivered and attempts >= limit
        next_ms = 0
        if not delivered and not gave_up:
            next_ms = int((time.time() + min(r.backoff(attempts) for r in matching)) * 1000)
        await self._record(esc.id, event, delivered, gave_up, "; ".join(errors), attempts, next_ms)

    async def _deliver(self, rule: Rule, event: str, esc: escalation_pb2.Escalation, attempt: int) -> str:
        try:
            secret = rule.secret()
        except ValueError as exc:
            return str(exc)
        body = json.dumps(payload(event, rule.name, esc), separators=(",", ":")).encode()
        ts = int(time.time())
        headers = {"Content-Type": "application/json", "User-Agent": "hivemesh-escalations/1",
                   "X-Hivemesh-Event": event, "X-Hivemesh-Delivery": delivery_id(esc, event),
                   "X-Hivemesh-Attempt": str(attempt),
                   "X-Hivemesh-Timestamp": str(ts), "X-Hivemesh-Signature": sign(secret, ts, body)}
        return await asyncio.to_thread(_post, rule.url, body, headers, rule.timeout_s)

    async def _record(self, escalation_id: str, event: str, delivered: bool, gave_up: bool, error: str,
                      attempts: int, next_ms: int) -> None:
        """Store the attempt's outcome and the retry state on the escalation (compare-and-swap, fenced by this
        leader's term) and audit delivered / given up. A deposed leader stores nothing: its successor carries on
        from the last stored attempt."""
        while True:
            found = await self.store.read(escalation_id)
            if found is None or found[0].status != E.ESCALATION_STATUS_PENDING:
                return  # resolved meanwhile: nothing to record on it
            esc, rev = found
            n = esc.notification
            n.attempts += 1
            n.last_error = "" if delivered else error[:500]
            done = delivered or gave_up
            n.retry_event = "" if done else event
            n.retry_attempts = 0 if done else attempts
            n.next_attempt_unix_ms = 0 if done else next_ms
            action = ""
            if event == OPENED:
                if delivered:
                    n.delivered_at_unix_ms = int(time.time() * 1000)
                    action = "notified"
                    if n.held:  # the deadline passed unseen: restart it now that someone knows
                        length = max(esc.deadline_unix_ms - esc.created_at_unix_ms, 0)
                        esc.deadline_unix_ms = n.delivered_at_unix_ms + max(1000, length // 5)
                        n.held = ""
                        n.reminded = True
                        action = "notified-deadline-restarted"
                elif gave_up:
                    n.gave_up = True
                    action = "notify-gave-up"
            elif delivered or gave_up:
                n.reminded = True
                action = "reminded" if delivered else "remind-gave-up"
            fence = self.fence()
            if fence is None:
                log.info("not recording webhook attempt %d of %s for %s: this replica no longer leads", attempts,
                         event, escalation_id)
                return
            if await self.store.swap(esc, rev, fence=fence):
                if action:
                    await self._audit(action, esc, event, attempts, error)
                return
            after = await self.store.read(escalation_id)
            if after is not None and after[1] == rev:  # unchanged, so the fence failed: another replica leads
                log.info("webhook attempt %d of %s for %s fenced off: another replica leads", attempts, event,
                         escalation_id)
                return

    async def _audit(self, action: str, esc: escalation_pb2.Escalation, event: str, attempts: int,
                     error: str) -> None:
        recorder: Recorder | None = self.store.recorder
        await _audit(action, esc, ACTOR, None)  # logs and the hooks
        if recorder is not None:
            fields = {**audit_fields(action, esc, ACTOR), "webhook_event": event, "attempts": attempts,
                      "error": error[:300]}
            try:
                await recorder(fields)
            except Exception:
                log.exception("could not record escalation %s %s in the audit log", esc.id, action)


def install(core: Core, server: Any) -> Notifier | None:
    """The webhook loop for the control plane's lifetime (after `escalations.install`, whose store it hooks)."""
    store = core.extensions.get(EXTENSION)
    if store is None:
        log.warning("escalation webhooks are off: the escalations service is not installed")
        return None
    from hivemesh.controlplane.replicas import is_leader

    return Notifier(store, leading=lambda: is_leader(core), fence=lambda: term_fence(core))

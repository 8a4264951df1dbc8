"""The escalation queue: the control plane's `Escalations` service, stored in etcd at /hivemesh/escalations/<id>.

A run that needs a person creates an escalation and waits; an operator (`hivemesh escalations approve|reject`)
resolves it. An escalation may also name an `answerer`, the principal a gateway relays for (the A2A caller
whose request asked): the requester (the relayer) relays that principal's reply with the principal's token,
which this service verifies, so nobody else's reply counts. The token proves only that the answerer called the
relayer, not what it answered, so the answer is recorded as the relayer's, `on_behalf_of` the answerer and
marked as claimed. The answerer is never the requester: a workload that named itself, then relayed a token it got
addressed to itself (sub = aud), approved its own escalation, though only operators resolve. So a non-operator's
escalation may not name its requester (INVALID_ARGUMENT), and no relay answers for the requester. Every change is
a compare-and-swap on the key's mod revision, so a person and the deadline policy can never both win.

An id is its requester's own. Ids are often derived from what others know (a workflow run's escalation id from
its run and step ids), so a first-come global id let any workload take a run's id before the run asked, and the
run was then refused its own escalation. The first requester of an id stores it under the id itself (as every
escalation was stored before); another requester's escalation of that id is stored under `scoped_id` (the id,
'@' and a hash of the requester), which no caller can ask for. Operators list and address each by its stored
id, unique; a requester addresses its own by the id it asked for as well (`_locate`).

To anyone but an operator, another principal's escalation is one that does not exist: Get, Wait, Cancel and a
relayed Resolve of it answer NOT_FOUND "no escalation '<id>'", exactly as for an id nobody holds (`_settled`). A
requester whose own scoped escalation is gone (retention deleted it) is otherwise located to the id's first
requester's, and a refusal there was both untrue (its own is simply not found) and a leak (someone else holds the
id). The audit log keeps the real reason (an `escalation` record with action `refused`, beside the RPC's own).
CreateEscalation still shows it, by answering with a scoped id exactly when another requester holds the id.

Deadlines need no background task: an escalation past its deadline is resolved by
its policy (reject, or approve with the default answer) the first time anyone reads, lists or waits on it;
a waiting run wakes at the deadline to do exactly that. An escalation a webhook rule matched is held instead
while nobody has been notified (`hivemesh.controlplane.escalation_webhooks`).

Every creation and resolution (by a person, by the deadline policy, or a withdrawal) is recorded in the
control plane's tamper-evident audit log (`hivemesh.controlplane.audit`, as a `controlplane` record with
kind `escalation`: the action, id, workflow, actor, decision and note), logged, and reported to any extra
hooks (`add_audit_hook`).

`ListEscalations` lists in pages, newest first by each escalation's etcd create revision (unique, and kept as an
escalation is resolved): a page token names the revision of the last escalation listed, bound to the caller, so
the next page resumes exactly there however many escalations were created, resolved or deleted in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

import grpc
from google.protobuf.message import DecodeError

from hivemesh.controlplane import json_text
from hivemesh.controlplane.server import Core, _rpc
from hivemesh.mesh.audit.record import DENY
from hivemesh.mesh.errors import (
    FailedPreconditionError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
)
from hivemesh.mesh.etcd import read_prefix
from hivemesh.mesh.paging import PageTokens, page_size
from hivemesh.mesh.pki import NAME_RE, Peer, parse_spiffe_id
from hivemesh.mesh.revocation import any_revoked
from hivemesh.mesh.tls import MAX_MESSAGE_BYTES
from hivemesh.mesh.tokens import KeySet, TokenVerifier
from hivemesh.v1 import escalation_pb2, escalation_pb2_grpc

log = logging.getLogger(__name__)

PREFIX: Final = "/hivemesh/escalations/"
MAX_DEADLINE_S: Final = 30 * 86400
MAX_REASON: Final = 1000
MAX_JSON: Final = 256 * 1024
MAX_WAIT_S: Final = 300
MAX_LIST_BYTES: Final = MAX_MESSAGE_BYTES - 256 * 1024
"""The most a ListEscalations reply holds: under the transport's message limit, which a few escalations with large
JSON reach (each may carry three 256 KiB documents), and past which the reply failed whole for everyone."""
_LISTED_OVERHEAD: Final = 8
"""A listed escalation's tag and length prefix in the reply, at most."""
LEFT_OFF_HEADER: Final = "hivemesh-left-off"
"""Trailing metadata of a ListEscalations page that did not hold every matching escalation: how many come after it
(for callers from before paging, which read only the first page)."""
TOKENS: Final = PageTokens("ListEscalations", "caller")
"""ListEscalations' page tokens, owned by the caller's SPIFFE id."""
DEADLINE_ACTOR: Final = "policy:deadline"
SCOPE_MARK: Final = "@"
"""Between an id and its requester's hash in a scoped id: outside a requested id's characters (NAME_RE)."""
SCOPE_HEX: Final = 12
_STORED_ID_RE: Final = re.compile(rf"(?:{NAME_RE.pattern}){re.escape(SCOPE_MARK)}[0-9a-f]{{{SCOPE_HEX}}}")

E = escalation_pb2
AuditHook = Callable[[str, escalation_pb2.Escalation, str], None]
"""(action, escalation after the change, actor SPIFFE id): action is created, approved, rejected, canceled or
expired. Hooks must not raise (a failing hook is logged and skipped)."""
_AUDIT_HOOKS: list[AuditHook] = []


def add_audit_hook(hook: AuditHook) -> None:
    """Hear every escalation change (the audit log registers here)."""
    if hook not in _AUDIT_HOOKS:
        _AUDIT_HOOKS.append(hook)


def remove_audit_hook(hook: AuditHook) -> None:
    with contextlib.suppress(ValueError):
        _AUDIT_HOOKS.remove(hook)


Recorder = Callable[[Mapping[str, Any]], Awaitable[Any]]


def audit_fields(action: str, esc: escalation_pb2.Escalation, actor: str) -> dict[str, Any]:
    """What the audit log keeps of one escalation change (never the context: it may hold personal data). A relayed
    answer adds on_behalf_of: the answerer the actor (the relayer) claims to relay for."""
    fields = {
        "event": "escalation", "action": action, "id": esc.id, "workflow_id": esc.workflow_id,
        "step_id": esc.step_id, "requested_by": esc.requested_by, "actor": actor, "reason": esc.reason[:300],
        "status": E.EscalationStatus.Name(esc.status).removeprefix("ESCALATION_STATUS_"),
        "note": esc.resolution.note[:300], "answered": bool(esc.resolution.answer_json),
    }
    if esc.resolution.on_behalf_of:
        fields["on_behalf_of"] = esc.resolution.on_behalf_of
    return fields


async def _audit(action: str, esc: escalation_pb2.Escalation, actor: str, recorder: Recorder | None) -> None:
    behalf = f" on behalf of {esc.resolution.on_behalf_of} (claimed)" if esc.resolution.on_behalf_of else ""
    log.info("escalation %s %s by %s%s (workflow %s): %s", esc.id, action, actor, behalf, esc.workflow_id or "-",
             esc.reason)
    if recorder is not None:
        try:
            await recorder(audit_fields(action, esc, actor))
        except Exception:
            log.exception("could not record escalation %s %s in the audit log", esc.id, action)
    for hook in list(_AUDIT_HOOKS):
        try:
            hook(action, esc, actor)
        except Exception:
            log.exception("escalation audit hook %r failed", hook)


def _key(escalation_id: str) -> bytes:
    return (PREFIX + escalation_id).encode()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _check_json(text: str, field: str, *, want_object: bool = False) -> None:
    if len(text) > MAX_JSON:
        raise InvalidInputError(f"{field} is larger than {MAX_JSON} bytes", field_violations={field: "too large"})
    value = json_text.load(text, field)
    if want_object and not isinstance(value, dict):
        raise InvalidInputError(f"{field} must be a JSON object", field_violations={field: "not an object"})


def scoped_id(escalation_id: str, requester: str) -> str:
    """Where requester's escalation of escalation_id is stored when another requester holds that id: '@' is not in
    a requested id, so no caller can take this one, and the hash keeps it unique among the ids operators see."""
    digest = hashlib.sha256(requester.encode()).hexdigest()[:SCOPE_HEX]
    return f"{escalation_id}{SCOPE_MARK}{digest}"


def _validate_id(escalation_id: str, *, stored: bool = False) -> None:
    """A requested id (CreateEscalation's); with stored, a scoped id too (the id that a lookup may name)."""
    if NAME_RE.fullmatch(escalation_id) or (stored and _STORED_ID_RE.fullmatch(escalation_id)):
        return
    msg = "must match [a-z0-9][a-z0-9._-]{0,62}"
    if stored:
        msg += f" (optionally followed by {SCOPE_MARK} and {SCOPE_HEX} hex digits)"
    raise InvalidInputError(f"escalation id {escalation_id[:80]!r} {msg}", field_violations={"id": msg})


def _is_operator(peer: Peer) -> bool:
    return peer.spiffe_id.kind == "operator"


def _expired(esc: escalation_pb2.Escalation, now_ms: int) -> bool:
    """Due for its deadline policy (not when held: nobody was notified, see escalation_webhooks)."""
    return (esc.status == E.ESCALATION_STATUS_PENDING and 0 < esc.deadline_unix_ms <= now_ms
            and not esc.notification.held)


NoticeCheck = Callable[[escalation_pb2.Escalation], Awaitable[bool]]
"""Does a webhook rule match this new escalation? (installed by `escalation_webhooks`)"""
HELD_NOTE: Final = "held: its deadline passed but no webhook reached anyone, so the deadline policy waits"
EXTENSION: Final = "escalations"


class EscalationStore:
    """Escalations in etcd, each change a compare-and-swap on the key's mod revision."""

    def __init__(self, etcd: Any, recorder: Recorder | None = None) -> None:
        self.etcd = etcd
        self.recorder = recorder
        self.notice_check: NoticeCheck | None = None

    async def read(self, escalation_id: str) -> tuple[escalation_pb2.Escalation, int] | None:
        kv = await self.etcd.get(_key(escalation_id))
        if kv is None:
            return None
        return E.Escalation.FromString(kv.value), int(kv.mod_revision)

    async def create(self, esc: escalation_pb2.Escalation) -> tuple[escalation_pb2.Escalation, bool]:
        """Store esc unless its id exists; returns (stored escalation, created?)."""
        key = _key(esc.id)
        tx = self.etcd.transactions
        ok, _ = await self.etcd.transaction(
            compare=[tx.version(key) == 0], success=[tx.put(key, esc.SerializeToString())], failure=[]
        )
        if ok:
            return esc, True
        found = await self.read(esc.id)
        if found is None:  # deleted in between: try once more
            return await self.create(esc)
        return found[0], False

    async def swap(self, esc: escalation_pb2.Escalation, mod_revision: int, *, fence: Sequence[Any] = ()) -> bool:
        """Store esc if its key is still at mod_revision (and every fence compare holds: a leader's term)."""
        key = _key(esc.id)
        tx = self.etcd.transactions
        ok, _ = await self.etcd.transaction(
            compare=[tx.mod(key) == mod_revision, *fence], success=[tx.put(key, esc.SerializeToString())],
            failure=[],
        )
        return bool(ok)

    async def settle(self, escalation_id: str) -> tuple[escalation_pb2.Escalation, int]:
        """Read one escalation, applying its deadline policy first if it is due (NotFoundError if absent)."""
        while True:
            found = await self.read(escalation_id)
            if found is None:
                raise NotFoundError(f"no escalation {escalation_id!r}", metadata={"id": escalation_id})
            esc, rev = found
            if not _expired(esc, _now_ms()):
                return esc, rev
            if esc.notification.required and not esc.notification.delivered_at_unix_ms:
                held = E.Escalation()
                held.CopyFrom(esc)
                held.notification.held = HELD_NOTE
                if await self.swap(held, rev):
                    await _audit("held", held, DEADLINE_ACTOR, self.recorder)
                continue
            done = E.Escalation()
            done.CopyFrom(esc)
            default = esc.on_deadline == E.DEADLINE_POLICY_DEFAULT_ANSWER
            done.status = E.ESCALATION_STATUS_APPROVED if default else E.ESCALATION_STATUS_REJECTED
            done.resolution.CopyFrom(E.Resolution(
                decision=done.status,
                note="no one resolved it before its deadline: " + ("default answer" if default else "rejected"),
                answer_json=esc.default_answer_json if default else "",
                resolved_by=DEADLINE_ACTOR,
                resolved_at_unix_ms=_now_ms(),
            ))
            if await self.swap(done, rev):
                await _audit("expired", done, DEADLINE_ACTOR, self.recorder)
                # loop: re-read to return the stored revision

    async def all(self) -> list[escalation_pb2.Escalation]:
        """Every escalation (settling those due), newest first by created_at_unix_ms."""
        out = [esc for esc, _ in await self.listed()]
        out.sort(key=lambda e: (-e.created_at_unix_ms, e.id))
        return out

    async def listed(self) -> list[tuple[escalation_pb2.Escalation, int]]:
        """Every escalation (settling those due) with its etcd create revision, newest first by that revision:
        unlike created_at_unix_ms (a replica's clock, which ties and may step back) it is unique, grows in the
        order escalations were stored, and stays as one is resolved, so a listing page resumes after it exactly."""
        out: list[tuple[escalation_pb2.Escalation, int]] = []
        listed, _ = await read_prefix(self.etcd, PREFIX.encode())  # paged: no size of the queue fails the read
        for kv in listed:
            try:
                esc = E.Escalation.FromString(kv.value)
            except DecodeError:
                log.warning("skipping unparsable escalation at %s", kv.key.decode(errors="replace"))
                continue
            if _expired(esc, _now_ms()):
                try:
                    esc, _ = await self.settle(esc.id)
                except NotFoundError:  # deleted since the read (retention): not listed, not an error
                    continue
            out.append((esc, int(kv.create_revision)))
        out.sort(key=lambda pair: -pair[1])
        return out


class EscalationsServicer(escalation_pb2_grpc.EscalationsServicer):
    """Escalations over the control plane's mutual TLS: anyone in the trust domain asks, operators decide."""

    def __init__(self, core: Core, recorder: Recorder | None = None) -> None:
        self._core = core
        self.store = EscalationStore(core.etcd, recorder)

    async def _locate(self, escalation_id: str, peer: Peer) -> str:
        """The stored id that escalation_id names for peer: a scoped id is itself; a requested id is peer's own
        scoped escalation if it has one (it asked when another requester held the id), else the id itself (its
        first requester's, and every escalation stored before ids were scoped). Operators address stored ids."""
        _validate_id(escalation_id, stored=True)
        if SCOPE_MARK in escalation_id or _is_operator(peer):
            return escalation_id
        own = scoped_id(escalation_id, str(peer.spiffe_id))
        return own if await self.store.read(own) is not None else escalation_id

    async def _settled(self, request_id: str, escalation_id: str, peer: Peer,
                       rpc: str) -> tuple[escalation_pb2.Escalation, int]:
        """The escalation at escalation_id (`_locate`d from request_id), settled, if peer may address it: an operator
        any, anyone else only its own. Another principal's is answered exactly as one that does not exist (NOT_FOUND
        naming request_id), so no refusal tells a caller that someone else holds an id; the audit log keeps the
        real reason (`_refused`). Settled before that check, as by any read: a due deadline policy applies
        whoever reads."""
        missing = NotFoundError(f"no escalation {request_id!r}", metadata={"id": request_id})
        try:
            esc, rev = await self.store.settle(escalation_id)
        except NotFoundError:
            raise missing from None
        if not _is_operator(peer) and esc.requested_by != str(peer.spiffe_id):
            await self._refused(rpc, request_id, esc, peer)
            raise missing
        return esc, rev

    async def _refused(self, rpc: str, request_id: str, esc: escalation_pb2.Escalation, peer: Peer) -> None:
        """Record what the caller's NOT_FOUND hides: the escalation it named is another principal's. The RPC's own
        audit record (the interceptor's) holds only what the caller was told; audit hooks hear changes only."""
        caller = str(peer.spiffe_id)
        log.info("%s by %s named escalation %s (as %r), which is %s's: answered NOT_FOUND", rpc, caller, esc.id,
                 request_id, esc.requested_by)
        if self.store.recorder is None:
            return
        fields = {  # status is the escalation's, as in every `escalation` record (audit_fields); answered, the call's
            "event": "escalation", "action": "refused", "method": "escalation.refused", "rpc": f"Escalations/{rpc}",
            "decision": DENY, "answered": "NOT_FOUND", "caller": caller, "actor": caller, "id": esc.id,
            "asked_id": request_id, "requested_by": esc.requested_by, "workflow_id": esc.workflow_id,
            "status": E.EscalationStatus.Name(esc.status).removeprefix("ESCALATION_STATUS_"),
            "message": "another principal's escalation: the caller was told it does not exist",
        }
        try:
            await self.store.recorder(fields)
        except Exception:
            log.exception("could not record the refusal of escalation %s to %s in the audit log", esc.id, caller)

    @_rpc
    async def CreateEscalation(
        self, request: escalation_pb2.CreateEscalationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> escalation_pb2.Escalation:
        peer = self._core.peer(context)
        escalation_id = request.id or f"esc-{secrets.token_hex(6)}"
        _validate_id(escalation_id)
        reason = request.reason.strip()
        if not reason or len(reason) > MAX_REASON:
            msg = f"a reason of 1..{MAX_REASON} characters is required"
            raise InvalidInputError(msg, field_violations={"reason": msg})
        if request.context_json:
            _check_json(request.context_json, "context_json", want_object=True)
        if not 0 <= request.deadline_seconds <= MAX_DEADLINE_S:
            msg = f"must be 0..{MAX_DEADLINE_S}"
            raise InvalidInputError(f"deadline_seconds {msg}", field_violations={"deadline_seconds": msg})
        on_deadline = request.on_deadline or E.DEADLINE_POLICY_REJECT
        if on_deadline not in E.DeadlinePolicy.values():  # proto3 keeps a number it has no name for
            msg = f"must be one of {', '.join(E.DeadlinePolicy.keys()[1:])}"
            raise InvalidInputError(f"on_deadline {msg}", field_violations={"on_deadline": msg})
        if on_deadline == E.DEADLINE_POLICY_DEFAULT_ANSWER and not request.default_answer_json:
            msg = "required when on_deadline is DEFAULT_ANSWER"
            raise InvalidInputError(f"default_answer_json is {msg}", field_violations={"default_answer_json": msg})
        if request.default_answer_json:  # stored whatever on_deadline says: checked (and bounded) alike
            _check_json(request.default_answer_json, "default_answer_json")
        if len(request.labels) > 32 or any(len(k) > 63 or len(v) > 256 for k, v in request.labels.items()):
            msg = "at most 32 labels, keys up to 63 and values up to 256 characters"
            raise InvalidInputError(f"labels: {msg}", field_violations={"labels": msg})
        if request.answerer:
            try:
                answerer = parse_spiffe_id(request.answerer)
            except ValueError as exc:
                raise InvalidInputError(f"answerer: {exc}", field_violations={"answerer": "not a SPIFFE id"}) from None
            if answerer.trust_domain != self._core.trust_domain:
                msg = f"must be in trust domain {self._core.trust_domain}"
                raise InvalidInputError(f"answerer {msg}", field_violations={"answerer": msg})
            if str(answerer) == str(peer.spiffe_id) and not _is_operator(peer):  # an operator resolves anyway
                msg = (f"must be another principal than the requester ({peer.spiffe_id}): a requester does not "
                       "answer its own escalation (an operator does)")
                raise InvalidInputError(f"answerer {msg}", field_violations={"answerer": msg})
        for name, value in (("workflow_id", request.workflow_id), ("step_id", request.step_id)):
            if len(value) > 256:
                raise InvalidInputError(f"{name} is too long", field_violations={name: "at most 256 characters"})
        now = _now_ms()
        esc = E.Escalation(
            id=escalation_id,
            reason=reason,
            context_json=request.context_json or "{}",
            requested_by=str(peer.spiffe_id),
            workflow_id=request.workflow_id,
            step_id=request.step_id,
            created_at_unix_ms=now,
            deadline_unix_ms=now + request.deadline_seconds * 1000 if request.deadline_seconds else 0,
            on_deadline=on_deadline,
            default_answer_json=request.default_answer_json,
            status=E.ESCALATION_STATUS_PENDING,
            labels=dict(request.labels),
            answerer=request.answerer,
        )
        if self.store.notice_check is not None and await self.store.notice_check(esc):
            esc.notification.required = True
        # Scoped for every requester, operators too: a run resumed by an operator (`hivemesh workflows resume`)
        # asks as the operator, and was handed the escalation another requester had taken its id for.
        requester = str(peer.spiffe_id)
        own = scoped_id(escalation_id, requester)
        if await self.store.read(own) is not None:  # asked before, under its scoped id
            return (await self.store.settle(own))[0]
        stored, created = await self.store.create(esc)
        if not created and stored.requested_by != requester:
            # Another requester's id: this requester's escalation is its own, under the id scoped to it.
            esc.id = own
            stored, created = await self.store.create(esc)
            if not created and stored.requested_by != requester:  # a hash collision: never in practice
                raise PermissionDeniedError(f"escalation {own!r} exists and belongs to another caller")
        if not created:  # idempotent: the one this requester created
            return (await self.store.settle(stored.id))[0]
        await _audit("created", stored, requester, self.store.recorder)
        return stored

    @_rpc
    async def GetEscalation(
        self, request: escalation_pb2.GetEscalationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> escalation_pb2.Escalation:
        peer = self._core.peer(context)
        esc, _ = await self._settled(request.id, await self._locate(request.id, peer), peer, "GetEscalation")
        return esc

    @_rpc
    async def ListEscalations(
        self, request: escalation_pb2.ListEscalationsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> escalation_pb2.ListEscalationsResponse:
        """One page of the caller's matching escalations, newest first: below the page token's revision, at most
        page_size of them and no more than fit in MAX_LIST_BYTES. next_page_token resumes below the last one
        listed, by its revision rather than its position, so escalations created, resolved or deleted between
        pages shift nothing."""
        peer = self._core.peer(context)
        caller = str(peer.spiffe_id)
        size, before = page_size(request.page_size), TOKENS.read(caller, request.page_token)
        matching = [
            (esc, revision) for esc, revision in await self.store.listed()
            if (before is None or revision < before)
            and (_is_operator(peer) or esc.requested_by == caller)
            and (not request.status or esc.status == request.status)
            and (not request.workflow_id or esc.workflow_id == request.workflow_id)
        ]
        out = E.ListEscalationsResponse()
        used = 0
        for esc, _ in matching[:size]:
            taken = esc.ByteSize() + _LISTED_OVERHEAD
            if out.escalations and used + taken > MAX_LIST_BYTES:  # the first always fits: each is bounded
                break
            out.escalations.append(esc)
            used += taken
        left_off = len(matching) - len(out.escalations)
        if left_off:
            out.next_page_token = TOKENS.make(caller, matching[len(out.escalations) - 1][1])
            log.debug("ListEscalations for %s: a page of %d, %d more after it", caller, len(out.escalations),
                      left_off)
            context.set_trailing_metadata(((LEFT_OFF_HEADER, str(left_off)),))
        return out

    async def _finish(self, request_id: str, escalation_id: str, peer: Peer, rpc: str, status: int, note: str,
                      answer_json: str, action: str, on_behalf_of: str = "") -> tuple[escalation_pb2.Escalation, bool]:
        """Resolve a pending escalation (by peer, relaying for on_behalf_of if set); (the escalation, whether this
        call changed it). Each read is `_settled`: what peer may not address is not found, even if it was deleted
        and created anew by another requester since peer's call checked it."""
        actor = str(peer.spiffe_id)
        while True:
            esc, rev = await self._settled(request_id, escalation_id, peer, rpc)
            if esc.status != E.ESCALATION_STATUS_PENDING:
                return esc, False
            done = E.Escalation()
            done.CopyFrom(esc)
            done.status = status  # type: ignore[assignment]
            done.resolution.CopyFrom(E.Resolution(
                decision=status,  # type: ignore[arg-type]
                note=note,
                answer_json=answer_json,
                resolved_by=actor,
                resolved_at_unix_ms=_now_ms(),
                on_behalf_of=on_behalf_of,
                on_behalf_of_claimed=bool(on_behalf_of),
            ))
            if await self.store.swap(done, rev):
                await _audit(action, done, actor, self.store.recorder)
                return done, True

    @_rpc
    async def ResolveEscalation(
        self, request: escalation_pb2.ResolveEscalationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> escalation_pb2.Escalation:
        peer = self._core.peer(context)
        _validate_id(request.id, stored=True)
        if not _is_operator(peer) and not request.subject_token:
            raise PermissionDeniedError(f"only operators (people) resolve escalations; {peer.spiffe_id} is not one")
        escalation_id = await self._locate(request.id, peer)
        on_behalf_of = ""
        if not _is_operator(peer):
            on_behalf_of = await self._relayed_answerer(request.id, escalation_id, request.subject_token, peer)
        if request.answer_json:
            _check_json(request.answer_json, "answer_json")
        if len(request.note) > MAX_REASON:
            raise InvalidInputError("the note is too long", field_violations={"note": f"at most {MAX_REASON}"})
        status = E.ESCALATION_STATUS_APPROVED if request.approve else E.ESCALATION_STATUS_REJECTED
        # Recorded as the caller's (the one verified), a relayer's on behalf of the answerer it names.
        done, changed = await self._finish(request.id, escalation_id, peer, "ResolveEscalation", status,
                                           request.note, request.answer_json,
                                           "approved" if request.approve else "rejected", on_behalf_of)
        if not changed:
            by = done.resolution.resolved_by or "?"
            now = E.EscalationStatus.Name(done.status).removeprefix("ESCALATION_STATUS_").lower()
            raise FailedPreconditionError(
                f"escalation {escalation_id!r} is already {now} (by {by})",
                metadata={"id": escalation_id, "resolved_by": by},
            )
        return done

    async def _relayed_answerer(self, request_id: str, escalation_id: str, subject_token: str, peer: Peer) -> str:
        """The answerer whose reply the requester relays, checked: the escalation is the relayer's own (another's
        is not found, as for every non-operator: `_settled`), names an answerer other than its requester, and the
        subject token is a genuine, unrevoked token of that answerer addressed to the relayer (never the relayer's
        own: sub = aud would let a requester answer itself). That shows the answerer called the relayer, not that
        it gave this answer: the caller records it as a claim (Resolution.on_behalf_of), the relayer as the one
        who resolved."""
        esc, _ = await self._settled(request_id, escalation_id, peer, "ResolveEscalation")
        relayer = str(peer.spiffe_id)
        if not esc.answerer:
            raise PermissionDeniedError(
                f"{relayer} may relay an answer only to an escalation that names an answerer; {request_id!r} "
                "names none")
        own = (relayer, esc.requested_by)
        if esc.answerer in own:  # named before creation refused it: the requester would answer itself
            raise PermissionDeniedError(
                f"escalation {escalation_id!r} names its own requester {esc.answerer} as answerer; a requester does "
                "not answer its own escalation: only an operator resolves it")
        core = self._core
        verifier = TokenVerifier(KeySet.from_jwks(core.issuer.keys.jwks_json()), issuer=core.issuer.issuer,
                                 audience=relayer, max_lifetime_s=core.issuer.max_ttl_s)
        claims = verifier.verify_signed(subject_token)
        if claims.subject in own:  # sub = aud: a token the requester got addressed to itself proves nobody else
            raise PermissionDeniedError(
                f"the relayed token is {claims.subject}'s own, addressed to itself; a requester does not answer its "
                f"own escalation: only {esc.answerer} (or an operator) answers escalation {escalation_id!r}")
        if claims.subject != esc.answerer or claims.actor is not None:
            raise PermissionDeniedError(
                f"the relayed token is {claims.subject}'s; only {esc.answerer} (or an operator) answers "
                f"escalation {escalation_id!r}")
        revoked = await any_revoked(core.etcd, claims.jti, [claims.subject])
        if revoked is not None:
            raise PermissionDeniedError(f"the answerer's token is revoked ({revoked.jti or revoked.subject})")
        return claims.subject

    @_rpc
    async def CancelEscalation(
        self, request: escalation_pb2.CancelEscalationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> escalation_pb2.Escalation:
        peer = self._core.peer(context)
        _validate_id(request.id, stored=True)
        if len(request.note) > MAX_REASON:  # as Resolve's: stored with the resolution
            raise InvalidInputError("the note is too long", field_violations={"note": f"at most {MAX_REASON}"})
        escalation_id = await self._locate(request.id, peer)
        done, _ = await self._finish(request.id, escalation_id, peer, "CancelEscalation", E.ESCALATION_STATUS_CANCELED,
                                     request.note, "", "canceled")
        return done

    @_rpc
    async def WaitEscalation(
        self, request: escalation_pb2.WaitEscalationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> escalation_pb2.Escalation:
        peer = self._core.peer(context)
        _validate_id(request.id, stored=True)
        if request.max_wait_seconds < 0:  # not "return at once": a caller whose sum went negative would spin
            msg = f"must be 0 (30 s) to {MAX_WAIT_S}; more is read as {MAX_WAIT_S}"
            raise InvalidInputError(f"max_wait_seconds {msg}, got {request.max_wait_seconds}",
                                    field_violations={"max_wait_seconds": msg})
        max_wait = min(request.max_wait_seconds or 30, MAX_WAIT_S)
        until = time.monotonic() + max_wait
        remaining_rpc = context.time_remaining()
        if remaining_rpc is not None:
            until = min(until, time.monotonic() + max(remaining_rpc - 0.5, 0.0))
        escalation_id = await self._locate(request.id, peer)
        while True:
            esc, rev = await self._settled(request.id, escalation_id, peer, "WaitEscalation")
            now = time.monotonic()
            if esc.status != E.ESCALATION_STATUS_PENDING or now >= until:
                return esc
            wait = until - now
            if esc.deadline_unix_ms and not esc.notification.held:
                wait = min(wait, max((esc.deadline_unix_ms - _now_ms()) / 1000 + 0.05, 0.05))
            await self._wait_change(escalation_id, rev, wait)

    async def _wait_change(self, escalation_id: str, revision: int, timeout: float) -> None:
        """Until the key changes after revision, or timeout (bounded even if the watch misbehaves)."""
        try:
            await asyncio.wait_for(
                self._core.etcd.watch_once(_key(escalation_id), timeout=timeout, start_revision=revision + 1),
                timeout + 1.0,
            )
        except Exception:  # noqa: BLE001 - a timeout or a broken watch both mean: read again
            await asyncio.sleep(min(0.2, timeout))


def _recorder(core: Core) -> Recorder | None:
    """The control plane's own audit log (issue 4's AuditStore), when this build has one."""
    try:
        from hivemesh.controlplane.audit import audit_store
    except ImportError:  # pragma: no cover - the audit log ships with hivemesh
        return None
    return audit_store(core).record_durably


def install(core: Core, server: grpc.aio.Server) -> None:
    """Add the Escalations service to the control plane's mutual-TLS server."""
    servicer = EscalationsServicer(core, _recorder(core))
    core.extensions[EXTENSION] = servicer.store  # the webhook feature hooks in here
    escalation_pb2_grpc.add_EscalationsServicer_to_server(servicer, server)

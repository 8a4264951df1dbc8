"""Asking a person: the SDK side of human escalation.

Two ways, both over the protos, so any language can do either:

- **From a capability** (A2A style): answer the call with `TASK_STATE_INPUT_REQUIRED`. In Python, raise
  `InputRequired(reason, context)`; an agent in another language returns an `InvokeResponse` with that state
  and a JSON output `{"reason": ..., "context": {...}}`. The orchestrating pattern queues the escalation in
  the control plane, pauses the run in INPUT_REQUIRED, and re-calls the capability with the person's answer.
- **Directly**: any workload with a mesh certificate calls the control plane's `Escalations` service
  (`EscalationClient` here) and waits for the resolution.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import grpc

from hivemesh.mesh import json_depth
from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.controlplane_errors import rpc_failure
from hivemesh.mesh.errors import ControlPlaneUnavailableError, HivemeshError, InvalidInputError
from hivemesh.v1 import escalation_pb2, escalation_pb2_grpc

log = logging.getLogger(__name__)

Status = Literal["PENDING", "APPROVED", "REJECTED", "CANCELED"]
OnDeadline = Literal["reject", "default"]
MAX_DEADLINE_S: Final = 30 * 86400
"""The longest deadline the control plane's Escalations service takes (`controlplane.escalations.MAX_DEADLINE_S`)."""
MAX_LIST_PAGES: Final = 10_000
"""The most ListEscalations pages `list` follows (each holds up to 1,000 escalations or up to 8 MiB): a listing
longer than that, or a server whose pages never end, is an error rather than a loop that never returns."""
WITHDRAW_S: Final = 5.0
"""How long a cancelled run waits (bounded, best effort) to withdraw a question it asked, its creation's answer
included: the cancellation goes on either way."""
_POLICY = {"reject": escalation_pb2.DEADLINE_POLICY_REJECT, "default": escalation_pb2.DEADLINE_POLICY_DEFAULT_ANSWER}


class InputRequired(Exception):  # noqa: N818 - named after the A2A task state it produces
    """Raised by a capability that needs a person: the call answers TASK_STATE_INPUT_REQUIRED.

    Args:
        reason: one line a person reads first.
        context: what they need to decide (JSON-serializable).
        options: the answers that make sense (shown to the person; not enforced).
    """

    def __init__(self, reason: str, context: Mapping[str, Any] | None = None, *, options: list[str] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.context = dict(context or {})
        self.options = list(options or [])

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"reason": self.reason, "context": self.context}
        if self.options:
            out["options"] = self.options
        return out


def status_name(value: int) -> str:
    return escalation_pb2.EscalationStatus.Name(value).removeprefix("ESCALATION_STATUS_")  # type: ignore[arg-type]


def _loads(text: str) -> Any:
    return json_depth.loads(text) if text else None


@dataclass(frozen=True)
class EscalationInfo:
    """An escalation as Python data (decoded from the proto)."""

    id: str
    reason: str
    context: dict[str, Any]
    requested_by: str
    workflow_id: str
    step_id: str
    created_at: float
    deadline: float | None
    on_deadline: OnDeadline
    default_answer: Any
    status: str
    decision: str = ""
    note: str = ""
    answer: Any = None
    resolved_by: str = ""
    resolved_at: float | None = None
    labels: dict[str, str] = field(default_factory=dict)
    answerer: str = ""
    """A principal who may answer besides operators (its reply relayed by the requester), or empty."""
    on_behalf_of: str = ""
    """For a relayed answer, the answerer the relayer (resolved_by) says it relays for; empty otherwise."""
    on_behalf_of_claimed: bool = False
    """on_behalf_of is the relayer's claim: its token shows the answerer called it, not what it answered."""

    @property
    def pending(self) -> bool:
        return self.status == "PENDING"

    @property
    def approved(self) -> bool:
        return self.status == "APPROVED"

    @classmethod
    def from_proto(cls, e: escalation_pb2.Escalation) -> EscalationInfo:
        r = e.resolution
        return cls(
            id=e.id,
            reason=e.reason,
            context=_loads(e.context_json) or {},
            requested_by=e.requested_by,
            workflow_id=e.workflow_id,
            step_id=e.step_id,
            created_at=e.created_at_unix_ms / 1000,
            deadline=e.deadline_unix_ms / 1000 if e.deadline_unix_ms else None,
            on_deadline="default" if e.on_deadline == escalation_pb2.DEADLINE_POLICY_DEFAULT_ANSWER else "reject",
            default_answer=_loads(e.default_answer_json),
            status=status_name(e.status),
            decision=status_name(r.decision) if r.decision else "",
            note=r.note,
            answer=_loads(r.answer_json),
            resolved_by=r.resolved_by,
            resolved_at=r.resolved_at_unix_ms / 1000 if r.resolved_at_unix_ms else None,
            labels=dict(e.labels),
            answerer=e.answerer,
            on_behalf_of=r.on_behalf_of,
            on_behalf_of_claimed=r.on_behalf_of_claimed,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "reason": self.reason, "context": self.context, "requested_by": self.requested_by,
            "workflow_id": self.workflow_id, "step_id": self.step_id, "created_at": self.created_at,
            "deadline": self.deadline, "on_deadline": self.on_deadline, "default_answer": self.default_answer,
            "status": self.status, "note": self.note, "answer": self.answer, "resolved_by": self.resolved_by,
            "resolved_at": self.resolved_at, "labels": self.labels, "answerer": self.answerer,
            "on_behalf_of": self.on_behalf_of, "on_behalf_of_claimed": self.on_behalf_of_claimed,
        }


def _deadline_seconds(deadline_s: float | None) -> int:
    """The request's whole seconds (0: no deadline). Finite and in (0, MAX_DEADLINE_S]: -30 silently became 1 s
    and NaN or 1e30 escaped as a bare ValueError/OverflowError from round()."""
    if deadline_s is None:
        return 0
    if (isinstance(deadline_s, bool) or not isinstance(deadline_s, int | float) or not math.isfinite(deadline_s)
            or not 0 < deadline_s <= MAX_DEADLINE_S):
        msg = f"must be a finite number of seconds in (0, {MAX_DEADLINE_S}] (or None: no deadline)"
        raise InvalidInputError(f"deadline_s {msg}, not {deadline_s!r}", field_violations={"deadline_s": msg})
    return max(1, min(MAX_DEADLINE_S, round(deadline_s)))


def _dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{what} is not JSON-serializable: {exc}") from None


class EscalationClient:
    """The control plane's Escalations service over a mutual-TLS channel (a ControlPlaneClient's)."""

    def __init__(self, channel: grpc.aio.Channel | Any, *, timeout_s: float = 10.0) -> None:
        # Accept a ControlPlaneClient too: it renews its channel, so look the channel up per call.
        self._source = channel
        self.timeout_s = timeout_s

    def _stub(self) -> escalation_pb2_grpc.EscalationsStub:
        channel = getattr(self._source, "channel", self._source)
        return escalation_pb2_grpc.EscalationsStub(channel)

    async def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """Escalations.<method>; a control plane that did not answer is CONTROL_PLANE_UNAVAILABLE naming its
        address (`rpc_failure`), not the AGENT_UNAVAILABLE or bare DEADLINE_EXCEEDED gRPC's own codes map to.
        Through a ControlPlaneClient as its other calls go, so its `reachable` and replica choice follow too."""
        timeout_s = timeout or self.timeout_s
        rpc = getattr(self._stub(), method)
        if isinstance(self._source, ControlPlaneClient):
            return await self._source.call(rpc, request, timeout_s=timeout_s)
        try:
            return await rpc(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise rpc_failure(exc, "", timeout_s=timeout_s) from exc  # a bare channel: its address is not known

    async def create(
        self,
        reason: str,
        context: Mapping[str, Any] | None = None,
        *,
        escalation_id: str = "",
        workflow_id: str = "",
        step_id: str = "",
        deadline_s: float | None = None,
        on_deadline: OnDeadline = "reject",
        default_answer: Any = None,
        labels: Mapping[str, str] | None = None,
        answerer: str = "",
    ) -> EscalationInfo:
        """Queue an escalation (idempotent by escalation_id, per caller) and return it as stored: its id is
        escalation_id, or, if another caller holds that id, escalation_id@<hash of this caller> (operators see
        that one; this caller may go on using escalation_id). answerer: a principal
        (SPIFFE id) whose reply this caller may relay with `resolve(subject_token=...)`, besides operators.
        deadline_s: seconds in (0, MAX_DEADLINE_S], or None for no deadline (else InvalidInputError)."""
        if on_deadline not in _POLICY:
            raise InvalidInputError("on_deadline must be 'reject' or 'default'")
        req = escalation_pb2.CreateEscalationRequest(
            id=escalation_id,
            reason=reason,
            context_json=_dumps(dict(context or {}), "the escalation context"),
            workflow_id=workflow_id,
            step_id=step_id,
            deadline_seconds=_deadline_seconds(deadline_s),
            on_deadline=_POLICY[on_deadline],
            default_answer_json=_dumps(default_answer, "the default answer") if on_deadline == "default" else "",
            labels=dict(labels or {}),
            answerer=answerer,
        )
        return EscalationInfo.from_proto(await self._call("CreateEscalation", req))

    async def get(self, escalation_id: str) -> EscalationInfo:
        req = escalation_pb2.GetEscalationRequest(id=escalation_id)
        return EscalationInfo.from_proto(await self._call("GetEscalation", req))

    async def list(self, status: Status | None = None, workflow_id: str = "", *,
                   max_pages: int = MAX_LIST_PAGES) -> list[EscalationInfo]:
        """Every matching escalation this caller may see, newest first: the service lists in pages (each under
        one message), which this follows to the end. Escalations created while it pages come in the next
        listing, not this one. More than max_pages pages is a HivemeshError (RESOURCE_EXHAUSTED), and a page
        token that repeats one (INTERNAL: the server did not advance), rather than a loop without end."""
        if isinstance(max_pages, bool) or not isinstance(max_pages, int) or max_pages < 1:
            raise InvalidInputError(f"max_pages must be a whole number >= 1, not {max_pages!r}",
                                    field_violations={"max_pages": "must be >= 1"})
        value = escalation_pb2.EscalationStatus.Value(f"ESCALATION_STATUS_{status}") if status else 0
        out: list[EscalationInfo] = []
        token, seen = "", set()
        for _ in range(max_pages):
            resp = await self._call("ListEscalations", escalation_pb2.ListEscalationsRequest(
                status=value, workflow_id=workflow_id, page_token=token))  # type: ignore[arg-type]
            out.extend(EscalationInfo.from_proto(e) for e in resp.escalations)
            token = resp.next_page_token
            if not token:
                return out
            if token in seen:
                raise HivemeshError(f"the escalation listing did not advance: page token {token[:40]!r} came "
                                    f"twice (after {len(out)} escalations)", code=grpc.StatusCode.INTERNAL,
                                    reason="LISTING_STUCK")
            seen.add(token)
        raise HivemeshError(f"the escalation listing did not end within {max_pages} pages ({len(out)} escalations "
                            "so far): narrow it by status or workflow_id", code=grpc.StatusCode.RESOURCE_EXHAUSTED,
                            reason="LISTING_TOO_LONG")

    async def resolve(self, escalation_id: str, *, approve: bool, note: str = "", answer: Any = None,
                      subject_token: str = "") -> EscalationInfo:
        """Resolve as an operator; or, with subject_token (the escalation's answerer's token addressed to this
        caller), relay the answerer's reply to an escalation this caller created: recorded as resolved by this
        caller, on behalf of the answerer (claimed)."""
        req = escalation_pb2.ResolveEscalationRequest(
            id=escalation_id, approve=approve, note=note,
            answer_json=_dumps(answer, "the answer") if answer is not None else "",
            subject_token=subject_token,
        )
        return EscalationInfo.from_proto(await self._call("ResolveEscalation", req))

    async def cancel(self, escalation_id: str, *, note: str = "") -> EscalationInfo:
        """Withdraw a pending escalation (its requester or an operator); a resolved one comes back unchanged."""
        req = escalation_pb2.CancelEscalationRequest(id=escalation_id, note=note)
        return EscalationInfo.from_proto(await self._call("CancelEscalation", req))

    async def wait(self, escalation_id: str, timeout: float | None = None, *, poll_s: float = 20.0) -> EscalationInfo:
        """Wait until the escalation is resolved (by a person or its deadline policy), or timeout passes.

        Survives a control-plane restart: an unreachable control plane is retried with backoff until timeout.
        A timeout must be finite and >= 0 (NaN compares false with every deadline: it never returned).
        """
        for name, value in (("timeout", timeout), ("poll_s", poll_s)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not math.isfinite(value) or value < 0):
                raise InvalidInputError(f"{name} must be a finite number of seconds >= 0, not {value!r}",
                                        field_violations={name: "must be finite and >= 0"})
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = 0.2
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return await self.get(escalation_id)
            wait_s = poll_s if remaining is None else max(1.0, min(poll_s, remaining))
            req = escalation_pb2.WaitEscalationRequest(id=escalation_id, max_wait_seconds=round(wait_s))
            try:
                info = EscalationInfo.from_proto(await self._call("WaitEscalation", req, timeout=wait_s + 10))
                backoff = 0.2
            except HivemeshError as exc:
                if exc.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                log.warning("waiting on escalation %s: %s; retrying", escalation_id, exc.message)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if not info.pending:
                return info
            if deadline is not None and time.monotonic() >= deadline:
                return info


__all__ = ["ControlPlaneUnavailableError", "EscalationClient", "EscalationInfo", "InputRequired", "status_name"]

"""The one table of hivemesh errors: typed exceptions, their gRPC status codes and `google.rpc` details.

Every layer raises a `HivemeshError`; the edge of each server turns it into a status with an `ErrorInfo`
(reason, domain "hivemesh") via `to_status`, and every client turns a failed RPC back into the same typed
error via `from_rpc_error`. So a caller in any language sees the same code and reason for the same refusal.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Mapping
from typing import Any, ClassVar, Final

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "hivemesh"
_DETAILS_KEY = "grpc-status-details-bin"
PUSHBACK_KEY = "grpc-retry-pushback-ms"


class _RichStatus(collections.namedtuple("_RichStatus", ("code", "details", "trailing_metadata")), grpc.Status):
    """A grpc.Status with extra trailers (grpc_status builds one without a way to add any)."""


class HivemeshError(Exception):
    """Base of every hivemesh error; subclasses fix the status code, reason and a default message."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    reason: ClassVar[str] = "INTERNAL"
    default_message: ClassVar[str] = "internal mesh error"

    def __init__(
        self,
        message: str | None = None,
        *,
        metadata: Mapping[str, str] | None = None,
        field_violations: Mapping[str, str] | None = None,
        retry_after_s: float | None = None,
        code: grpc.StatusCode | None = None,
        reason: str | None = None,
    ) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: dict[str, str] = dict(field_violations or {})
        self.retry_after_s = retry_after_s
        self.said_by_grpc = False
        """The status carried no hivemesh reason: gRPC itself ended the call (a connection that broke, a server
        that stopped under it), not a hivemesh layer that decided (`from_status_parts` sets it)."""
        # A remote error may carry a code/reason this process has no class for; keep them as received.
        if code is not None:
            self.code = code  # type: ignore[misc]
        if reason is not None:
            self.reason = reason  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.reason}: {self.message!r})"


# --- authentication: who are you? (UNAUTHENTICATED) ---------------------------------------------------------
class UnauthenticatedError(HivemeshError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"
    default_message = "the caller could not be authenticated"


class PeerUnauthenticatedError(UnauthenticatedError):
    reason = "PEER_UNAUTHENTICATED"
    default_message = "no valid mesh client certificate was presented (mutual TLS is required)"


class TokenMissingError(UnauthenticatedError):
    reason = "TOKEN_MISSING"
    default_message = "no capability token: send 'authorization: Bearer <jwt>' issued by the control plane"


class TokenInvalidError(UnauthenticatedError):
    reason = "TOKEN_INVALID"
    default_message = "the capability token is invalid"


class TokenExpiredError(UnauthenticatedError):
    reason = "TOKEN_EXPIRED"
    default_message = "the capability token has expired; fetch a fresh one from the control plane"


class AudienceMismatchError(UnauthenticatedError):
    reason = "AUDIENCE_MISMATCH"
    default_message = "the capability token was issued for another audience"


class JoinTokenInvalidError(UnauthenticatedError):
    reason = "JOIN_TOKEN_INVALID"
    default_message = "the join token is unknown, expired or already used"


class TokenRevokedError(UnauthenticatedError):
    reason = "TOKEN_REVOKED"
    default_message = "the capability token has been revoked"


class SignatureInvalidError(UnauthenticatedError):
    """A signed payload's JWS is missing, malformed, outside its time window or not made by the peer's key."""

    reason = "SIGNATURE_INVALID"


# --- authorization: may you? (PERMISSION_DENIED) ------------------------------------------------------------
class PermissionDeniedError(HivemeshError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"
    default_message = "the caller is not allowed to do this"


class ScopeMissingError(PermissionDeniedError):
    reason = "SCOPE_MISSING"
    default_message = "the capability token does not grant this capability"


class GrantDeniedError(PermissionDeniedError):
    reason = "GRANT_DENIED"
    default_message = "no grant allows this identity the requested capabilities"


class IdentityMismatchError(PermissionDeniedError):
    reason = "IDENTITY_MISMATCH"
    default_message = "the capability token's subject is not the certificate's identity"


class PolicyDeniedError(PermissionDeniedError):
    reason = "POLICY_DENIED"
    default_message = "an authorization policy denies this call"


class DelegationDeniedError(PermissionDeniedError):
    reason = "DELEGATION_DENIED"
    default_message = "the delegation would widen the scopes of the token it derives from, or is too deep"


class CallHandleInvalidError(PermissionDeniedError):
    reason = "CALL_HANDLE_INVALID"
    default_message = (
        "the call handle (x-hivemesh-call-handle) is unknown or expired: it is valid only while the inbound call "
        "the sidecar gave it with is in flight"
    )


# --- the request itself ---------------------------------------------------------------------------------------
class InvalidInputError(HivemeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_INPUT"
    default_message = "the input is not valid for this capability"


class ContentRefusedError(InvalidInputError):
    reason = "CONTENT_REFUSED"
    default_message = "the input was refused by the content screen (e.g. a prompt-injection pattern)"


class ReplayedError(InvalidInputError):
    """A signed request whose nonce was already seen within its time window."""

    reason = "REPLAYED"


class PayloadTooLargeError(HivemeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "PAYLOAD_TOO_LARGE"
    default_message = "the input is larger than this capability accepts"


class UnknownCapabilityError(HivemeshError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "UNKNOWN_CAPABILITY"
    default_message = "no agent in the mesh offers this capability"


# --- the mesh and the agents ------------------------------------------------------------------------------------
class NoLiveInstanceError(HivemeshError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "NO_LIVE_INSTANCE"
    default_message = "the capability is known but no live instance serves it now"


class AgentUnavailableError(HivemeshError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "AGENT_UNAVAILABLE"
    default_message = "the agent could not be reached"


class StaleRegistrationError(HivemeshError):
    """The call was routed by a registration of the instance that is gone (its `hivemesh-fence` names another
    one): nothing ran, and the caller's mesh sends it to an instance its registry knows now."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "STALE_REGISTRATION"
    default_message = "the call was routed by a registration of this instance that is gone"


class DeadlineExceededError(HivemeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"
    default_message = "the call's deadline passed before it finished"


class CancelledError(HivemeshError):
    code = grpc.StatusCode.CANCELLED
    reason = "CANCELLED"
    default_message = "the call was cancelled"


class AgentError(HivemeshError):
    code = grpc.StatusCode.INTERNAL
    reason = "AGENT_ERROR"
    default_message = "the agent failed while handling the call"


class InvalidOutputError(AgentError):
    """The agent's answer does not match its declared output schema: never passed on (the caller gets this)."""

    reason = "INVALID_OUTPUT"
    default_message = "the agent's answer does not match its declared output schema"


class OutputScreenedError(AgentError):
    """The agent's answer carried a secret or personal data its capability's output screen refuses."""

    reason = "OUTPUT_SCREENED"


class ToolRoundsExceededError(AgentError):
    """The agent's model still asked for tools after its tool loop's bound on rounds (`hivemesh.sdk.tools`):
    the agent's fault, not the caller's; metadata `max_rounds` says the bound."""

    reason = "TOOL_ROUNDS_EXCEEDED"
    default_message = "the model kept asking for tools past the bound on rounds"


class RegistryUnavailableError(HivemeshError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "REGISTRY_UNAVAILABLE"
    default_message = "the registry (etcd) cannot be reached"


class ControlPlaneUnavailableError(HivemeshError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "CONTROL_PLANE_UNAVAILABLE"
    default_message = "the control plane cannot be reached"


class AuditUnavailableError(HivemeshError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "AUDIT_UNAVAILABLE"
    default_message = "the audit record could not be written, so the call was not served (fail closed)"


class CertificateExpiredError(HivemeshError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "CERTIFICATE_EXPIRED"
    default_message = "this workload's certificate has expired and could not be renewed (control plane down?)"


class FailedPreconditionError(HivemeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"
    default_message = "the system is not in a state to do this"


class JoinTokenRequiredError(FailedPreconditionError):
    reason = "JOIN_TOKEN_REQUIRED"
    default_message = "this workload has no usable identity: a new join token is needed (HIVEMESH_JOIN_TOKEN)"


class StoredIdentityMismatchError(FailedPreconditionError):
    reason = "STORED_IDENTITY_MISMATCH"
    default_message = "the identity stored in the state folder is not the one this workload asks for"


class LoopDetectedError(FailedPreconditionError):
    reason = "LOOP_DETECTED"
    default_message = "the call would re-enter an agent already in its call chain (A -> B -> A)"


class DepthExceededError(FailedPreconditionError):
    reason = "DEPTH_EXCEEDED"
    default_message = "the call chain is deeper than the mesh allows"


class NotFoundError(HivemeshError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"
    default_message = "not found"


# --- orchestration (issue 5) -------------------------------------------------------------------------------------
class TaskRejectedError(FailedPreconditionError):
    """A validation step, a reviewer or a person turned the task down: a verdict, not a fault (A2A REJECTED)."""

    reason = "TASK_REJECTED"
    default_message = "the task was rejected"


class TokenBudgetExceededError(HivemeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "TOKEN_BUDGET_EXCEEDED"
    default_message = "the caller's token budget for this window is spent"


# --- traffic policy and resilience (issue 3) ----------------------------------------------------------------------
class RateLimitedError(HivemeshError):
    """A rate limit refused the call; `retry_after_s` says when a token will be there (RetryInfo + pushback)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RATE_LIMITED"
    default_message = "rate limit reached: retry after the delay given"


class OverloadedError(HivemeshError):
    """The agent is at its in-flight limit and shed the call instead of queueing it without bound."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "OVERLOADED"
    default_message = "the agent is overloaded and shed the call"


class CircuitOpenError(HivemeshError):
    """The capability's circuit breaker is open: the call failed fast instead of piling onto a failing target."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "CIRCUIT_OPEN"
    default_message = "the circuit breaker for this capability is open"


# --- queued delivery (mesh/queue.py) ----------------------------------------------------------------------------
class QueueFullError(HivemeshError):
    """The caller already holds as many queued calls as it may; nothing was written for this one."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "QUEUE_FULL"
    default_message = "too many calls are held for this caller already"


class QueueExpiredError(DeadlineExceededError):
    """A held call's queue_for passed before any instance of its capability went live; it was never sent."""

    reason = "QUEUE_EXPIRED"
    default_message = "no instance went live while the call was held; it was never sent"


class DeliveryOutcomeUnknownError(HivemeshError):
    """The node delivering a held call stopped in the middle: the agent may or may not have run it. Not resent,
    since resending blind could run it twice; the caller decides (an idempotency key makes a resend safe)."""

    code = grpc.StatusCode.UNKNOWN
    reason = "OUTCOME_UNKNOWN"
    default_message = "the node delivering the held call stopped mid-call: outcome unknown, not resent"


def _all_subclasses(cls: type[HivemeshError]) -> list[type[HivemeshError]]:
    out: list[type[HivemeshError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


# reason -> class, so a client re-raises the same type the server raised.
_BY_REASON: dict[str, type[HivemeshError]] = {c.reason: c for c in _all_subclasses(HivemeshError)}
_BY_REASON[HivemeshError.reason] = HivemeshError

AGENT_CODES: Final = frozenset({
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.DATA_LOSS, grpc.StatusCode.PERMISSION_DENIED,
})
"""Codes that, on a status an agent's own server answered with no hivemesh ErrorInfo, the agent's code decided:
gRPC never gives these itself but INTERNAL and UNKNOWN, which a server gives for a handler that raised. A sidecar
relaying such a status from its agent labels it AGENT_ERROR, the agent's code and message kept (`agents_own`), never
a reason made up from the code name that a caller would take for the mesh's own refusal (an agent's
INVALID_ARGUMENT is not the mesh's INVALID_INPUT). Only there: read anywhere else (`from_status_parts`), a status
without ErrorInfo may be the mesh's own (a link's refusal) or gRPC's (a stream reset is INTERNAL), not an agent's."""

# Status codes with no hivemesh reason (raised by gRPC itself) map to the most fitting class.
_BY_CODE: dict[grpc.StatusCode, type[HivemeshError]] = {
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAVAILABLE: AgentUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: PayloadTooLargeError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
}


def _utf8(text: str) -> str:
    """text as UTF-8 can carry it: a lone surrogate (which a caller's JSON can name, e.g. as a key an error
    quotes) written as its escape, since a status, its details and protobuf strings are UTF-8 and would raise."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


MAX_MESSAGE_BYTES: Final = 1024
"""A status message's bound in UTF-8 bytes, and below those of its details: a status travels in trailers, which
gRPC refuses past 16 KiB (most clients' bound: RESOURCE_EXHAUSTED, the caller never learns the real code), and a
message quoting a caller's input (a 20,000-character name, id or filter) must not take it there."""
MAX_DETAIL_BYTES: Final = 256
MAX_DETAIL_ENTRIES: Final = 12


def _clip(text: str, limit: int) -> str:
    """text (escaped as `_utf8` does) cut to at most limit UTF-8 bytes, ending in "…" when cut."""
    text = _utf8(text)
    if len(text) <= limit // 4:  # no character takes more than 4 bytes
        return text
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode("utf-8", "ignore") + "…"


def to_status(err: HivemeshError) -> grpc.Status:
    """Build the rich gRPC status for err: code, message, ErrorInfo and, where they apply, BadRequest and RetryInfo.
    Text from the caller's own input may hold lone surrogates: they go out escaped (`_utf8`), never as a raise; and
    it is bounded (MAX_MESSAGE_BYTES, MAX_DETAIL_BYTES and MAX_DETAIL_ENTRIES), whatever the raiser quoted."""
    details: list[any_pb2.Any] = []
    info = any_pb2.Any()
    metadata = {_clip(k, 64): _clip(v, MAX_DETAIL_BYTES)
                for k, v in itertools.islice(err.metadata.items(), MAX_DETAIL_ENTRIES)}
    info.Pack(error_details_pb2.ErrorInfo(reason=_clip(err.reason, 64), domain=DOMAIN, metadata=metadata))
    details.append(info)
    if err.field_violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=_clip(f, 128), description=_clip(d, MAX_DETAIL_BYTES))
                for f, d in itertools.islice(err.field_violations.items(), MAX_DETAIL_ENTRIES)
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    if err.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(err.retry_after_s * 1e9))
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(packed)
    status = status_pb2.Status(code=err.code.value[0], message=_clip(err.message, MAX_MESSAGE_BYTES), details=details)
    result: grpc.Status = rpc_status.to_status(status)
    if err.retry_after_s is not None:
        # gRPC's own retry machinery (any language) honours this trailer, so clients back off as asked.
        pushback = (PUSHBACK_KEY, str(max(0, round(err.retry_after_s * 1000))))
        result = _RichStatus(result.code, result.details, (*result.trailing_metadata, pushback))
    return result


async def abort(context: grpc.aio.ServicerContext[Any, Any], err: HivemeshError) -> None:
    """Abort the current RPC with err's rich status (raises, as grpc.aio's abort does)."""
    status = to_status(err)
    await context.abort(status.code, status.details, status.trailing_metadata)


def _status_code(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


def from_status_parts(
    code: grpc.StatusCode, message: str, trailing: Any
) -> HivemeshError:
    """Rebuild the typed error from a status code, message and trailing metadata (rich details if present). A
    status without hivemesh ErrorInfo gets the class of its code and `said_by_grpc` (who decided is not known here:
    an agent's own error is labelled by the sidecar that relayed it, `agents_own`)."""
    reason = ""
    meta: dict[str, str] = {}
    violations: dict[str, str] = {}
    retry: float | None = None
    for key, value in trailing or ():
        if key != _DETAILS_KEY or not isinstance(value, bytes):
            continue
        # The peer's bytes: details that do not parse are left out (the code and message still say what
        # happened), so a corrupt trailer from a faulty or hostile peer never turns into a DecodeError here.
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            continue
        for detail in status.details:
            try:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    if info.domain == DOMAIN:
                        reason = info.reason
                        meta = dict(info.metadata)
                elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    violations = {v.field: v.description for v in bad.field_violations}
                elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    ri = error_details_pb2.RetryInfo()
                    detail.Unpack(ri)
                    retry = max(0.0, ri.retry_delay.ToNanoseconds() / 1e9)
            except DecodeError:
                continue
    cls = _BY_REASON.get(reason) or _BY_CODE.get(code) or HivemeshError
    err = cls(message, metadata=meta, field_violations=violations, retry_after_s=retry)
    if err.code != code or (reason and err.reason != reason):
        # Keep exactly what the server said, even when this process maps the reason to another class.
        err.code = code  # type: ignore[misc]
        if reason:
            err.reason = reason  # type: ignore[misc]
    if not reason and cls is HivemeshError:
        err.reason = code.name  # type: ignore[misc]
    err.said_by_grpc = not reason
    return err


def agents_own(code: grpc.StatusCode, message: str, trailing: Any) -> AgentError | None:
    """The AGENT_ERROR a sidecar relays for its agent's own failure status: one of `AGENT_CODES` with no rich
    details at all (an agent in another language, answering a plain status); None for anything else, relayed as
    the agent gave it (its own hivemesh ErrorInfo or details, or a code gRPC gives)."""
    if code not in AGENT_CODES or any(key == _DETAILS_KEY for key, _ in trailing or ()):
        return None
    return AgentError(message or f"the agent answered {code.name} with no message", code=code)


def typed_error(code: grpc.StatusCode, reason: str, message: str) -> HivemeshError:
    """The typed error for a code, reason and message kept as data (e.g. a held call's stored outcome)."""
    cls = _BY_REASON.get(reason) or _BY_CODE.get(code) or HivemeshError
    return cls(message, code=code, reason=reason or code.name)


def from_rpc_error(exc: grpc.aio.AioRpcError | grpc.RpcError) -> HivemeshError:
    """Turn a failed RPC into the typed hivemesh error the server raised (the client's mirror of `to_status`)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    err = from_status_parts(code, details or "", trailing)
    err.__cause__ = exc
    return err

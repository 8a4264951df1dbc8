"""The audit of the control plane's own decisions: one record per RPC it answers on its other services (joins,
renewals, token issue and exchange, revocations, rotations, escalations, audit reads), with the caller, the
outcome and a whitelist of request fields (never a token, join token or CSR), handed to the store before the
response is released. With the mesh-wide log (`hivemesh.controlplane.audit.shared_log`) the answer waits until
its record is committed there (one etcd write, shared by the records that arrive meanwhile), at most 2 s.

It runs before the `DecodeGuard` (`hivemesh.controlplane.services.interceptors`), so that a request refused for
not decoding is recorded like any other refusal (from the status the call ended with); the request it is then
handed is the guard's `Undecodable` marker, passed on for the guard to refuse and never summarized. Health
checking is outside the audit, but its requests that do not decode are recorded too (`_refusals_only`)."""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import grpc
from google.rpc import error_details_pb2, status_pb2

from hivemesh.controlplane.audit.store import audit_store, commit_wait
from hivemesh.mesh.audit.record import classify
from hivemesh.mesh.decode_guard import Undecodable
from hivemesh.mesh.errors import HivemeshError
from hivemesh.mesh.pki import load_cert, peer_from_auth_context, uri_sans
from hivemesh.mesh.rpcwrap import StreamBehaviour, StreamWriter, UnaryBehaviour, outcome_code, wrap_handler, write

if TYPE_CHECKING:
    from hivemesh.controlplane.server import Core

log = logging.getLogger(__name__)

_UNAUDITED: Final = frozenset({
    "/hivemesh.v1.Audit/AppendBatch", "/hivemesh.v1.Audit/SourceState",  # the shipping itself: machine traffic
})
_AUDITED_PREFIXES: Final = ("/hivemesh.v1.",)
_REQUEST_FIELDS: Final = (
    "audience", "scopes", "delegable", "name", "kind", "jti", "subject", "step", "ttl_seconds", "id", "decision",
    "caller", "capability",
)
_RESPONSE_FIELDS: Final = ("jti", "scopes", "spiffe_id", "kid", "phase")
_OWN_FIELDS: Final = frozenset({
    "v", "seq", "prev", "hash", "time", "kind", "node", "method", "decision", "status", "reason", "caller",
    "caller_unverified", "latency_us", "remote", "message",  # what this interceptor and the store write
})
"""The record's own fields: a request field of the same name (an audit query's `--decision` filter, a join
token's workload `kind`) is kept as `request_<name>`, never in their place."""
_FILTER_FIELDS: Final = frozenset({"capability", "principal", "agent", "jti", "trace_id"})
"""What queries match records on (`AuditFilter`). In an audit read's request they are filters, kept as
`request_<name>` so a query for `--capability X` finds the calls of X, not the earlier queries for it (`hivemesh
audit tail -f --capability X` found its own polls, one a second). In any other request they say what the record is
about (the token a revocation names, the capability a token is issued for), so they stay findable under their
name: `audit query --jti J` lists J's issue, its uses and its revocation."""
_AUDIT_READS: Final = "Audit/"
"""The audit service's methods, as records name them (`Audit/Query`): their requests are reads of the log."""


_DETAILS_KEY = "grpc-status-details-bin"


def _caller(context: grpc.aio.ServicerContext[Any, Any], trust_domain: str) -> tuple[str, str]:
    """(verified caller id or "", unverified URI SAN for forensics or "")."""
    auth = context.auth_context()
    try:
        return str(peer_from_auth_context(auth, trust_domain=trust_domain).spiffe_id), ""
    except HivemeshError:
        pass
    pems = list(auth.get("x509_pem_cert") or ()) if auth else []
    if not pems:
        return "", ""
    try:
        return "", ",".join(uri_sans(load_cert(pems[0])))[:256]
    except ValueError:
        return "", ""


def _summary(message: Any, names: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if message is None or not hasattr(message, "DESCRIPTOR"):
        return out
    fields = message.DESCRIPTOR.fields_by_name
    for name in names:
        if name not in fields:
            continue
        value = getattr(message, name)
        if isinstance(value, str | int) and not isinstance(value, bool) and value not in ("", 0):
            out[name] = value if isinstance(value, int) else value[:256]
        elif hasattr(value, "__iter__") and not isinstance(value, str | bytes):
            items = [str(v)[:128] for v in list(value)[:64]]
            if items:
                out[name] = items
    return out


def _reason(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    try:
        trailing = context.trailing_metadata()
    except Exception:  # noqa: BLE001 - older grpc: no getter
        return ""
    for key, value in trailing or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return str(info.reason)
    return ""


class ControlPlaneAuditInterceptor(grpc.aio.ServerInterceptor):
    """Records one entry per control-plane RPC outcome (handed to the store before the response is released)."""

    def __init__(self, core: Core) -> None:
        self._core = core
        self._store = audit_store(core)

    async def _write(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any], request: Any, response: Any,
        failure: BaseException | None, started: float,
    ) -> None:
        code = outcome_code(context, failure)
        caller, unverified = _caller(context, self._core.trust_domain)
        reason = _reason(context) if code != grpc.StatusCode.OK else ""
        fields: dict[str, Any] = {
            "method": method,
            "decision": classify(None, code) if code == grpc.StatusCode.OK else classify(
                HivemeshError(reason=reason or code.name, code=code), code
            ),
            "status": code.name,
            "reason": reason,
            "caller": caller,
            "latency_us": int((time.perf_counter() - started) * 1e6),
            "remote": context.peer() or "",
        }
        if not isinstance(request, Undecodable):  # the guard's marker: no request fields to record
            kept_apart = _OWN_FIELDS | _FILTER_FIELDS if method.startswith(_AUDIT_READS) else _OWN_FIELDS
            for name, value in _summary(request, _REQUEST_FIELDS).items():
                fields[f"request_{name}" if name in kept_apart else name] = value
        if unverified:
            fields["caller_unverified"] = unverified
        if code != grpc.StatusCode.OK:
            details = context.details() if hasattr(context, "details") else ""
            if details:
                fields["message"] = str(details)[:256]
        else:
            for k, v in _summary(response, _RESPONSE_FIELDS).items():
                fields[f"granted_{k}" if k == "scopes" else k] = v
        try:
            await self._store.record_durably(fields, timeout=commit_wait(context.time_remaining()))
        except Exception:
            log.exception("cannot write the control plane's audit record for %s", method)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method in _UNAUDITED:
            return handler
        short = method.rsplit(".", 1)[-1]
        if not method.startswith(_AUDITED_PREFIXES):
            return self._refusals_only(handler, short)

        def unary_unary(inner: UnaryBehaviour) -> UnaryBehaviour:
            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                started = time.perf_counter()
                failure: BaseException | None = None
                response: Any = None
                try:
                    response = await inner(request, context)
                    return response
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    await self._write(short, context, request, response, failure, started)

            return unary

        def unary_stream(inner: StreamBehaviour) -> StreamWriter:
            if not inspect.isasyncgenfunction(inner):  # already the writer style: awaited as a unary one is
                return unary_unary(inner)  # type: ignore[arg-type]

            async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
                started = time.perf_counter()
                failure: BaseException | None = None
                try:
                    # Written here (gRPC's writer style): a caller's cancel while gRPC writes an item is raised
                    # here and recorded now, as CANCELLED, and the method's stream is closed now.
                    async with contextlib.aclosing(inner(request, context)) as items:
                        async for item in items:
                            await write(context, item)
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    await self._write(short, context, request, None, failure, started)

            return stream

        return wrap_handler(handler, unary_unary=unary_unary, unary_stream=unary_stream)


    def _refusals_only(self, handler: grpc.RpcMethodHandler[Any, Any], short: str) -> grpc.RpcMethodHandler[Any, Any]:
        """A method outside the audit (health checking, reflection): only its requests that do not decode are
        recorded, as they are on every other service (the guard's marker is the request then); the rest pass
        unrecorded. A client stream (reflection's) is recorded once, for the marker the guard refused it on."""

        def unary_unary(inner: UnaryBehaviour) -> UnaryBehaviour:
            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                if not isinstance(request, Undecodable):
                    return await inner(request, context)
                started = time.perf_counter()
                try:
                    return await inner(request, context)  # the guard refuses it (raises)
                except BaseException as exc:
                    await self._write(short, context, request, None, exc, started)
                    raise

            return unary

        def unary_stream(inner: StreamBehaviour) -> StreamBehaviour:
            if not inspect.isasyncgenfunction(inner):  # the reader/writer style (health's Watch): a coroutine
                return unary_unary(inner)  # type: ignore[arg-type,return-value]

            async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncGenerator[Any, None]:
                started = time.perf_counter()
                try:
                    async for item in inner(request, context):
                        yield item
                except BaseException as exc:
                    if isinstance(request, Undecodable):
                        await self._write(short, context, request, None, exc, started)
                    raise

            return stream

        def requests_in(inner: Callable[..., Any]) -> Callable[..., Any]:
            """A client-streaming behaviour (either response cardinality): its requests are watched for the
            guard's marker, and a call that ends on one is recorded (the guard refuses the first it reads)."""
            if inspect.isasyncgenfunction(inner):
                async def stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                    seen = _Seen()
                    try:
                        async for item in inner(seen.watch(requests), context):
                            yield item
                    except BaseException as exc:
                        if seen.marker is not None:
                            await self._write(short, context, seen.marker, None, exc, seen.at)
                        raise

                return stream

            async def unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                seen = _Seen()
                try:
                    return await inner(seen.watch(requests), context)
                except BaseException as exc:
                    if seen.marker is not None:
                        await self._write(short, context, seen.marker, None, exc, seen.at)
                    raise

            return unary

        return wrap_handler(handler, unary_unary=unary_unary, unary_stream=unary_stream,
                            stream_unary=requests_in, stream_stream=requests_in)


class _Seen:
    """The first request of a client stream that did not decode (the guard's marker), and when it was read."""

    __slots__ = ("at", "marker")

    def __init__(self) -> None:
        self.marker: Undecodable | None = None
        self.at = 0.0

    async def watch(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """requests, unchanged, noting the first marker among them."""
        async for request in requests:
            if isinstance(request, Undecodable) and self.marker is None:
                self.marker, self.at = request, time.perf_counter()
            yield request


def interceptor(core: Core) -> grpc.aio.ServerInterceptor:
    return ControlPlaneAuditInterceptor(core)

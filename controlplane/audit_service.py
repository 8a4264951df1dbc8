"""The control plane's Audit service, and the audit of the control plane's own decisions.

Nodes ship their spools here (`AppendBatch`, `SourceState`); operators query, export and verify the log. Every
RPC the control plane answers on its other services (joins, renewals, token issue and exchange, revocations,
rotations, escalations, audit reads) is itself recorded, by a server interceptor, with the caller, the outcome
and a whitelist of request fields (never a token, join token or CSR).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import grpc
from google.rpc import error_details_pb2, status_pb2

from hivemesh.controlplane.auditlog import AuditFilter, AuditStore, public_key_pem
from hivemesh.mesh.audit import classify
from hivemesh.mesh.errors import HivemeshError, PermissionDeniedError, abort
from hivemesh.mesh.handshake_audit import HandshakeAudit
from hivemesh.mesh.pki import Peer, controlplane_id, load_cert, peer_from_auth_context, uri_sans
from hivemesh.v1 import audit_pb2, audit_pb2_grpc

if TYPE_CHECKING:
    from hivemesh.controlplane.server import Core

log = logging.getLogger(__name__)

EXTENSION: Final = "audit"
_UNAUDITED: Final = frozenset({
    "/hivemesh.v1.Audit/AppendBatch", "/hivemesh.v1.Audit/SourceState",  # the shipping itself: machine traffic
})
_AUDITED_PREFIXES: Final = ("/hivemesh.v1.",)
_REQUEST_FIELDS: Final = (
    "audience", "scopes", "delegable", "name", "kind", "jti", "subject", "step", "ttl_seconds", "id", "decision",
    "caller", "capability",
)
_RESPONSE_FIELDS: Final = ("jti", "scopes", "spiffe_id", "kid", "phase")
_OWN_FIELDS: Final = frozenset({"kind", "decision", "caller", "status", "reason", "method", "node", "time"})
"""The record's own fields: a request field of the same name (an audit query's `--decision` filter, a join
token's workload `kind`) is kept as `request_<name>`, never in their place."""
_DETAILS_KEY = "grpc-status-details-bin"


def audit_store(core: Core) -> AuditStore:
    """The control plane's AuditStore (created and opened on first use)."""
    store = core.extensions.get(EXTENSION)
    if store is None:
        store = AuditStore(core.config.state_dir / "audit", identity=controlplane_id(core.trust_domain)).open()
        core.extensions[EXTENSION] = store
    assert isinstance(store, AuditStore)
    return store


def _require_operator(peer: Peer) -> None:
    if peer.spiffe_id.kind != "operator":
        raise PermissionDeniedError(f"only operators may read the audit log; {peer.spiffe_id} is not one")


class AuditServicer(audit_pb2_grpc.AuditServicer):
    def __init__(self, core: Core, store: AuditStore) -> None:
        self._core = core
        self._store = store

    async def _guard(self, context: grpc.aio.ServicerContext[Any, Any], fn: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await fn()
        except HivemeshError as err:
            await abort(context, err)

    async def AppendBatch(
        self, request: audit_pb2.AppendBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> audit_pb2.AppendBatchResponse:
        async def go() -> audit_pb2.AppendBatchResponse:
            peer = self._core.peer(context)
            seq, digest, stored = await self._store.append(request.source, str(peer.spiffe_id), list(request.records))
            return audit_pb2.AppendBatchResponse(last_seq=seq, last_hash=digest, stored=stored)

        result: audit_pb2.AppendBatchResponse = await self._guard(context, go)
        return result

    async def SourceState(
        self, request: audit_pb2.SourceStateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> audit_pb2.SourceStateResponse:
        async def go() -> audit_pb2.SourceStateResponse:
            self._core.peer(context)
            seq, digest = self._store.source_state(request.source)
            return audit_pb2.SourceStateResponse(last_seq=seq, last_hash=digest)

        result: audit_pb2.SourceStateResponse = await self._guard(context, go)
        return result

    async def Query(
        self, request: audit_pb2.AuditQueryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> audit_pb2.AuditQueryResponse:
        async def go() -> audit_pb2.AuditQueryResponse:
            _require_operator(self._core.peer(context))
            flt = AuditFilter.from_strings(
                caller=request.caller, capability=request.capability, decision=request.decision,
                principal=request.principal, agent=request.agent, jti=request.jti, trace_id=request.trace_id,
                kind=request.kind, since=request.since, until=request.until, after_seq=request.after_seq,
            )
            entries, scanned = self._store.query(flt, limit=request.limit or 100, tail=request.tail)
            return audit_pb2.AuditQueryResponse(entries=entries, head_seq=self._store.seq, scanned=scanned)

        result: audit_pb2.AuditQueryResponse = await self._guard(context, go)
        return result

    async def Export(
        self, request: audit_pb2.ExportRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[audit_pb2.ExportChunk]:
        try:
            _require_operator(self._core.peer(context))
        except HivemeshError as err:
            await abort(context, err)
        batch: list[bytes] = []
        size = 0
        for line in self._store.lines(request.after_seq):
            batch.append(line)
            size += len(line)
            if len(batch) >= 2000 or size >= 2 * 1024 * 1024:
                yield audit_pb2.ExportChunk(entries=batch)
                batch, size = [], 0
        if batch:
            yield audit_pb2.ExportChunk(entries=batch)

    async def Verify(
        self, request: audit_pb2.AuditVerifyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> audit_pb2.AuditVerifyResponse:
        async def go() -> audit_pb2.AuditVerifyResponse:
            _require_operator(self._core.peer(context))
            report = self._store.verify()
            p = report.problem
            return audit_pb2.AuditVerifyResponse(
                ok=report.ok, entries=report.entries, sources=report.sources, checkpoints=report.checkpoints,
                first_bad_seq=p.seq if p else 0, first_bad_line=p.line if p else 0, problem=p.reason if p else "",
                head_hash=report.head_hash,
            )

        result: audit_pb2.AuditVerifyResponse = await self._guard(context, go)
        return result

    def _checkpoints(self) -> audit_pb2.CheckpointsResponse:
        return audit_pb2.CheckpointsResponse(
            checkpoints=self._store.checkpoints(), public_key_pem=public_key_pem(self._store.public_key)
        )

    async def Checkpoints(
        self, request: audit_pb2.CheckpointsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> audit_pb2.CheckpointsResponse:
        async def go() -> audit_pb2.CheckpointsResponse:
            self._core.peer(context)
            return self._checkpoints()

        result: audit_pb2.CheckpointsResponse = await self._guard(context, go)
        return result

    async def CreateCheckpoint(
        self, request: audit_pb2.CreateCheckpointRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> audit_pb2.CheckpointsResponse:
        async def go() -> audit_pb2.CheckpointsResponse:
            _require_operator(self._core.peer(context))
            await self._store.checkpoint()
            return self._checkpoints()

        result: audit_pb2.CheckpointsResponse = await self._guard(context, go)
        return result


# --- the audit of the control plane's own decisions ---------------------------------------------------------------
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
    """Records one entry per control-plane RPC outcome (written before the response is released)."""

    def __init__(self, core: Core) -> None:
        self._core = core
        self._store = audit_store(core)

    async def _write(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any], request: Any, response: Any,
        failure: BaseException | None, started: float,
    ) -> None:
        if failure is None:
            code = grpc.StatusCode.OK
        else:
            got = context.code()
            code = got if isinstance(got, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
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
        for name, value in _summary(request, _REQUEST_FIELDS).items():
            fields[f"request_{name}" if name in _OWN_FIELDS else name] = value
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
            await self._store.record(fields)
        except Exception:
            log.exception("cannot write the control plane's audit record for %s", method)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method in _UNAUDITED or not method.startswith(_AUDITED_PREFIXES):
            return handler
        short = method.rsplit(".", 1)[-1]
        if handler.unary_unary is not None:
            inner: Any = handler.unary_unary

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

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream: Any = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                started = time.perf_counter()
                failure: BaseException | None = None
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    await self._write(short, context, request, None, failure, started)

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


class _FromAnyThread:
    """The store's async `record`, callable from the stderr tee's thread (what HandshakeAudit needs)."""

    def __init__(self, store: AuditStore, loop: asyncio.AbstractEventLoop) -> None:
        self._store = store
        self._loop = loop
        self._pending: set[concurrent.futures.Future[int]] = set()

    def record(self, fields: dict[str, Any]) -> int:
        future = asyncio.run_coroutine_threadsafe(self._store.record(fields), self._loop)
        self._pending.add(future)
        future.add_done_callback(self._done)
        return 0

    def _done(self, future: concurrent.futures.Future[int]) -> None:
        self._pending.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("cannot record a TLS handshake refusal: %s", future.exception())

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Wait (bounded) for the records already handed over, before the store closes."""
        pending = [asyncio.wrap_future(f) for f in list(self._pending)]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)


class AuditFeature:
    """Starts and stops the store with the control plane; hears escalation changes (issue 5's audit hook);
    audits the TLS handshakes the control plane's ports refuse."""

    def __init__(self, store: AuditStore) -> None:
        self.store = store
        self._hook: Any = None
        self.handshakes: list[HandshakeAudit] = []
        self._recorder: _FromAnyThread | None = None

    async def serving(self, host: str, ports: Sequence[int]) -> None:
        """The control plane listens on ports: record the handshakes refused there, like its RPC decisions."""
        recorder = self._recorder = _FromAnyThread(self.store, asyncio.get_running_loop())
        for port in ports:
            audit = HandshakeAudit(recorder, host, port)
            await audit.start()
            self.handshakes.append(audit)

    async def start(self) -> None:
        await self.store.start()
        try:
            from hivemesh.controlplane import escalations
        except ImportError:  # pragma: no cover - the escalation feature is optional
            return

        store = self.store

        def hook(action: str, esc: Any, actor: str) -> None:
            import asyncio

            fields = {"method": f"escalation.{action}", "decision": "allow", "status": "OK", "reason": "",
                      "caller": actor, "id": str(getattr(esc, "id", "")),
                      "workflow_id": str(getattr(esc, "workflow_id", "")),
                      "message": str(getattr(esc, "reason", ""))[:256]}
            task = asyncio.get_running_loop().create_task(store.record(fields))
            task.add_done_callback(lambda t: t.exception())

        self._hook = hook
        escalations.add_audit_hook(hook)

    async def stop(self) -> None:
        for audit in self.handshakes:
            await audit.close()
        self.handshakes = []
        if self._recorder is not None:
            await self._recorder.drain()
        if self._hook is not None:
            from hivemesh.controlplane import escalations

            escalations.remove_audit_hook(self._hook)
            self._hook = None
        await self.store.close()


def interceptor(core: Core) -> grpc.aio.ServerInterceptor:
    return ControlPlaneAuditInterceptor(core)


def install(core: Core, server: grpc.aio.Server) -> AuditFeature:
    """Add the Audit service to the control plane's mutual-TLS server."""
    store = audit_store(core)
    audit_pb2_grpc.add_AuditServicer_to_server(AuditServicer(core, store), server)
    return AuditFeature(store)


def entry_json(raw: bytes) -> dict[str, Any]:
    """One log entry (for the CLI)."""
    value = json.loads(raw)
    assert isinstance(value, dict)
    return value

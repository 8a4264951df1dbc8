"""The control plane's Audit service: nodes ship their spools here (`AppendBatch`, `SourceState`); operators
query, export and verify the log. It also audits the TLS handshakes the control plane's own ports refuse."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import aetcd
import grpc

from hivemesh.controlplane.audit.checkpoints import public_key_pem
from hivemesh.controlplane.audit.query import AuditFilter
from hivemesh.controlplane.audit.store import AuditStore, audit_store
from hivemesh.mesh import json_depth
from hivemesh.mesh.audit.chain import canonical
from hivemesh.mesh.audit.handshake.audit import HandshakeAudit
from hivemesh.mesh.audit.handshake.tracer import tracer_events
from hivemesh.mesh.errors import (
    FailedPreconditionError,
    HivemeshError,
    PermissionDeniedError,
    RegistryUnavailableError,
    abort,
)
from hivemesh.mesh.pki import Peer
from hivemesh.v1 import audit_pb2, audit_pb2_grpc

if TYPE_CHECKING:
    from hivemesh.controlplane.server import Core

log = logging.getLogger(__name__)


SYNC_WAIT_S: Final = 3.0
"""How long an operator's read waits for this copy to catch up with the mesh-wide log in etcd before it answers
REGISTRY_UNAVAILABLE: well inside the CLI's 10 s, so a stopped etcd is named as such, not the control plane
(`hivemesh audit tail` said the control plane did not answer, when its etcd was the component stopped)."""


def _require_operator(peer: Peer) -> None:
    if peer.spiffe_id.kind != "operator":
        raise PermissionDeniedError(f"only operators may read the audit log; {peer.spiffe_id} is not one")


class AuditServicer(audit_pb2_grpc.AuditServicer):
    def __init__(self, core: Core, store: AuditStore) -> None:
        self._core = core
        self._store = store
        self._sync: asyncio.Task[None] | None = None
        """The sync in flight, shared by every read that comes while it runs: with etcd stopped a `hivemesh audit
        tail -f` (a read a second) started one per read, each waiting on the store's lock for etcd's timeout, and
        they piled up. Ended with the control plane (`close`)."""

    async def _synced(self) -> None:
        """The store's `sync` (the mesh-wide log read from etcd), waited for at most SYNC_WAIT_S. It runs on as a
        task of its own when the wait ends: cut off part-way it would leave the store's copy to its own recovery,
        while finished later it just leaves the copy caught up for the next read. A read that comes while one runs
        waits for that one (begun at most SYNC_WAIT_S earlier, or else etcd is not answering). etcd's own failure
        is named too, never an UNKNOWN status."""
        task = self._sync
        if task is None or task.done():
            task = self._sync = asyncio.ensure_future(self._store.sync())
            task.add_done_callback(_taken)
        try:
            done, _ = await asyncio.wait([task], timeout=SYNC_WAIT_S)
        except asyncio.CancelledError:
            raise  # the caller went away; the sync finishes (bounded by etcd's own timeouts) on its own
        endpoints = ",".join(self._core.config.etcd_endpoints)
        if not done:
            raise RegistryUnavailableError(
                f"etcd not reachable: the control plane's etcd ({endpoints}) did not answer within {SYNC_WAIT_S:g} s, "
                "so the mesh-wide audit log cannot be read; retry once etcd answers",
                metadata={"etcd": endpoints})
        try:
            task.result()
        except (aetcd.exceptions.ClientError, grpc.aio.AioRpcError) as exc:
            raise RegistryUnavailableError(
                f"etcd not reachable: the control plane's etcd ({endpoints}) failed the read of the mesh-wide audit "
                f"log ({type(exc).__name__}); retry once etcd answers",
                metadata={"etcd": endpoints}) from None

    async def close(self) -> None:
        """End the sync in flight, if any (the control plane stops: nothing is left to read it)."""
        task, self._sync = self._sync, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

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
            await self._store.sync(node=True)  # what the node shipped to another replica counts too
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
            await self._synced()
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
        try:
            await self._synced()
            head = await self._store.sign_head(export=True)
        except HivemeshError as err:
            await abort(context, err)
        end = int(head["log_seq"])
        first = audit_pb2.ExportChunk(head=canonical(head))
        batch: list[bytes] = []
        size = 0
        for n, line in enumerate(self._store.lines(request.after_seq), request.after_seq + 1):
            if n > end:
                break  # entries after the head: the next export's
            batch.append(line)
            size += len(line)
            if len(batch) >= 2000 or size >= 2 * 1024 * 1024:
                yield audit_pb2.ExportChunk(entries=batch, head=first.head)
                first.head = b""
                batch, size = [], 0
        yield audit_pb2.ExportChunk(entries=batch, head=first.head)

    async def Head(
        self, request: audit_pb2.HeadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> audit_pb2.HeadResponse:
        async def go() -> audit_pb2.HeadResponse:
            _require_operator(self._core.peer(context))
            await self._synced()
            return audit_pb2.HeadResponse(latest=self._store.latest_head(), exports=self._store.export_heads(),
                                          key_cert_pem=self._store.key_cert_pem)

        result: audit_pb2.HeadResponse = await self._guard(context, go)
        return result

    async def Verify(
        self, request: audit_pb2.AuditVerifyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> audit_pb2.AuditVerifyResponse:
        async def go() -> audit_pb2.AuditVerifyResponse:
            _require_operator(self._core.peer(context))
            await self._synced()
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
            checkpoints=self._store.checkpoints(), public_key_pem=public_key_pem(self._store.public_key),
            key_cert_pem=self._store.key_cert_pem,
        )

    async def Checkpoints(
        self, request: audit_pb2.CheckpointsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> audit_pb2.CheckpointsResponse:
        async def go() -> audit_pb2.CheckpointsResponse:
            self._core.peer(context)
            await self._synced()
            return self._checkpoints()

        result: audit_pb2.CheckpointsResponse = await self._guard(context, go)
        return result

    async def CreateCheckpoint(
        self, request: audit_pb2.CreateCheckpointRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> audit_pb2.CheckpointsResponse:
        async def go() -> audit_pb2.CheckpointsResponse:
            _require_operator(self._core.peer(context))
            shared = self._store.shared
            if shared is not None and not shared.leading():
                raise FailedPreconditionError("only the control-plane leader signs audit checkpoints; this replica "
                                              "copies them (`hivemesh controlplanes` names the leader)")
            await self._store.checkpoint()
            await self._store.sync()
            return self._checkpoints()

        result: audit_pb2.CheckpointsResponse = await self._guard(context, go)
        return result



def _taken(task: asyncio.Task[None]) -> None:
    """A sync's done callback: take its outcome (a failed sync whose reads stopped waiting is logged, once)."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.debug("audit sync ended with %r", exc)


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

    def __init__(self, store: AuditStore, servicer: AuditServicer | None = None) -> None:
        self.store = store
        self._servicer = servicer
        self._hook: Any = None
        self.handshakes: list[HandshakeAudit] = []
        self._recorder: _FromAnyThread | None = None

    async def serving(self, host: str, ports: Sequence[int]) -> None:
        """The control plane listens on ports: record the handshakes refused there, like its RPC decisions."""
        recorder = self._recorder = _FromAnyThread(self.store, asyncio.get_running_loop())
        for port in ports:
            audit = HandshakeAudit(recorder, host, port, events=tracer_events())
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
        if self._servicer is not None:
            await self._servicer.close()
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


def install(core: Core, server: grpc.aio.Server) -> AuditFeature:
    """Add the Audit service to the control plane's mutual-TLS server."""
    store = audit_store(core)
    servicer = AuditServicer(core, store)
    audit_pb2_grpc.add_AuditServicer_to_server(servicer, server)
    return AuditFeature(store, servicer)


def entry_json(raw: bytes) -> dict[str, Any]:
    """One log entry (for the CLI)."""
    value = json_depth.loads(raw)
    assert isinstance(value, dict)
    return value

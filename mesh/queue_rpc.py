"""Queued delivery for a sidecar's local callers (an agent in any language): `InvokeRequest.queue_for_ms` on
`Mesh.Call`, and `Mesh.Enqueue`, `Mesh.GetQueued`, `Mesh.ListQueued`.

The sidecar's node holds and delivers the calls (`hivemesh.mesh.queue`), so a held call does not depend on the
agent's process: an agent that restarts mid-wait finds its call with `ListQueued` (by the call_id or idempotency
key it set) and polls it with `GetQueued`. `ListQueued` lists each call without its answer (one answer may be
most of a held entry, so a dozen of them passed the message limit and broke the listing for good), saying only
whether one is kept and its size; `GetQueued` by id returns the answer. It lists in pages (page_size calls, and
no more than fit in one message) that resume after the last call listed, by the queue's stable order (each
entry's etcd create revision), so calls held or removed between pages neither repeat nor skip one; the page
token names that revision, bound to this identity's prefix. A sidecar that restarts resumes its
identity's held calls at start. A call made for an inbound call (with a call handle) is not queued: its
delegation ends with that call, and delivering it later as the sidecar's own identity would act with authority
the caller did not have.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any, Final

import grpc
from google.protobuf.message import DecodeError

from hivemesh.mesh.errors import (
    FailedPreconditionError,
    HivemeshError,
    InvalidInputError,
    InvalidOutputError,
    NoLiveInstanceError,
    UnknownCapabilityError,
    abort,
)
from hivemesh.mesh.etcd import client as etcd_client
from hivemesh.mesh.node import MeshNode
from hivemesh.mesh.paging import MAX_PAGE_SIZE, PageTokens, page_size
from hivemesh.mesh.pki import parse_spiffe_id
from hivemesh.mesh.queue import DONE, FAILED, MAX_WAIT_S, CallQueue, HeldCall
from hivemesh.mesh.run_ids import owner_segment
from hivemesh.mesh.tls import MAX_MESSAGE_BYTES
from hivemesh.v1 import agent_pb2, mesh_pb2

DELIVERY_TIMEOUT_S: Final = 30.0
"""A delivered call's deadline when its capability's `timeouts` policy gives none (as a MeshClient's default)."""
_MARGIN_S: Final = 0.25
"""Answer this long before the RPC's deadline, so the caller gets the held call's id rather than its own timeout."""

LIST_LIMIT: Final = MAX_MESSAGE_BYTES - 64 * 1024
"""The most ListQueued's calls take together: under the message limit, with room for the envelope."""
_LISTED_OVERHEAD: Final = 8
"""A listed call's tag and length in the response, at most."""
LEFT_OFF_HEADER: Final = "hivemesh-left-off"
"""Trailing metadata of a ListQueued page that did not hold every call: how many come after it (for callers that
do not page)."""
TOKENS: Final = PageTokens("ListQueued", "identity")
"""ListQueued's page tokens, owned by the held calls' etcd prefix (a revision means something only within it)."""

Context = grpc.aio.ServicerContext[Any, Any]
NOT_QUEUEABLE = (NoLiveInstanceError, UnknownCapabilityError)
"""What Call turns into a held call when the request asks for it: nothing serves the capability now."""


def queue_for_s(req: agent_pb2.InvokeRequest, *, required: bool = False) -> float:
    """The request's queue_for_ms in seconds (0: not queued); InvalidInputError naming the field if out of bounds."""
    ms = req.queue_for_ms
    if ms == 0 and not required:
        return 0.0
    if not 0 < ms <= MAX_WAIT_S * 1000:
        msg = f"must be 1..{MAX_WAIT_S * 1000} milliseconds"
        raise InvalidInputError(f"queue_for_ms {msg}, got {ms}", field_violations={"queue_for_ms": msg})
    return ms / 1000


def held_message(held: HeldCall, *, body: bool = True) -> mesh_pb2.QueuedCall:
    """held as a QueuedCall; body False leaves a done call's answer out (ListQueued: the caller reads it with
    GetQueued), though an answer that does not decode still lists the call as failed, as GetQueued reads it.
    answer_kept and answer_bytes are set either way: the lister sizes an answer without its body."""
    response = agent_pb2.InvokeResponse()
    if held.state == DONE:
        try:
            response.ParseFromString(held.response)
        except DecodeError:  # the peer's answer does not decode: this call failed, not every listing of the queue
            held = dataclasses.replace(held, state=FAILED, response=b"",
                                       error=InvalidOutputError("the answer is not an InvokeResponse message"))
    out = mesh_pb2.QueuedCall(
        id=held.id, capability=held.capability, state=held.state, enqueued_at_unix_ms=held.enqueued_at_unix_ms,
        expires_at_unix_ms=held.expires_at_unix_ms, call_id=held.call_id, idempotency_key=held.idempotency_key,
    )
    if held.state == DONE:
        out.answer_kept = True
        out.answer_bytes = response.ByteSize()  # what GetQueued sends as `response`
        if body:
            out.response.CopyFrom(response)
    elif held.state == FAILED and held.error is not None:
        out.error.CopyFrom(mesh_pb2.BatchItemError(code=held.error.code.name, reason=held.error.reason,
                                                   message=held.error.message))
    return out


def listing(calls: list[HeldCall], prefix: str, *, size: int = MAX_PAGE_SIZE, after: int = 0,
            limit: int = LIST_LIMIT) -> tuple[mesh_pb2.ListQueuedResponse, int]:
    """ListQueued's page of calls (in the queue's order, by create revision): those after revision after, each
    without its answer, at most size of them and no more than fit in limit bytes (a call's call_id and
    idempotency key are the caller's, each up to most of an entry); and how many calls come after the page.
    next_page_token resumes after the last call listed, by its revision rather than its position, so a call
    removed or held between pages shifts nothing."""
    rest = [held for held in calls if held.revision > after] if after else calls
    out = mesh_pb2.ListQueuedResponse()
    used = 0
    for held in rest[:size]:
        call = held_message(held, body=False)
        taken = call.ByteSize() + _LISTED_OVERHEAD
        if used + taken > limit:
            break
        out.calls.append(call)
        used += taken
    left_off = len(rest) - len(out.calls)
    if left_off and out.calls:  # one call always fits (an entry is far under limit): a page is never empty
        out.next_page_token = TOKENS.make(prefix, rest[len(out.calls) - 1].revision)
    return out, left_off


def _wait_s(wanted: float, context: Context) -> float:
    """wanted, cut short so the answer leaves before the RPC's deadline."""
    remaining = context.time_remaining()
    return wanted if remaining is None else max(0.0, min(wanted, remaining - _MARGIN_S))


class SidecarQueue:
    """One sidecar's held calls. delegated(context) is the token a local call acts for (None: the sidecar's own);
    chain(raw, req, context) is the request as the sidecar sends it onward (its call chain extended)."""

    def __init__(self, node: MeshNode, delegated: Callable[[Context], str | None],
                 chain: Callable[[bytes, agent_pb2.InvokeRequest, Context], bytes], *, max_held: int = 100) -> None:
        self.node = node
        self._delegated = delegated
        self._chain = chain
        self._max_held = max_held
        self._etcd: Any = None
        self.queue: CallQueue | None = None

    async def start(self) -> int:
        """Open the queue and resume what this identity still holds; how many calls are waiting."""
        me = parse_spiffe_id(str(self.node.workload.spiffe_id))
        self._etcd = etcd_client(self.node.etcd)
        node = self.node

        async def invoke(raw: bytes, capability: str, key: str, timeout: float | None) -> bytes:
            out, _ = await node.outbound.invoke(raw, capability=capability, idempotency_key=key, timeout=timeout,
                                                default_timeout=DELIVERY_TIMEOUT_S)
            return out

        self.queue = CallQueue(self._etcd, owner_segment(me.kind, me.name), invoke,
                               lambda cap: bool(node.registry.instances(cap)), max_held=self._max_held)
        return await self.queue.resume()

    async def stop(self) -> None:
        queue, self.queue = self.queue, None
        if queue is not None:
            await queue.stop()
        if self._etcd is not None:
            with contextlib.suppress(Exception):
                await self._etcd.close()
            self._etcd = None

    def _ready(self) -> CallQueue:
        if self.queue is None:
            raise FailedPreconditionError("this sidecar's call queue is not open (starting or stopping)")
        return self.queue

    async def _hold(self, chained: bytes, context: Context, wait: float) -> str:
        """Store one call (its chained bytes, without queue_for_ms, so the agent never sees it); its id."""
        if self._delegated(context) is not None:
            raise FailedPreconditionError(
                "a call made for an inbound call (with its call handle) cannot be queued: the delegation ends "
                "with that call; send it without the handle to queue it as this agent")
        req = agent_pb2.InvokeRequest.FromString(chained)
        req.ClearField("queue_for_ms")
        return await self._ready().enqueue(req.capability, req.SerializeToString(), req.context.idempotency_key,
                                           wait, call_id=req.context.call_id)

    async def hold_and_wait(self, chained: bytes, queue_for: float, context: Context) -> bytes:
        """Call's fallback when nothing serves the capability: hold the call and wait for its answer (within
        queue_for and the RPC's deadline). Still held after that: NO_LIVE_INSTANCE naming the id (ErrorInfo
        metadata `queued_id`), so the caller polls GetQueued; the held call stays until its own bound. A caller
        gone before that finds it with ListQueued by the call_id or idempotency key it set."""
        queue = self._ready()
        held_id = await self._hold(chained, context, queue_for)
        held = await queue.wait(held_id, _wait_s(queue_for, context))
        if held.state == DONE:
            return held.response
        if held.state == FAILED and held.error is not None:
            raise held.error
        raise NoLiveInstanceError(f"no instance went live within the wait; the call is held as {held_id}: poll "
                                  "Mesh.GetQueued", metadata={"queued_id": held_id})

    def handlers(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        """The Enqueue, GetQueued and ListQueued methods of the Mesh service."""

        async def enqueue(request: bytes, context: Context) -> mesh_pb2.QueuedCall:
            try:
                try:
                    req = agent_pb2.InvokeRequest.FromString(request)
                except Exception:  # noqa: BLE001 - any decode failure is the caller's bad input
                    raise InvalidInputError("the request is not a valid hivemesh.v1.InvokeRequest") from None
                wait = queue_for_s(req, required=True)
                held_id = await self._hold(self._chain(request, req, context), context, wait)
                return held_message(await self._ready().get(held_id))
            except HivemeshError as err:
                await abort(context, err)
                raise  # abort raises; for the type checker

        async def get_queued(request: mesh_pb2.GetQueuedRequest, context: Context) -> mesh_pb2.QueuedCall:
            try:
                if request.wait_ms < 0:
                    raise InvalidInputError(f"wait_ms must be >= 0, got {request.wait_ms}",
                                            field_violations={"wait_ms": "must be >= 0"})
                queue = self._ready()
                wait = _wait_s(request.wait_ms / 1000, context)
                held = await (queue.wait(request.id, wait) if wait > 0 else queue.get(request.id))
                return held_message(held)
            except HivemeshError as err:
                await abort(context, err)
                raise

        async def list_queued(request: mesh_pb2.ListQueuedRequest, context: Context) -> mesh_pb2.ListQueuedResponse:
            try:
                queue = self._ready()
                size, after = page_size(request.page_size), TOKENS.read(queue.prefix, request.page_token) or 0
                out, left_off = listing(await queue.held(), queue.prefix, size=size, after=after)
            except HivemeshError as err:
                await abort(context, err)
                raise
            if left_off:
                context.set_trailing_metadata(((LEFT_OFF_HEADER, str(left_off)),))
            return out

        return {
            "Enqueue": grpc.unary_unary_rpc_method_handler(
                enqueue, response_serializer=mesh_pb2.QueuedCall.SerializeToString),
            "GetQueued": grpc.unary_unary_rpc_method_handler(
                get_queued, request_deserializer=mesh_pb2.GetQueuedRequest.FromString,
                response_serializer=mesh_pb2.QueuedCall.SerializeToString),
            "ListQueued": grpc.unary_unary_rpc_method_handler(
                list_queued, request_deserializer=mesh_pb2.ListQueuedRequest.FromString,
                response_serializer=mesh_pb2.ListQueuedResponse.SerializeToString),
        }

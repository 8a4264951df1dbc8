"""Calling the mesh from any Python program: `MeshClient`.

    async with MeshClient.connect(name="reporter") as mesh:
        fields = await mesh.call("extract", {"text": "..."}, timeout=5)
        async for chunk in mesh.stream("summarize", {"text": "..."}):
            ...

Proxyless: the client resolves the capability from its own registry cache and dials the serving agent (or
its sidecar) directly over mutual TLS with a capability token, running the same outbound layers a sidecar
runs, one gRPC hop fewer. Errors arrive as the typed `hivemesh.sdk` exceptions the agent side raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import traceback
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Unpack

from hivemesh.mesh import invoke_wire, json_fast
from hivemesh.mesh.callcontext import new_call_id
from hivemesh.mesh.errors import (
    AgentError,
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    HivemeshError,
    NoLiveInstanceError,
    UnknownCapabilityError,
)
from hivemesh.mesh.etcd import client as etcd_client
from hivemesh.mesh.instance_ref import instance_key
from hivemesh.mesh.json_compact import compact_json_parts
from hivemesh.mesh.node import MeshNode, describe_failure
from hivemesh.mesh.node_metrics import NodeMetrics
from hivemesh.mesh.node_metrics import metrics_listen as metrics_listen_for
from hivemesh.mesh.outbound.degrade import DEGRADED_KEY
from hivemesh.mesh.outbound.pipeline import cancelled_by_caller
from hivemesh.mesh.pki import parse_spiffe_id
from hivemesh.mesh.queue import DONE, FAILED, CallQueue, HeldCall
from hivemesh.mesh.registry import CapabilityInfo
from hivemesh.mesh.run_ids import owner_segment
from hivemesh.mesh.settings import MeshSettings
from hivemesh.mesh.token_source import on_behalf_of
from hivemesh.sdk.batch import BatchItem, call_batch, call_batch_stream
from hivemesh.sdk.call_options import CallOptionArgs, CallOptions, check_agent
from hivemesh.v1 import agent_pb2, mesh_pb2

if TYPE_CHECKING:
    from hivemesh.mesh.audit import AuditLog
    from hivemesh.mesh.outbound import OutboundPipeline

JSON = "application/json"
_CLOSED = "this MeshClient is closed; create a new one with MeshClient.connect(...)"
_NOT_STARTED = ("this MeshClient is not started: use `async with MeshClient.connect(...) as mesh:` or "
                "`await mesh.start()`")
_START_FAILED = "this MeshClient's earlier start failed ({}): create a new one with MeshClient.connect(...)"
_CUT = "this MeshClient was closed while the call was in flight: the call may have run"


@dataclass(frozen=True)
class CallResult:
    """A capability's decoded output plus where it ran (for tracing and demos)."""

    output: Any
    instance: mesh_pb2.AgentInstance
    hops: tuple[agent_pb2.Hop, ...] = field(default_factory=tuple)
    state: int = agent_pb2.TASK_STATE_COMPLETED
    usage: agent_pb2.Usage | None = None
    """Model tokens the call consumed, as the agent reported them (None when it reported none)."""
    degraded: str = ""
    """How the mesh answered in place of the capability when it failed ("" when it did not): `fallback:<capability>`
    (the route's fallback answered) or `cache` (the last good answer to the same input), the caller's mesh's
    `x-hivemesh-degraded` marker. The state and hops are those of whatever answered, so only this tells."""


_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(CallOptions))


def _options(
    options: CallOptions | None, overrides: CallOptionArgs
) -> tuple[float | None, agent_pb2.CallContext | None, str | None, str]:
    """(timeout, context, idempotency key, agent pin or "") of options with overrides; with keywords alone (nearly
    every call) read straight from them, building no CallOptions on the hot path."""
    if options is None:
        if not overrides.keys() <= _OPTION_NAMES:  # a misspelt option must not pass silently
            raise TypeError(f"unknown call option(s) {sorted(overrides.keys() - _OPTION_NAMES)}; "
                            f"the options are {sorted(_OPTION_NAMES)}")
        agent = overrides.get("agent")
        if agent is not None:  # checked as CallOptions(agent=...) checks it
            check_agent(agent, overrides.get("queue_for"))
        return overrides.get("timeout"), overrides.get("context"), overrides.get("idempotency_key"), agent or ""
    opts = CallOptions.of(options, overrides)
    return opts.timeout, opts.context, opts.idempotency_key, opts.agent or ""


def _decode_output(data: bytes | memoryview, content_type: str) -> Any:
    if content_type and content_type != JSON:
        return bytes(data)
    try:
        return json_fast.loads(data) if data else None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AgentError(f"the agent answered with invalid JSON: {exc}") from None
    except RecursionError:
        raise AgentError("the agent answered with JSON nested too deeply") from None


def _encode_input(payload: Any) -> list[bytes]:
    """The input's bytes as pieces (`compact_json_parts`): the request is written around them (`invoke_wire`)."""
    if isinstance(payload, bytes | bytearray):
        return [bytes(payload)]
    try:
        return compact_json_parts(payload)
    except (TypeError, ValueError, RecursionError) as exc:  # ValueError: a cycle, NaN or Infinity
        raise TypeError(f"the call's input is not JSON-serializable: {exc}") from None


def _result(raw: bytes, instance: mesh_pb2.AgentInstance) -> CallResult:
    resp, output = invoke_wire.read_response(raw)
    return CallResult(
        output=_decode_output(output, resp.content_type),
        instance=instance,
        hops=tuple(resp.hops),
        state=resp.state,
        usage=resp.usage if resp.HasField("usage") else None,
        degraded=resp.metadata.get(DEGRADED_KEY, ""),
    )


class MeshClient:
    """A client of the mesh for one identity; reuse one per process (it holds channels, tokens, the cache)."""

    def __init__(self, node: MeshNode, *, default_timeout: float | None = 30.0) -> None:
        self._node = node
        self._owns_node = False
        self._started = False
        self._closed = False
        self.default_timeout = default_timeout
        self._audit_enabled = False
        self._audit_dir: Path | str | None = None
        self.audit: AuditLog | None = None
        self.max_held_calls = 100
        """How many calls this client may hold in its queue at once (`queue_for`, `enqueue`)."""
        self._queue: CallQueue | None = None
        self._queue_etcd: Any = None
        """The client's own audit log (only for a client that owns its node; an agent's client shares the
        agent's audit)."""

    @classmethod
    def connect(
        cls,
        *,
        name: str = "client",
        kind: str = "client",
        settings: MeshSettings | None = None,
        default_timeout: float | None = 30.0,
        audit: bool = True,
        audit_dir: Path | str | None = None,
        verify_inbound: bool = False,
        metrics_listen: str | None = None,
        link: bool | None = None,
        **overrides: Any,
    ) -> MeshClient:
        """A client that joins the mesh on `start()` (or `async with`), with settings resolved as documented
        in `MeshSettings.resolve` (arguments, HIVEMESH_* variables, then the `hivemesh up` state file).

        With `audit` (the default), refusals this client decides itself on the way out are recorded in a spool
        under `audit_dir` (default `<HIVEMESH_HOME>/audit`) and shipped to the control plane. `verify_inbound`
        keeps the token key set in sync, for a client that also verifies tokens addressed to it (A2A gateway).
        metrics_listen (HOST:PORT, or $HIVEMESH_METRICS_LISTEN) serves the client's Prometheus `/metrics`;
        off unless asked: an embedded client does not open ports on its own. link sends unary calls as frames on
        one multiplexed stream per peer (`hivemesh.mesh.outbound.link`; None: $HIVEMESH_LINK, else on)."""
        listen = metrics_listen_for(metrics_listen, None)  # embedded: off unless asked (or the env says so)
        node = MeshNode(settings or MeshSettings.resolve(**overrides), name=name, kind=kind,
                        verify_inbound=verify_inbound, link=link,
                        metrics=None if listen is None else NodeMetrics(packaging="client", node=name, listen=listen))
        client = cls(node, default_timeout=default_timeout)
        client._owns_node = True
        client._audit_enabled = audit
        client._audit_dir = audit_dir
        return client

    @property
    def node(self) -> MeshNode:
        return self._node

    async def start(self) -> None:
        """Join the mesh; a no-op on a started client (nothing opened twice). A closed client, or one whose start
        failed part-way, is refused before anything: its node cannot rejoin. A close() during start() ends it at
        once, with the closed client's error."""
        if self._closed:
            raise FailedPreconditionError(_CLOSED)
        failure = self._node.start_failure
        if failure is not None and self._owns_node:
            raise FailedPreconditionError(_START_FAILED.format(describe_failure(failure)))
        if self._started:
            return
        try:
            await self._node.start()
        except Exception:
            if self._closed:  # close() stopped the node under its start: that is the news, not how it ended
                raise FailedPreconditionError(_CLOSED) from None
            raise
        if self._closed:  # close() ran as the start ended (an agent's shared node goes on: nothing opened here)
            raise FailedPreconditionError(_CLOSED)
        if self._started:  # another start() ran alongside and finished first: it opened the audit log
            return
        if self._owns_node and self._audit_enabled:
            from hivemesh.mesh.audit import open_node_audit

            # A proxyless caller decides on its own side (circuit open, no grant, rate limited by policy):
            # those decisions are audited like a sidecar's, in a spool shipped to the control plane.
            self.audit = open_node_audit(
                self._node, spiffe_id=self._node.workload.spiffe_id, instance=self._node.instance_id,
                directory=self._audit_dir,
            )
            self._node.outbound.observer = self.audit.outbound
            self._node.outbound.signed_recorder = self.audit.signed
            self._node.outbound.shadow.recorder = self.audit.record  # differing shadow answers
        self._started = True

    @contextlib.contextmanager
    def on_behalf_of(self, subject_token: str) -> Iterator[None]:
        """Calls made inside act for the principal of subject_token (a token this process received): each
        sends a delegated token from the control plane's token exchange instead of this client's own."""
        reset = on_behalf_of.set(subject_token)
        try:
            yield
        finally:
            on_behalf_of.reset(reset)

    async def close(self) -> None:
        """Leave the mesh; idempotent (a close() cut short, by a timeout say, is finished by the next). Calls in
        flight end with CancelledError (`_cut`); the client is refused from then on."""
        self._closed = True
        if self._queue is not None:
            await self._queue.stop()
            with contextlib.suppress(Exception):
                await self._queue_etcd.close()
            self._queue = self._queue_etcd = None
        audit = self.audit
        if audit is not None:
            if not self._node.stopped:
                self._node.outbound.observer = None
                self._node.outbound.signed_recorder = None
                self._node.outbound.shadow.recorder = None
            await audit.close()  # ships what it can (bounded); the rest stays in the spool for next time
            self.audit = None  # only now: a close() cancelled in audit.close() leaves the next one to finish it
        if self._owns_node:
            await self._node.stop()

    async def __aenter__(self) -> MeshClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _outbound(self) -> OutboundPipeline:
        """The node's outbound pipeline, or at once a clear error for a client not started or closed (whose
        call would otherwise route on a registry view no longer kept fresh, over channels nothing closes)."""
        if self._closed:
            raise FailedPreconditionError(_CLOSED)
        if self._owns_node and not self._started:
            failure = self._node.start_failure
            raise FailedPreconditionError(_NOT_STARTED if failure is None else
                                          _START_FAILED.format(describe_failure(failure)))
        return self._node.outbound  # a node it shares (an agent's) says itself if it is not, or no longer, up

    def _cut(self, exc: BaseException) -> BaseException:
        """What a call that ended with a cancellation (exc) raises. The caller's own task cancelled: exc as it
        is. Cut by close() (or its shared node's stop): the mesh's CancelledError saying so, the same whether the
        call was a frame on a link (CANCELLED, "the link was closed") or a unary call or stream (asyncio's
        CancelledError, its channel closed): never asyncio's, which made a task nobody cancelled end cancelled."""
        if isinstance(exc, asyncio.CancelledError):
            if cancelled_by_caller():
                return exc
        elif not (self._closed or self._node.stopped):
            return exc  # a CANCELLED of the agent's, or of this node's own (its pipeline says which)
        traceback.clear_frames(exc.__traceback__)  # gRPC's finished frames hold the call, and it its connection
        if self._closed:
            return CancelledError(_CUT)
        if self._node.stopped:
            return CancelledError(f"{self._node.kind} {self._node.name!r} left the mesh (it was stopped) while the "
                                  "call was in flight: the call may have run")
        return CancelledError("the call was cancelled in flight, though its caller was not: it may have run")

    def _request(
        self, capability: str, payload: Any, context: agent_pb2.CallContext | None, idempotency_key: str | None
    ) -> bytes:
        # The bytes `encode_request(capability, data, context=ctx)` makes, built in place (no CallContext copy),
        # a large input written around rather than copied through the message (`invoke_wire`).
        data = _encode_input(payload)
        req = agent_pb2.InvokeRequest(content_type=JSON)
        ctx = req.context
        if context is not None:
            ctx.CopyFrom(context)
        if not ctx.call_id:
            ctx.call_id = new_call_id()
        if idempotency_key:
            ctx.idempotency_key = idempotency_key
        return invoke_wire.request(capability, data, req)

    async def call_detailed(
        self,
        capability: str,
        payload: Any = None,
        *,
        options: CallOptions | None = None,
        **overrides: Unpack[CallOptionArgs],
    ) -> CallResult:
        """Call capability and return its output with the instance and hops it went through."""
        outbound = self._outbound()
        timeout, context, idempotency_key, agent = _options(options, overrides)
        request = self._request(capability, payload, context, idempotency_key)
        key = idempotency_key or (context.idempotency_key if context is not None else "")
        started = time.monotonic()
        try:
            try:
                # The caller's timeout wins; without one the capability's `timeouts` policy, then default_timeout.
                raw, instance = await outbound.invoke(
                    request, capability=capability, idempotency_key=key, timeout=timeout,
                    default_timeout=self.default_timeout, agent=agent,
                )
            except (NoLiveInstanceError, UnknownCapabilityError):
                queue_for = overrides.get("queue_for", options.queue_for if options is not None else None)
                if not queue_for:
                    raise
                left = None if timeout is None else timeout - (time.monotonic() - started)
                if left is not None and left <= 0:
                    raise DeadlineExceededError(f"the call's {timeout} s passed before it could be held") from None
                return await self._held_call(capability, request, key, queue_for, left)
        except (asyncio.CancelledError, CancelledError) as exc:
            cut = self._cut(exc)
            if cut is exc:
                raise
            raise cut from None
        return _result(raw, instance)

    def _call_queue(self) -> CallQueue:
        self._outbound()  # a closed client's queue is stopped: a new one would leak its etcd client
        if self._queue is None:
            me = parse_spiffe_id(str(self._node.workload.spiffe_id))
            self._queue_etcd = etcd_client(self._node.etcd)

            async def invoke(raw: bytes, capability: str, key: str, timeout: float | None) -> bytes:
                out, _ = await self._node.outbound.invoke(raw, capability=capability, idempotency_key=key,
                                                          timeout=timeout, default_timeout=self.default_timeout)
                return out

            self._queue = CallQueue(self._queue_etcd, owner_segment(me.kind, me.name), invoke,
                                    lambda cap: bool(self._node.registry.instances(cap)),
                                    max_held=self.max_held_calls)
        return self._queue

    async def _held_call(self, capability: str, request: bytes, key: str, queue_for: float,
                         deadline_s: float | None) -> CallResult:
        """The call held for queue_for s at most, and within its own deadline (deadline_s from now, its timeout
        less what it spent): a timeout or a parent's deadline bounds the wait, and the call is never delivered
        past it."""
        queue = self._call_queue()
        call_id = await queue.enqueue(capability, request, key, queue_for, deadline_s=deadline_s)
        bounded_by_deadline = deadline_s is not None and deadline_s < queue_for
        if deadline_s is not None:
            queue_for = min(queue_for, deadline_s)
        held = await queue.wait(call_id, queue_for)
        result = self._held_result(held.state, held.response, held.error)
        if result is None and bounded_by_deadline:
            raise DeadlineExceededError(f"the call's deadline passed while it was held as {call_id} (no instance "
                                        f"of {capability!r} went live in time)", metadata={"queued_id": call_id})
        if result is None:
            raise NoLiveInstanceError(f"no instance of {capability!r} went live within {queue_for} s; the call "
                                      f"was held as {call_id}", metadata={"queued_id": call_id})
        return result

    @staticmethod
    def _held_result(state: str, response: bytes, error: HivemeshError | None) -> CallResult | None:
        if state == FAILED and error is not None:
            raise error
        return _result(response, mesh_pb2.AgentInstance()) if state == DONE else None

    async def enqueue(self, capability: str, payload: Any = None, *, max_wait: float = 300.0,
                      options: CallOptions | None = None, **overrides: Unpack[CallOptionArgs]) -> str:
        """Hold a call for capability until an instance serves it (at most max_wait s), without waiting; its id
        for `queued`. Delivered by this client's node while it runs (`resume_queued` after a restart)."""
        _timeout, context, idempotency_key, agent = _options(options, overrides)
        if agent:
            raise ValueError(f"agent={agent!r} cannot pin a held call: the queue delivers it to any agent serving "
                             "the capability")
        request = self._request(capability, payload, context, idempotency_key)
        key = idempotency_key or (context.idempotency_key if context is not None else "")
        return await self._call_queue().enqueue(capability, request, key, max_wait)

    async def queued(self, call_id: str, *, wait: float = 0.0) -> CallResult | None:
        """A held call's result once delivered (None while still held, after waiting up to wait s); raises the
        call's error if its delivery failed, NotFoundError for an unknown or long-gone id."""
        queue = self._call_queue()
        held = await (queue.wait(call_id, wait) if wait > 0 else queue.get(call_id))
        return self._held_result(held.state, held.response, held.error)

    async def held_calls(self) -> list[HeldCall]:
        """This identity's held calls (waiting, being delivered, or answered within the last minute)."""
        return await self._call_queue().held()

    async def resume_queued(self) -> int:
        """After a restart, deliver the calls this identity still holds; how many are waiting."""
        return await self._call_queue().resume()

    async def call_on(
        self,
        instance: mesh_pb2.AgentInstance,
        capability: str,
        payload: Any = None,
        *,
        options: CallOptions | None = None,
        **overrides: Unpack[CallOptionArgs],
    ) -> CallResult:
        """Call capability on one given instance (fan-out to every instance of a capability), no failover."""
        outbound = self._outbound()
        timeout, context, idempotency_key, agent = _options(options, overrides)
        if agent and instance.card.name != agent:
            raise ValueError(f"instance {instance_key(instance)!r} is not one of agent {agent!r}'s, which the "
                             "options pin the call to")
        try:
            raw = await outbound.invoke_on(
                self._request(capability, payload, context, idempotency_key),
                instance,
                capability=capability,
                timeout=timeout if timeout is not None else self.default_timeout,
                idempotency_key=idempotency_key or "",
            )
        except (asyncio.CancelledError, CancelledError) as exc:
            cut = self._cut(exc)
            if cut is exc:
                raise
            raise cut from None
        return _result(raw, instance)

    def instances(self, capability: str) -> tuple[mesh_pb2.AgentInstance, ...]:
        """The live instances serving capability now (from the registry cache)."""
        return self._node.registry.instances(capability)

    def capability_infos(self) -> list[CapabilityInfo]:
        """Every capability served now, with its declaration (description, tags) and serving agents."""
        return self._node.registry.capabilities()

    async def call(
        self,
        capability: str,
        payload: Any = None,
        *,
        options: CallOptions | None = None,
        **overrides: Unpack[CallOptionArgs],
    ) -> Any:
        """Call capability with a JSON-serializable payload and return its decoded output. The call's options
        are `CallOptions` fields, as keywords (`timeout=5`) or a set (`options=`) that keywords override.

        Raises:
            HivemeshError subclasses: UnknownCapabilityError, NoLiveInstanceError, InvalidInputError,
            PermissionDeniedError (incl. ScopeMissingError, GrantDeniedError), UnauthenticatedError,
            DeadlineExceededError, AgentError, ... — the same types the agent side raised.
        """
        result = await self.call_detailed(capability, payload, options=options, **overrides)
        return result.output

    async def stream(
        self,
        capability: str,
        payload: Any = None,
        *,
        options: CallOptions | None = None,
        **overrides: Unpack[CallOptionArgs],
    ) -> AsyncIterator[Any]:
        """Call capability and yield its output items as they arrive (including data on the final chunk).
        A stream has no idempotency key: it is never deduplicated."""
        outbound = self._outbound()
        timeout, context, idempotency_key, agent = _options(options, overrides)
        if idempotency_key:
            raise ValueError("a stream is never deduplicated: idempotency_key is for call/call_detailed/call_on")
        # Closed here, not left to the garbage collector: returning at the final chunk (or being closed by our
        # consumer) ends the attempt now, in this task: the gRPC stream is cancelled and the breakers, balancer
        # and metrics learn its outcome before the caller's next call.
        try:
            async with contextlib.aclosing(outbound.invoke_stream(
                self._request(capability, payload, context, None),
                capability=capability,
                timeout=timeout,
                default_timeout=self.default_timeout,
                agent=agent,
            )) as chunks:
                async for raw, _instance in chunks:
                    chunk = agent_pb2.InvokeChunk.FromString(raw)
                    if chunk.data:
                        yield _decode_output(chunk.data, chunk.content_type)
                    if chunk.final:
                        return
        except (asyncio.CancelledError, CancelledError) as exc:
            cut = self._cut(exc)
            if cut is exc:
                raise
            raise cut from None

    async def call_batch(
        self,
        capability: str,
        inputs: Sequence[Any],
        *,
        concurrency: int = 8,
        idempotency_keys: Sequence[str] | None = None,
        options: CallOptions | None = None,
        **overrides: Unpack[CallOptionArgs],
    ) -> list[BatchItem]:
        """Call capability once per input (at most concurrency at a time): a result or an error per item,
        never one item's failure for the whole batch. See `hivemesh.sdk.batch`."""
        self._outbound()  # a client closed or not started fails the batch, not each item
        return await call_batch(self, capability, inputs, concurrency=concurrency,
                                idempotency_keys=idempotency_keys, options=options, **overrides)

    def call_batch_stream(
        self,
        capability: str,
        inputs: Iterable[Any] | AsyncIterable[Any],
        *,
        concurrency: int = 8,
        ordered: bool = False,
        idempotency_keys: Callable[[int, Any], str] | None = None,
        options: CallOptions | None = None,
        **overrides: Unpack[CallOptionArgs],
    ) -> AsyncGenerator[BatchItem, None]:
        """call_batch over inputs of any number, read lazily: each BatchItem is yielded as it finishes (in input
        order with ordered=True), holding at most concurrency at once. See `hivemesh.sdk.batch.call_batch_stream`."""
        self._outbound()  # a client closed or not started fails the stream here, not each item
        return call_batch_stream(self, capability, inputs, concurrency=concurrency, ordered=ordered,
                                 idempotency_keys=idempotency_keys, options=options, **overrides)

    def capabilities(self) -> list[tuple[str, str, list[str], int]]:
        """(name, description, agents, live instances) for every capability in the registry now."""
        return [(c.capability.name, c.capability.description, list(c.agents), c.instances)
                for c in self._node.registry.capabilities()]


__all__ = ["CallResult", "HivemeshError", "MeshClient"]

"""The outbound side of the mesh, assembled in exactly one place: resolve → route → token → forward.

Used by the SDK's MeshClient (proxyless: the caller's own process dials the callee) and by the sidecar's
Mesh service (for callers in other languages). Same code, so both behave the same.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

import grpc

from hivemesh.mesh.channels import ChannelPool
from hivemesh.mesh.errors import (
    DeadlineExceededError,
    HivemeshError,
    TokenExpiredError,
    from_rpc_error,
)
from hivemesh.mesh.routing import RoundRobinRouter
from hivemesh.mesh.token_source import TokenSource
from hivemesh.v1 import agent_pb2, mesh_pb2

Metadata = Sequence[tuple[str, str]]
_CONNECT_FAILURE_MARKERS = ("failed to connect", "Connection refused", "connections to all backends failing")


def _never_sent(exc: grpc.aio.AioRpcError) -> bool:
    """True when gRPC could not even connect, so the request certainly never reached the agent."""
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    text = f"{exc.details()} {exc.debug_error_string()}"
    return any(m in text for m in _CONNECT_FAILURE_MARKERS)


def _idempotent(instance: mesh_pb2.AgentInstance, capability: str) -> bool:
    return any(c.name == capability and c.idempotent for c in instance.card.capabilities)


class OutboundPipeline:
    """Routes one call to a live instance of its capability and returns the agent's raw response bytes.

    Failover: if an instance cannot be reached at all (connection refused: the request was never sent), the
    call moves to the next instance within the same deadline. An idempotent capability also fails over when a
    connection broke mid-call. Retries with budgets and backoff are the resilience layer's job, not this one's.
    """

    def __init__(self, router: RoundRobinRouter, tokens: TokenSource, channels: ChannelPool) -> None:
        self.router = router
        self.tokens = tokens
        self.channels = channels

    async def _prepare(
        self, instance: mesh_pb2.AgentInstance, capability: str, metadata: Metadata
    ) -> list[tuple[str, str]]:
        token = await self.tokens.get(instance.identity, capability)
        return [*metadata, ("authorization", f"Bearer {token}")]

    async def invoke(
        self,
        raw_request: bytes,
        *,
        capability: str,
        timeout: float | None,
        metadata: Metadata = (),
    ) -> tuple[bytes, mesh_pb2.AgentInstance]:
        """Forward a serialized InvokeRequest; returns the serialized InvokeResponse and the instance used."""
        deadline = None if timeout is None else time.monotonic() + timeout
        candidates = self.router.candidates(capability)
        last: HivemeshError | None = None
        for attempt, instance in enumerate(candidates):
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceededError(
                    f"deadline passed before {capability!r} could be sent"
                    + (f" (after {attempt} unreachable instance(s))" if attempt else "")
                )
            md = await self._prepare(instance, capability, metadata)
            ep = self.channels.get(instance.endpoint, instance.identity)
            try:
                raw = await ep.invoke(raw_request, timeout=remaining, metadata=md)
            except grpc.aio.AioRpcError as exc:
                err = from_rpc_error(exc)
                if isinstance(err, TokenExpiredError):
                    self.tokens.invalidate(instance.identity)
                if _never_sent(exc) or (
                    exc.code() == grpc.StatusCode.UNAVAILABLE and _idempotent(instance, capability)
                ):
                    self.router.mark_failed(instance.instance_id)
                    last = err
                    continue
                raise err from None
            self.router.mark_ok(instance.instance_id)
            return raw, instance
        assert last is not None
        raise last

    async def invoke_stream(
        self,
        raw_request: bytes,
        *,
        capability: str,
        timeout: float | None,
        metadata: Metadata = (),
    ) -> AsyncIterator[tuple[bytes, mesh_pb2.AgentInstance]]:
        """Forward a streaming call; yields serialized InvokeChunks. Fails over only before the first chunk."""
        deadline = None if timeout is None else time.monotonic() + timeout
        candidates = self.router.candidates(capability)
        last: HivemeshError | None = None
        for instance in candidates:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceededError(f"deadline passed before {capability!r} could be sent")
            md = await self._prepare(instance, capability, metadata)
            ep = self.channels.get(instance.endpoint, instance.identity)
            call = ep.invoke_stream(raw_request, timeout=remaining, metadata=md)
            started = False
            try:
                async for chunk in call:
                    started = True
                    yield chunk, instance
                self.router.mark_ok(instance.instance_id)
                return
            except grpc.aio.AioRpcError as exc:
                err = from_rpc_error(exc)
                if not started and _never_sent(exc):
                    self.router.mark_failed(instance.instance_id)
                    last = err
                    continue
                raise err from None
            finally:
                call.cancel()
        assert last is not None
        raise last


def encode_request(
    capability: str,
    payload: bytes,
    *,
    content_type: str = "application/json",
    context: agent_pb2.CallContext | None = None,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """Serialize an InvokeRequest once, at the edge where the call starts."""
    req = agent_pb2.InvokeRequest(
        capability=capability, input=payload, content_type=content_type, metadata=metadata or {}
    )
    if context is not None:
        req.context.CopyFrom(context)
    return req.SerializeToString()

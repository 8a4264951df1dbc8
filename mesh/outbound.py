"""The outbound side of the mesh, assembled in exactly one place.

    deadline (caller's, else the capability's default) → capability breaker → route (split / pin / match)
    → skip ejected and suspect instances → balance (round robin / least outstanding) → token → send
    → on failure: fail over (never sent) or retry (retryable, resendable, within budget, with backoff)
    → on final failure: degrade (fallback capability, then the cached last good response)

Used by the SDK's MeshClient (proxyless: the caller's own process dials the callee) and by the sidecar's
Mesh service (for callers in other languages). Same code, so both behave the same. Every policy is read from
the node's compiled, in-memory view (`Traffic`); nothing here waits on etcd.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

import grpc

from hivemesh.mesh.channels import ChannelPool
from hivemesh.mesh.errors import (
    CertificateExpiredError,
    CircuitOpenError,
    DeadlineExceededError,
    HivemeshError,
    NoLiveInstanceError,
    TokenExpiredError,
    from_rpc_error,
)
from hivemesh.mesh.resilience.balancer import ROUND_ROBIN
from hivemesh.mesh.resilience.breaker import DEFAULT_FAILURE_CODES, CircuitBreaker
from hivemesh.mesh.resilience.kinds import BreakerSettings
from hivemesh.mesh.resilience.retry import RetryBudget, RetryPolicy, may_resend
from hivemesh.mesh.resilience.routes import RoutePolicy, select
from hivemesh.mesh.resilience.traffic import OutboundPolicies, ResponseCache, Traffic
from hivemesh.mesh.routing import RoundRobinRouter
from hivemesh.mesh.token_source import TokenSource, on_behalf_of
from hivemesh.v1 import agent_pb2, mesh_pb2

log = logging.getLogger(__name__)

Metadata = Sequence[tuple[str, str]]
_CONNECT_FAILURE_MARKERS = ("failed to connect", "Connection refused", "connections to all backends failing")
DEGRADED_KEY = "x-hivemesh-degraded"
"""Set in InvokeResponse.metadata when the answer came from a fallback capability or the response cache."""
_DEGRADE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
_TOKEN_REFUSALS = frozenset({"TOKEN_EXPIRED", "TOKEN_INVALID"})


def _never_sent(exc: grpc.aio.AioRpcError) -> bool:
    """True when gRPC could not even connect, so the request certainly never reached the agent."""
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    text = f"{exc.details()} {exc.debug_error_string()}"
    return any(m in text for m in _CONNECT_FAILURE_MARKERS)


def _idempotent(instance: mesh_pb2.AgentInstance, capability: str) -> bool:
    for c in instance.card.capabilities:  # noqa: SIM110 - a loop, not any(<generator>): this runs on every call
        if c.name == capability and c.idempotent:
            return True
    return False


def _rendezvous(key: str, instance_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\0{instance_id}".encode(), digest_size=8).digest(), "big")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _metadata_entry(key: str, value: str) -> bytes:
    """Wire bytes of one InvokeResponse.metadata entry (field 4), appended without re-encoding the response."""
    k, v = key.encode(), value.encode()
    entry = b"\x0a" + _varint(len(k)) + k + b"\x12" + _varint(len(v)) + v
    return b"\x22" + _varint(len(entry)) + entry


class _Call:
    """One outbound call as the pipeline sees it; the request is decoded only if a policy needs a field."""

    __slots__ = ("_request", "capability", "deadline", "metadata", "raw")

    def __init__(
        self, capability: str, raw: bytes, metadata: Metadata, deadline: float | None,
        request: agent_pb2.InvokeRequest | None,
    ) -> None:
        self.capability = capability
        self.raw = raw
        self.metadata = metadata
        self.deadline = deadline
        self._request = request

    def request(self) -> agent_pb2.InvokeRequest:
        if self._request is None:
            self._request = agent_pb2.InvokeRequest.FromString(self.raw)
        return self._request

    def route_metadata(self) -> Mapping[str, str]:
        md = {k: v for k, v in self.metadata if isinstance(v, str)}
        md.update(self.request().metadata)
        return md

    def has_idempotency_key(self) -> bool:
        return bool(self.request().context.idempotency_key)

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


class OutboundPipeline:
    """Routes one call to a live instance of its capability and returns the agent's raw response bytes.

    Without any policy it behaves as the plain mesh always did: round robin over live instances, failing over
    when an instance cannot be reached at all (and, for an idempotent capability, when a connection broke
    mid-call). Policies add routes, breakers, retries, default deadlines and degradation (module docstring).
    """

    def __init__(
        self,
        router: RoundRobinRouter,
        tokens: TokenSource,
        channels: ChannelPool,
        *,
        traffic: Traffic | None = None,
    ) -> None:
        self.router = router
        self.tokens = tokens
        self.channels = channels
        self.traffic = traffic if traffic is not None else Traffic()
        self.observer: Callable[[str, HivemeshError], None] | None = None
        """Told of every call this node refuses itself (circuit open, no instance, no grant, certificate
        expired...): the audit log of a serving node records them. It must not raise."""

    async def _prepare(
        self, instance: mesh_pb2.AgentInstance, capability: str, metadata: Metadata
    ) -> list[tuple[str, str]]:
        expires_at = self.channels.workload.expires_at
        if expires_at <= time.time():
            # Fail closed, and say why: every peer would refuse the handshake anyway.
            raise CertificateExpiredError(
                f"this workload's certificate expired at {time.ctime(expires_at)} and could not be renewed "
                "(is the control plane reachable?)"
            )
        subject = on_behalf_of.get()
        if subject:
            token = await self.tokens.get_delegated(subject, instance.identity, capability)
        else:
            token = await self.tokens.get(instance.identity, capability)
        return [*metadata, ("authorization", f"Bearer {token}")]

    @staticmethod
    def _deadline(
        policies: OutboundPolicies, timeout: float | None, default_timeout: float | None
    ) -> float | None:
        """The caller's deadline always wins; without one, the capability's policy default, then the client's."""
        if timeout is None:
            timeout = policies.timeout
        if timeout is None:
            timeout = default_timeout
        return None if timeout is None else time.monotonic() + timeout

    # --- unary ----------------------------------------------------------------------------------------------
    async def invoke(
        self,
        raw_request: bytes,
        *,
        capability: str,
        timeout: float | None,
        metadata: Metadata = (),
        default_timeout: float | None = None,
        request: agent_pb2.InvokeRequest | None = None,
    ) -> tuple[bytes, mesh_pb2.AgentInstance]:
        """Forward a serialized InvokeRequest; returns the serialized InvokeResponse and the instance used.

        timeout is the caller's deadline (seconds; None: none given). request, if the caller has the decoded
        message at hand, saves decoding it when a policy needs one of its fields.
        """
        t = self.traffic
        policies = t.outbound(capability)  # one lookup per call for every policy kind below
        call = _Call(capability, raw_request, metadata, self._deadline(policies, timeout, default_timeout), request)
        routes = policies.routes
        retries = [0]
        failed, degraded = True, False
        t.out_started(capability)
        try:
            try:
                raw, instance = await self._invoke_capability(call, policies, retries)
            except HivemeshError as err:
                if routes is None or err.code not in _DEGRADE_CODES:
                    raise
                result = await self._degrade(call, routes, err)
                if result is None:
                    raise
                degraded = True
                raw, instance = result
            else:
                if routes is not None and routes.cache_ttl_s is not None:
                    req = call.request()
                    t.cache.put(capability, ResponseCache.key(req.content_type, req.input), (raw, instance),
                                routes.cache_max_entries)
            failed = False
            return raw, instance
        except asyncio.CancelledError:
            failed = False  # the caller went away: not the capability's failure
            raise
        except HivemeshError as err:
            observer = self.observer
            if observer is not None and err.__cause__ is None:  # decided here (no remote status): audit it
                observer(capability, err)
            raise
        finally:
            t.out_finished(capability, failed=failed, retries=retries[0], degraded=degraded)

    async def _invoke_capability(
        self, call: _Call, policies: OutboundPolicies, retries: list[int]
    ) -> tuple[bytes, mesh_pb2.AgentInstance]:
        """One capability, guarded by its capability breaker (if a breakers policy gives it one)."""
        t = self.traffic
        settings = policies.breakers
        breaker: CircuitBreaker | None = None
        if settings is not None and settings.capability is not None:
            breaker = t.capability_breaker(call.capability, settings.capability)
            if not breaker.allow():
                raise CircuitOpenError(
                    f"the circuit breaker of {call.capability!r} is open after repeated failures",
                    metadata={"capability": call.capability[:128]},
                )
        outcome = "neutral"
        try:
            result = await self._attempts(call, policies.routes, settings, policies.retries, retries)
            outcome = "success"
            return result
        except HivemeshError as err:
            codes = settings.failure_codes if settings is not None else DEFAULT_FAILURE_CODES
            if err.code in codes:
                outcome = "failure"
            raise
        finally:
            if breaker is not None:
                if outcome == "success":
                    breaker.on_success()
                elif outcome == "failure":
                    if breaker.on_failure():
                        log.warning("circuit breaker of capability %s opened", call.capability)
                else:
                    breaker.on_neutral()

    def _choose(
        self,
        call: _Call,
        routes: RoutePolicy | None,
        tried: set[str],
        *,
        reuse: bool,
        affinity: str | None = None,
        refused: set[str] | frozenset[str] = frozenset(),
    ) -> mesh_pb2.AgentInstance | None:
        """The instance for the next attempt: allowed by the route, untried if possible (any if reuse), not
        ejected or suspect if possible, then the balancer's pick. None when every allowed one was tried.

        With an affinity key (the idempotency key of a non-idempotent call) the healthy instance that key hashes
        to is chosen (rendezvous hashing), tried or not: every attempt and every re-send of the key reaches the
        instance that remembers it, so its effect happens once while membership holds. Instances whose breaker
        refused this call (`refused`) are out; CircuitOpenError when that leaves none.
        """
        t = self.traffic
        cap = call.capability
        live = self.router.live(cap)
        key = cap
        if routes is not None and routes.rules:
            subset, why = select(routes, live, call.route_metadata,
                                 lambda rule, n: t.split_state(cap, routes, rule, n))
            if not subset:
                raise NoLiveInstanceError(
                    f"routes/{routes.name} ({why}) allows no live instance of {cap!r}",
                    metadata={"capability": cap[:128], "route": routes.name},
                )
            key = f"{cap}\0{why}"
            candidates: Sequence[mesh_pb2.AgentInstance] = subset  # type: ignore[assignment]
        else:
            candidates = live
        if refused:
            candidates = [i for i in candidates if i.instance_id not in refused]
            if not candidates:
                raise CircuitOpenError(
                    f"every instance of {cap!r} the call may use is ejected by its circuit breaker",
                    metadata={"capability": cap[:128]},
                )

        def ejected(i: mesh_pb2.AgentInstance) -> bool:
            b = t.peek_instance_breaker(cap, i.instance_id)
            return b is not None and b.ejected

        pool = [i for i in candidates if i.instance_id not in tried]
        if not pool:
            if not reuse:
                return None
            pool = list(candidates)

        if affinity is not None:
            usable = [i for i in candidates if not ejected(i) and not self.router.is_suspect(i.instance_id)]
            if usable:
                return max(usable, key=lambda i: _rendezvous(affinity, i.instance_id))
        healthy = [i for i in pool if not ejected(i) and not self.router.is_suspect(i.instance_id)]
        pool = healthy or [i for i in pool if not ejected(i)] or pool
        mode = routes.load_balancer if routes is not None else ROUND_ROBIN
        return t.balancer.order(key, pool, mode)[0]

    async def _attempts(
        self,
        call: _Call,
        routes: RoutePolicy | None,
        settings: BreakerSettings | None,
        policy: RetryPolicy | None,
        retries: list[int],
    ) -> tuple[bytes, mesh_pb2.AgentInstance]:
        t = self.traffic
        cap = call.capability
        budget = t.budget(cap, policy) if policy is not None else None
        if budget is not None:
            budget.record_call()
        failure_codes = settings.failure_codes if settings is not None else DEFAULT_FAILURE_CODES
        attempt = 1  # attempts that may have reached an agent
        tried: set[str] = set()
        reuse = False
        refused: set[str] = set()
        token_resent = False
        affinity = self._affinity(call)
        last: HivemeshError | None = None
        last_instance: mesh_pb2.AgentInstance | None = None
        while True:
            remaining = call.remaining()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceededError(
                    f"deadline passed before {cap!r} could be sent"
                    + (f" (after {attempt - 1 + len(tried)} failed attempt(s): {last.message})" if last else "")
                )
            instance = self._choose(call, routes, tried, reuse=reuse, affinity=affinity, refused=refused)
            if instance is None:
                # Every allowed instance was unreachable: a retry with backoff, if the policy has one to spend.
                assert last is not None and last_instance is not None
                if not self._may_retry(call, policy, budget, last, attempt, last_instance, never_sent=True):
                    raise last
                await self._backoff(policy, attempt, last, retries)
                attempt += 1
                tried.clear()
                continue
            per_try, per_try_bound = remaining, False
            try_limit = policy.per_try_timeout_s if policy is not None else None
            if try_limit is not None and (per_try is None or try_limit < per_try):
                per_try, per_try_bound = try_limit, True
            md = await self._prepare(instance, cap, call.metadata)
            breaker: CircuitBreaker | None = None
            if settings is not None and settings.instance is not None:
                breaker = t.instance_breaker(cap, instance.instance_id, settings.instance)
                if not breaker.allow():
                    refused.add(instance.instance_id)  # open, or its half-open probe slots are taken
                    continue
            endpoint = self.channels.get(instance.endpoint, instance.identity)
            health = "neutral"
            t.attempt_started(cap, instance.instance_id)
            try:
                raw: bytes = await endpoint.invoke(call.raw, timeout=per_try, metadata=md)
                health = "ok"
            except grpc.aio.AioRpcError as exc:
                err = from_rpc_error(exc)
                code = exc.code()
                never_sent = _never_sent(exc)
                if never_sent or code in failure_codes:
                    health = "failed"
            finally:
                t.attempt_finished(cap, instance.instance_id, failed=health == "failed")
                if breaker is not None:
                    self._report(breaker, health, cap, instance, settings)
            if health == "ok":
                self.router.mark_ok(instance.instance_id)
                return raw, instance
            if isinstance(err, TokenExpiredError):
                self.tokens.invalidate(instance.identity)
            if err.reason in _TOKEN_REFUSALS and not token_resent:
                # The target refused the token before its agent saw the call: it expired, or this node's
                # certificate (or the signing key) was just rotated. Send once more with a fresh token.
                self.tokens.invalidate(instance.identity)
                token_resent = True
                last, last_instance = err, instance
                continue
            tried.add(instance.instance_id)
            last, last_instance = err, instance
            if never_sent:
                self.router.mark_failed(instance.instance_id)
                continue  # the request never left: another instance may take it, free of any budget
            if policy is None:
                # No retry policy: an idempotent capability still fails over when a connection broke mid-call.
                if code == grpc.StatusCode.UNAVAILABLE and _idempotent(instance, cap):
                    self.router.mark_failed(instance.instance_id)
                    continue
                raise err
            timed_out_try = per_try_bound and code == grpc.StatusCode.DEADLINE_EXCEEDED
            if not self._may_retry(call, policy, budget, err, attempt, instance, per_try_timed_out=timed_out_try):
                raise err
            await self._backoff(policy, attempt, err, retries)
            attempt += 1
            reuse = True

    async def invoke_on(
        self,
        raw_request: bytes,
        instance: mesh_pb2.AgentInstance,
        *,
        capability: str,
        timeout: float | None,
        metadata: Metadata = (),
    ) -> bytes:
        """Send to one given instance (a fan-out to every instance): no routing, retries or failover, but the
        same certificate check, delegation, token refresh and audit of local refusals as `invoke`."""
        for resend in (False, True):
            try:
                md = await self._prepare(instance, capability, metadata)
            except HivemeshError as local:
                if self.observer is not None:
                    self.observer(capability, local)
                raise
            endpoint = self.channels.get(instance.endpoint, instance.identity)
            try:
                raw: bytes = await endpoint.invoke(raw_request, timeout=timeout, metadata=md)
                return raw
            except grpc.aio.AioRpcError as exc:
                remote = from_rpc_error(exc)
                if remote.reason in _TOKEN_REFUSALS and not resend:
                    self.tokens.invalidate(instance.identity)  # expired or rotated: once more, fresh token
                    continue
                raise remote from None
        raise AssertionError("unreachable")

    def _affinity(self, call: _Call) -> str | None:
        """The idempotency key of a call to a non-idempotent capability (None otherwise)."""
        live = self.router.live(call.capability)
        if _idempotent(live[0], call.capability):
            return None
        return call.request().context.idempotency_key or None

    def _may_retry(
        self,
        call: _Call,
        policy: RetryPolicy | None,
        budget: RetryBudget | None,
        err: HivemeshError,
        attempt: int,
        instance: mesh_pb2.AgentInstance,
        *,
        never_sent: bool = False,
        per_try_timed_out: bool = False,
    ) -> bool:
        if policy is None or budget is None:
            return False
        if attempt >= policy.attempts or not policy.is_retryable(err.code, per_try_timed_out=per_try_timed_out):
            return False
        if not never_sent and not may_resend(
            idempotent=_idempotent(instance, call.capability), idempotency_key=call.has_idempotency_key()
        ):
            return False
        delay = max(policy.backoff.delay(attempt), err.retry_after_s or 0.0)
        remaining = call.remaining()
        if remaining is not None and delay >= remaining:
            return False  # no time left for another attempt: fail now with the real error
        if not budget.try_spend():
            log.debug("retry budget of %s exhausted; not retrying %s", call.capability, err.reason)
            return False
        return True

    async def _backoff(
        self, policy: RetryPolicy | None, attempt: int, err: HivemeshError, retries: list[int]
    ) -> None:
        assert policy is not None
        retries[0] += 1
        delay = max(policy.backoff.delay(attempt), err.retry_after_s or 0.0)
        if delay > 0:
            await asyncio.sleep(delay)

    def _report(
        self,
        breaker: CircuitBreaker,
        health: str,
        capability: str,
        instance: mesh_pb2.AgentInstance,
        settings: BreakerSettings | None,
    ) -> None:
        if health == "ok":
            breaker.on_success()
        elif health == "neutral":
            breaker.on_neutral()
        else:
            share = settings.max_ejected_share if settings is not None else 0.5

            def may_open() -> bool:
                live = [i.instance_id for i in self.router.live(capability)]
                return self.traffic.ejected_share_allows(capability, live, share)

            if breaker.on_failure(may_open):
                log.warning("ejected instance %s of %s (circuit breaker open)", instance.instance_id, capability)

    # --- graceful degradation ---------------------------------------------------------------------------------
    async def _degrade(
        self, call: _Call, routes: RoutePolicy, err: HivemeshError
    ) -> tuple[bytes, mesh_pb2.AgentInstance] | None:
        """A fallback capability's answer, else the cached last good answer, else None (the error stands)."""
        t = self.traffic
        if routes.fallback:
            remaining = call.remaining()
            if remaining is None or remaining > 0:
                req = agent_pb2.InvokeRequest()
                req.CopyFrom(call.request())
                req.capability = routes.fallback
                fallback = _Call(routes.fallback, req.SerializeToString(), call.metadata, call.deadline, req)
                try:
                    raw, instance = await self._invoke_capability(fallback, t.outbound(routes.fallback), [0])
                    log.info("%s failed (%s): answered by fallback %s", call.capability, err.reason, routes.fallback)
                    return raw + _metadata_entry(DEGRADED_KEY, f"fallback:{routes.fallback}"), instance
                except HivemeshError as fb_err:
                    log.info("fallback %s of %s failed too: %s", routes.fallback, call.capability, fb_err.reason)
        if routes.cache_ttl_s is not None:
            req = call.request()
            hit = t.cache.get(call.capability, ResponseCache.key(req.content_type, req.input), routes.cache_ttl_s)
            if hit is not None:
                raw, instance = hit
                log.info("%s failed (%s): answered from the response cache", call.capability, err.reason)
                return raw + _metadata_entry(DEGRADED_KEY, "cache"), instance
        return None

    # --- streaming ------------------------------------------------------------------------------------------
    async def invoke_stream(
        self,
        raw_request: bytes,
        *,
        capability: str,
        timeout: float | None,
        metadata: Metadata = (),
        default_timeout: float | None = None,
    ) -> AsyncIterator[tuple[bytes, mesh_pb2.AgentInstance]]:
        """Forward a streaming call; yields serialized InvokeChunks. Routes, breakers and balancing apply; it
        fails over only before the first chunk, and only when the request was never sent."""
        t = self.traffic
        policies = t.outbound(capability)
        call = _Call(capability, raw_request, metadata, self._deadline(policies, timeout, default_timeout), None)
        routes = policies.routes
        settings = policies.breakers
        failure_codes = settings.failure_codes if settings is not None else DEFAULT_FAILURE_CODES
        cap_breaker: CircuitBreaker | None = None
        if settings is not None and settings.capability is not None:
            cap_breaker = t.capability_breaker(capability, settings.capability)
            if not cap_breaker.allow():
                raise CircuitOpenError(f"the circuit breaker of {capability!r} is open",
                                       metadata={"capability": capability[:128]})
        tried: set[str] = set()
        refused: set[str] = set()
        last: HivemeshError | None = None
        outcome = "neutral"
        t.out_started(capability)
        try:
            while True:
                remaining = call.remaining()
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceededError(f"deadline passed before {capability!r} could be sent")
                instance = self._choose(call, routes, tried, reuse=False, refused=refused)
                if instance is None:
                    assert last is not None
                    raise last
                md = await self._prepare(instance, capability, metadata)
                breaker = None
                if settings is not None and settings.instance is not None:
                    breaker = t.instance_breaker(capability, instance.instance_id, settings.instance)
                    if not breaker.allow():
                        refused.add(instance.instance_id)
                        continue
                ep = self.channels.get(instance.endpoint, instance.identity)
                stream = ep.invoke_stream(raw_request, timeout=remaining, metadata=md)
                started = False
                health = "neutral"
                t.attempt_started(capability, instance.instance_id)
                try:
                    async for chunk in stream:
                        started = True
                        yield chunk, instance
                    health = "ok"
                except grpc.aio.AioRpcError as exc:
                    err = from_rpc_error(exc)
                    never_sent = not started and _never_sent(exc)
                    if never_sent or exc.code() in failure_codes:
                        health = "failed"
                    if never_sent:
                        self.router.mark_failed(instance.instance_id)
                        tried.add(instance.instance_id)
                        last = err
                    else:
                        raise err from None
                finally:
                    stream.cancel()
                    t.attempt_finished(capability, instance.instance_id, failed=health == "failed")
                    if breaker is not None:
                        self._report(breaker, health, capability, instance, settings)
                if health == "ok":
                    self.router.mark_ok(instance.instance_id)
                    outcome = "success"
                    return
        except HivemeshError as err:
            if err.code in failure_codes:
                outcome = "failure"
            raise
        finally:
            t.out_finished(capability, failed=outcome == "failure", retries=0, degraded=False)
            if cap_breaker is not None:
                if outcome == "success":
                    cap_breaker.on_success()
                elif outcome == "failure":
                    cap_breaker.on_failure()
                else:
                    cap_breaker.on_neutral()


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

"""The outbound side of the mesh, assembled in exactly one place.

    deadline (caller's, else the capability's default) → capability breaker (unpinned calls) → the caller's
    agent pin, if any → route (split / pin / match) → skip ejected and suspect instances → balance (round robin /
    least outstanding) → token → send
    → on failure: fail over (never sent) or retry (retryable, resendable, within budget, with backoff)
    → on final failure: degrade (fallback capability, then the cached last good response)

Used by the SDK's MeshClient (proxyless: the caller's own process dials the callee) and by the sidecar's
Mesh service (for callers in other languages). Same code, so both behave the same. Every policy is read from
the node's compiled, in-memory view (`Traffic.policy`); nothing here waits on etcd. The parts: `call` (one
call), `selection` (which instance), `attempts` (the retry loop), `degrade` (fallback, cache), `channels`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

import grpc
import jwt
from google.protobuf.message import DecodeError

from hivemesh.mesh import tracing
from hivemesh.mesh.authz import AuthzRequest, AuthzTable
from hivemesh.mesh.errors import (
    CancelledError,
    CertificateExpiredError,
    CircuitOpenError,
    DeadlineExceededError,
    HivemeshError,
    NoLiveInstanceError,
    PayloadTooLargeError,
    PolicyDeniedError,
    StaleRegistrationError,
    from_rpc_error,
)
from hivemesh.mesh.instance_ref import instance_key
from hivemesh.mesh.layers.fence import FENCE_HEADER
from hivemesh.mesh.outbound.attempts import (
    TOKEN_REFUSALS,
    AttemptError,
    AttemptParts,
    Attempts,
    Result,
    StaleRefusals,
    held_to_deadline,
    ran_nothing,
    report_attempt,
    report_unanswered,
    report_unreachable,
    timed_out,
    went_away,
    within,
)
from hivemesh.mesh.outbound.call import GIVEN, Metadata, OutboundCall, deadline_for, deadline_words
from hivemesh.mesh.outbound.channels import ChannelPool
from hivemesh.mesh.outbound.degrade import DEGRADE_CODES, Degradation
from hivemesh.mesh.outbound.events import OutboundEvents
from hivemesh.mesh.outbound.selection import InstanceSelector, Liveness
from hivemesh.mesh.outbound.shadow import ShadowTraffic
from hivemesh.mesh.outbound.signed import Proof, StreamCheck, sign_request, signs, verify_answer
from hivemesh.mesh.resilience.breaker import DEFAULT_FAILURE_CODES, CircuitBreaker
from hivemesh.mesh.resilience.kinds import ROUTES
from hivemesh.mesh.resilience.routes import RoutePolicy
from hivemesh.mesh.resilience.traffic import Traffic
from hivemesh.mesh.tls import MAX_MESSAGE_BYTES
from hivemesh.mesh.token_source import TokenSource, on_behalf_of
from hivemesh.v1 import agent_pb2, mesh_pb2

log = logging.getLogger(__name__)

_CONNECT_FAILURE_MARKERS = ("failed to connect", "Connection refused", "connections to all backends failing")


def _final(raw: bytes) -> bool:
    """Whether a serialized InvokeChunk is its stream's final one (a chunk that does not decode is not)."""
    try:
        return agent_pb2.InvokeChunk.FromString(raw).final
    except DecodeError:
        return False


def check_request_size(capability: str, raw_request: bytes) -> None:
    """Refuse, before anything is sent, a request one message cannot carry: every mesh channel sends at most
    MAX_MESSAGE_BYTES per message, and gRPC's own refusal ("Sent message larger than max") names neither the
    capability nor what to do. On a link such a request never takes the link's stream: it is refused here."""
    size = len(raw_request)
    if size > MAX_MESSAGE_BYTES:
        raise PayloadTooLargeError(
            f"the call to capability {capability!r} is {size} bytes with its input, over the {MAX_MESSAGE_BYTES}-byte "
            "limit of one mesh message, so it was not sent: send less (split the input over several calls), or put "
            "the data where the agent can read it and send a reference to it (a URL, a file or object key)",
            metadata={"capability": capability[:128], "limit_bytes": str(MAX_MESSAGE_BYTES), "size_bytes": str(size)},
        )


CUT_HERE = ("this node closed the call's channel while the call was in flight (it was stopping, or retiring the "
            "channel after a certificate renewal): the call may have run")


def cancelled_by_caller() -> bool:
    """Whether the running task was asked to cancel (`Task.cancel`, a timeout), so an asyncio.CancelledError it
    sees is its own. Otherwise it is gRPC's for a call this process cancelled itself: a unary call or stream whose
    channel was closed under it raises asyncio's CancelledError into a task nobody cancelled."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def cut_here(exc: asyncio.CancelledError) -> CancelledError:
    """The mesh's CancelledError for a call of this node's that its own channel's closing cut (exc, from gRPC):
    a HivemeshError like any other call's end, where asyncio's made the caller's task look cancelled."""
    traceback.clear_frames(exc.__traceback__)  # gRPC's finished frames hold the call, and it its connection
    return CancelledError(CUT_HERE)


def connect_failed(exc: grpc.aio.AioRpcError) -> bool:
    """True when gRPC could not even connect, so the request certainly never reached the agent."""
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    text = f"{exc.details()} {exc.debug_error_string()}"
    return any(m in text for m in _CONNECT_FAILURE_MARKERS)


class OutboundPipeline:
    """Routes one call to a live instance of its capability and returns the agent's raw response bytes.

    Without any policy it behaves as the plain mesh always did: round robin over live instances, failing over
    when an instance cannot be reached at all (and, for an idempotent capability, when a connection broke
    mid-call). Policies add routes, breakers, retries, default deadlines and degradation (module docstring).
    """

    def __init__(
        self,
        liveness: Liveness,
        tokens: TokenSource,
        channels: ChannelPool,
        *,
        traffic: Traffic | None = None,
        authz: Callable[[], AuthzTable] | None = None,
        events: OutboundEvents | None = None,
    ) -> None:
        """authz returns the authz policies in force (the node's mirror): a cached answer is served only to a
        caller they allow; without it no cached answer is served at all (fail closed). events hears of every
        call's end, retries, ejections and degraded answers (the node's metrics)."""
        self.liveness = liveness
        self.tokens = tokens
        self.channels = channels
        self.traffic = traffic if traffic is not None else Traffic()
        self.selector = InstanceSelector(liveness, self.traffic.state, declared=self._declared)
        self.events = events
        self._parts = AttemptParts(self.selector, self._prepare_attempt, self._send, self._forget_token, events,
                                   self._policy_named)
        self._authz = authz
        self._subjects: dict[str, str] = {}
        self._degradation = Degradation(self.traffic.state.cache, self._run, principal=self._principal,
                                        authorize=self._authorize_cached, events=events)
        self.shadow = ShadowTraffic(self._send_shadow, listener=events,
                                    caller=lambda: self.channels.workload.spiffe_id)
        """Mirrors answered calls of capabilities whose route has a shadow (hivemesh.mesh.outbound.shadow)."""
        self.observer: Callable[[str, HivemeshError], None] | None = None
        """Told of every call this node refuses itself (circuit open, no instance, no grant, certificate
        expired...): the audit log of a serving node records them. It must not raise."""
        self.signed_recorder: Callable[[Mapping[str, Any]], object] | None = None
        """Told of every signed answer this node verified (`Proof.record`): the node's audit log keeps the caller's
        side of the proof. It must not raise."""

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
        fence = instance.registration_revision
        if fence:  # the registration this call is routed by: the instance refuses it if that one is gone
            return [*metadata, ("authorization", f"Bearer {token}"), (FENCE_HEADER, str(fence))]
        return [*metadata, ("authorization", f"Bearer {token}")]

    def _declared(self, capability: str) -> RoutePolicy | None:
        """The routes policy in force for capability if it names it by its name (not a pattern such as "*", which a
        typo matches too) and has a fallback: a capability the operator declared (`InstanceSelector.live`). Asked
        only when no instance of capability was ever seen here, so the scan of the documents costs no call."""
        routes = self.traffic.policy.outbound(capability).routes
        policies = self.traffic.policy.policies
        if routes is None or not routes.fallback or policies is None:
            return None
        for doc in policies.docs(ROUTES.name):
            if doc.name == routes.name and capability in doc.spec.get("capabilities", ()):
                return routes
        return None

    def _policy_named(self, kind: str, capability: str) -> str:
        """"kind/name" of the policy of kind in force for capability ("": none), for a message that says whose
        deadline passed: the same choice as the compiled table's lookup (the most specific target wins). Asked only
        when a message needs it."""
        policies = self.traffic.policy.policies
        table = policies.view().get(kind) if policies is not None else None
        best: tuple[tuple[int, int], str] | None = None
        for target in getattr(table, "targets", ()):
            if target.cap.fullmatch(capability) and (best is None or target.cap_rank > best[0]):
                best = (target.cap_rank, target.doc)
        return f"{kind}/{best[1]}" if best is not None else ""

    # --- who is calling, for the answer cache ------------------------------------------------------------------
    def _subject(self) -> str | None:
        """The principal this node calls on behalf of now (the verified subject token's `sub`), if any."""
        token = on_behalf_of.get()
        if not token:
            return None
        sub = self._subjects.get(token)
        if sub is None:
            # Verified on the way in (the inbound token layer); here only its subject is read.
            sub = str(jwt.decode(token, options={"verify_signature": False}).get("sub", ""))
            if len(self._subjects) > 1024:
                self._subjects.clear()
            self._subjects[token] = sub
        return sub

    def _principal(self) -> str:
        return f"{self.channels.workload.spiffe_id}|{self._subject() or ''}"

    async def _authorize_cached(self, call: OutboundCall, instance: mesh_pb2.AgentInstance) -> None:
        """Raise unless this caller may make this call now: a token is issued for it (grants and revocations
        of this moment) and the mirrored authz policies allow it."""
        if self._authz is None:
            raise PolicyDeniedError("no authz policies are mirrored here, so a cached answer cannot be authorized")
        await self._prepare(instance, call.capability, ())
        me, subject = self.channels.workload.spiffe_id, self._subject()
        decision = self._authz().decide(AuthzRequest(
            caller=me, capability=call.capability, action="invoke", agent=instance.identity,
            principal=subject or me, chain=(subject, me) if subject else ()))
        if not decision.allowed:
            raise PolicyDeniedError(decision.reason, metadata={"rule": decision.rule or "default-deny"})

    @property
    def cached_answers_refused(self) -> int:
        """Cached answers withheld because the caller was not allowed to make the call at that moment."""
        return self._degradation.refused

    # --- the attempt loop's parts over gRPC --------------------------------------------------------------------
    async def _prepare_attempt(self, call: OutboundCall, instance: mesh_pb2.AgentInstance) -> Metadata:
        return await self._prepare(instance, call.capability, call.metadata)

    async def _send(
        self, call: OutboundCall, instance: mesh_pb2.AgentInstance, metadata: Metadata, timeout: float | None
    ) -> bytes:
        endpoint = self.channels.get(instance.endpoint, instance.identity, instance.link_endpoint)
        if tracing.TRACER is not None:  # the attempt's span is current: the callee's parent
            metadata = tracing.with_headers(metadata)
        signed = signs(instance, call.capability)
        if signed:
            metadata = sign_request(self.channels.workload, call, instance, metadata)
        try:
            raw: bytes = await endpoint.invoke(call.raw, timeout=timeout, metadata=metadata)
            if signed:
                self._keep(verify_answer(self.channels.workload, call, instance, raw))
            return raw
        except grpc.aio.AioRpcError as exc:
            raise AttemptError(from_rpc_error(exc), never_sent=connect_failed(exc)) from None

    async def _send_shadow(
        self, instance: mesh_pb2.AgentInstance, capability: str, raw: bytes, metadata: Metadata, timeout: float
    ) -> bytes:
        md = await self._prepare(instance, capability, metadata)
        endpoint = self.channels.get(instance.endpoint, instance.identity, instance.link_endpoint)
        try:
            answer: bytes = await endpoint.invoke(raw, timeout=timeout, metadata=md)
            return answer
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    def _keep(self, proof: Proof) -> None:
        if self.signed_recorder is not None:
            self.signed_recorder(proof.record())

    def _forget_token(self, instance: mesh_pb2.AgentInstance) -> None:
        self.tokens.invalidate(instance.identity)

    async def _run(self, call: OutboundCall) -> Result:
        """One capability through the attempt loop, without degradation (a fallback's own call)."""
        return await Attempts(self._parts, call, self.traffic.policy.outbound(call.capability)).run()

    # --- unary ----------------------------------------------------------------------------------------------
    async def invoke(
        self,
        raw_request: bytes,
        *,
        capability: str,
        idempotency_key: str,
        timeout: float | None,
        metadata: Metadata = (),
        default_timeout: float | None = None,
        request: agent_pb2.InvokeRequest | None = None,
        agent: str = "",
    ) -> Result:
        """Forward a serialized InvokeRequest; returns the serialized InvokeResponse and the instance used.

        idempotency_key is the request's `CallContext.idempotency_key` ("" for none), which the caller set when
        it encoded the request. timeout is the caller's deadline (seconds; None: none given). request, if the
        caller has the decoded message at hand, saves decoding it when a policy needs one of its fields. agent
        pins the call to that agent's instances ("": any; `CallOptions.agent`, validated by the caller).
        """
        t = self.traffic
        state = t.state
        policies = t.policy.outbound(capability)  # one lookup per call for every policy kind below
        deadline = deadline_for(policies, timeout, default_timeout)
        call = OutboundCall(capability, raw_request, metadata, deadline.at, request, idempotency_key, agent,
                            timeout_s=deadline.seconds, timeout_from=deadline.source)
        routes = policies.routes
        attempts = Attempts(self._parts, call, policies)
        failed, degraded = True, False
        span = None if tracing.TRACER is None else tracing.start(
            f"{tracing.AGENT_SERVICE}/Invoke", tracing.SpanKind.CLIENT,
            tracing.rpc_attributes(tracing.AGENT_SERVICE, "Invoke", capability=capability))
        failure: BaseException | None = None
        events = self.events
        started = time.perf_counter() if events is not None else 0.0
        error: HivemeshError | None = None
        state.out_started(capability)
        try:
            check_request_size(capability, raw_request)  # before degradation: a fallback could not carry it either
            try:
                raw, instance = await attempts.run()
            except HivemeshError as err:
                if routes is None or err.code not in DEGRADE_CODES:
                    raise
                result = await self._degradation.answer(call, routes, err)
                if result is None:
                    raise
                degraded = True
                raw, instance = result
            else:
                if routes is not None and routes.cache_ttl_s is not None:
                    self._degradation.remember(call, routes, (raw, instance))
                if routes is not None and routes.shadow is not None:  # fire and forget: never awaited here
                    # A pinned call is mirrored only to its agent's candidates: it reaches no other agent.
                    self.shadow.mirror(call, routes.shadow, lambda: self.selector.live_for(call), raw, instance)
            failed = False
            if span is not None:
                tracing.set_attributes({"hivemesh.agent": instance.identity, "hivemesh.instance": instance.instance_id,
                                        "hivemesh.degraded": degraded, "hivemesh.retries": attempts.retries})
            return raw, instance
        except asyncio.CancelledError as exc:
            failed, failure = False, exc  # the caller went away, or this node closed the channel: not the capability's
            if cancelled_by_caller():
                raise
            raise cut_here(exc) from None  # not audited: nobody refused the call
        except HivemeshError as err:
            failure = error = err
            observer = self.observer
            if observer is not None and err.__cause__ is None:  # decided here (no remote status): audit it
                observer(capability, err)
            raise
        finally:
            state.out_finished(capability, failed=failed, retries=attempts.retries, degraded=degraded)
            if span is not None:
                tracing.finish(span, failure, grpc.StatusCode.CANCELLED if failure is not None and not failed
                               else None if failure is not None else grpc.StatusCode.OK)
            if events is not None:
                events.finished(capability, error, time.perf_counter() - started, attempts.retries)

    async def invoke_on(
        self,
        raw_request: bytes,
        instance: mesh_pb2.AgentInstance,
        *,
        capability: str,
        timeout: float | None,
        metadata: Metadata = (),
        idempotency_key: str = "",
    ) -> bytes:
        """Send to one given instance (a fan-out to every instance): no routing, retries or failover, but the
        same certificate check, delegation, token refresh and audit of local refusals as `invoke`. The
        idempotency key the request carries, if any, is only for saying when a call cut mid-way may be resent."""
        try:
            check_request_size(capability, raw_request)
        except HivemeshError as local:
            if self.observer is not None:
                self.observer(capability, local)
            raise
        for resend in (False, True):
            try:
                md = await self._prepare(instance, capability, metadata)
                if tracing.TRACER is not None:
                    md = tracing.with_headers(md)
            except HivemeshError as local:
                if self.observer is not None:
                    self.observer(capability, local)
                raise
            signed = OutboundCall(capability, raw_request, (), None, None) if signs(instance, capability) else None
            if signed is not None:
                md = list(sign_request(self.channels.workload, signed, instance, md))
            endpoint = self.channels.get(instance.endpoint, instance.identity, instance.link_endpoint)
            try:
                raw: bytes = await endpoint.invoke(raw_request, timeout=timeout, metadata=md)
                if signed is not None:
                    self._keep(verify_answer(self.channels.workload, signed, instance, raw))
                return raw
            except asyncio.CancelledError as exc:
                if cancelled_by_caller():
                    raise
                raise cut_here(exc) from None
            except grpc.aio.AioRpcError as exc:
                remote = from_rpc_error(exc)
                if remote.reason in TOKEN_REFUSALS and not resend:
                    self.tokens.invalidate(instance.identity)  # expired or rotated: once more, fresh token
                    continue
                sent = OutboundCall(capability, raw_request, (), None, None, idempotency_key)
                worded = remote if connect_failed(exc) else went_away(remote, sent, instance)
                if worded.code == grpc.StatusCode.DEADLINE_EXCEEDED:  # the caller's, or the client's default
                    worded = timed_out(worded, sent, instance, deadline_words(timeout, GIVEN))
                raise worded from (None if worded is remote else exc)  # reworded: gRPC's error its cause, as unary
        raise AssertionError("unreachable")

    # --- streaming ------------------------------------------------------------------------------------------
    async def invoke_stream(
        self,
        raw_request: bytes,
        *,
        capability: str,
        timeout: float | None,
        metadata: Metadata = (),
        default_timeout: float | None = None,
        agent: str = "",
    ) -> AsyncGenerator[Result, None]:
        """Forward a streaming call; yields serialized InvokeChunks. The agent pin (as `invoke`), routes, breakers
        and balancing apply; it fails over only before the first chunk, and only when the request was never
        sent."""
        check_request_size(capability, raw_request)  # the caller's mistake: before any breaker counts the call
        t = self.traffic.state
        selector = self.selector
        policies = self.traffic.policy.outbound(capability)
        deadline = deadline_for(policies, timeout, default_timeout)
        call = OutboundCall(capability, raw_request, metadata, deadline.at, None, agent=agent,
                            timeout_s=deadline.seconds, timeout_from=deadline.source)
        routes = policies.routes
        settings = policies.breakers
        failure_codes = settings.failure_codes if settings is not None else DEFAULT_FAILURE_CODES
        cap_breaker: CircuitBreaker | None = None
        if settings is not None and settings.capability is not None and not agent:  # a pin: see Attempts.run
            cap_breaker = t.capability_breaker(capability, settings.capability)
            if not cap_breaker.allow():
                raise CircuitOpenError(f"the circuit breaker of {capability!r} is open",
                                       metadata={"capability": capability[:128]})
        tried: set[str] = set()
        refused: set[str] = set()
        stale = StaleRefusals()
        last: HivemeshError | None = None
        outcome = "neutral"
        span = None if tracing.TRACER is None else tracing.start(
            f"{tracing.AGENT_SERVICE}/InvokeStream", tracing.SpanKind.CLIENT,
            tracing.rpc_attributes(tracing.AGENT_SERVICE, "InvokeStream", capability=capability), attach=False)
        failure: HivemeshError | None = None
        t.out_started(capability)
        try:
            while True:
                remaining = call.remaining()
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceededError(
                        f"deadline passed before {capability!r} could be sent ({within(call, self._policy_named)})",
                        metadata={"capability": capability[:128]})
                try:
                    instance = selector.choose(call, routes, tried, reuse=False, refused=refused)
                except NoLiveInstanceError:
                    if not stale.pending:
                        raise
                    instance = None  # the refusing entry deleted before its new registration shows: wait for it
                if instance is None:
                    if await stale.view_moved(selector, call, tried):  # refused by a registration now gone
                        continue
                    assert last is not None
                    raise last
                md = await self._prepare(instance, capability, metadata)
                if span is not None:
                    md = tracing.with_headers(md, span[0])
                check = None
                if signs(instance, capability):  # the request now; the chunks as they come (StreamCheck)
                    md = list(sign_request(self.channels.workload, call, instance, md))
                    check = StreamCheck(self.channels.workload, call, instance)
                ikey = instance_key(instance)
                breaker = None
                if settings is not None and settings.instance is not None:
                    breaker = t.instance_breaker(capability, ikey, settings.instance)
                    if not breaker.allow():
                        refused.add(ikey)
                        continue
                ep = self.channels.get(instance.endpoint, instance.identity, instance.link_endpoint)
                stream = ep.invoke_stream(raw_request, timeout=remaining, metadata=md)
                sent_at = time.monotonic()
                started = 0  # chunks received
                health = "neutral"
                t.attempt_started(capability, ikey)
                try:
                    async for chunk in stream:
                        started += 1
                        if check is not None:
                            final = check.chunk(chunk)  # the final one is verified before it is handed on
                            if check.proof is not None:
                                self._keep(check.proof)  # now: a consumer may stop reading at the final chunk
                        else:
                            final = _final(chunk)
                        if final:
                            health = "ok"  # the answer is whole: a consumer may stop reading here (MeshClient does)
                        yield chunk, instance
                    if check is not None:
                        check.end()
                    health = "ok"
                except asyncio.CancelledError as exc:
                    if cancelled_by_caller():
                        raise
                    raise cut_here(exc) from None  # neutral: the instance did nothing wrong
                except grpc.aio.AioRpcError as exc:
                    err = from_rpc_error(exc)
                    # Never sent, or refused by an agent's sidecar that could not reach its agent: nothing ran.
                    never_sent = not started and (connect_failed(exc) or ran_nothing(err))
                    fenced = not started and err.reason == StaleRegistrationError.reason
                    health = "failed" if never_sent or (exc.code() in failure_codes and not fenced) else "neutral"
                    if never_sent:
                        report_unreachable(self.liveness, capability, instance, self.events)
                        tried.add(ikey)
                        last = err
                    elif fenced:  # routed by a registration that is gone: it ran nothing, another instance may
                        tried.add(ikey)  # take it, or this one once the view shows its newer registration
                        stale.note(instance)
                        last = err
                        log.info("instance %s of %s refused a stream routed by its old registration: %s",
                                 instance.instance_id, capability, err.message)
                    else:
                        if (not started and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                                and held_to_deadline(remaining, sent_at)):
                            report_unanswered(self.liveness, capability, instance, self.events,  # no chunk came
                                              within(call, self._policy_named))
                        worded = went_away(err, call, instance, streamed=started)
                        if worded.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                            worded = timed_out(worded, call, instance, within(call, self._policy_named),
                                               streamed=started)
                        raise worded from (None if worded is err else exc)  # reworded: gRPC's error its cause
                finally:
                    stream.cancel()
                    t.attempt_finished(capability, ikey, failed=health == "failed")
                    if breaker is not None:
                        report_attempt(selector, breaker, health, capability, instance, settings, self.events)
                    if health == "ok":  # here, not after the loop: also when the consumer stopped at the final chunk
                        self.liveness.mark_ok(ikey)
                        outcome = "success"
                if health == "ok":
                    return
        except HivemeshError as err:
            failure = err
            if err.code in failure_codes:
                outcome = "failure"
            raise
        finally:
            t.out_finished(capability, failed=outcome == "failure", retries=0, degraded=False)
            if span is not None:
                tracing.finish(span, failure, None if failure is not None else grpc.StatusCode.OK)
            if cap_breaker is not None:
                if outcome == "success":
                    cap_breaker.on_success()
                elif outcome == "failure":
                    cap_breaker.on_failure()
                else:
                    cap_breaker.on_neutral()

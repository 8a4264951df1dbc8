"""The inbound side of the mesh, assembled in exactly one place.

The same chain fronts an agent in both packagings: the sidecar process (a raw-bytes forwarder behind it) and
the SDK's in-process server (the agent's own servicer behind it). Only what follows the chain differs. Either
gets the call's `Inbound` record on its servicer context (`hivemesh.mesh.callcontext`), not from ambient state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from hivemesh.mesh import answer_size, invoke_wire, tracing
from hivemesh.mesh.authz import AuthzTable
from hivemesh.mesh.budget import TokenBudgets
from hivemesh.mesh.callcontext import InboundContext
from hivemesh.mesh.errors import AuditUnavailableError, HivemeshError, InvalidInputError, abort
from hivemesh.mesh.layers import (
    BudgetLayer,
    Inbound,
    InboundLayer,
    InputGuardLayer,
    PeerIdentityLayer,
    SettlingLayer,
    TokenLayer,
)
from hivemesh.mesh.layers.admission import Admission, Done
from hivemesh.mesh.layers.authz import AuthzLayer
from hivemesh.mesh.layers.base import AnsweringLayer
from hivemesh.mesh.layers.fence import FenceLayer
from hivemesh.mesh.layers.guard import DEFAULT_MAX_INPUT_BYTES
from hivemesh.mesh.layers.loopguard import DEFAULT_MAX_CALL_DEPTH, LoopGuardLayer
from hivemesh.mesh.layers.output_screen import DEFAULT_CLASSIFIER, Classifier, output_screen_layer
from hivemesh.mesh.layers.payload_signing import payload_signing_layer
from hivemesh.mesh.layers.ratelimit import RateLimitLayer
from hivemesh.mesh.layers.screen import DEFAULT_SCREEN, ContentScreen
from hivemesh.mesh.output_check import REFUSAL_NOTE, note_refusal
from hivemesh.mesh.resilience.traffic import Traffic
from hivemesh.mesh.rpcwrap import StreamBehaviour, StreamWriter, UnaryBehaviour, outcome_code, wrap_handler, write
from hivemesh.mesh.signing import Signer
from hivemesh.mesh.tls import MAX_MESSAGE_BYTES
from hivemesh.mesh.tokens import TokenVerifier
from hivemesh.v1 import agent_pb2

log = logging.getLogger(__name__)

AGENT_SERVICE = "hivemesh.v1.Agent"
_AGENT_PREFIX = f"/{AGENT_SERVICE}/"


class InboundChain:
    """An ordered, immutable list of layers; `admit` runs them and raises the first refusal.

    `admission`, when set, runs after every layer passed: it may wait for an in-flight slot and holds it
    while the handler runs (see `hivemesh.mesh.layers.admission`). `settle` hands the handler's answer, before
    it is sent, to the layers with work then (`SettlingLayer`, e.g. charging a token budget).
    """

    def __init__(self, layers: Sequence[InboundLayer], *, admission: Admission | None = None) -> None:
        self.layers: tuple[InboundLayer, ...] = tuple(layers)
        self._checks = tuple(layer.check for layer in self.layers)
        self._settles = tuple(layer.settle for layer in self.layers if isinstance(layer, SettlingLayer))
        self.settles = bool(self._settles)
        """Some layer settles calls (else the interceptor need not keep the response)."""
        self._answers = tuple(layer.answer for layer in reversed(self.layers) if isinstance(layer, AnsweringLayer))
        self.answers = bool(self._answers)
        """Some layer changes or withholds answers (the output screen, the answer signer)."""
        self.admission = admission

    def admit(self, call: Inbound) -> None:
        for check in self._checks:
            check(call)

    def identify(self, call: Inbound) -> None:
        """Only the peer's identity (`call.peer`), for a call refused before the chain ran (a request that does
        not decode); raises what the identity layer raises for a peer it refuses."""
        for layer in self.layers:
            if isinstance(layer, PeerIdentityLayer):
                layer.check(call)

    def settle(self, call: Inbound, response: Any) -> None:
        for settle in self._settles:
            settle(call, response)

    def answer(self, call: Inbound, response: Any) -> Any:
        """What is sent in place of response (a HivemeshError withholds it)."""
        for answer in self._answers:
            response = answer(call, response)
        return response


def build_inbound_chain(
    *,
    trust_domain: str,
    verifier: TokenVerifier,
    capabilities: Iterable[agent_pb2.Capability],
    agent_name: str,
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
    traffic: Traffic | None = None,
    instances: Callable[[str], int] | None = None,
    authz: Callable[[], AuthzTable] | None = None,
    limits: Mapping[str, int] | None = None,
    screen: ContentScreen | None = DEFAULT_SCREEN,
    screen_exempt: Iterable[str] = (),
    budgets: TokenBudgets | None = None,
    max_call_depth: int = DEFAULT_MAX_CALL_DEPTH,
    meters: Sequence[InboundLayer] = (),
    signer: Callable[[], Signer] | None = None,
    instance_id: str = "",
    output_classifier: Classifier = DEFAULT_CLASSIFIER,
    fence: FenceLayer | None = None,
) -> InboundChain:
    """The inbound chain, in the order the checks must run.

    traffic (the node's policy view and resilience state) adds the rate limit and admission; instances(cap)
    counts this agent's live instances of a capability, to divide cluster-wide rate limits among them.
    authz returns the authz policies in force (the node's policy mirror); without it every call is denied
    (default deny). limits are per-capability input size limits; screen is the content screen (None: off).
    budgets are the per-caller token budgets (None: none). max_call_depth bounds the agents one call chain
    passes through. meters are layers that only watch (the node's usage meter): they come last and never refuse.
    signer gives this workload's key and certificate, for capabilities with signed_payloads (required then), and
    instance_id this instance's registry id (what a caller signs a request for);
    output_classifier finds what the output screen of a capability that declares one acts on; fence refuses
    calls routed by a registration of this instance that is gone (given by the front door, which has it follow
    the instance's registration).
    """
    capabilities = tuple(capabilities)
    me = f"spiffe://{trust_domain}/agent/{agent_name}"
    signing = payload_signing_layer(capabilities, me, signer, instance_id)
    screening = output_screen_layer(capabilities, output_classifier)
    traffic_layers: list[InboundLayer] = []
    if traffic is not None:
        # 4. How often: rate limits per caller identity × capability. After the token (it limits a verified
        #    identity), before the input guard (a refused call should cost as little as possible).
        traffic_layers.append(RateLimitLayer(traffic, agent_name, instances))
    if budgets is not None:
        # 5. How much: the verified caller's token budget for the capability; the usage the answer reports is
        #    charged as the handler hands it over. After the rate limit, before the input guard, for the same
        #    reasons.
        traffic_layers.append(BudgetLayer(budgets))
    return InboundChain(
        [
            # 1. Who is calling: every later layer decides about this identity. gRPC already verified the chain.
            PeerIdentityLayer(trust_domain),
            # 2. What the caller may do: a token for this agent, covering the capability, bound to the peer's
            #    certificate. Before input checks, so an unauthenticated caller learns nothing about inputs.
            TokenLayer(verifier),
            # 3. May this identity do this: authz policies over the verified peer, original principal and
            #    chain (which the token layer established; a policy can only judge what is proven) × capability
            #    × action. Default deny. Before the rate limit, so a denied caller spends no one's quota, and
            #    before the input guard, so it learns nothing about inputs and costs no JSON decode.
            AuthzLayer(authz, f"spiffe://{trust_domain}/agent/{agent_name}"),
            # 3a. Is the call for this registration: one routed by a registry entry of this instance that is gone
            #     (its lease lost) is refused unrun, so the caller routes it again. After authz (a stranger learns
            #     nothing of the registration), before anything that spends, counts or decodes.
            *([fence] if fence is not None else []),
            # 3b. Would this call re-enter this agent (A -> B -> A) or go too deep: refused at once instead of
            #     looping until the deadline. After authz (a stranger learns nothing), before the rate limit and
            #     budget (a looping call spends no one's quota) and the input guard (no JSON decode).
            LoopGuardLayer(capabilities, me=f"spiffe://{trust_domain}/agent/{agent_name}",
                           max_depth=max_call_depth),
            # 3c. Signed payloads: the request's signature is the peer's, fresh and not replayed (its answer is
            #     signed on the way out). After authz, so a stranger costs no signature check; before the rate
            #     limit, so a replay spends no one's quota.
            *([signing] if signing is not None else []),
            *traffic_layers,
            # 6. Is the input acceptable: capability exists, size, JSON, schema, content screen. Last, as it is
            #    the costliest (JSON decode); the decoded value is handed to the agent so it is decoded once.
            InputGuardLayer(capabilities, max_input_bytes=max_input_bytes, agent_name=agent_name, limits=limits,
                            screen=screen, screen_exempt=screen_exempt),
            # 6b. The output screen admits every call; it answers first on the way out (answering layers run in
            #     reverse), so a redacted answer is what gets signed.
            *([screening] if screening is not None else []),
            *meters,
        ],
        # 7. How many at once: last, once the call is certainly acceptable, so a refused call never holds or
        #    waits for an in-flight slot; high priority passes first, the excess is shed (OVERLOADED).
        admission=Admission(traffic, agent_name) if traffic is not None else None,
    )


def _as_dict(metadata: Any) -> dict[str, str | bytes | tuple[str | bytes, ...]]:
    out: dict[str, str | bytes | tuple[str | bytes, ...]] = {}
    for k, v in metadata or ():
        if k == "authorization" and k in out:
            # Never let a second credential silently replace the first: keep them all, the token layer refuses.
            prev = out[k]
            out[k] = (*prev, v) if isinstance(prev, tuple) else (prev, v)
        else:
            out[k] = v
    return out


def _decode(call: Inbound, request: Any) -> None:
    """call's request, its input (a large one as a view, left unset in the message) and its size on the wire."""
    if isinstance(request, agent_pb2.InvokeRequest):
        call.request, call.input, call.wire_size = request, request.input, request.ByteSize()
        return
    try:
        call.request, call.input = invoke_wire.read_request(request)
    except DecodeError:
        raise InvalidInputError(
            "the request is not a valid hivemesh.v1.InvokeRequest message"
        ) from None
    call.wire_size = len(request)


def _handler_request(call: Inbound, raw: Any, deserialize: Callable[[bytes], Any] | None) -> Any:
    """What the handler behind the chain takes: raw bytes for a forwarder (no deserializer), else the message.

    The interceptor owns deserialization, so bytes that are not a valid message become INVALID_ARGUMENT from
    the chain instead of gRPC's own UNKNOWN; an Invoke request is decoded once, by the chain.
    """
    if isinstance(raw, memoryview):  # a Link call's request, read as a view of its frame
        if deserialize is None:
            return bytes(raw)  # what a forwarder relays
    elif deserialize is None or not isinstance(raw, bytes):
        return raw
    request = call.request
    if request is not None:
        if isinstance(call.input, memoryview) and deserialize is not invoke_wire.parse_request:
            request.input = bytes(call.input)  # a handler that reads the message's input gets the whole request
        return request
    try:
        return deserialize(raw)
    except DecodeError:
        raise InvalidInputError(f"the request is not a valid {call.method} request message") from None


DecisionObserver = Callable[[Inbound, "HivemeshError | None", grpc.StatusCode, float], None]
"""Told about every call the chain decided on: refused (with the error and its code) or let through (with
the handler's final status), plus the seconds it took. The audit log is one. It must not raise, except
AuditUnavailableError, which fails the call closed: a call that could not be recorded is not answered."""


def _new_call(method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Inbound:
    return Inbound(
        method=method,
        request=None,
        wire_size=0,
        metadata=_as_dict(context.invocation_metadata()),
        auth_context=context.auth_context(),
        notes={"remote": context.peer() or ""},  # the audit record's network address of the caller
    )


def _admit(
    chain: InboundChain, call: Inbound, request: Any, context: grpc.aio.ServicerContext[Any, Any] | None = None
) -> float:
    """Decode the call, refuse it if it came too late (given its context), run the layers; the seconds it waited
    in this agent."""
    waited = 0.0
    if call.method != "Describe":
        try:
            _decode(call, request)
            if chain.admission is not None and context is not None:
                received = getattr(context, "received", None)  # a link's call: when its frame was read
                waited = time.monotonic() - received if received is not None else 0.0
                # Before the layers: under overload most calls end here, and each costs the calls that can
                # still make it their time (bench/overload.py).
                chain.admission.too_late(call, context.time_remaining(), waited)
        except HivemeshError:
            chain.identify(call)  # the refusal's record names who sent it (a stranger is refused as one)
            raise
    chain.admit(call)
    return waited




async def _answered(
    chain: InboundChain, call: Inbound, response: Any, context: grpc.aio.ServicerContext[Any, Any], *,
    streamed: bool = False,
) -> Any:
    """The answer the answering layers let out; a refusal is noted for the observers and aborts the call. One they
    rewrote is measured again: the handler measured what it answered, and a redaction can grow it past one message."""
    try:
        answer = chain.answer(call, response)
        if answer is not response:
            _fits(call, answer, streamed)
        return answer
    except HivemeshError as err:
        note_refusal(call, err)
        await abort(context, err)
        raise


def _fits(call: Inbound, answer: Any, streamed: bool) -> None:
    """Raise PAYLOAD_TOO_LARGE when an answer (its bytes, or a message) one message cannot carry, or on a Link whose
    answer frame does not fit: refused here, inside the chain, the call's record is that refusal (gRPC refused it
    after, with its own message naming nothing)."""
    raw = answer if isinstance(answer, bytes) else None
    if (len(raw) if raw is not None else answer.ByteSize()) + answer_size.ANSWER_HEADS <= MAX_MESSAGE_BYTES:
        return
    req = call.request
    refused = answer_size.refusal(req.capability if req is not None else "",
                                  raw if raw is not None else answer.SerializeToString(), MAX_MESSAGE_BYTES,
                                  on=" as the mesh's answering layers rewrote it", streamed=streamed)
    if refused is not None:
        raise refused


def _layer_failure(method: str, exc: Exception) -> HivemeshError:
    """What a layer's own failure (a bug, not a refusal) becomes: the call is refused INTERNAL, closed, and
    recorded like any refusal, instead of escaping as gRPC's UNKNOWN with no audit record."""
    log.error("the inbound chain failed on %s: %r", method, exc, exc_info=exc)
    return HivemeshError("the mesh could not check this call (an internal error; see the serving node's log)")


class MeshInboundInterceptor(grpc.aio.ServerInterceptor):
    """Runs the inbound chain before any `hivemesh.v1.Agent` method; refused calls never reach the handler.

    It wraps the handler's behaviour (as opentelemetry's gRPC instrumentation does) because the checks need
    the request, which `intercept_service` alone does not see. Health and reflection pass untouched.
    Observers (the audit log) hear of every decision; with none registered the wrapper costs nothing extra.
    """

    takes_views = True
    """Its wrapped behaviours take a request as bytes or as a memoryview of them (a Link call's large request,
    `link_wire.read`): a `LinkServer` passes such a view on instead of copying it out."""

    def __init__(self, chain: InboundChain, *, observers: Sequence[DecisionObserver] = ()) -> None:
        self._chain = chain
        self._observers = tuple(observers)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any], object]] = {}
        """method path -> (the servicer's handler, its wrapper, the tracer it was built for): the wrapper depends
        on nothing else, so it is built once per handler (and tracing state) instead of once per call."""

    def record_refusal(self, method: str, context: grpc.aio.ServicerContext[Any, Any], err: HivemeshError) -> None:
        """Tell the observers of a refusal made outside the chain (a Link message its server cannot read): one
        decision, with the sender's verified identity as the chain records an undecodable Invoke's (a sender the
        identity layer refuses is recorded with what its certificate claims). The caller sees only err."""
        started = time.perf_counter()
        call = _new_call(method, context)
        with contextlib.suppress(HivemeshError):
            self._chain.identify(call)
        self._notify(call, err, err.code, started)

    def _notify(
        self, call: Inbound, err: HivemeshError | None, code: grpc.StatusCode, started: float
    ) -> AuditUnavailableError | None:
        """Tell every observer; returns the AuditUnavailableError one raised (the call must then fail closed)."""
        elapsed = time.perf_counter() - started
        unrecorded: AuditUnavailableError | None = None
        for observe in self._observers:
            try:
                observe(call, err, code, elapsed)
            except AuditUnavailableError as exc:
                log.error("failing the call closed: %s", exc.message)
                unrecorded = exc
            except Exception:
                log.exception("decision observer %r failed", observe)
        return unrecorded

    async def _enter(
        self,
        method: str,
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        deserialize: Callable[[bytes], Any] | None,
        started: float,
    ) -> tuple[Inbound, Any, Done | None]:
        """Run the chain and admission for one call; a refusal is observed, then aborts the RPC (raises)."""
        call = _new_call(method, context)
        done: Done | None = None
        try:
            waited = _admit(self._chain, call, request, context)
            inner_request = _handler_request(call, request, deserialize)
            if self._chain.admission is not None:
                done = await self._chain.admission.enter(call, context.time_remaining(), waited)
            if tracing.TRACER is not None:
                tracing.note_call(call, None)
        except Exception as exc:  # noqa: BLE001 - a refusal, or a layer's bug refused and recorded all the same
            err = exc if isinstance(exc, HivemeshError) else _layer_failure(method, exc)
            if tracing.TRACER is not None:
                tracing.note_call(call, err)
            if self._observers:
                self._notify(call, err, err.code, started)
            await abort(context, err)
        return call, inner_request, done

    def _leave(
        self,
        call: Inbound,
        context: grpc.aio.ServicerContext[Any, Any],
        failure: BaseException | None,
        done: Done | None,
        started: float,
    ) -> AuditUnavailableError | None:
        """Release the admission slot and record the outcome. Returns the error to abort a successful call with
        when its record could not be written (an unrecordable success is never released); the caller aborts.
        Not a coroutine: it never waits, and this runs on every call."""
        if done is not None:
            done(failure is not None)
        if self._observers:
            # A refusal made behind the chain (an answer breaking its output schema) is recorded with its reason.
            refused = call.notes.get(REFUSAL_NOTE) if failure is not None else None
            unrecorded = self._notify(call, refused, outcome_code(context, failure), started)
            if unrecorded is not None and failure is None:
                return unrecorded
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        path: str = handler_call_details.method
        if handler is None or not path.startswith(_AGENT_PREFIX):
            return handler
        cached = self._wrapped.get(path)
        tracer = tracing.TRACER
        if cached is not None and cached[0] is handler and cached[2] is tracer:
            return cached[1]
        wrapped = self._wrap(path[len(_AGENT_PREFIX):], handler, traced=tracer is not None)
        if len(self._wrapped) >= 64:  # the Agent service has three methods; bound it anyway
            self._wrapped.clear()
        self._wrapped[path] = (handler, wrapped, tracer)
        return wrapped

    def _wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any], *, traced: bool = False
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """The handler with the chain in front of it (see the class docstring); traced: inside a server span."""
        observed = bool(self._observers)
        chain = self._chain
        settles = chain.settles
        answers = chain.answers
        deserialize = handler.request_deserializer  # applied by the wrappers below, after the chain
        packaging = "sidecar" if deserialize is None else "sdk"  # a raw-bytes forwarder is the sidecar's

        def unary_unary(inner_unary: UnaryBehaviour) -> UnaryBehaviour:
            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                started = time.perf_counter()
                call, inner_request, done = await self._enter(method, request, context, deserialize, started)
                handed = InboundContext(context, call)  # the handler reads the call's record from its context
                if not observed and done is None and not settles and not answers:
                    return await inner_unary(inner_request, handed)
                failure: BaseException | None = None
                try:
                    response = await inner_unary(inner_request, handed)
                    if answers:
                        response = await _answered(chain, call, response, context)
                    if settles:
                        chain.settle(call, response)
                    return response
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    unrecorded = self._leave(call, context, failure, done, started)
                    if unrecorded is not None:
                        await abort(context, unrecorded)

            return tracing.server_unary(unary, AGENT_SERVICE, method, packaging) if traced else unary

        def unary_stream(inner_stream: StreamBehaviour) -> StreamWriter:
            async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
                started = time.perf_counter()
                call, inner_request, done = await self._enter(method, request, context, deserialize, started)
                failure: BaseException | None = None
                try:
                    # Written here, not yielded to gRPC: a cancel that comes while gRPC writes an item is then
                    # raised here (gRPC left a generator suspended at that item, closed whenever it was
                    # collected, and recorded UNKNOWN), and the handler's stream is closed now.
                    async with contextlib.aclosing(inner_stream(inner_request, InboundContext(context, call))) as items:
                        async for item in items:
                            if answers:
                                item = await _answered(chain, call, item, context, streamed=True)
                            if settles:  # before it is sent: a caller that stops reading cannot skip a charge
                                chain.settle(call, item)
                            await write(context, item)
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    ended = failure is None
                    if call.final_sent and isinstance(failure, asyncio.CancelledError):
                        failure = None  # the caller went away as its whole answer was being written: answered
                    unrecorded = self._leave(call, context, failure, done, started)
                    if unrecorded is not None and ended:
                        await abort(context, unrecorded)

            return tracing.server_stream(stream, AGENT_SERVICE, method, packaging) if traced else stream

        # The Agent service has no client-streaming methods.
        return wrap_handler(handler, unary_unary=unary_unary, unary_stream=unary_stream, raw_requests=True)

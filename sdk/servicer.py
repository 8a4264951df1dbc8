"""The gRPC `Agent` servicer for SDK agents: turns protobuf calls into capability method calls.

Thin on purpose: the mesh's inbound chain (run by the interceptor before this) has already authenticated the
caller, checked the token and the caller's token budget, and validated and decoded the input; it hands the
call's record over on the servicer context (`hivemesh.mesh.callcontext`). This servicer only dispatches and
encodes, and decides nothing the chain decided.

Errors: an `InvalidInputError` (or any `HivemeshError`) raised by a capability keeps its code; anything else
it raises (a `TypeError` or `ValueError` included) is a bug in the agent, AGENT_ERROR, not the caller's fault.
A streaming capability called unary is collected into one answer of at most one message's size, else
RESOURCE_EXHAUSTED (`AgentServicer._collect`); any unary answer larger than one message is PAYLOAD_TOO_LARGE,
naming the capability, its size and the limit (gRPC's own refusal to send it named neither). Each such refusal of
an answer too large is noted on the call (`note_refusal`), so its audit record is the sidecar's for the same
refusal (invalid, RESOURCE_EXHAUSTED, reason PAYLOAD_TOO_LARGE), not an unexplained error.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, Final

import grpc

from hivemesh.mesh import invoke_wire, json_fast, tracing
from hivemesh.mesh.answer_size import answer_too_large
from hivemesh.mesh.callcontext import inbound_call, new_call_id
from hivemesh.mesh.errors import (
    AgentError,
    HivemeshError,
    InvalidInputError,
    InvalidOutputError,
    PayloadTooLargeError,
    abort,
)
from hivemesh.mesh.json_compact import compact_json, compact_json_parts
from hivemesh.mesh.layers import Inbound
from hivemesh.mesh.link_server import LinkServer, link_handler
from hivemesh.mesh.output_check import OutputCheck, note_refusal
from hivemesh.mesh.tls import MAX_MESSAGE_BYTES
from hivemesh.sdk.agent import Agent, CapabilitySpec
from hivemesh.sdk.context import Context
from hivemesh.sdk.escalation import InputRequired
from hivemesh.sdk.idempotency import DedupeStore, fingerprint
from hivemesh.sdk.llm import metering
from hivemesh.v1 import agent_pb2, agent_pb2_grpc

if TYPE_CHECKING:
    from hivemesh.sdk.client import MeshClient

log = logging.getLogger(__name__)
_JSON = "application/json"
_ENCODER = json.JSONEncoder(separators=(",", ":"))
"""`json.dumps(x, separators=(",", ":"))` without building a new encoder on every call."""


def _text(exc: BaseException) -> str:
    """str(exc), or a stand-in when even that raises (the agent's exception class may be broken too)."""
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - any failure to print it
        return f"<an unprintable {type(exc).__name__}>"


def _failure(capability: str, exc: BaseException) -> AgentError:
    """The caller's error for one call whose capability code raised: an exception, a SystemExit, or a
    CancelledError from a task it awaited. Re-raises the call's own cancellation (its caller went away): that
    one is not an error to answer."""
    task = asyncio.current_task()
    if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
        raise exc
    log.error("capability %s failed", capability, exc_info=exc)
    return AgentError(f"capability {capability!r} failed: {type(exc).__name__}: {_text(exc)}")


def _json(value: Any) -> bytes:
    """value as a stream chunk's JSON: no NaN or Infinity (not JSON; other languages' readers refuse them)."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise AgentError(f"the capability's output is not JSON: {_text(exc)}") from None


_CHUNK_OVERHEAD: Final = 64
"""More than a stream chunk's fields other than its data take on the wire: a chunk whose data is shorter than the
limit by this much is within it, measured no further."""


class AgentServicer(agent_pb2_grpc.AgentServicer):
    """Serves one SDK `Agent` over the hivemesh.v1.Agent contract.

    max_output_bytes: the largest unary answer, as the InvokeResponse written (and the most a streaming capability
    called unary may yield, as JSON); the largest message the agent's server sends (its
    `grpc.max_send_message_length`, `ManagedServer`'s max_message_bytes), since a larger answer could not be sent
    anyway: it is PAYLOAD_TOO_LARGE instead."""

    def __init__(
        self,
        agent: Agent,
        *,
        hop: agent_pb2.Hop,
        mesh: MeshClient | None = None,
        dedupe: DedupeStore | None = None,
        max_output_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self._agent = agent
        self._max_output_bytes = max_output_bytes
        self._card = agent.card()
        self._outputs = OutputCheck(self._card.capabilities)
        self._hop = hop
        self._mesh = mesh
        self._dedupe = dedupe
        # What every unary answer shares, copied per call (cheaper than building the hop into each response).
        self._response = agent_pb2.InvokeResponse(content_type=_JSON, hops=[hop])
        self.link: LinkServer | None = None
        """Serves Link streams (each call through the same chain as Invoke); None: Link is UNIMPLEMENTED."""

    async def _execute(
        self, call: Inbound, spec: CapabilitySpec, value: Any, ctx: Context
    ) -> tuple[int, Any, agent_pb2.Usage]:
        """Run a capability once for call: (task state, JSON output, usage). Token usage is metered here and
        reported in the response, whose usage the mesh's budget layer charges."""
        state = agent_pb2.TASK_STATE_COMPLETED
        try:
            with metering(ctx.usage):
                if spec.streaming:
                    result: Any = await self._collect(call, spec, value, ctx)
                else:
                    result = await self._agent.run_unary(spec, value, ctx)
        except InputRequired as ask:
            state, result = agent_pb2.TASK_STATE_INPUT_REQUIRED, ask.to_json()
        used = ctx.usage.usage
        return state, result, agent_pb2.Usage(
            input_tokens=used.input_tokens, output_tokens=used.output_tokens, model=used.model
        )

    async def _collect(self, call: Inbound, spec: CapabilitySpec, value: Any, ctx: Context) -> list[Any]:
        """A streaming capability's items as one unary answer (a JSON array), closing the stream as soon as the
        array passes max_output_bytes (PAYLOAD_TOO_LARGE, noted on call) or an item is not JSON (AGENT_ERROR):
        collected without a bound, a stream that never ends grew the agent's memory until it died. Each item is
        measured as encoded (the array's commas and brackets counted) since its size in memory says nothing of
        its JSON."""
        items: list[Any] = []
        size = 1  # "[", then each item with the "," or "]" after it
        limit = self._max_output_bytes
        async with aclosing(self._agent.run_stream(spec, value, ctx)) as stream:
            async for item in stream:
                try:
                    size += len(compact_json(item)) + 1
                except (TypeError, ValueError, RecursionError) as exc:
                    raise AgentError(f"capability {spec.name!r} returned output that is not JSON: "
                                     f"{_text(exc)}") from None
                if size > limit:
                    refused = PayloadTooLargeError(
                        f"the streaming capability {spec.name!r}'s output passed {limit} bytes, the most one answer "
                        f"carries: call it with InvokeStream (MeshClient.stream), which sends each item on its own")
                    note_refusal(call, refused)
                    raise refused
                items.append(item)
        return items

    async def _run(
        self, call: Inbound, request: agent_pb2.InvokeRequest, spec: CapabilitySpec, value: Any, ctx: Context
    ) -> tuple[int, Any, agent_pb2.Usage]:
        key = ctx.call.idempotency_key
        if key and not spec.idempotent and spec.dedupe and self._dedupe is not None:
            # A non-idempotent effect with a key: run it once, join a running attempt, replay a finished one.
            # Keys of a workflow's steps are shared by whoever drives the run (a resumer may be another
            # identity, e.g. the operator); other keys are the caller's own.
            scope = (f"workflow:{ctx.call.workflow_id}" if ctx.call.workflow_id else ctx.caller, spec.name, key)
            ran = False

            def execute() -> Any:
                nonlocal ran
                ran = True
                return self._execute(call, spec, value, ctx)

            outcome: tuple[int, Any, agent_pb2.Usage] = await self._dedupe.run(
                scope, fingerprint(call.input), execute
            )
            if not ran:  # replayed or joined: this call spent no tokens, though its answer reports them
                call.charge_usage = False
            return outcome
        return await self._execute(call, spec, value, ctx)

    def _check_output(self, call: Inbound, capability: str, value: Any, *, whole: bool = False) -> None:
        """Raise InvalidOutputError (noted for the observers) when an answer or item breaks its output schema.
        The value is checked as is; a mismatch is confirmed on the encoded bytes, which is what the caller would
        get (json turns int keys into strings, tuples into arrays)."""
        if not self._outputs.declared(capability):
            return
        try:
            self._outputs.check(capability, value, whole=whole)
        except InvalidOutputError:
            try:
                self._outputs.check_bytes(capability, _ENCODER.encode(value).encode(), _JSON, whole=whole)
            except InvalidOutputError as err:
                note_refusal(call, err)
                raise

    async def _traced_run(
        self, call: Inbound, request: agent_pb2.InvokeRequest, spec: CapabilitySpec, value: Any, ctx: Context
    ) -> tuple[int, Any, agent_pb2.Usage]:
        """`_run` inside the handler's span (current, so the capability's onward calls are its children)."""
        attrs = {"hivemesh.capability": spec.name, "hivemesh.agent": self._hop.identity,
                 "hivemesh.instance": self._hop.instance, "hivemesh.caller": ctx.caller, "hivemesh.packaging": "sdk"}
        with tracing.span(f"handler {spec.name}", tracing.SpanKind.INTERNAL, attrs) as span:
            outcome = await self._run(call, request, spec, value, ctx)
            if span is not None:
                usage = outcome[2]
                span.set_attributes(tracing.usage_attributes(usage.input_tokens, usage.output_tokens, usage.model))
            return outcome

    async def Describe(
        self, request: agent_pb2.DescribeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.AgentCard:
        return self._card

    def _prepare(
        self, request: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[Inbound, CapabilitySpec, Any, Context]:
        """What the chain established, as the capability's arguments: the chain admitted only capabilities of
        this agent's card, so the spec is looked up, not checked again; the input was decoded by the chain."""
        call = inbound_call(context)
        spec = self._agent.capabilities[request.capability]
        if call.input_parsed:
            value = call.parsed_input
        else:  # a content type the chain does not decode (not JSON): the SDK's handlers still take JSON
            try:
                value = json_fast.loads(call.input) if call.input else None
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise InvalidInputError(f"input is not valid JSON: {exc}") from None
        call_ctx = agent_pb2.CallContext()
        call_ctx.CopyFrom(request.context)
        if not call_ctx.call_id:
            call_ctx.call_id = new_call_id()
        claims = call.claims
        ctx = Context(
            capability=spec.name,
            caller=claims.presenter if claims is not None else "",
            call=call_ctx,
            metadata=dict(request.metadata),
            scopes=claims.scopes if claims is not None else frozenset(),
            mesh=self._mesh,
            _grpc=context,
            principal=claims.subject if claims is not None else "",
            chain=claims.delegation if claims is not None else (),
            subject_token=call.bearer() if claims is not None else "",  # the token the chain verified
        )
        return call, spec, value, ctx

    async def Invoke(  # type: ignore[override]  # add_to_server registers it with a serializer that passes bytes
        self, request: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        """The serialized InvokeResponse (written around its output, `invoke_wire`; `add_to_server`'s
        serializer passes bytes through)."""
        try:
            call, spec, value, ctx = self._prepare(request, context)
            run = self._run if tracing.TRACER is None else self._traced_run
            state, result, usage = await run(call, request, spec, value, ctx)
        except HivemeshError as err:
            await abort(context, err)
        except (KeyboardInterrupt, GeneratorExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - the agent's bug: an error, or an exit or cancel not the call's
            await abort(context, _failure(request.capability, exc))
        try:
            output = compact_json_parts(result)
        except (TypeError, ValueError, RecursionError) as exc:
            await abort(context, AgentError(f"capability {request.capability!r} returned output that is not JSON: "
                                            f"{_text(exc)}"))
        if state == agent_pb2.TASK_STATE_COMPLETED:
            try:
                self._check_output(call, spec.name, result, whole=True)
            except InvalidOutputError as err:
                await abort(context, err)
        response = agent_pb2.InvokeResponse()
        response.CopyFrom(self._response)
        response.state = state  # type: ignore[assignment]
        if usage.input_tokens or usage.output_tokens:
            response.usage.CopyFrom(usage)
        wire = invoke_wire.response(output, response)
        # Refused here, inside the chain, and noted, the call is on record as this refusal with its reason.
        if len(wire) > self._max_output_bytes:  # else gRPC refuses to send it, naming neither capability nor limit
            too_large = answer_too_large(request.capability, len(wire), self._max_output_bytes)
            note_refusal(call, too_large)
            await abort(context, too_large)
        if self.link is not None:
            # On a link, its answer frame is a few bytes larger: refused here, inside the chain, the call is on
            # record as refused; the link server's own check, after the chain, recorded it as answered.
            refused = self.link.answer_refusal(request.capability, wire)
            if refused is not None:
                note_refusal(call, refused)
                await abort(context, refused)
        call.written = (wire, response.usage)  # what the usage-counting layers would otherwise parse it for
        return wire

    async def Link(
        self, request_iterator: AsyncIterator[agent_pb2.LinkFrame], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[agent_pb2.LinkFrame]:
        if self.link is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this agent does not serve Link: call Invoke")
        else:
            async for frame in self.link.serve(request_iterator, context):
                yield frame

    def _chunk(self, call: Inbound, capability: str, data: bytes) -> agent_pb2.InvokeChunk:
        """A stream's item chunk; PAYLOAD_TOO_LARGE (naming the capability, noted on call for its audit record)
        for one larger than a message may carry, which gRPC would refuse to send with a message naming neither."""
        chunk = agent_pb2.InvokeChunk(data=data, content_type=_JSON, state=agent_pb2.TASK_STATE_WORKING)
        limit = self._max_output_bytes
        if len(data) > limit - _CHUNK_OVERHEAD and (size := chunk.ByteSize()) > limit:
            refused = answer_too_large(capability, size, limit, on=" in one stream item", streamed=True)
            note_refusal(call, refused)
            raise refused
        return chunk

    async def InvokeStream(
        self, request: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[agent_pb2.InvokeChunk]:
        final = agent_pb2.InvokeChunk(final=True, state=agent_pb2.TASK_STATE_COMPLETED, hops=[self._hop])
        try:
            call, spec, value, ctx = self._prepare(request, context)
            try:
                if spec.streaming:
                    # The generator's body runs in this task's context, so the meter is current while it runs.
                    with metering(ctx.usage):
                        async with aclosing(self._agent.run_stream(spec, value, ctx)) as stream:
                            async for item in stream:
                                data = _json(item)
                                self._check_output(call, spec.name, item)  # each item, before it is sent
                                yield self._chunk(call, spec.name, data)
                else:
                    run = self._run if tracing.TRACER is None else self._traced_run
                    state, result, _usage = await run(call, request, spec, value, ctx)
                    data = _json(result)
                    if state == agent_pb2.TASK_STATE_INPUT_REQUIRED:
                        final.state = agent_pb2.TASK_STATE_INPUT_REQUIRED
                    else:
                        self._check_output(call, spec.name, result, whole=True)
                    yield self._chunk(call, spec.name, data)
            except InputRequired as ask:
                final.state = agent_pb2.TASK_STATE_INPUT_REQUIRED
                final.data = json.dumps(ask.to_json(), separators=(",", ":")).encode()
                final.content_type = _JSON
            used = ctx.usage.usage
            if used.total:
                final.usage.CopyFrom(agent_pb2.Usage(input_tokens=used.input_tokens,
                                                     output_tokens=used.output_tokens, model=used.model))
        except HivemeshError as err:
            await abort(context, err)
        except (KeyboardInterrupt, GeneratorExit):  # GeneratorExit: the caller stopped reading; end quietly
            raise
        except BaseException as exc:  # noqa: BLE001 - the agent's bug: an error, or an exit or cancel not the call's
            await abort(context, _failure(request.capability, exc))
        call.final_sent = True
        yield final


def _serialized(response: bytes | agent_pb2.InvokeResponse) -> bytes:
    """Invoke's answer on the wire: bytes as they are (what `AgentServicer.Invoke` returns), a message serialized
    (what a subclass's override may return)."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def invoke_handler(servicer: AgentServicer) -> grpc.RpcMethodHandler[Any, Any]:
    """servicer's unary Invoke as gRPC (and a LinkServer) calls it: requests decoded, answers as bytes."""
    return grpc.unary_unary_rpc_method_handler(
        servicer.Invoke, request_deserializer=invoke_wire.parse_request, response_serializer=_serialized)


def add_to_server(servicer: AgentServicer, server: grpc.aio.Server) -> None:
    """Register servicer as `hivemesh.v1.Agent`, as the generated `add_AgentServicer_to_server` does, except that
    Link (when it serves Link) carries wire bytes both ways (`link_handler`): the generated handler would turn
    every frame into a message and back, copying each call's payload several times (`mesh/link_wire.py`)."""
    service = agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Describe": grpc.unary_unary_rpc_method_handler(
            servicer.Describe, request_deserializer=agent_pb2.DescribeRequest.FromString,
            response_serializer=agent_pb2.AgentCard.SerializeToString),
        "Invoke": invoke_handler(servicer),
        "InvokeStream": grpc.unary_stream_rpc_method_handler(
            servicer.InvokeStream, request_deserializer=invoke_wire.parse_request,
            response_serializer=agent_pb2.InvokeChunk.SerializeToString),
        "Link": link_handler(servicer.link) if servicer.link is not None else grpc.stream_stream_rpc_method_handler(
            servicer.Link, request_deserializer=agent_pb2.LinkFrame.FromString,
            response_serializer=agent_pb2.LinkFrame.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)

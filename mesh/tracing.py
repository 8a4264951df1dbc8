"""OpenTelemetry traces for the mesh: the tracer provider from the standard environment, and the spans' helpers.

Off by default. `configure()` turns it on when the environment asks for an exporter the standard way
(`OTEL_TRACES_EXPORTER`, or an `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`; `OTEL_SDK_DISABLED=true` wins), sampling
parent-based by trace-id ratio (`OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG`; default ratio 1.0). While off,
`TRACER` is None and every hook on the call path is a single `is None` test: no span, no context, no headers.

Propagation is W3C `traceparent`/`tracestate` plus `baggage`, in gRPC metadata. The hooks live where the mesh
decides (the outbound pipeline and its attempts, the inbound interceptor, the handler, the sidecar's forward),
which `opentelemetry-instrumentation-grpc` cannot see: see docs/observability.md "Traces".
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import baggage, context, trace
from opentelemetry.propagate import get_global_textmap, set_global_textmap
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Link, Status, StatusCode, Tracer
from opentelemetry.trace import Span as Span
from opentelemetry.trace import SpanKind as SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from hivemesh.mesh import invoke_wire
from hivemesh.mesh.errors import HivemeshError
from hivemesh.mesh.layers.base import Inbound
from hivemesh.mesh.rpcwrap import outcome_code
from hivemesh.v1 import agent_pb2

TRACER: Tracer | None = None
"""The mesh's tracer while tracing is on; None (the default) means off, and every hook does nothing."""
_FOLLOW_PARENT = False
"""The sampler is parent-based: under an unsampled parent no span would record, so none is made (`start`)."""

PROPAGATION_KEYS = frozenset({"traceparent", "tracestate", "baggage"})
"""The metadata keys the mesh owns when tracing is on: replaced with the current span's, never passed through."""

AGENT_SERVICE = "hivemesh.v1.Agent"
MESH_SERVICE = "hivemesh.v1.Mesh"
_SCOPE = "hivemesh"


def _propagator() -> CompositePropagator:
    from opentelemetry.baggage.propagation import W3CBaggagePropagator

    return CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])


def _enabled_by(env: Mapping[str, str]) -> bool:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def sampler_from(env: Mapping[str, str]) -> Any:
    """The sampler the environment names; without OTEL_TRACES_SAMPLER, parent-based ratio (ARG, default 1.0)."""
    from opentelemetry.sdk.trace import sampling

    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_traceidratio"
    arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    try:
        ratio = float(arg) if arg else 1.0
    except ValueError:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={arg!r} is not a number between 0 and 1") from None
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={arg!r} is not a number between 0 and 1")
    samplers: dict[str, Callable[[], Any]] = {
        "always_on": lambda: sampling.ALWAYS_ON,
        "always_off": lambda: sampling.ALWAYS_OFF,
        "traceidratio": lambda: sampling.TraceIdRatioBased(ratio),
        "parentbased_always_on": lambda: sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": lambda: sampling.ParentBased(sampling.ALWAYS_OFF),
        "parentbased_traceidratio": lambda: sampling.ParentBasedTraceIdRatio(ratio),
    }
    make = samplers.get(name)
    if make is None:
        raise ValueError(f"OTEL_TRACES_SAMPLER={name!r} is not one of {', '.join(sorted(samplers))}")
    return make()


def _exporter(env: Mapping[str, str]) -> Any:
    name = env.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
    if name == "otlp":
        protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc")
        if protocol.strip() != "grpc":
            raise ValueError(f"OTLP protocol {protocol!r} is not supported here: use grpc")
        # Reads OTEL_EXPORTER_OTLP_[TRACES_]{ENDPOINT,HEADERS,CERTIFICATE,INSECURE,TIMEOUT,COMPRESSION} itself.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    raise ValueError(f"OTEL_TRACES_EXPORTER={name!r} is not supported: use otlp, console or none")


def configure(env: Mapping[str, str] | None = None, *, service: str = "hivemesh") -> bool:
    """Turn tracing on if the environment asks for it (module docstring); True when on. Idempotent: a process
    keeps its first provider. service is `service.name` unless OTEL_SERVICE_NAME names one."""
    env = os.environ if env is None else env
    if TRACER is not None:
        return True
    if not _enabled_by(env):
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or service})
    provider = TracerProvider(sampler=sampler_from(env), resource=resource)
    provider.add_span_processor(BatchSpanProcessor(_exporter(env)))
    # Also the process's global provider (unless the program set one), so an agent's own spans
    # (`opentelemetry.trace.get_tracer(...)`) are exported with the mesh's, in the same traces.
    trace.set_tracer_provider(provider)
    enable(provider)
    return True


def enable(provider: Any) -> None:
    """Trace through this TracerProvider (configure() builds one; tests pass one with an in-memory exporter)."""
    global TRACER, _FOLLOW_PARENT
    from opentelemetry.sdk.trace.sampling import ParentBased

    if not isinstance(get_global_textmap(), CompositePropagator) or TRACER is None:
        set_global_textmap(_propagator())
    _FOLLOW_PARENT = isinstance(getattr(provider, "sampler", None), ParentBased)
    TRACER = provider.get_tracer(_SCOPE)


def disable() -> None:
    """Back to off (tests, and a bench comparing both in one process)."""
    global TRACER
    TRACER = None


# --- propagation --------------------------------------------------------------------------------------------------
class _Getter(Getter[Mapping[str, Any]]):
    """Reads W3C headers from gRPC metadata pairs (a bytes value is ignored: these headers are text)."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier)


_GETTER = _Getter()


def extract(metadata: Iterable[tuple[str, Any]] | None) -> context.Context:
    """The remote parent (and baggage) carried by inbound metadata; the current context's if it carries none."""
    carrier = {k: v for k, v in metadata or () if k in PROPAGATION_KEYS}
    return get_global_textmap().extract(carrier, getter=_GETTER) if carrier else context.get_current()


def headers(span: Span | None = None) -> list[tuple[str, str]]:
    """The traceparent/tracestate of span (default: the current one) and the current baggage, as gRPC metadata."""
    carrier: dict[str, str] = {}
    get_global_textmap().inject(carrier, context=None if span is None else trace.set_span_in_context(span))
    return list(carrier.items())


def with_headers(metadata: Iterable[tuple[str, Any]], span: Span | None = None) -> list[tuple[str, Any]]:
    """metadata with the propagation headers replaced by those of span (default: the current context's)."""
    return [*((k, v) for k, v in metadata if k not in PROPAGATION_KEYS), *headers(span)]


# --- spans --------------------------------------------------------------------------------------------------------
def start(
    name: str,
    kind: SpanKind,
    attributes: Mapping[str, Any],
    *,
    parent: context.Context | None = None,
    links: Iterable[Link] = (),
    attach: bool = True,
) -> tuple[Span, object]:
    """Start a span and make it current; `finish` ends it (same task). Only called while TRACER is set.
    attach=False leaves the current context alone (a stream's span, whose generator runs in its consumer's
    context between chunks): pass the span to `with_headers` to propagate it.

    Under an unsampled parent with a parent-based sampler, no span is made: the parent stays current (and is
    what propagates, flags 00), which is all a child would have done, at a fraction of the SDK's cost."""
    assert TRACER is not None
    if _FOLLOW_PARENT:
        current = trace.get_current_span(parent)
        sc = current.get_span_context()
        if sc.is_valid and not sc.trace_flags.sampled and not current.is_recording():
            return current, (context.attach(parent) if parent is not None and attach else None)
    span = TRACER.start_span(name, context=parent, kind=kind, attributes=dict(attributes), links=list(links))
    if not attach:
        return span, None
    return span, context.attach(trace.set_span_in_context(span, parent))


def finish(
    handle: tuple[Span, object], error: BaseException | None = None, code: grpc.StatusCode | None = None
) -> None:
    """End a span from `start`: error status (with the mesh's reason) if error, the gRPC code if known."""
    span, token = handle
    try:
        if code is None and isinstance(error, HivemeshError):
            code = error.code
        if code is not None:
            span.set_attribute("rpc.grpc.status_code", code.value[0])
        if error is not None:
            mark_error(span, error, code)
        elif code is not None and code != grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, code.name))
    finally:
        if token is not None:
            context.detach(token)  # type: ignore[arg-type]
        span.end()


def mark_error(span: Span, error: BaseException, code: grpc.StatusCode | None = None) -> None:
    """Error status on span; a mesh error adds its ErrorInfo reason (`hivemesh.reason`)."""
    if isinstance(error, HivemeshError):
        span.set_attribute("hivemesh.reason", error.reason)
        span.set_attribute("rpc.grpc.status_code", error.code.value[0])
        span.set_status(Status(StatusCode.ERROR, f"{error.reason}: {error.message}"[:256]))
    else:
        span.set_status(Status(StatusCode.ERROR, f"{code.name if code else type(error).__name__}"))


def current() -> Span:
    return trace.get_current_span()


def set_attributes(attributes: Mapping[str, Any]) -> None:
    """Set attributes on the current span (a no-op span when none is recording)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(dict(attributes))


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span in hex, or None when there is none (or tracing is off)."""
    if TRACER is None:
        return None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def rpc_attributes(service: str, method: str, **mesh: Any) -> dict[str, Any]:
    """RPC semantic-convention attributes plus the mesh's own (`hivemesh.<key>`, dots for underscores)."""
    attrs: dict[str, Any] = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    for key, value in mesh.items():
        if value is not None and value != "":
            attrs["hivemesh." + key.replace("_", ".")] = value
    return attrs


def usage_attributes(input_tokens: int, output_tokens: int, model: str) -> dict[str, Any]:
    """GenAI semantic-convention usage attributes (only what is known)."""
    attrs: dict[str, Any] = {}
    if input_tokens or output_tokens:
        attrs["gen_ai.usage.input_tokens"] = input_tokens
        attrs["gen_ai.usage.output_tokens"] = output_tokens
    if model:
        attrs["gen_ai.request.model"] = model
    return attrs


def note_usage(span: Span, usage: agent_pb2.Usage) -> None:
    """The model usage an agent's answer reports, on span: how a sidecar, which relays the agent's bytes,
    gives its spans the `gen_ai.usage.*` attributes the SDK's handler span has."""
    if span.is_recording():
        span.set_attributes(usage_attributes(usage.input_tokens, usage.output_tokens, usage.model))


def note_response_usage(span: Span, raw: bytes) -> None:
    """`note_usage` from an encoded InvokeResponse (decoded only while span records; unreadable: nothing)."""
    if not span.is_recording():
        return
    try:
        usage = invoke_wire.read_response(raw)[0].usage
    except DecodeError:
        return
    note_usage(span, usage)


@contextlib.contextmanager
def span(name: str, kind: SpanKind = SpanKind.INTERNAL, attributes: Mapping[str, Any] | None = None,
         *, parent: context.Context | None = None, links: Iterable[Link] = ()) -> Iterator[Span | None]:
    """A current span for the block, error status if it raises; yields None (and costs nothing) while off."""
    if TRACER is None:
        yield None
        return
    handle = start(name, kind, attributes or {}, parent=parent, links=links)
    failure: BaseException | None = None
    try:
        yield handle[0]
    except BaseException as exc:
        failure = exc
        raise
    finally:
        finish(handle, failure)


def root() -> context.Context:
    """A context with no parent span but the current baggage: what starts a trace of its own (a workflow run)."""
    bag = baggage.get_all()
    ctx = context.Context()
    for key, value in bag.items():
        ctx = baggage.set_baggage(key, value, ctx)
    return ctx


def link_to(trace_id: str, span_id: str) -> list[Link]:
    """A link to a span known by its hex ids (a resumed workflow run links to the run it continues)."""
    try:
        ctx = trace.SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True,
                                trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))
    except ValueError:
        return []
    return [Link(ctx)] if ctx.is_valid else []


# --- the inbound side ---------------------------------------------------------------------------------------------
def _end_server(handle: tuple[Span, object], context: grpc.aio.ServicerContext[Any, Any],
                failure: BaseException | None) -> None:
    code = outcome_code(context, failure)
    span = handle[0]
    status = getattr(span, "status", None)
    if code != grpc.StatusCode.OK and status is not None and status.status_code is StatusCode.ERROR:
        span.set_attribute("rpc.grpc.status_code", code.value[0])  # a refusal already said why (note_call)
        code = None  # type: ignore[assignment]
    finish(handle, None, code)


def server_start(service: str, method: str, context: grpc.aio.ServicerContext[Any, Any], packaging: str
                 ) -> tuple[Span, object]:
    """The server span of one inbound call, child of the caller's traceparent, current until `_end_server`."""
    return start(f"{service}/{method}", SpanKind.SERVER, rpc_attributes(service, method, packaging=packaging),
                 parent=extract(context.invocation_metadata()))


def server_unary(behaviour: Any, service: str, method: str, packaging: str) -> Any:
    """behaviour (a unary-unary gRPC aio handler) inside a server span."""

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        handle = server_start(service, method, context, packaging)
        failure: BaseException | None = None
        try:
            return await behaviour(request, context)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            _end_server(handle, context, failure)

    return unary


def server_stream(behaviour: Any, service: str, method: str, packaging: str) -> Any:
    """behaviour (a unary-stream gRPC aio handler: an async generator, or a coroutine in gRPC's writer style)
    inside a server span."""
    if not inspect.isasyncgenfunction(behaviour):
        return server_unary(behaviour, service, method, packaging)  # a writer is awaited as a unary one is

    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        handle = server_start(service, method, context, packaging)
        failure: BaseException | None = None
        try:
            async for item in behaviour(request, context):
                yield item
        except BaseException as exc:
            failure = exc
            raise
        finally:
            _end_server(handle, context, failure)

    return stream


def note_call(call: Inbound, error: HivemeshError | None) -> None:
    """What the inbound chain decided about call (an `Inbound`), on the current (server) span: capability,
    verified caller, decision, and for a refusal its ErrorInfo reason and error status."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    from hivemesh.mesh.audit.record import classify  # the audit's own decision names, one vocabulary

    request = call.request
    attrs: dict[str, Any] = {
        "hivemesh.decision": classify(error, error.code if error is not None else grpc.StatusCode.OK),
    }
    if request is not None and request.capability:
        attrs["hivemesh.capability"] = request.capability
    if call.peer is not None:
        attrs["hivemesh.caller"] = str(call.peer.spiffe_id)
    span.set_attributes(attrs)
    if error is not None:
        mark_error(span, error)

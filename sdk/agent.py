"""Writing an agent: a class with `@capability`-decorated async methods.

    class Extractor(Agent):
        name = "extractor"

        @capability(description="Pull fields out of text", tags=["documents"])
        async def extract(self, doc: Document) -> Fields: ...

The decorator reads the input and return type hints (and fails at import time when they are missing), derives
JSON schemas from them unless schemas are declared, and returns the method unchanged. The class collects its
capabilities into an A2A-style agent card. `hivemesh.sdk.serve(agent)` puts it on the mesh.
"""

from __future__ import annotations

import collections.abc
import inspect
import json
import typing
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, overload

from hivemesh.mesh.schema import compile_schema
from hivemesh.sdk.schema import from_json, schema_for, to_json
from hivemesh.v1 import agent_pb2

if TYPE_CHECKING:
    from hivemesh.sdk.context import Context

F = TypeVar("F", bound=Callable[..., Any])
_ATTR = "__hivemesh_capability__"


@dataclass(frozen=True)
class CapabilitySpec:
    """What `@capability` recorded about one method."""

    name: str
    method_name: str
    description: str
    input_type: Any
    output_type: Any
    input_schema: Mapping[str, Any]
    output_schema: Mapping[str, Any]
    streaming: bool
    idempotent: bool
    tags: tuple[str, ...]
    wants_context: bool
    max_input_bytes: int | None = None
    dedupe: bool = True
    """Deduplicate keyed calls in the SDK server (non-idempotent capabilities only; see hivemesh.sdk.idempotency).
    False when the handler keeps `ctx.idempotency_key` with its effect itself and answers repeats its own way."""
    cache_shareable: bool = False
    """The answer does not depend on who asks: a caller's degraded-mode cache may serve it to other callers."""
    recursion: int = 0
    """How many times one call chain may re-enter this agent through this capability (0: a revisit is a loop)."""
    signed_payloads: bool = False
    """Requests and answers are signed and verified (`hivemesh.mesh.signing`)."""
    output_screen: str = "off"
    """What the mesh does with secrets or personal data in an answer: off, refuse, redact or record."""

    def to_proto(self) -> agent_pb2.Capability:
        return agent_pb2.Capability(
            name=self.name,
            description=self.description,
            input_schema=json.dumps(self.input_schema, sort_keys=True) if self.input_schema else "",
            output_schema=json.dumps(self.output_schema, sort_keys=True) if self.output_schema else "",
            streaming=self.streaming,
            tags=list(self.tags),
            idempotent=self.idempotent,
            cache_shareable=self.cache_shareable,
            recursion=self.recursion,
            signed_payloads=self.signed_payloads,
            output_screen=agent_pb2.OutputScreen.Value(f"OUTPUT_SCREEN_{self.output_screen.upper()}"),
            input_modes=["application/json"],
            output_modes=["application/json"],
        )


_OUTPUT_SCREENS = ("off", "refuse", "redact", "record")


def _stream_item_type(ret: Any) -> Any | None:
    origin = typing.get_origin(ret)
    if origin in (collections.abc.AsyncIterator, collections.abc.AsyncGenerator, collections.abc.AsyncIterable):
        args = typing.get_args(ret)
        return args[0] if args else Any
    return None


def _derived_schema(hint: Any, what: str) -> dict[str, Any]:
    """schema_for, its TypeError saying which capability and parameter the hint with no JSON form belongs to."""
    try:
        return schema_for(hint)
    except TypeError as exc:
        raise TypeError(f"{what}: {exc}") from exc


def _build_spec(
    fn: Callable[..., Any],
    *,
    name: str | None,
    description: str | None,
    tags: tuple[str, ...],
    idempotent: bool,
    input_schema: Mapping[str, Any] | None,
    output_schema: Mapping[str, Any] | None,
    max_input_bytes: int | None,
    dedupe: bool = True,
    cache_shareable: bool = False,
    recursion: int = 0,
    signed_payloads: bool = False,
    output_screen: str = "off",
) -> CapabilitySpec:
    where = f"capability {fn.__qualname__}"
    if output_screen not in _OUTPUT_SCREENS:
        raise ValueError(f"{where}: output_screen must be one of {', '.join(_OUTPUT_SCREENS)}, not {output_screen!r}")
    if not isinstance(recursion, int) or isinstance(recursion, bool) or not 0 <= recursion <= 64:
        raise ValueError(f"{where}: recursion must be a whole number of re-entries from 0 to 64, not {recursion!r}")
    if max_input_bytes is not None and (isinstance(max_input_bytes, bool) or not isinstance(max_input_bytes, int)
                                        or not 0 < max_input_bytes < 2**31):
        raise ValueError(f"{where}: max_input_bytes must be a whole number of bytes (1 up to 2 GiB), not "
                         f"{max_input_bytes!r}")
    if not (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)):
        raise TypeError(f"{where} must be 'async def' (or an async generator for streaming)")
    params = list(inspect.signature(fn).parameters.values())
    if len(params) not in (2, 3):
        raise TypeError(f"{where} must take (self, input) or (self, input, ctx)")
    hints = typing.get_type_hints(fn)
    in_name = params[1].name
    if in_name not in hints:
        raise TypeError(f"{where}: annotate the input parameter {in_name!r} (its type becomes the input schema)")
    if "return" not in hints:
        raise TypeError(f"{where}: annotate the return type (it becomes the output schema)")
    ret = hints["return"]
    item = _stream_item_type(ret)
    streaming = item is not None or inspect.isasyncgenfunction(fn)
    if streaming and not inspect.isasyncgenfunction(fn):
        raise TypeError(f"{where}: a streaming capability must be an async generator (use 'yield')")
    out_type = item if item is not None else ret
    cap_name = name or fn.__name__.replace("_", "-")
    in_schema = (dict(input_schema) if input_schema is not None
                 else _derived_schema(hints[in_name], f"{where}: the parameter {in_name!r}"))
    out_schema = (dict(output_schema) if output_schema is not None
                  else _derived_schema(out_type, f"{where}: the return type"))
    # Fail at import on a schema that cannot compile, an unknown $schema included.
    compile_schema(json.dumps(in_schema), where=f"{where} input")
    compile_schema(json.dumps(out_schema), where=f"{where} output")
    doc = inspect.getdoc(fn) or ""
    return CapabilitySpec(
        name=cap_name,
        method_name=fn.__name__,
        description=description if description is not None else doc.split("\n\n")[0],
        input_type=hints[in_name],
        output_type=out_type,
        input_schema=in_schema,
        output_schema=out_schema,
        streaming=streaming,
        idempotent=idempotent,
        tags=tags,
        wants_context=len(params) == 3,
        max_input_bytes=max_input_bytes,
        dedupe=dedupe,
        cache_shareable=cache_shareable,
        recursion=recursion,
        signed_payloads=signed_payloads,
        output_screen=output_screen,
    )


@overload
def capability(fn: F, /) -> F: ...


@overload
def capability(
    *,
    name: str | None = None,
    description: str | None = None,
    tags: tuple[str, ...] | list[str] = (),
    idempotent: bool = False,
    input_schema: Mapping[str, Any] | None = None,
    output_schema: Mapping[str, Any] | None = None,
    max_input_bytes: int | None = None,
    dedupe: bool = True,
    cache_shareable: bool = False,
    recursion: int = 0,
    signed_payloads: bool = False,
    output_screen: str = "off",
) -> Callable[[F], F]: ...


def capability(
    fn: F | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    tags: tuple[str, ...] | list[str] = (),
    idempotent: bool = False,
    input_schema: Mapping[str, Any] | None = None,
    output_schema: Mapping[str, Any] | None = None,
    max_input_bytes: int | None = None,
    dedupe: bool = True,
    cache_shareable: bool = False,
    recursion: int = 0,
    signed_payloads: bool = False,
    output_screen: str = "off",
) -> F | Callable[[F], F]:
    """Mark an async method as a mesh capability (bare `@capability` or `@capability(...)`).

    Args:
        name: capability name on the mesh; default the method name with '_' → '-'.
        description: for people and routers; default the docstring's first paragraph.
        tags: labels routers match on.
        idempotent: safe to run twice with the same input (enables failover and workflow re-runs).
        input_schema / output_schema: JSON Schemas overriding the ones derived from type hints.
        max_input_bytes: a tighter input size limit than the agent's default.
        dedupe: for a non-idempotent capability, let the SDK server deduplicate calls by idempotency key (join a
            running attempt, replay a finished one); False if the handler handles `ctx.idempotency_key` itself.
        cache_shareable: the answer does not depend on the caller, so a caller's degraded-mode answer cache may
            give one caller's cached answer to another (who must still be allowed to make the call). Default: a
            cached answer is only ever served to the caller it was given to.
        recursion: how many times one call chain may re-enter this agent through this capability (a capability
            that calls itself, directly or through others); 0 (default): a call back into the agent is refused
            with LOOP_DETECTED. The mesh's maximum call depth still applies.
        signed_payloads: callers sign each request and this agent signs each answer (detached JWS with the
            workload keys), each verified by the other side; the audit record keeps both digests.
        output_screen: secrets or personal data in an answer are refused, redacted or recorded ("off": none).
    Returns:
        The method itself, with its spec attached (the class collects it).
    """

    def mark(f: F) -> F:
        spec = _build_spec(
            f,
            name=name,
            description=description,
            tags=tuple(tags),
            idempotent=idempotent,
            input_schema=input_schema,
            output_schema=output_schema,
            max_input_bytes=max_input_bytes,
            dedupe=dedupe,
            cache_shareable=cache_shareable,
            recursion=recursion,
            signed_payloads=signed_payloads,
            output_screen=output_screen,
        )
        setattr(f, _ATTR, spec)
        return f

    return mark(fn) if fn is not None else mark


def _collect_capabilities(agent_class: type) -> dict[str, CapabilitySpec]:
    """The capabilities an agent class serves, by name. A method overridden in a subclass is one capability: the
    nearest class's `@capability` on it counts (an undecorated override keeps the parent's spec and serves it).

    Raises:
        TypeError: two methods with one capability name (one would silently go unserved), naming both.
    """
    by_method: dict[str, tuple[type, CapabilitySpec]] = {}
    for cls in reversed(agent_class.__mro__):
        for attr_name, attr in vars(cls).items():
            spec = getattr(attr, _ATTR, None)
            if isinstance(spec, CapabilitySpec):
                by_method[attr_name] = (cls, spec)
    specs: dict[str, CapabilitySpec] = {}
    owners: dict[str, str] = {}
    for attr_name, (cls, spec) in by_method.items():
        where = f"{cls.__qualname__}.{attr_name}"
        if spec.name in specs and specs[spec.name] is not spec:  # the same method under a second attribute is fine
            raise TypeError(
                f"agent class {agent_class.__qualname__}: the capability name {spec.name!r} is given to both "
                f"{owners[spec.name]} and {where}: give one of them another name with @capability(name=...) (to "
                "replace a parent's capability, override its method under the same method name)")
        specs.setdefault(spec.name, spec)
        owners.setdefault(spec.name, where)
    return specs


class Agent:
    """Base class of SDK agents. Subclasses set `name` (and optionally version, description, owner, labels)."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "0.1.0"
    description: ClassVar[str] = ""
    owner: ClassVar[str] = ""
    labels: ClassVar[Mapping[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _collect_capabilities(cls)  # two methods under one capability name: fail where the class is defined

    def __init__(self) -> None:
        if not self.name:
            raise TypeError(f"{type(self).__name__} must set a class attribute 'name'")
        specs = _collect_capabilities(type(self))
        if not specs:
            raise TypeError(f"agent {self.name!r} has no @capability methods")
        self.capabilities: dict[str, CapabilitySpec] = specs

    def card(self) -> agent_pb2.AgentCard:
        """The agent card published in the registry and returned by Describe."""
        # The class's own docstring only: inspect.getdoc would inherit one, so an agent without a docstring
        # advertised Agent's ("Base class of SDK agents ...") or its parent agent's.
        own = type(self).__doc__  # every class has its own __doc__ (None without a docstring)
        doc = self.description or (inspect.cleandoc(own) if own else "").split("\n\n")[0]
        return agent_pb2.AgentCard(
            name=self.name,
            version=self.version,
            description=doc,
            owner=self.owner,
            capabilities=[s.to_proto() for s in self.capabilities.values()],
            labels=dict(self.labels),
        )

    async def on_start(self) -> None:
        """Called once the agent is serving and registered; override to warm up."""

    async def on_stop(self) -> None:
        """Called before the agent stops serving; override to release resources."""

    def handler(self, capability_name: str) -> tuple[CapabilitySpec, Callable[..., Any]] | None:
        spec = self.capabilities.get(capability_name)
        if spec is None:
            return None
        return spec, getattr(self, spec.method_name)

    async def run_unary(self, spec: CapabilitySpec, value: Any, ctx: Context) -> Any:
        """Call a unary capability with decoded JSON; returns JSON-ready data."""
        fn: Callable[..., Awaitable[Any]] = getattr(self, spec.method_name)
        arg = from_json(spec.input_type, value)
        result = await (fn(arg, ctx) if spec.wants_context else fn(arg))
        return to_json(result)

    async def run_stream(self, spec: CapabilitySpec, value: Any, ctx: Context) -> AsyncGenerator[Any, None]:
        """Call a streaming capability with decoded JSON; yields JSON-ready items."""
        fn: Callable[..., AsyncIterator[Any]] = getattr(self, spec.method_name)
        arg = from_json(spec.input_type, value)
        items = fn(arg, ctx) if spec.wants_context else fn(arg)
        aclose = getattr(items, "aclose", None)
        try:
            async for item in items:
                yield to_json(item)
        finally:  # closing this generator closes the capability's at once, not when it is collected
            if aclose is not None:
                await aclose()

"""Tools for models: `@tool` functions and mesh capabilities, described in the OpenAI tool format, and the
bounded tool-calling loop (model → tool calls → results → model).

    @tool
    async def lookup_order(order_id: str) -> dict[str, Any]:
        "Find an order by its id."
        ...

    tools = [lookup_order, *mesh_tools(ctx, ["upper", "kb.search"])]
    run = await run_with_tools(llm_from_env(), "...", tools, ctx=ctx, max_rounds=4)
    run.text, run.calls, run.usage

A tool's parameters are a JSON Schema 2020-12 object: from the function's signature, or from the capability's
declared input schema (older drafts are rewritten, a non-object input is wrapped as `{"input": ...}`). A mesh
tool is called through the agent's `ctx`, so it is an ordinary onward mesh call: authorization, grants, rate
limits, token budgets, audit and tracing apply to each tool call, and the caller's deadline bounds it. Every
failure of a tool call (unknown tool, arguments that are not JSON or do not match, a refused or failed mesh
call, an exception in a function) goes back to the model as that call's result, `{"error": {...}}`, so the model
can recover and the agent never crashes on it; only the round bound and model errors end the loop.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from opentelemetry.trace import Status, StatusCode

from hivemesh.mesh import json_depth, tracing
from hivemesh.mesh.errors import HivemeshError, ToolRoundsExceededError
from hivemesh.mesh.schema import DEFAULT_DIALECT, CompiledSchema, SchemaMismatchError, compile_schema
from hivemesh.sdk.llm import ChatModel, Message, ToolCall, Usage
from hivemesh.sdk.schema import from_json, schema_for, to_json

if TYPE_CHECKING:
    from hivemesh.sdk.context import Context
    from hivemesh.v1.agent_pb2 import Capability

log = logging.getLogger(__name__)

TOOL_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""What the OpenAI tool format allows as a function name."""
MAX_RESULT_CHARS: Final = 16_000
"""A tool result longer than this is cut before it goes to the model (it would crowd out the conversation)."""
WRAPPED_INPUT: Final = "input"
"""The one property a non-object capability input is wrapped in, since tool parameters must be an object."""

Runner = Callable[[dict[str, Any], "Context | None"], Awaitable[Any]]


@dataclass(frozen=True)
class Tool:
    """A tool the model may call: its name, description and parameters (a JSON Schema 2020-12 object)."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    run: Runner = field(repr=False)
    """Called with the validated arguments and the agent's ctx (None outside a capability)."""
    capability: str = ""
    """The mesh capability this tool calls ("" for a function tool)."""
    _check: CompiledSchema | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not TOOL_NAME_RE.match(self.name):
            raise ValueError(f"tool name {self.name!r} must match {TOOL_NAME_RE.pattern} (the OpenAI tool format)")
        if self.parameters.get("type") != "object":
            raise ValueError(f"tool {self.name!r}: parameters must be a JSON Schema with type 'object'")
        check = compile_schema(json.dumps({"$schema": DEFAULT_DIALECT, **self.parameters}),
                               where=f"tool {self.name!r} parameters")
        object.__setattr__(self, "_check", check)

    def spec(self) -> dict[str, Any]:
        """The tool in the OpenAI tool format (`tools=[...]` of a chat completion request)."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": dict(self.parameters)}}

    def check(self, arguments: Any) -> None:
        """Raises SchemaMismatchError when the arguments do not match the parameters."""
        if self._check is not None:
            self._check.check(arguments, root="arguments")


# --- function tools ---------------------------------------------------------------------------------------


def _is_context(hint: Any) -> bool:
    return getattr(hint, "__name__", "") == "Context" or hint == "Context"


def function_parameters(fn: Callable[..., Any]) -> tuple[dict[str, Any], str | None, dict[str, Any]]:
    """The parameters schema of a function from its signature, the name of its ctx parameter if any, and the
    type hint of each parameter (arguments are built from JSON by them: a dataclass hint gets a dataclass).

    Raises:
        TypeError: for a parameter without a type hint or with no JSON form, or *args/**kwargs.
    """
    where = f"tool {getattr(fn, '__qualname__', fn)!r}"
    hints = typing.get_type_hints(fn)
    properties: dict[str, Any] = {}
    types: dict[str, Any] = {}
    required: list[str] = []
    ctx_name: str | None = None
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"{where}: *args and **kwargs cannot be described to a model")
        hint = hints.get(p.name)
        if p.name == "ctx" or _is_context(hint):
            ctx_name = p.name
            continue
        if hint is None:
            raise TypeError(f"{where}: annotate parameter {p.name!r} (its type becomes its JSON schema)")
        properties[p.name] = schema_for(hint)
        types[p.name] = hint
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
    schema = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return schema, ctx_name, types


def _function_tool(fn: Callable[..., Any], name: str | None, description: str | None) -> Tool:
    parameters, ctx_name, types = function_parameters(fn)
    is_async = inspect.iscoroutinefunction(fn)

    async def run(arguments: dict[str, Any], ctx: Context | None) -> Any:
        kwargs = {k: from_json(types[k], v) for k, v in arguments.items()}
        if ctx_name is not None:
            kwargs[ctx_name] = ctx
        result = await fn(**kwargs) if is_async else await asyncio.to_thread(fn, **kwargs)
        return to_json(result)

    doc = inspect.getdoc(fn) or ""
    return Tool(name=name or fn.__name__, description=description if description is not None else doc.split("\n\n")[0],
                parameters=parameters, run=run)


@typing.overload
def tool(fn: Callable[..., Any], /) -> Tool: ...


@typing.overload
def tool(*, name: str | None = None, description: str | None = None) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(fn: Callable[..., Any] | None = None, /, *, name: str | None = None,
         description: str | None = None) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Make a function (async, or sync and run in a thread) a tool; bare `@tool` or `@tool(name=...)`.

    The parameters come from the type hints (as for `@capability`); a parameter named `ctx` (or typed `Context`)
    is not shown to the model and receives the agent's ctx. The description defaults to the docstring's first
    paragraph. A bound method works too: `tool(self.lookup)`.
    """

    def make(f: Callable[..., Any]) -> Tool:
        return _function_tool(f, name, description)

    return make(fn) if fn is not None else make


# --- mesh capabilities as tools ----------------------------------------------------------------------------


def _to_2020_12(node: Any) -> Any:
    """A schema from an older draft read the 2020-12 way: `definitions` → `$defs` (and their `$ref`s), array
    `items` → `prefixItems` (with `additionalItems` → `items`), `$schema`/`$id` dropped."""
    if isinstance(node, list):
        return [_to_2020_12(v) for v in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("$schema", "$id", "id") and isinstance(value, str):
            continue
        if key == "definitions":
            out["$defs"] = _to_2020_12(value)
        elif key == "$ref" and isinstance(value, str):
            out["$ref"] = value.replace("#/definitions/", "#/$defs/")
        elif key == "items" and isinstance(value, list):
            out["prefixItems"] = _to_2020_12(value)
        elif key == "additionalItems" and isinstance(node.get("items"), list):
            out["items"] = _to_2020_12(value)
        elif key in ("properties", "$defs", "patternProperties") and isinstance(value, dict):
            out[key] = {k: _to_2020_12(v) for k, v in value.items()}  # keys here are names, not keywords
        else:
            out[key] = _to_2020_12(value)
    return out


def tool_parameters(input_schema: Mapping[str, Any] | str | None) -> tuple[dict[str, Any], bool]:
    """A capability's input schema as tool parameters: (schema, wrapped). Wrapped: the input is not an object,
    so the parameters are `{"input": <schema>}` and the tool passes `arguments["input"]` to the capability."""
    try:
        if isinstance(input_schema, str):  # a card's text, from any agent in the registry
            input_schema = json_depth.loads(input_schema) if input_schema.strip() else None
        schema: dict[str, Any] = _to_2020_12(dict(input_schema or {}))
    except RecursionError:
        raise ValueError("the input schema is nested too deeply to offer as tool parameters") from None
    if not schema:
        return {"type": "object"}, False  # any JSON: an object is what a model can give
    if schema.get("type") == "object":
        return schema, False
    return {"type": "object", "properties": {WRAPPED_INPUT: schema}, "required": [WRAPPED_INPUT],
            "additionalProperties": False}, True


def tool_name_for(capability: str) -> str:
    """A capability name as a tool name: the OpenAI format has no '.', so it becomes '_'."""
    return capability.replace(".", "_")[:64]


def mesh_tool(capability: str, *, description: str = "", input_schema: Mapping[str, Any] | str | None = None,
              name: str | None = None, on_behalf: bool = False) -> Tool:
    """A mesh capability as a tool: each call is `ctx.call_capability(capability, ...)` (so authz, grants, rate
    limits, budgets, audit and tracing apply, and the caller's deadline bounds it). on_behalf: delegate as the
    call's principal (see `Context.call_capability`)."""
    parameters, wrapped = tool_parameters(input_schema)

    async def run(arguments: dict[str, Any], ctx: Context | None) -> Any:
        if ctx is None:
            raise RuntimeError(f"the mesh tool {capability!r} needs the capability's ctx: run_with_tools(ctx=ctx)")
        payload = arguments.get(WRAPPED_INPUT) if wrapped else arguments
        return await ctx.call_capability(capability, payload, on_behalf=on_behalf)

    return Tool(name=name or tool_name_for(capability), description=description or f"Call {capability} on the mesh",
                parameters=parameters, run=run, capability=capability)


def mesh_tool_from_capability(declared: Capability, *, on_behalf: bool = False) -> Tool:
    """A tool from a capability as the registry declares it (its description and input schema)."""
    return mesh_tool(declared.name, description=declared.description, input_schema=declared.input_schema,
                     on_behalf=on_behalf)


def mesh_tools(ctx: Context, capabilities: Sequence[str], *, on_behalf: bool = False) -> list[Tool]:
    """Tools for the named capabilities, described from the live registry.

    Raises:
        UnknownCapabilityError: for a name no live agent serves now.
    """
    from hivemesh.mesh.errors import UnknownCapabilityError

    if ctx.mesh is None:
        raise RuntimeError("this agent is not connected to a mesh: serve it with hivemesh.sdk.serve()")
    declared = {info.capability.name: info.capability for info in ctx.mesh.capability_infos()}
    missing = [c for c in capabilities if c not in declared]
    if missing:
        raise UnknownCapabilityError(f"no live agent serves {', '.join(missing)}: cannot offer it as a tool")
    return [mesh_tool_from_capability(declared[c], on_behalf=on_behalf) for c in capabilities]


# --- the loop ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCallRecord:
    """One tool call the loop ran: what the model asked, whether it worked, and what went back to the model."""

    round: int
    name: str
    arguments: str
    ok: bool
    result: str


@dataclass
class ToolRun:
    """What `run_with_tools` ended with: the model's final text, every tool call, and the tokens spent."""

    text: str
    rounds: int
    calls: list[ToolCallRecord]
    usage: Usage
    messages: list[Message]


def _error(kind: str, message: str, **more: str) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message, **more}}


def _encode(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= MAX_RESULT_CHARS else text[:MAX_RESULT_CHARS] + "…(cut)"


async def _run_call(call: ToolCall, tools: Mapping[str, Tool], ctx: Context | None) -> tuple[bool, str]:
    """Run one call in a span of its own (a mesh tool's call is its child); a failure is an error span."""
    found = tools.get(call.name)
    attrs = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": call.name,
             "gen_ai.tool.call.id": call.id, "hivemesh.capability": found.capability if found else ""}
    with tracing.span(f"execute_tool {call.name}", attributes=attrs) as span:
        ok, content = await _run_call_inner(call, found, tools, ctx)
        if span is not None and not ok:
            span.set_status(Status(StatusCode.ERROR, content[:256]))
        return ok, content


async def _run_call_inner(call: ToolCall, found: Tool | None, tools: Mapping[str, Tool],
                          ctx: Context | None) -> tuple[bool, str]:
    """Run one call; any failure becomes an error result for the model (cancellation still propagates)."""
    if found is None:
        return False, _encode(_error("UnknownTool", f"there is no tool {call.name!r}", tools=", ".join(tools)))
    try:
        arguments = json_depth.loads(call.arguments or "{}")
    except (ValueError, RecursionError) as exc:
        return False, _encode(_error("InvalidArguments", f"the arguments are not JSON: {exc}"))
    if not isinstance(arguments, dict):
        return False, _encode(_error("InvalidArguments", "the arguments must be a JSON object"))
    try:
        found.check(arguments)
    except SchemaMismatchError as exc:
        return False, _encode(_error("InvalidArguments", str(exc)))
    try:
        result = await found.run(arguments, ctx)
    except HivemeshError as exc:
        return False, _encode(_error(type(exc).__name__, exc.message, code=exc.code.name, reason=exc.reason))
    except Exception as exc:  # noqa: BLE001 - a tool's failure is the model's to handle, not the agent's crash
        log.warning("tool %s failed: %s", call.name, type(exc).__name__)
        return False, _encode(_error(type(exc).__name__, _text(exc)))
    try:
        return True, _encode(result)
    except (ValueError, RecursionError) as exc:  # a cycle, an int past 4,300 digits: the tool's bad result
        return False, _encode(_error("InvalidResult", f"the tool's result cannot be written as JSON: {_text(exc)}"))


def _text(exc: BaseException) -> str:
    """str(exc), or its type's name when it has none or even that raises."""
    try:
        return str(exc) or type(exc).__name__
    except Exception:  # noqa: BLE001 - any failure to print it
        return f"<an unprintable {type(exc).__name__}>"


async def run_with_tools(
    model: ChatModel,
    prompt: str | Sequence[Message],
    tools: Sequence[Tool],
    *,
    ctx: Context | None = None,
    system: str = "",
    task: str = "",
    max_rounds: int = 4,
    max_tokens: int = 512,
) -> ToolRun:
    """Ask the model, run the tool calls it makes (each round's calls concurrently), give it the results, and
    repeat until it answers without tool calls.

    Args:
        prompt: the user's message, or a whole conversation (OpenAI-format messages).
        ctx: the capability's context: mesh tools call through it; function tools that take `ctx` get it.
        max_rounds: the most rounds of tool calls; the model's next answer must then be final.

    Raises:
        ToolRoundsExceededError: the model asked for tools again after max_rounds rounds.
        ValueError: for two tools with one name, or max_rounds < 1.
        HivemeshError: a model error (unreachable, timed out, refused).
    """
    if max_rounds < 1:
        raise ValueError("max_rounds must be at least 1")
    by_name: dict[str, Tool] = {}
    for t in tools:
        if t.name in by_name:
            raise ValueError(f"two tools are named {t.name!r}")
        by_name[t.name] = t
    specs = [t.spec() for t in tools]
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    records: list[ToolCallRecord] = []
    usage = Usage()
    rounds = 0
    while True:
        with tracing.span(f"chat {model.model}", attributes={"gen_ai.operation.name": "chat"}) as span:
            turn = await model.chat(messages, tools=specs, task=task, max_tokens=max_tokens)
            if span is not None:
                span.set_attributes(tracing.usage_attributes(turn.usage.input_tokens, turn.usage.output_tokens,
                                                             turn.usage.model))
        usage = usage + turn.usage
        if not turn.tool_calls:
            return ToolRun(turn.text, rounds, records, usage, messages)
        if rounds >= max_rounds:
            asked = ", ".join(c.name for c in turn.tool_calls)
            raise ToolRoundsExceededError(f"the model still asked for tools ({asked}) after {max_rounds} rounds",
                                          metadata={"max_rounds": str(max_rounds)})
        rounds += 1
        messages.append(turn.to_message())
        results = await asyncio.gather(*(_run_call(c, by_name, ctx) for c in turn.tool_calls))
        for call, (ok, content) in zip(turn.tool_calls, results, strict=True):
            records.append(ToolCallRecord(rounds, call.name, call.arguments, ok, content))
            messages.append({"role": "tool", "tool_call_id": call.id, "content": content})


__all__ = [
    "MAX_RESULT_CHARS",
    "Tool",
    "ToolCallRecord",
    "ToolRoundsExceededError",
    "ToolRun",
    "function_parameters",
    "mesh_tool",
    "mesh_tool_from_capability",
    "mesh_tools",
    "run_with_tools",
    "tool",
    "tool_name_for",
    "tool_parameters",
]

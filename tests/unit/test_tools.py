"""Tools without a network: schemas from signatures and capability inputs (OpenAI format, JSON Schema 2020-12),
the offline model's deterministic tool calls, and the loop (errors as results, the round bound)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import grpc
import pytest

from hivemesh.mesh.errors import AgentError, PermissionDeniedError, from_status_parts, to_status
from hivemesh.mesh.schema import compile_schema
from hivemesh.sdk.llm import ChatTurn, Message, RuleBasedLLM, TieredLLM, ToolCall, Usage, UsageMeter, metering
from hivemesh.sdk.tools import (
    Tool,
    ToolRoundsExceededError,
    mesh_tool,
    run_with_tools,
    tool,
    tool_name_for,
    tool_parameters,
)


@dataclass
class Address:
    city: str
    zip: str | None = None


@tool
async def ship(order_id: str, address: Address, speed: Literal["slow", "fast"] = "slow") -> dict[str, Any]:
    """Ship an order.

    More detail the model does not need."""
    assert isinstance(address, Address)  # built from the JSON arguments, as a capability's input is
    return {"order": order_id, "city": address.city, "speed": speed}


@tool
def explode_never(reason: str) -> str:
    """Offered, never named in a prompt."""
    raise AssertionError(reason)


def test_a_function_signature_becomes_openai_tool_parameters() -> None:
    spec = ship.spec()
    assert spec["type"] == "function" and spec["function"]["name"] == "ship"
    assert spec["function"]["description"] == "Ship an order."
    params = spec["function"]["parameters"]
    assert params["type"] == "object" and params["additionalProperties"] is False
    assert params["required"] == ["order_id", "address"]
    assert params["properties"]["speed"] == {"enum": ["slow", "fast"]}
    assert params["properties"]["address"]["required"] == ["city"]
    assert compile_schema(json.dumps(params), where="t").dialect == "2020-12"  # type: ignore[union-attr]

    def lookup(ctx: Any, query: str, limit: int = 3) -> list[str]:
        return [query] * limit

    t = tool(name="kb_lookup", description="Search")(lookup)
    assert t.name == "kb_lookup" and list(t.parameters["properties"]) == ["query", "limit"]  # ctx is hidden
    with pytest.raises(TypeError, match="annotate parameter 'x'"):
        tool(lambda x: x)
    with pytest.raises(TypeError, match=r"\*args"):
        tool(lambda *a: a)
    with pytest.raises(ValueError, match="OpenAI tool format"):
        tool(name="has space")(lookup)


def test_capability_input_schemas_become_2020_12_object_parameters() -> None:
    draft7 = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "definitions": {"pair": {"type": "array", "items": [{"type": "string"}, {"type": "number"}],
                                 "additionalItems": False}},
        "properties": {"pairs": {"type": "array", "items": {"$ref": "#/definitions/pair"}},
                       "definitions": {"type": "string"}},  # a property named like a keyword stays a property
        "required": ["pairs"],
    }
    params, wrapped = tool_parameters(json.dumps(draft7))
    assert not wrapped and "$schema" not in params and "definitions" not in params
    assert params["$defs"]["pair"] == {"type": "array", "prefixItems": [{"type": "string"}, {"type": "number"}],
                                       "items": False}
    assert params["properties"]["pairs"]["items"] == {"$ref": "#/$defs/pair"}
    assert params["properties"]["definitions"] == {"type": "string"}
    checked = compile_schema(json.dumps(params), where="t")
    assert checked is not None
    checked.check({"pairs": [["a", 1]]})
    with pytest.raises(ValueError):
        checked.check({"pairs": [["a", 1, "extra"]]})  # additionalItems: false survived as items: false

    params, wrapped = tool_parameters({"type": "string", "maxLength": 5})
    assert wrapped and params == {"type": "object", "properties": {"input": {"type": "string", "maxLength": 5}},
                                  "required": ["input"], "additionalProperties": False}
    assert tool_parameters("") == ({"type": "object"}, False)
    assert tool_name_for("kb.search") == "kb_search"
    t = mesh_tool("kb.search", description="Search the KB", input_schema={"type": "string"})
    assert t.spec()["function"]["name"] == "kb_search" and t.capability == "kb.search"


async def test_the_offline_model_calls_the_tools_the_prompt_names_then_answers_with_results() -> None:
    llm = RuleBasedLLM()
    specs = [ship.spec(), mesh_tool("upper", input_schema={"type": "object"}).spec()]
    ask: list[Message] = [{"role": "user", "content": 'Please upper({"text": "hi"}) then ship it. Not shipping.'}]
    turn = await llm.chat(ask, tools=specs)
    assert turn.text == "" and [(c.name, c.arguments) for c in turn.tool_calls] == [
        ("upper", '{"text": "hi"}'), ("ship", "{}")]
    assert turn == await llm.chat(ask, tools=specs)  # deterministic
    done = await llm.chat([*ask, turn.to_message(),
                           {"role": "tool", "tool_call_id": "call_0", "content": '{"text": "HI"}'},
                           {"role": "tool", "tool_call_id": "call_1", "content": "shipped"}], tools=specs)
    assert done.tool_calls == () and done.text == 'upper: {"text": "HI"}\nship: shipped'
    plain = await llm.chat([{"role": "user", "content": "No tools here. Really."}], tools=specs)
    assert plain.tool_calls == () and plain.text == "No tools here."
    tiered = TieredLLM(RuleBasedLLM(model="small"), RuleBasedLLM(model="large"), max_simple_tokens=3)
    assert (await tiered.chat([{"role": "user", "content": "ship it"}], tools=specs)).usage.model == "small"
    run = await run_with_tools(tiered, "ship it now, please, quickly", [ship, explode_never])
    assert run.usage.model == "large" and run.calls[0].name == "ship"  # every turn stays on the picked model


async def test_the_loop_runs_tools_and_returns_every_failure_to_the_model_as_a_result() -> None:
    @tool
    async def explode(reason: str = "boom") -> str:
        """Always fails."""
        raise ValueError(f"it went {reason}")

    @tool
    def refuse() -> str:
        raise PermissionDeniedError("not for you")

    meter = UsageMeter()
    prompt = ('ship({"order_id": "o-1", "address": {"city": "Oslo"}}) explode({"reason": "bang"}) refuse '
              'upper({"text": "x"})')
    with metering(meter):
        run = await run_with_tools(RuleBasedLLM(), prompt, [ship, explode, refuse, mesh_tool("upper")])
    assert run.rounds == 1 and [c.name for c in run.calls] == ["ship", "explode", "refuse", "upper"]
    by = {c.name: c for c in run.calls}
    assert by["ship"].ok and json.loads(by["ship"].result) == {"order": "o-1", "city": "Oslo", "speed": "slow"}
    assert not by["explode"].ok
    assert json.loads(by["explode"].result) == {"error": {"type": "ValueError", "message": "it went bang"}}
    assert json.loads(by["refuse"].result)["error"]["code"] == "PERMISSION_DENIED"
    assert "needs the capability's ctx" in json.loads(by["upper"].result)["error"]["message"]
    assert run.text.splitlines()[1] == 'explode: {"error": {"type": "ValueError", "message": "it went bang"}}'
    assert meter.calls == 2 and meter.usage == run.usage  # both model turns are metered

    bad = await run_with_tools(RuleBasedLLM(), 'ship({"order_id": 5})', [ship])
    assert not bad.calls[0].ok and "InvalidArguments" in bad.calls[0].result  # schema-checked before running


async def test_a_tool_result_that_is_not_json_or_an_unprintable_error_goes_back_to_the_model() -> None:
    """A cyclic result, an int past 4,300 digits, or an exception whose str() raises ended the whole capability
    (ValueError, RuntimeError) where every other tool failure goes back to the model as an error result."""

    @tool
    async def cyclic() -> dict[str, Any]:
        """Returns a dict that holds itself."""
        d: dict[str, Any] = {}
        d["self"] = d
        return d

    @tool
    async def huge() -> int:
        """Returns an int no JSON writer takes."""
        return 10**5000

    class UnprintableError(RuntimeError):
        def __str__(self) -> str:
            raise RuntimeError("str() fails")

    @tool
    async def unprintable() -> str:
        """Raises an exception that cannot be printed."""
        raise UnprintableError()

    run = await run_with_tools(RuleBasedLLM(), "cyclic huge unprintable", [cyclic, huge, unprintable])
    by = {c.name: c for c in run.calls}
    assert set(by) == {"cyclic", "huge", "unprintable"} and not any(c.ok for c in run.calls)
    assert json.loads(by["cyclic"].result)["error"]["type"] == "InvalidResult"
    assert json.loads(by["huge"].result)["error"]["type"] == "InvalidResult"
    assert json.loads(by["unprintable"].result)["error"] == {
        "type": "UnprintableError", "message": "<an unprintable UnprintableError>"}


class _Insistent:
    """A model that always asks for one more tool call, or a tool that does not exist."""

    model = "insistent"

    def __init__(self, name: str) -> None:
        self.name, self.turns = name, 0

    async def chat(self, messages: Sequence[Message], *, tools: Sequence[Mapping[str, Any]] = (), task: str = "",
                   max_tokens: int = 512) -> ChatTurn:
        self.turns += 1
        if self.name == "nope" and any(m.get("role") == "tool" for m in messages):
            return ChatTurn("gave up", (), Usage(1, 1, self.model))
        return ChatTurn("", (ToolCall(f"c{self.turns}", self.name, "not json" if self.turns == 2 else "{}"),),
                        Usage(1, 1, self.model))


async def test_the_round_bound_ends_a_model_that_never_stops_asking() -> None:
    calls: list[int] = []

    async def count(arguments: dict[str, Any], ctx: Any) -> int:
        calls.append(1)
        return len(calls)

    counter = Tool("count", "Count", {"type": "object"}, count)
    model = _Insistent("count")
    with pytest.raises(ToolRoundsExceededError, match="after 3 rounds") as exc:
        await run_with_tools(model, "go", [counter], max_rounds=3)
    assert exc.value.reason == "TOOL_ROUNDS_EXCEEDED" and model.turns == 4 and len(calls) == 2  # turn 2: bad JSON
    # It is in the mesh's error table: the status a caller decodes is the same type, code and metadata.
    status = to_status(exc.value)
    back = from_status_parts(status.code, status.details, status.trailing_metadata)
    assert type(back) is ToolRoundsExceededError and back.code == grpc.StatusCode.INTERNAL
    assert back.metadata == {"max_rounds": "3"} and isinstance(back, AgentError)
    unknown = await run_with_tools(_Insistent("nope"), "go", [counter])
    assert unknown.text == "gave up" and "UnknownTool" in unknown.calls[0].result
    with pytest.raises(ValueError, match="two tools"):
        await run_with_tools(RuleBasedLLM(), "x", [counter, counter])

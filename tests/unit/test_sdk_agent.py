"""The SDK's authoring surface: @capability reads hints, derives schemas, and fails early on mistakes."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Optional, TypedDict

import fastjsonschema
import pytest

from hivemesh.sdk import Agent, capability
from hivemesh.sdk.schema import from_json, schema_for


@dataclass
class Item:
    name: str
    qty: int = 1


class Order(TypedDict):
    items: list[Item]
    kind: Literal["a", "b"]
    note: str | None


class Shop(Agent):
    """Sells things."""

    name = "shop"

    @capability(tags=["retail"], idempotent=True)
    async def price_order(self, order: Order) -> float:
        """Price an order.

        Long description that is not the summary."""
        return 1.0

    @capability
    async def feed(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i


def test_card_lists_capabilities_with_derived_schemas() -> None:
    card = Shop().card()
    assert card.name == "shop" and card.description == "Sells things."
    caps = {c.name: c for c in card.capabilities}
    assert set(caps) == {"price-order", "feed"}
    price = caps["price-order"]
    assert price.idempotent and list(price.tags) == ["retail"] and price.description == "Price an order."
    validate = fastjsonschema.compile(json.loads(price.input_schema))
    validate({"items": [{"name": "x"}], "kind": "a", "note": None})
    with pytest.raises(fastjsonschema.JsonSchemaValueException):
        validate({"items": [{"qty": 2}], "kind": "a", "note": None})
    with pytest.raises(fastjsonschema.JsonSchemaValueException):
        validate({"items": [], "kind": "c", "note": None})
    assert caps["feed"].streaming and json.loads(caps["feed"].output_schema) == {"type": "integer"}


def test_from_json_builds_nested_dataclasses() -> None:
    assert from_json(list[Item], [{"name": "a", "qty": 2}]) == [Item("a", 2)]


def test_missing_hints_fail_at_definition_time() -> None:
    with pytest.raises(TypeError, match="annotate the input"):

        @capability
        async def nohint(self, x) -> int:  # type: ignore[no-untyped-def]
            return 1

    with pytest.raises(TypeError, match="annotate the return"):

        @capability
        async def noret(self, x: int):  # type: ignore[no-untyped-def]
            return 1


def test_sync_functions_and_unsupported_types_are_refused() -> None:
    with pytest.raises(TypeError, match="async def"):

        @capability
        def sync(self, x: int) -> int:  # type: ignore[no-untyped-def]
            return x

    with pytest.raises(TypeError, match="no JSON schema"):
        schema_for(complex)


def test_an_agent_needs_a_name_and_a_capability() -> None:
    class Nameless(Agent):
        @capability
        async def x(self, a: int) -> int:
            return a

    with pytest.raises(TypeError, match="name"):
        Nameless()

    class Empty(Agent):
        name = "empty"

    with pytest.raises(TypeError, match="no @capability"):
        Empty()


# --- the hints the schema and the decoding handle alike (review of 5 Dec) ------------------------------------------
@dataclass
class Inner:
    x: int


@dataclass
class Counted:
    n: int
    seen: int = dataclasses.field(default=0, init=False)  # not an input: passing it raised TypeError


def _valid(tp: object, value: object) -> bool:
    from hivemesh.mesh.schema import SchemaMismatchError, compile_schema

    compiled = compile_schema(json.dumps(schema_for(tp)), where="test")
    assert compiled is not None
    try:
        compiled.check(value)
    except SchemaMismatchError:
        return False
    return True


def test_abstract_containers_and_fixed_tuples_have_schemas_that_take_their_values() -> None:
    """Sequence and Mapping hints (get_origin gives the collections.abc classes) had no schema: the agent failed
    at import; tuple[int, str] took its first type for every item, so ([1, "a"]) was refused."""
    assert _valid(Sequence[int], [1, 2]) and not _valid(Sequence[int], ["a"])
    assert _valid(Mapping[str, int], {"a": 1}) and not _valid(Mapping[str, int], {"a": "b"})
    assert _valid(tuple[int, str], [1, "a"]) and not _valid(tuple[int, str], [1, "a", 2])
    assert _valid(tuple[int, ...], [1, 2, 3])
    assert "seen" not in schema_for(Counted)["properties"]


def test_decoding_builds_dataclasses_wherever_the_hint_puts_them() -> None:
    """Optional[Inner], dict[str, Inner] and tuple[Inner, ...] arrived as dicts (AttributeError in the handler)."""
    assert from_json(Optional[Inner], {"x": 1}) == Inner(1) and from_json(Optional[Inner], None) is None  # noqa: UP045
    assert from_json(Inner | None, {"x": 2}) == Inner(2)
    assert from_json(dict[str, Inner], {"a": {"x": 3}}) == {"a": Inner(3)}
    assert from_json(tuple[Inner, ...], [{"x": 4}]) == (Inner(4),)
    assert from_json(Counted, {"n": 5}) == Counted(5)


def test_results_are_made_json_wherever_a_dataclass_or_set_sits() -> None:
    """A list of dataclasses, or a set, was sent to the encoder as is: 'not JSON serializable'."""
    from hivemesh.sdk.schema import to_json

    assert json.dumps(to_json([Inner(1), {"y": (Inner(2),)}, {3}])) == '[{"x": 1}, {"y": [{"x": 2}]}, [3]]'
    plain = {"text": "x", "n": 1}
    assert to_json(plain) is plain  # nothing to change: returned as it is (the hot path)
    assert to_json({"n": [1, 2]}) == {"n": [1, 2]}


class Node(TypedDict):
    name: str
    children: list[Node]


def test_a_recursive_type_is_a_clear_type_error_not_a_recursion_error() -> None:
    """It raised RecursionError from deep inside the schema builder, stopping the agent at import unexplained."""
    with pytest.raises(TypeError, match="recursive type"):
        schema_for(Node)

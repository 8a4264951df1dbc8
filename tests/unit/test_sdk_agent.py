"""The SDK's authoring surface: @capability reads hints, derives schemas, and fails early on mistakes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, TypedDict

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

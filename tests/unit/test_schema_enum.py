"""Enum and set hints on capabilities (`hivemesh.sdk.schema`): an Enum parameter failed at import ("no JSON schema
for type <enum 'Color'>"), a Literal of Enum members was refused, an Enum in a result was not JSON, and set[X] was
handed to the handler as a list (set[str] untouched, set[int] a new list) under a schema that let duplicates in."""

from __future__ import annotations

import enum
import json
from collections.abc import AsyncIterator, Set
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional, TypedDict

import grpc
import pytest

from hivemesh.mesh.errors import InvalidInputError
from hivemesh.mesh.schema import compile_schema
from hivemesh.sdk import Agent, capability
from hivemesh.sdk.schema import from_json, schema_for, to_json
from tests.support.orch_env import Orch
from tests.support.schema_hints import assert_refused_at_definition


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Size(enum.StrEnum):
    SMALL = "s"
    LARGE = "l"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Mixed(enum.Enum):
    ONE = 1
    HALF = 0.5
    WORD = "w"
    NOTHING = None


@dataclass(frozen=True)
class Point:
    x: int
    y: int


class Tagged(TypedDict):
    color: Color
    levels: set[Level]


@dataclass
class Order:
    color: Color
    size: Size
    level: Level
    pick: Literal[Color.RED, Color.BLUE]
    tags: set[str]
    colors: frozenset[Color]
    points: set[Point]
    tagged: Tagged
    pair: tuple[Color, int]
    by_name: dict[str, Level]
    history: list[Optional[Color]]  # noqa: UP045 - the typing spelling, on purpose
    either: Color | int
    maybe: Level | None = None
    also: list[Size] = field(default_factory=list)


ORDER = {
    "color": "red", "size": "l", "level": 2.0, "pick": "blue", "tags": ["b", "a"], "colors": ["blue"],
    "points": [{"x": 1, "y": 2.0}, {"x": 0, "y": 0}], "tagged": {"color": "blue", "levels": [1, 2]},
    "pair": ["blue", 3.0], "by_name": {"a": 1}, "history": ["red", None], "either": "red", "maybe": 1,
    "also": ["s"],
}
DECODED = Order(
    color=Color.RED, size=Size.LARGE, level=Level.HIGH, pick=Color.BLUE, tags={"a", "b"},
    colors=frozenset({Color.BLUE}), points={Point(1, 2), Point(0, 0)},
    tagged={"color": Color.BLUE, "levels": {Level.LOW, Level.HIGH}},
    pair=(Color.BLUE, 3), by_name={"a": Level.LOW}, history=[Color.RED, None], either=Color.RED, maybe=Level.LOW,
    also=[Size.SMALL],
)


def _types(value: Any) -> Any:
    """The value with each leaf its type's name, so a test sees that an Enum arrived as a member, a set as a set."""
    if isinstance(value, Order):
        return {k: _types(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [type(value).__name__, *(_types(v) for v in value)]
    if isinstance(value, (set, frozenset)):
        return [type(value).__name__, *sorted(type(v).__name__ for v in value)]
    return type(value).__name__


def test_enum_literal_and_set_hints_have_json_schemas() -> None:
    """Each Enum gives its values (and a "type" when they share one), a Literal of members its members' values, a set
    an array of unique items; each compiles, and admits what it says."""
    assert schema_for(Color) == {"type": "string", "enum": ["red", "blue"]}
    assert schema_for(Size) == {"type": "string", "enum": ["s", "l"]}
    assert schema_for(Level) == {"type": "integer", "enum": [1, 2]}
    assert schema_for(Mixed) == {"enum": [1, 0.5, "w", None]}
    assert schema_for(Annotated[Level, "why"]) == schema_for(Level)
    assert schema_for(Literal[Color.RED, Level.HIGH, "x"]) == {"enum": ["red", 2, "x"]}
    assert schema_for(set[int]) == {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    assert schema_for(frozenset[Color]) == {"type": "array", "items": schema_for(Color), "uniqueItems": True}
    assert schema_for(Set[str])["uniqueItems"] is True
    assert schema_for(list[int]) == {"type": "array", "items": {"type": "integer"}}  # a list may repeat
    check = compile_schema(json.dumps(schema_for(Order)), where="test")
    assert check is not None
    check.check(ORDER)
    for field_name, bad in (("color", "green"), ("level", 3), ("level", True), ("pick", "RED"), ("tags", ["a", "a"]),
                            ("points", [{"x": 1, "y": 1}, {"x": 1.0, "y": 1}])):
        with pytest.raises(ValueError, match=rf"input\.{field_name}"):
            check.check({**ORDER, field_name: bad})


def test_enum_and_set_inputs_decode_to_members_and_sets_wherever_they_nest() -> None:
    """Members (a whole float to an int-valued one) and sets in dataclass fields, TypedDicts, tuples, dicts, lists,
    Optional and unions; an Enum beside int in a union keeps the int arm's 1.0 rule."""
    decoded = from_json(Order, ORDER)
    assert decoded == DECODED
    assert _types(decoded) == _types(DECODED)
    assert type(decoded.level) is Level and type(decoded.tags) is set and type(decoded.colors) is frozenset
    assert from_json(Level, 2.0) is Level.HIGH and from_json(Mixed, None) is Mixed.NOTHING
    assert from_json(Mixed, 1.0) is Mixed.ONE and from_json(Mixed, 0.5) is Mixed.HALF
    assert from_json(Literal[Color.RED, 1], "red") is Color.RED and repr(from_json(Literal[Color.RED, 1], 1.0)) == "1"
    assert from_json(Optional[Color], None) is None and from_json(Optional[Color], "blue") is Color.BLUE  # noqa: UP045
    assert repr(from_json(Level | float, 2.0)) == "2.0"  # an exact fit first, as int | float keeps 1.0 a float
    assert from_json(Level | str, 2.0) is Level.HIGH
    assert from_json(Set[int], [1, 2.0]) == frozenset({1, 2})
    assert from_json(set[str], ["a"]) == {"a"} and type(from_json(set[str], ["a"])) is set


def test_a_set_whose_json_items_are_one_python_value_is_invalid_input() -> None:
    """true and 1 are distinct in JSON (uniqueItems lets them through) but one in a Python set: kept, one of the
    caller's values was dropped without a word. An item no set can hold (a list under set[Any]) is refused too."""
    for hint, value in ((set[int | bool], [1, True]), (list[set[Any]], [[1, 1.0]]), (set[Any], [[1]]),
                        (Optional[frozenset[Any]], [{"a": 1}])):  # noqa: UP045
        with pytest.raises(InvalidInputError) as refused:
            from_json(hint, value)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and "set" in refused.value.message
    assert from_json(set[Any] | list[Any], [[1]]) == [[1]]  # a union's next arm takes what its set arm cannot


def test_results_encode_enums_as_values_and_sets_as_sorted_lists() -> None:
    result = {"c": Color.RED, "s": {3, 1, 2}, "e": frozenset({Color.BLUE, Color.RED}), "l": [Size.SMALL, Level.HIGH],
              "t": (Mixed.NOTHING,), "d": DECODED, "mixed": {1, "a"}}
    encoded = to_json(result)
    assert json.loads(json.dumps(encoded)) == encoded
    assert encoded["c"] == "red" and encoded["s"] == [1, 2, 3] and encoded["e"] == ["blue", "red"]
    assert encoded["l"] == ["s", 2] and type(encoded["l"][0]) is str and type(encoded["l"][1]) is int
    assert encoded["t"] == [None] and sorted(encoded["mixed"], key=str) == [1, "a"]
    assert encoded["d"]["points"] == [{"x": 0, "y": 0}, {"x": 1, "y": 2}] or encoded["d"]["points"] == [
        {"x": 1, "y": 2}, {"x": 0, "y": 0}]  # dicts have no order: as the set iterates them
    check = compile_schema(json.dumps(schema_for(Order)), where="test")
    assert check is not None
    check.check(encoded["d"])  # what an Order result encodes to is what its output schema admits
    assert to_json(Color.BLUE) == "blue" and to_json({Size.LARGE, Size.SMALL}) == ["l", "s"]


def test_hints_with_no_json_form_fail_at_import_naming_the_capability_and_what() -> None:
    class Shape(enum.Enum):
        POINT = (0, 0)

    class Perm(enum.Flag):
        READ = 1
        WRITE = 2

    class Nothing(enum.Enum):
        pass

    @dataclass
    class Mutable:
        x: int

    cases: list[tuple[Any, tuple[str, ...]]] = [
        (Shape, ("Shape", "POINT", "(0, 0)", "tuple")),
        (list[Optional[Shape]], ("Shape", "POINT")),  # noqa: UP045
        (Literal[Shape.POINT], ("Shape.POINT", "(0, 0)")),
        (Perm, ("Perm", "Flag")),
        (Nothing, ("Nothing", "no members")),
        (set[Mutable], ("hashable", "Mutable", "frozen=True")),
        (frozenset[dict[str, int]], ("hashable", "dict[str, int]")),
        (set[int | list[int]], ("hashable", "list[int]")),
    ]
    for hint, words in cases:
        assert_refused_at_definition(hint, words)


class Paint(Agent):
    """Echoes what it was sent, with the Python type of each part, so the caller sees members and sets."""

    name = "paint"

    @capability(idempotent=True)
    async def order(self, req: Order) -> Order:
        assert _types(req) == _types(DECODED), _types(req)
        return req

    @capability(idempotent=True)
    async def shade(self, color: Color) -> Literal[Color.RED, Color.BLUE]:
        assert type(color) is Color
        return Color.BLUE if color is Color.RED else Color.RED

    @capability(idempotent=True)
    async def unique(self, tags: set[int | bool]) -> set[int | bool]:
        assert type(tags) is set
        return tags

    @capability
    async def levels(self, upto: Level) -> AsyncIterator[dict[str, Level | set[Size]]]:
        for level in Level:
            if level <= upto:
                yield {"level": level, "sizes": set(Size)}


async def test_enum_and_set_hints_work_through_a_served_agent(orch: Orch) -> None:
    """Inputs reach the handler as members and sets; results and stream items leave as values and sorted lists that
    pass the output schema; a repeated set item, a value no member has, and items one in Python are INVALID_ARGUMENT."""
    agent = Paint()
    card = {c.name: c for c in agent.card().capabilities}
    assert json.loads(card["shade"].input_schema) == {"type": "string", "enum": ["red", "blue"]}
    assert json.loads(card["shade"].output_schema) == {"enum": ["red", "blue"]}
    assert json.loads(card["unique"].input_schema)["uniqueItems"] is True
    await orch.serve(agent)
    answer = await orch.mesh.call("order", ORDER, timeout=10)
    assert answer == {**ORDER, "level": 2, "pick": "blue", "tags": ["a", "b"], "pair": ["blue", 3], "by_name": {"a": 1},
                      "points": answer["points"], "tagged": {"color": "blue", "levels": [1, 2]}}
    assert sorted(answer["points"], key=lambda p: (p["x"], p["y"])) == [{"x": 0, "y": 0}, {"x": 1, "y": 2}]
    assert await orch.mesh.call("shade", "red", timeout=10) == "blue"
    assert await orch.mesh.call("unique", [3, 1, 2], timeout=10) == [1, 2, 3]
    items = [item async for item in orch.mesh.stream("levels", 2.0, timeout=10)]
    assert items == [{"level": 1, "sizes": ["l", "s"]}, {"level": 2, "sizes": ["l", "s"]}]
    for name, bad, where in (("shade", "green", "input"), ("unique", [1, 1], "input"),
                             ("order", {**ORDER, "tags": ["a", "a"]}, "input.tags"),
                             ("order", {**ORDER, "level": 3}, "input.level"), ("unique", [1, True], "")):
        with pytest.raises(InvalidInputError) as refused:
            await orch.mesh.call(name, bad, timeout=10)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT, (name, bad)
        if where:
            assert where in refused.value.field_violations, (bad, refused.value.field_violations)
        else:  # distinct in JSON, one value in Python: refused by decoding, which says why
            assert "True" in refused.value.message and "one value in Python" in refused.value.message

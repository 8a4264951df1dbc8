"""Enum-keyed dict hints on capabilities (`hivemesh.sdk.schema`): `dict[Color, int]` had the schema of
`dict[str, int]` (any key admitted), reached the handler with str keys ("1", not Level.LOW), and a result keyed by
a plain Enum's members was no JSON at all; an Enum whose values no key can stand for was accepted at class
definition."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Optional

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


class Offset(enum.Enum):  # int values, not an IntEnum; one negative
    BACK = -1
    HERE = 0


@dataclass
class Stock:
    by_color: dict[Color, int]
    by_level: Mapping[Level, list[Size]]
    nested: dict[Size, dict[Offset, Color]]
    noted: dict[Annotated[Level, "why"], str]
    either: dict[Color, int] | dict[str, str]
    maybe: Optional[dict[Level, int]] = None  # noqa: UP045 - the typing spelling, on purpose


STOCK = {
    "by_color": {"red": 1, "blue": 2.0}, "by_level": {"1": ["s"], "2": ["l", "s"]},
    "nested": {"l": {"-1": "red", "0": "blue"}}, "noted": {"2": "x"}, "either": {"green": "no member"},
    "maybe": {"1": 3},
}
DECODED = Stock(
    by_color={Color.RED: 1, Color.BLUE: 2}, by_level={Level.LOW: [Size.SMALL], Level.HIGH: [Size.LARGE, Size.SMALL]},
    nested={Size.LARGE: {Offset.BACK: Color.RED, Offset.HERE: Color.BLUE}}, noted={Level.HIGH: "x"},
    either={"green": "no member"}, maybe={Level.LOW: 3},
)


def _keys(value: Any) -> Any:
    """Each dict's keys as (type name, key), nested, so a test sees members where a plain == would not: Size.SMALL
    == "s" and Level.LOW == 1, but "1" is neither."""
    if isinstance(value, Stock):
        return {k: _keys(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, dict):
        return [((type(k).__name__, k), _keys(v)) for k, v in value.items()]
    return type(value).__name__


def test_enum_keys_have_property_names_in_the_schema() -> None:
    """A str-valued Enum's keys are its values, an int-valued one's their decimal text; the compiled schema admits
    those keys and refuses any other, naming where."""
    assert schema_for(dict[Color, int]) == {"type": "object", "propertyNames": {"enum": ["red", "blue"]},
                                            "additionalProperties": {"type": "integer"}}
    assert schema_for(dict[Size, Any])["propertyNames"] == {"enum": ["s", "l"]}
    assert schema_for(Mapping[Level, str])["propertyNames"] == {"enum": ["1", "2"]}
    assert schema_for(dict[Offset, Color]) == {"type": "object", "propertyNames": {"enum": ["-1", "0"]},
                                               "additionalProperties": schema_for(Color)}
    assert schema_for(dict[Annotated[Level, "why"], int]) == schema_for(dict[Level, int])
    assert schema_for(dict[str, int]) == {"type": "object", "additionalProperties": {"type": "integer"}}
    check = compile_schema(json.dumps(schema_for(Stock)), where="test")
    assert check is not None
    check.check(STOCK)
    for field_name, bad in (("by_color", {"green": 1}), ("by_color", {"RED": 1}), ("by_level", {"3": []}),
                            ("by_level", {"01": []}), ("noted", {"HIGH": "x"}), ("either", {"green": 1})):
        with pytest.raises(ValueError, match=rf"input\.{field_name}"):
            check.check({**STOCK, field_name: bad})


def test_enum_keys_decode_to_members_wherever_the_dict_nests() -> None:
    """Keys become members in dataclass fields, Mappings, nested dicts, Annotated keys and Optional; a union's
    Enum-keyed arm is taken only when every key is a member's."""
    decoded = from_json(Stock, STOCK)
    assert decoded == DECODED
    assert _keys(decoded) == _keys(DECODED)
    assert _keys(from_json(dict[Color, int] | dict[str, str], {"red": 1})) == [(("Color", Color.RED), "int")]
    assert from_json(dict[Level, int], {Level.LOW: 1}) == {Level.LOW: 1}  # a member passed in Python stays one


def test_a_key_no_member_stands_for_is_invalid_input() -> None:
    """What a declared schema let through: an unknown key, another spelling of one ("01", "RED"), is refused as
    bad input naming the key and the keys there are, not handed on as a str where the hint promised a member."""
    cases: list[tuple[Any, Any, str]] = [
        (dict[Color, int], {"red": 1, "green": 2}, "'green'"),
        (dict[Level, int], {"01": 1}, "'01'"),
        (list[dict[Size, int]], [{"s": 1}, {"SMALL": 1}], "'SMALL'"),
        (Stock, {**STOCK, "nested": {"m": {}}}, "'m'"),
        (Optional[dict[Offset, int]], {"1": 2}, "'1'"),  # noqa: UP045 - in a union too
        (dict[Offset, int] | list[int], {"-1": 1, "HERE": 1}, "'HERE'"),
    ]
    for hint, value, key in cases:
        with pytest.raises(InvalidInputError) as refused:
            from_json(hint, value)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"the key {key}" in refused.value.message and "which is none of" in refused.value.message, (
            refused.value.message)
    with pytest.raises(InvalidInputError, match=r"the key 'xxxxx.*\.\.\., which is none of '-1', '0'$"):
        from_json(dict[Offset, int], {"x" * 10_000: 1})  # a long key is cut short


def test_results_encode_member_keys_as_their_json_keys() -> None:
    """A plain Enum's member as a key was no JSON (json refuses it); every member key becomes the text its input is
    decoded from, so what a result encodes to is what its output schema admits and decodes back to the same."""
    result = {Color.RED: [Size.SMALL], Level.HIGH: {Offset.BACK: Color.BLUE}, "plain": 1}
    encoded = to_json(result)
    assert encoded == {"red": ["s"], "2": {"-1": "blue"}, "plain": 1}
    assert all(type(k) is str for k in encoded) and all(type(k) is str for k in encoded["2"])
    assert json.loads(json.dumps(encoded)) == encoded
    stock = to_json(DECODED)
    check = compile_schema(json.dumps(schema_for(Stock)), where="test")
    assert check is not None
    check.check(stock)
    assert from_json(Stock, json.loads(json.dumps(stock))) == DECODED
    assert to_json({1: "x", "a": 2}) == {1: "x", "a": 2}  # keys that are no members are left as they are


def test_enum_keys_no_json_key_stands_for_fail_at_class_definition_naming_the_hint() -> None:
    class Shape(enum.Enum):
        POINT = (0, 0)

    class Ratio(enum.Enum):
        HALF = 0.5

    class Truth(enum.Enum):
        YES = True

    class Twice(enum.Enum):
        TEXT = "1"
        NUMBER = 1

    class Perm(enum.IntFlag):
        READ = 1

    class Nothing(enum.Enum):
        pass

    cases: list[tuple[Any, tuple[str, ...]]] = [
        (dict[Shape, int], ("dict[", "Shape, int]", "POINT", "(0, 0)", "tuple", "str or int")),
        (list[Mapping[Ratio, str]], ("Mapping[", "Ratio, str]", "HALF", "0.5", "float")),
        (dict[Truth, int], ("Truth", "YES", "bool")),
        (dict[Twice, int], ("Twice", "TEXT", "NUMBER", "'1'")),
        (dict[Perm, int], ("Perm", "Flag")),
        (dict[Nothing, int], ("Nothing", "no members")),
    ]
    for hint, words in cases:
        assert_refused_at_definition(hint, words)


class Inventory(Agent):
    """Counts stock by color and level; the handler sees members, the caller gets JSON keys back."""

    name = "inventory"

    @capability(idempotent=True)
    async def tally(self, counts: dict[Color, dict[Level, int]]) -> dict[Level, int]:
        assert all(type(c) is Color and all(type(lv) is Level for lv in by) for c, by in counts.items()), counts
        total: dict[Level, int] = {}
        for by_level in counts.values():
            for level, n in by_level.items():
                total[level] = total.get(level, 0) + n
        return total

    @capability(idempotent=True, input_schema={"type": "object"})
    async def loose(self, counts: dict[Offset, int]) -> dict[Offset, int]:
        return counts


async def test_enum_keys_work_through_a_served_agent(orch: Orch) -> None:
    """The card carries propertyNames; keys reach the handler as members and leave as JSON keys that pass the
    output schema; an unknown key is INVALID_ARGUMENT by the schema, or by decoding where a declared schema let it
    through."""
    agent = Inventory()
    card = {c.name: c for c in agent.card().capabilities}
    assert json.loads(card["tally"].input_schema)["propertyNames"] == {"enum": ["red", "blue"]}
    assert json.loads(card["tally"].output_schema)["propertyNames"] == {"enum": ["1", "2"]}
    await orch.serve(agent)
    answer = await orch.mesh.call("tally", {"red": {"1": 2, "2": 1}, "blue": {"1": 3.0}}, timeout=10)
    assert answer == {"1": 5, "2": 1}
    assert await orch.mesh.call("loose", {"-1": 4}, timeout=10) == {"-1": 4}
    with pytest.raises(InvalidInputError) as refused:
        await orch.mesh.call("tally", {"red": {"3": 1}}, timeout=10)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "input.red" in refused.value.field_violations, refused.value.field_violations
    with pytest.raises(InvalidInputError) as refused:
        await orch.mesh.call("loose", {"BACK": 4}, timeout=10)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'BACK'" in refused.value.message and "'-1', '0'" in refused.value.message, refused.value.message

"""Authoring edges of the SDK (review of the agent layer): two methods under one capability name, a whole float
for an int hint, and a Literal of Enum members. Each is checked where an author meets it: the class definition,
or a call over a real mesh."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, TypedDict

import grpc
import pytest

from hivemesh.mesh.errors import InvalidInputError
from hivemesh.sdk import Agent, capability
from hivemesh.sdk.schema import from_json
from tests.support.orch_env import Orch


# --- 1. one capability name, two methods ---------------------------------------------------------------------------
def test_two_methods_with_one_capability_name_fail_where_the_class_is_defined() -> None:
    """The second method silently replaced the first: the agent served one of them and nobody was told."""
    with pytest.raises(TypeError) as explicit:

        class Twice(Agent):
            name = "twice"

            @capability(name="go")
            async def first(self, n: int) -> int:
                return n

            @capability(name="go")
            async def second(self, n: int) -> int:
                return -n

    text = str(explicit.value)
    assert "Twice" in text and "'go'" in text and "Twice.first" in text and "Twice.second" in text

    with pytest.raises(TypeError, match=r"'do-it'.*Clash\.do_it.*Clash\.other"):

        class Clash(Agent):  # an explicit name equal to another method's default one
            name = "clash"

            @capability
            async def do_it(self, n: int) -> int:
                return n

            @capability(name="do-it")
            async def other(self, n: int) -> int:
                return n

    class Base(Agent):
        name = "base"

        @capability(name="go")
        async def first(self, n: int) -> int:
            return n

    with pytest.raises(TypeError, match=r"Child.*'go'.*Base\.first.*Child\.second"):

        class Child(Base):  # another method under the parent's name: not an override of it
            @capability(name="go")
            async def second(self, n: int) -> int:
                return n


class Parent(Agent):
    name = "parent"

    @capability
    async def describe(self, n: int) -> str:
        return f"parent {n}"

    @capability
    async def shout(self, text: str) -> str:
        return text.upper()

    @capability
    async def keep(self, n: int) -> str:
        return f"parent keep {n}"


class Overriding(Parent):
    """Overrides each of its parent's capability methods under the same method name, three ways."""

    name = "overriding"

    @capability  # the same capability, another input type
    async def describe(self, n: str) -> str:  # type: ignore[override]
        return f"child {n!r}"

    @capability(name="yell")  # the method now serves another name: the parent's 'shout' is gone with it
    async def shout(self, text: str) -> str:
        return text.upper() + "!"

    async def keep(self, n: int) -> str:  # undecorated: the parent's spec stays, served by this method
        return f"child keep {n}"


async def test_a_subclass_overriding_a_capability_method_serves_it_once(orch: Orch) -> None:
    """Overriding a method under another capability name left the parent's name served too, by the child's method
    with the parent's input type."""
    agent = Overriding()
    assert set(agent.capabilities) == {"describe", "yell", "keep"}
    await orch.serve(agent)
    assert await orch.mesh.call("describe", "x", timeout=10) == "child 'x'"
    assert await orch.mesh.call("yell", "hi", timeout=10) == "HI!"
    assert await orch.mesh.call("keep", 2, timeout=10) == "child keep 2"
    assert sorted(c.name for c in agent.card().capabilities) == ["describe", "keep", "yell"]


# --- 2. a whole float where the hint says int ----------------------------------------------------------------------
@dataclass
class Inner:
    x: int


class Counts(TypedDict):
    n: int
    inner: Inner


@dataclass
class Shapes:
    n: int
    items: list[int]
    by_key: dict[str, int]
    maybe: int | None
    pair: tuple[int, str]
    nested: Inner
    counts: Counts
    flag: bool
    either: int | bool
    ratio: float
    number: int | float
    literal: Literal[1, 2]
    many: list[Optional[Inner]] = field(default_factory=list)  # noqa: UP045 - the typing spelling, on purpose


class Numbers(Agent):
    """Answers with the repr of what its handler received, so the caller sees the Python types."""

    name = "numbers"

    @capability(idempotent=True)
    async def whole(self, n: int) -> str:
        return repr(n)

    @capability(idempotent=True)
    async def shapes(self, req: Shapes) -> str:
        return repr(req)

    @capability(idempotent=True)
    async def counted(self, req: Counts) -> str:
        return repr(req)

    @capability
    async def countdown(self, n: int) -> AsyncIterator[str]:
        yield repr(n)


async def test_a_whole_float_reaches_an_int_hint_as_an_int_wherever_it_sits(orch: Orch) -> None:
    """JSON Schema's "integer" admits 1.0, and the handler received the float 1.0 where its hint promised an int."""
    await orch.serve(Numbers())
    assert await orch.mesh.call("whole", 1.0, timeout=10) == "1"
    assert [item async for item in orch.mesh.stream("countdown", 3.0, timeout=10)] == ["3"]
    assert await orch.mesh.call("counted", {"n": 4.0, "inner": {"x": 5.0}}, timeout=10) == repr(
        {"n": 4, "inner": Inner(5)})
    sent: dict[str, Any] = {
        "n": 1.0, "items": [2.0, 3], "by_key": {"a": 4.0}, "maybe": 5.0, "pair": [6.0, "s"], "nested": {"x": 7.0},
        "counts": {"n": 8.0, "inner": {"x": 9.0}}, "flag": True, "either": True, "ratio": 2.0, "number": 3.0,
        "literal": 2.0, "many": [{"x": 10.0}, None],
    }
    expected = Shapes(n=1, items=[2, 3], by_key={"a": 4}, maybe=5, pair=(6, "s"), nested=Inner(7),
                      counts={"n": 8, "inner": Inner(9)}, flag=True, either=True, ratio=2.0, number=3.0, literal=2,
                      many=[Inner(10), None])
    assert await orch.mesh.call("shapes", sent, timeout=10) == repr(expected)
    for bad in (1.5, {"n": 1, "inner": {"x": 2.5}}):  # a fractional number is still the caller's error
        with pytest.raises(InvalidInputError) as refused:
            await orch.mesh.call("whole" if isinstance(bad, float) else "counted", bad, timeout=10)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_union_takes_the_arm_the_value_fits_exactly_before_an_int_arm() -> None:
    """int | float keeps 1.0 a float (the hint allows it); an int arm takes it only when no arm fits it as it is."""
    assert repr(from_json(int | float, 1.0)) == "1.0" and repr(from_json(float | int, 1.0)) == "1.0"
    assert repr(from_json(list[int] | list[float], [1.0, 2.5])) == "[1.0, 2.5]"
    assert repr(from_json(Optional[list[int]], [1.0])) == "[1]"  # noqa: UP045
    assert repr(from_json(int | str, 2.0)) == "2" and from_json(int | bool, True) is True
    assert repr(from_json(Literal[1, True], 1.0)) == "1" and from_json(Literal[1, True], True) is True
    assert repr(from_json(int, 1.5)) == "1.5"  # not whole: left for the schema check, which refuses it


# --- 3. a Literal of Enum members ----------------------------------------------------------------------------------
class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Size(enum.StrEnum):
    SMALL = "small"


class Shape(enum.Enum):
    POINT = (0, 0)


def test_a_literal_of_enum_members_is_their_values_and_one_of_non_json_a_type_error_naming_it() -> None:
    """It failed at import with json's bare 'Object of type Color is not JSON serializable', naming nothing; then was
    refused. A member stands for its value now (decoded back to the member); a value with no JSON form still fails at
    import, naming the capability, the parameter and the hint."""

    class Paint(Agent):
        name = "paint"

        @capability
        async def pick(self, color: Literal[Color.RED, Color.BLUE]) -> Literal[Color.RED]:
            return Color.RED

        @capability  # a str-based Enum's member: its JSON string, as it was, now decoded to the member
        async def sized(self, size: Literal[Size.SMALL]) -> str:
            return size

    specs = Paint().capabilities
    assert specs["pick"].input_schema == {"enum": ["red", "blue"]} and specs["pick"].output_schema == {"enum": ["red"]}
    assert from_json(specs["pick"].input_type, "blue") is Color.BLUE
    assert from_json(specs["sized"].input_type, "small") is Size.SMALL

    with pytest.raises(TypeError, match=r"favourite.*the return type.*Shape\.POINT.*\(0, 0\)"):

        @capability
        async def favourite(self: Agent, n: int) -> Literal[Shape.POINT]:
            return Shape.POINT

    with pytest.raises(TypeError, match=r"raw.*parameter 'data'.*b'x'.*bytes"):

        @capability
        async def raw(self: Agent, data: Literal[b"x"]) -> int:
            return 1

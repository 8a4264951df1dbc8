"""Decoding a capability's JSON input into its hinted types (`hivemesh.sdk.schema.from_json`) on the inputs that
broke it: a Union of recursive dataclasses (exponential CPU), a Union with a dict or Any arm beside a dataclass (the
dataclass no longer built), an arm whose constructor refuses the value (no fall-through), and a recursive input
deeper than the interpreter's stack (RecursionError, answered AGENT_ERROR)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Optional, TypedDict, Union

import pytest

from hivemesh.sdk import Agent, AgentServerConfig, capability, schema
from hivemesh.sdk.schema import from_json
from tests.support.orch_env import Orch


@dataclass
class Num:
    value: int


@dataclass
class Add:
    left: Expr
    right: Expr


@dataclass
class Mul:
    left: Expr
    right: Expr


Expr = Union[Num, Add, Mul]  # noqa: UP007 - an alias of the typing spelling, as authors write recursive unions


def _tree(depth: int) -> dict[str, Any]:
    """An Add chain `depth` deep whose one whole float sits at the bottom: every exact fit of an arm fails only
    there, so trying Add and Mul at each level without keeping answers costs 2**depth."""
    node: dict[str, Any] = {"value": 2.0}
    for _ in range(depth):
        node = {"left": node, "right": {"value": 1}}
    return node


def _counting(fn: Callable[..., Any], calls: list[int], limit: int) -> Callable[..., Any]:
    """fn itself, counting its calls and failing the test past `limit` (so exponential work fails at once)."""

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] > limit:
            pytest.fail(f"{fn.__name__} called more than {limit} times: decoding is not linear in the input")
        return fn(*args, **kwargs)

    return counted


def test_a_union_of_recursive_dataclasses_is_decoded_in_work_linear_in_the_input(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A 608-byte expression tree 18 deep took ~8 s of the event loop: each level re-walked its subtree once per
    arm. The work is counted, not timed: the real fit and decode functions, wrapped, run a few times per node, not
    2**40."""
    depth = 40
    nodes = 2 * depth + 1
    fits, decodes = [0], [0]
    monkeypatch.setattr(schema, "_fits", _counting(schema._fits, fits, limit=10 * nodes))
    monkeypatch.setattr(schema, "_decode", _counting(schema._decode, decodes, limit=10 * nodes))
    decoded = from_json(Expr, _tree(depth))
    assert 0 < fits[0] <= 10 * nodes and 0 < decodes[0] <= 10 * nodes
    for _ in range(depth):
        assert isinstance(decoded, Add) and decoded.right == Num(1)
        decoded = decoded.left
    assert decoded == Num(2) and type(decoded.value) is int  # the whole float at the bottom, made the int promised


@dataclass
class Cfg:
    retries: int
    name: str = "x"


def test_a_union_builds_its_dataclass_arm_before_a_dict_or_any_arm() -> None:
    """Union[dict[str, Any], Cfg] and Union[Any, Cfg] gave the handler a dict where it had always been given the Cfg
    (the dict arm fitted first); the intended choices between scalar arms are kept."""
    for hint in (Union[dict[str, Any], Cfg], Optional[Union[dict, Cfg]], Union[Any, Cfg],  # noqa: UP007, UP045
                 Union[Mapping[str, Any], Cfg], dict[str, float] | Cfg):  # noqa: UP007
        assert from_json(hint, {"retries": 3}) == Cfg(3), hint
        assert repr(from_json(hint, {"retries": 3.0})) == repr(Cfg(3)), hint
        assert from_json(hint, {"other": 1}) == {"other": 1}, hint  # not a Cfg: the other arm takes it as it is
    assert repr(from_json(int | float, 1.0)) == "1.0" and repr(from_json(Optional[int], 1.0)) == "1"  # noqa: UP045
    assert from_json(int | bool, True) is True and from_json(Optional[Cfg], None) is None  # noqa: UP045


@dataclass
class Celsius:
    value: float

    def __post_init__(self) -> None:
        if self.value < -273.15:
            raise TypeError("below absolute zero")


@dataclass
class Kelvin:
    value: float

    def __post_init__(self) -> None:
        if self.value < 0:
            raise TypeError("below zero")


@dataclass
class Raw:
    value: float


def test_an_arm_whose_constructor_refuses_the_value_falls_through_to_the_next_that_fits() -> None:
    """A TypeError from the first fitting arm's constructor (a __post_init__ check) reached the handler's caller
    as a failure, where the next arm that fits had built the value; when no arm builds it, the value is given as it
    is, as before."""
    assert from_json(Union[Celsius, Raw], {"value": -500.0}) == Raw(-500.0)  # noqa: UP007
    assert from_json(Union[Celsius, Raw], {"value": 20.0}) == Celsius(20.0)  # noqa: UP007
    assert from_json(list[Union[Celsius, Kelvin]], [{"value": -500.0}, {"value": -5}]) == [  # noqa: UP007
        {"value": -500.0}, Celsius(-5)]
    with pytest.raises(TypeError, match="below absolute zero"):  # no other arm: the constructor's error, as before
        from_json(Celsius, {"value": -500.0})


class Node(TypedDict):
    v: int
    kids: list[Node]


class Label(TypedDict):
    text: str
    kids: list[Label]


def _nodes(depth: int, leaf: Any) -> dict[str, Any]:
    node: dict[str, Any] = {"v": leaf, "kids": []}
    for _ in range(depth):
        node = {"v": 1, "kids": [node]}
    return node


def test_a_recursive_input_deeper_than_the_interpreters_stack_is_decoded() -> None:
    """Decoding walked a recursive TypedDict ~4 frames a level: 200 levels (4 KB, which the JSON parser and the
    schema check take) raised RecursionError in Agent.run_unary. Any depth is decoded now, in order."""
    depth = 3 * sys.getrecursionlimit()
    decoded = from_json(Node, _nodes(depth, 7.0))
    for _ in range(depth):
        assert decoded["v"] == 1 and len(decoded["kids"]) == 1
        decoded = decoded["kids"][0]
    assert decoded == {"v": 7, "kids": []} and type(decoded["v"]) is int
    tree = from_json(Expr, _tree(depth))
    for _ in range(depth):
        assert isinstance(tree, Add)
        tree = tree.left
    assert tree == Num(2)
    labels: dict[str, Any] = {"text": "leaf", "kids": []}
    for _ in range(depth):
        labels = {"text": "x", "kids": [labels]}
    assert from_json(Label, labels) is labels  # nothing to decode: given as it is, at any depth


NODE_SCHEMA = {"$defs": {"n": {"type": "object", "properties": {
    "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}}, "required": ["v", "kids"]}},
    "$ref": "#/$defs/n"}


class Trees(Agent):
    name = "trees"

    @capability(input_schema=NODE_SCHEMA, output_schema={"type": "integer"}, idempotent=True)
    async def depth(self, tree: Node) -> int:
        """How deep the tree is, with the int its leaf's whole float was made."""
        levels = 0
        while tree["kids"]:
            tree, levels = tree["kids"][0], levels + 1
        assert type(tree["v"]) is int
        return levels + tree["v"]


async def test_a_recursive_typeddict_input_200_levels_deep_reaches_the_handler(orch: Orch) -> None:
    """The same over a real mesh, to a capability the content screen (64 levels) is told to skip: the chain parsed
    and validated the 4 KB input, then the agent answered AGENT_ERROR (RecursionError) where it had given the
    handler the tree."""
    await orch.serve(Trees(), AgentServerConfig(screen_exempt=("depth",)))
    assert await orch.mesh.call("depth", _nodes(200, 5.0), timeout=30) == 205


def test_an_annotated_hint_with_unhashable_metadata_has_its_schema_and_decodes() -> None:
    """Annotated's metadata may be any object (a dict of units, say); the schema and the decoding follow the
    annotated type, and never hash the metadata."""
    hint = Annotated[int, {"unit": "s"}]
    assert schema.schema_for(hint) == {"type": "integer"}
    assert schema.schema_for(list[hint]) == {"type": "array", "items": {"type": "integer"}}  # type: ignore[valid-type]
    assert schema.from_json(list[hint], [2.0, 3]) == [2, 3]  # type: ignore[valid-type]

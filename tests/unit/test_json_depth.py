"""`mesh/json_depth.py`: json.loads with one nesting bound, the same on every interpreter."""

from __future__ import annotations

import json
import sys
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivemesh.mesh.json_depth import MAX_NESTING, NestedTooDeepError, check, loads


def _nested(depth: int, kind: str) -> Any:
    """A value depth containers deep, built without recursion."""
    value: Any = 1
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_the_bound_is_exact(kind: str) -> None:
    check(_nested(MAX_NESTING, kind))  # at the bound: kept
    with pytest.raises(NestedTooDeepError, match=f"nested more than {MAX_NESTING} levels deep"):
        check(_nested(MAX_NESTING + 1, kind))


def test_the_walk_needs_no_stack() -> None:
    """Far deeper than the interpreter's recursion limit, the check still answers with its own error."""
    with pytest.raises(NestedTooDeepError):
        check(_nested(sys.getrecursionlimit() * 20, "list"))


@pytest.mark.parametrize("text", ["[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1),
                                  '{"a":' * 5_000 + "1" + "}" * 5_000,
                                  b"[" * 3_000 + b"]" * 3_000])
def test_text_nested_past_the_bound_raises_recursion_error(text: str | bytes) -> None:
    """What every reader catches: json's own RecursionError on 3.11, the bound's (a RecursionError) later."""
    with pytest.raises(RecursionError):
        loads(text)


def test_a_nested_error_is_a_recursion_error() -> None:
    assert issubclass(NestedTooDeepError, RecursionError)


def test_brackets_inside_strings_do_not_count() -> None:
    text = json.dumps({"text": "[" * 5_000 + "{" * 5_000, "list": [[1], {"b": [2]}]})
    assert loads(text) == json.loads(text)
    assert loads(text.encode()) == json.loads(text)


def test_deep_but_within_the_bound_is_read_as_json_reads_it() -> None:
    text = "[" * 300 + "1" + "]" * 300
    assert loads(text) == json.loads(text) == _nested(300, "list")


def test_keyword_arguments_reach_json() -> None:
    assert loads('{"x": 1.5}', parse_float=Decimal) == {"x": Decimal("1.5")}
    with pytest.raises(ValueError, match="no constants"):
        loads("[NaN]", parse_constant=lambda c: (_ for _ in ()).throw(ValueError("no constants")))


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text()),
                    lambda inner: st.one_of(st.lists(inner, max_size=4),
                                            st.dictionaries(st.text(max_size=5), inner, max_size=4)),
                    max_leaves=20))
def test_any_value_within_the_bound_reads_as_json_reads_it(value: Any) -> None:
    text = json.dumps(value)
    assert loads(text) == json.loads(text)

"""Operator YAML read safely (controlplane/yaml_text.py): aliases allowed, their expansion bounded."""

from __future__ import annotations

import pytest

from hivemesh.controlplane.grants import parse_grants_text
from hivemesh.controlplane.policies import parse_documents
from hivemesh.controlplane.yaml_text import MAX_VALUES, _bounded, load, load_all
from hivemesh.mesh.errors import InvalidInputError


def _laughs(key: str = "spec", indent: str = "  ") -> str:
    """Nine levels of ten aliases each: 551 bytes that load as 10^9 values."""
    lines = [f'{indent}l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{indent}l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 9)]
    return f"{key}:\n" + "\n".join(lines) + "\n"


@pytest.mark.parametrize("parse", [
    lambda text: parse_documents("apiVersion: hivemesh/v1\nkind: routes\nmetadata: {name: x}\n" + text,
                                 source="policies.yaml"),
    lambda text: parse_grants_text(text, source="grants.yaml"),
    lambda text: load_all(text, "a.yaml"),
    lambda text: load(text, "a.yaml"),
])
def test_an_alias_bomb_is_refused_before_anything_walks_it(parse: object) -> None:
    """Before, policy validation walked the 10^9 values, holding the control plane's loop (a run was stopped
    after 30 s)."""
    with pytest.raises(InvalidInputError, match=f"more than {MAX_VALUES:,} values once its aliases are expanded"):
        parse(_laughs())  # type: ignore[operator]


def test_aliases_within_the_bound_are_read_as_written() -> None:
    doc = load("base: &base {timeout_s: 2, retries: 3}\na: *base\nb: *base\n", "a.yaml")
    assert doc == {"base": {"timeout_s": 2, "retries": 3}, "a": {"timeout_s": 2, "retries": 3},
                   "b": {"timeout_s": 2, "retries": 3}}
    _bounded([1] * (MAX_VALUES - 1), "a.yaml")  # the list and its items: exactly the bound
    with pytest.raises(InvalidInputError, match="once its aliases are expanded"):
        _bounded([1] * MAX_VALUES, "a.yaml")


def test_syntax_errors_and_depth_name_the_source() -> None:
    with pytest.raises(InvalidInputError, match=r"^a\.yaml: not valid YAML/JSON at line 1"):
        load("a: [1, 2", "a.yaml")
    with pytest.raises(InvalidInputError, match=r"^a\.yaml: nested too deeply"):
        load_all("[" * 3000 + "]" * 3000, "a.yaml")

"""The `state` policy kind and the names it governs: who may read and write a namespace, which bounds apply when
several documents match, what the store refuses, and the memory namespaces the SDK builds."""

from __future__ import annotations

from typing import Any

import pytest

from hivemesh.controlplane.policies import validate_documents
from hivemesh.controlplane.state_policy import (
    DEFAULTS,
    MEMORY_DEFAULTS,
    STATE,
    Bounds,
    check_key,
    check_namespace,
)
from hivemesh.mesh.errors import InvalidInputError
from hivemesh.mesh.pki import parse_spiffe_id
from hivemesh.mesh.policy import PolicyDoc
from hivemesh.sdk.memory import conversation_namespace, user_namespace

TD = "hivemesh.local"


def _sid(kind: str, name: str) -> Any:
    return parse_spiffe_id(f"spiffe://{TD}/{kind}/{name}")


def _rules(*specs: dict[str, Any]) -> Any:
    docs = {f"p{i}": STATE.validate(PolicyDoc("state", f"p{i}", spec)) for i, spec in enumerate(specs)}
    return STATE.compile(docs)


def test_access_is_default_deny_and_adds_up_readers_and_writers() -> None:
    rules = _rules(
        {"namespaces": ["team/*"], "read": [f"spiffe://{TD}/agent/*"], "write": [f"spiffe://{TD}/agent/lead"]},
        {"namespaces": ["team/a"], "write": [f"spiffe://{TD}/client/app"]},
    )
    lead, other, app = _sid("agent", "lead"), _sid("agent", "other"), _sid("client", "app")
    assert (rules.access(lead, "team/a").read, rules.access(lead, "team/a").write) == (True, True)
    assert (rules.access(other, "team/a").read, rules.access(other, "team/a").write) == (True, False)
    assert (rules.access(app, "team/a").read, rules.access(app, "team/a").write) == (True, True)  # writers read
    assert (rules.access(app, "team/b").read, rules.access(app, "team/b").write) == (False, False)
    unnamed = rules.access(lead, "elsewhere/x")
    assert (unnamed.read, unnamed.write) == (False, False)
    op = rules.access(_sid("operator", "admin"), "elsewhere/x")
    assert (op.read, op.write) == (True, False)  # operators read everything, write nothing unless named


def test_memory_namespaces_belong_to_their_owner_only() -> None:
    rules = _rules()
    owner = rules.access(_sid("agent", "chat"), "memory/agent-chat/c/c-1")
    assert (owner.read, owner.write, owner.bounds) == (True, True, MEMORY_DEFAULTS)
    other = rules.access(_sid("agent", "spy"), "memory/agent-chat/c/c-1")
    assert (other.read, other.write) == (False, False)
    # A client named like the agent is another owner (the kind is part of the segment).
    assert not rules.access(_sid("client", "chat"), "memory/agent-chat/c/c-1").read


def test_the_first_stated_bound_replaces_the_default_and_later_ones_only_tighten() -> None:
    rules = _rules(
        {"namespaces": ["big/*"], "max_namespace_bytes": 4 << 20, "ttl_seconds": 3600},
        {"namespaces": ["big/x"], "max_namespace_bytes": 8 << 20, "max_value_bytes": 1000, "ttl_seconds": 60},
    )
    bounds = rules.access(_sid("agent", "a"), "big/x").bounds
    assert bounds == Bounds(max_value_bytes=1000, max_namespace_bytes=4 << 20, ttl_s=60)
    assert rules.access(_sid("agent", "a"), "big/y").bounds == Bounds(DEFAULTS.max_value_bytes, 4 << 20, 3600)
    assert rules.access(_sid("agent", "a"), "small/y").bounds == DEFAULTS


@pytest.mark.parametrize(("spec", "path"), [
    ({"namespaces": ["team/*"]}, "spec"),  # grants nothing, bounds nothing
    ({"namespaces": ["Team/*"], "read": ["*"]}, "spec.namespaces[0]"),
    ({"namespaces": ["t/*"], "max_value_bytes": 10, "max_namespace_bytes": 5}, "spec.max_value_bytes"),
    ({"namespaces": ["t/*"], "max_value_bytes": 600 * 1024}, "spec.max_value_bytes"),
    ({"namespaces": ["t/*"], "ttl_seconds": 0}, "spec.ttl_seconds"),
    ({"namespaces": ["t/*"], "read": ["*"], "owners": ["x"]}, "spec.owners"),
])
def test_bad_state_policies_are_refused_naming_the_field(spec: dict[str, Any], path: str) -> None:
    with pytest.raises(InvalidInputError) as bad:
        validate_documents([{"kind": "state", "name": "p", "spec": spec}])
    assert path in bad.value.field_violations, bad.value.field_violations


def test_names_the_store_accepts() -> None:
    for ok in ("conversation/c-42", "workflow/client-app/r-1", "memory/agent-chat/u/client-app", "team"):
        assert check_namespace(ok) == ok
    for bad in ("", "Team/x", "a//b", "a/b/", "a#b", "a/" + "b" * 129, "a/b/c/d/e/f/g/h"):
        with pytest.raises(InvalidInputError) as err:
            check_namespace(bad)
        assert "namespace" in err.value.field_violations
    assert check_key("plan.v2@x") == "plan.v2@x"
    for bad in ("", "a/b", "a#b", "-x", "k" * 201):
        with pytest.raises(InvalidInputError):
            check_key(bad)


def test_memory_namespaces_the_sdk_builds_are_valid_and_distinct() -> None:
    agent = f"spiffe://{TD}/agent/chat"
    plain = conversation_namespace(agent, "c-1")
    digested = conversation_namespace(agent, "a conversation / with # anything")
    user = user_namespace(agent, f"spiffe://{TD}/client/app")
    assert (plain, user) == ("memory/agent-chat/c/c-1", "memory/agent-chat/u/client-app")
    assert digested.startswith("memory/agent-chat/c/h.") and digested != conversation_namespace(agent, "other")
    for ns in (plain, digested, user):
        assert check_namespace(ns) == ns

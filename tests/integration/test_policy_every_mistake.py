"""The `authz` and `state` kinds name every mistake of a document (and of a set of documents) in one error, as the
traffic kinds do: a check or compiler that stopped at its first finding took one apply per mistake to learn them
all. Through the real path (the control plane's store against a real etcd): refused with every path named, and
nothing written."""

from __future__ import annotations

import json
from typing import Any

import aetcd
import pytest

from hivemesh.controlplane import policies as store
from hivemesh.controlplane.state_policy import STATE
from hivemesh.mesh.authz import AUTHZ, compile_authz
from hivemesh.mesh.errors import InvalidInputError
from hivemesh.mesh.policy import PolicyDoc, PolicyError

UNDEFINED = "is defined in no authz policy (spec.teams)"


def _refused(doc: PolicyDoc, kind: Any) -> PolicyError:
    with pytest.raises(PolicyError) as refused:
        kind.validate(doc)
    return refused.value


async def _apply_refused(etcd: aetcd.Client, docs: list[dict[str, Any]]) -> InvalidInputError:
    with pytest.raises(InvalidInputError) as refused:
        await store.apply_text(etcd, json.dumps(docs[0] if len(docs) == 1 else docs))
    return refused.value


# --- authz --------------------------------------------------------------------------------------------------------
def test_an_authz_check_names_every_mistake_of_a_document() -> None:
    rules = [
        {"name": "a", "action": "ALLOW"},
        {"name": "a", "action": "DENY"},                            # a second "a"
        {"name": "ask", "action": "CUSTOM"},                        # no provider
        {"name": "a", "action": "ALLOW", "provider": "pdp"},        # a third "a", and a provider on ALLOW
    ]
    err = _refused(PolicyDoc("authz", "p", {"rules": rules}), AUTHZ)
    assert err.violations == {
        "spec.rules[1].name": "duplicate rule name (also rules[0])",
        "spec.rules[2].provider": "a CUSTOM rule names its provider",
        "spec.rules[3].name": "duplicate rule name (also rules[0])",
        "spec.rules[3].provider": "only CUSTOM rules have a provider",
    }
    assert str(err) == "spec.rules[1].name: duplicate rule name (also rules[0])"  # the first still first


def test_the_authz_compiler_names_every_undefined_team_in_the_document_it_is_in() -> None:
    docs = {
        "a": PolicyDoc("authz", "a", {"teams": {"ops": ["spiffe://x/client/*"]}, "rules": [
            {"name": "r", "action": "ALLOW", "from": {"teams": ["ops", "ghosts"]}}]}),
        "b": PolicyDoc("authz", "b", {"rules": [
            {"name": "r", "action": "ALLOW"},
            {"name": "s", "action": "DENY", "from": {"teams": ["elves"], "not_teams": ["ops", "dwarves"]}}]}),
    }
    with pytest.raises(PolicyError) as refused:
        compile_authz(docs)
    err = refused.value
    assert {d: dict(v) for d, v in err.documents.items()} == {
        "a": {"spec.rules[0].from.teams[1]": f"team 'ghosts' {UNDEFINED}"},
        "b": {"spec.rules[1].from.teams[0]": f"team 'elves' {UNDEFINED}",
              "spec.rules[1].from.not_teams[1]": f"team 'dwarves' {UNDEFINED}"},
    }
    # Valid: the teams each document uses are defined (in any document of the set), and it compiles as before.
    docs["b"] = PolicyDoc("authz", "b", {"teams": {"elves": ["spiffe://x/agent/*"], "ghosts": ["spiffe://x/a/b"],
                                                   "dwarves": ["spiffe://x/client/d"]}, "rules": []})
    table = compile_authz(docs)
    assert table.policies == ("a", "b") and [t for t, _p in table.teams] == ["dwarves", "elves", "ghosts", "ops"]


async def test_an_authz_apply_with_three_mistakes_names_them_all_and_writes_nothing(etcd: aetcd.Client) -> None:
    doc = {"kind": "authz", "name": "p", "spec": {"rules": [
        {"name": "a", "action": "ALLOW"}, {"name": "a", "action": "DENY"},
        {"name": "ask", "action": "CUSTOM"}, {"name": "b", "action": "DENY", "provider": "pdp"}]}}
    err = await _apply_refused(etcd, [doc])
    assert err.field_violations == {
        "spec.rules[1].name": "duplicate rule name (also rules[0])",
        "spec.rules[2].provider": "a CUSTOM rule names its provider",
        "spec.rules[3].provider": "only CUSTOM rules have a provider",
    }
    assert err.message == "authz/p: spec.rules[1].name: duplicate rule name (also rules[0]); and 2 more mistakes"
    assert await store.list_policies(etcd, "authz") == []


async def test_an_authz_apply_names_every_undefined_team_under_its_document(etcd: aetcd.Client) -> None:
    def doc(name: str, teams: list[str]) -> dict[str, Any]:
        return {"kind": "authz", "name": name, "spec": {"rules": [
            {"name": "r", "action": "ALLOW", "from": {"teams": teams}}]}}

    err = await _apply_refused(etcd, [doc("a", ["ghosts"]), doc("b", ["elves", "dwarves"])])
    assert err.field_violations == {
        "documents[0].spec.rules[0].from.teams[0]": f"team 'ghosts' {UNDEFINED}",
        "documents[1].spec.rules[0].from.teams[0]": f"team 'elves' {UNDEFINED}",
        "documents[1].spec.rules[0].from.teams[1]": f"team 'dwarves' {UNDEFINED}",
    }
    assert err.message == (f"documents[0] (authz/a): spec.rules[0].from.teams[0]: team 'ghosts' {UNDEFINED}; "
                           "and 2 more mistakes")
    assert await store.list_policies(etcd, "authz") == []


# --- state --------------------------------------------------------------------------------------------------------
def test_a_state_check_names_every_mistake_of_a_document() -> None:
    spec = {"namespaces": ["Team/*", "ok/*", "/x"], "max_value_bytes": 10, "max_namespace_bytes": 5}
    err = _refused(PolicyDoc("state", "s", spec), STATE)
    assert err.violations == {
        "spec.namespaces[0]": "'Team/*' must start with a scope word ([a-z0-9._-])",
        "spec.namespaces[2]": "'/x' must start with a scope word ([a-z0-9._-])",
        "spec.max_value_bytes": "10 is more than max_namespace_bytes (5)",
    }
    nothing = _refused(PolicyDoc("state", "s", {"namespaces": ["Team/*"]}), STATE)
    assert nothing.violations == {
        "spec": "a state policy needs read, write, or a bound (max_*_bytes, ttl_seconds)",
        "spec.namespaces[0]": "'Team/*' must start with a scope word ([a-z0-9._-])",
    }


async def test_a_state_apply_with_three_mistakes_names_them_all_and_writes_nothing(etcd: aetcd.Client) -> None:
    good = {"kind": "state", "name": "fine", "spec": {"namespaces": ["team/*"], "read": ["*"]}}
    bad = {"kind": "state", "name": "s", "spec": {"namespaces": ["Team/*", "/x"], "max_value_bytes": 10,
                                                   "max_namespace_bytes": 5}}
    err = await _apply_refused(etcd, [bad])
    assert err.field_violations == {
        "spec.namespaces[0]": "'Team/*' must start with a scope word ([a-z0-9._-])",
        "spec.namespaces[1]": "'/x' must start with a scope word ([a-z0-9._-])",
        "spec.max_value_bytes": "10 is more than max_namespace_bytes (5)",
    }
    assert err.message == ("state/s: spec.namespaces[0]: 'Team/*' must start with a scope word ([a-z0-9._-]); "
                           "and 2 more mistakes")
    # Beside a valid document, all or nothing: neither is written.
    both = await _apply_refused(etcd, [good, bad])
    assert set(both.field_violations) == {"documents[1].spec.namespaces[0]", "documents[1].spec.namespaces[1]",
                                          "documents[1].spec.max_value_bytes"}
    assert await store.list_policies(etcd, "state") == []
    # The valid one alone is applied as before.
    result = await store.apply_text(etcd, json.dumps(good))
    assert [(a.kind, a.name, a.action) for a in result.applied] == [("state", "fine", "created")]
    assert [d.name for d in await store.list_policies(etcd, "state")] == ["fine"]

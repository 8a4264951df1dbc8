"""The `providers` policy kind (which agent identities may serve which capabilities): its documents are checked
field by field as the control plane checks them, and they compile into a table that restricts exactly the
capabilities its rules match (the union of every matching rule's agents, across documents) and leaves every
other capability open. `hivemesh up`'s demo documents cover each demo's capabilities with the agents it starts,
and `hivemesh authz check` reports the providers gate per agent."""

from __future__ import annotations

import importlib
from types import MappingProxyType
from typing import Any

import pytest

from hivemesh.controlplane.cli.authz import provider_gate
from hivemesh.controlplane.cli.launcher import DEMO_PROVIDERS
from hivemesh.controlplane.policies import KINDS, parse_documents, validate_document, validate_documents
from hivemesh.mesh import providers
from hivemesh.mesh.errors import InvalidInputError
from hivemesh.mesh.policy import PolicyDoc, PolicyError
from hivemesh.mesh.providers import PROVIDERS, ProvidersTable, compile_providers

TD = "spiffe://hivemesh.local"
EXTRACTOR = f"{TD}/agent/extractor"
MALLORY = f"{TD}/agent/mallory"
RULE_FIELDS = "unknown field (allowed: agents, capabilities, description)"


def _doc(name: str, *rules: dict[str, Any]) -> PolicyDoc:
    return validate_document({"kind": "providers", "name": name, "spec": {"rules": list(rules)}}).doc


def _table(*docs: PolicyDoc) -> ProvidersTable:
    return compile_providers(MappingProxyType({d.name: d for d in docs}))


def _mistakes(spec: Any) -> dict[str, str]:
    with pytest.raises(PolicyError) as refused:
        validate_document({"kind": "providers", "name": "p", "spec": spec})
    return refused.value.violations


def test_the_store_accepts_the_kind_and_the_documented_example() -> None:
    assert KINDS["providers"] is PROVIDERS
    doc = _doc("pipeline", {"capabilities": ["extract"], "agents": [EXTRACTOR], "description": "the extractor"})
    assert doc.kind == "providers" and doc.spec["rules"][0]["agents"] == [EXTRACTOR]
    # The envelope's apiVersion is accepted as for every kind.
    validate_document({"apiVersion": "hivemesh/v1", "kind": "providers", "name": "x",
                       "spec": {"rules": [{"capabilities": ["ex*"], "agents": [f"{TD}/agent/ex-*"]}]}})


def test_schema_mistakes_are_each_named_by_their_field_path() -> None:
    assert _mistakes({}) == {"spec.rules": "is required"}
    assert _mistakes({"rules": []}) == {"spec.rules": "must have at least 1 item(s)"}
    assert _mistakes({"rules": [{"capabilities": ["extract"]}], "extra": 1}) == {
        "spec.rules[0].agents": "is required", "spec.extra": "unknown field (allowed: rules)"}
    assert _mistakes({"rules": [{"capabilities": ["Extract", "ok"], "agents": [], "to": ["x"]}]}) == {
        "spec.rules[0].capabilities[0]": r"must match ^[a-z0-9*?.\[\]!_-]+$",
        "spec.rules[0].agents": "must have at least 1 item(s)",
        "spec.rules[0].to": RULE_FIELDS,
    }
    assert _mistakes({"rules": [{"capabilities": "extract", "agents": [EXTRACTOR, EXTRACTOR]}]}) == {
        "spec.rules[0].capabilities": "must be an array, not string",
        "spec.rules[0].agents": "must not repeat items",
    }


@pytest.mark.parametrize(("glob", "said"), [
    ("extractor", "must be a SPIFFE id glob of agents"),
    ("agent/extractor", "must be a SPIFFE id glob of agents"),
    (f"{TD}/client/demo", "names a client, which serves nothing"),
    (f"{TD}/client/validator*", "names client identities, which serve nothing"),
    ("spiffe://*/operator/*", "names operator identities, which serve nothing"),
    (f"{TD}/agent/Extractor", "bad SPIFFE id"),
    ("spiffe://hivemesh.local/agent", "bad SPIFFE id"),
])
def test_an_agent_that_could_never_match_an_agent_identity_is_refused(glob: str, said: str) -> None:
    violations = _mistakes({"rules": [{"capabilities": ["extract"], "agents": [EXTRACTOR]},
                                      {"capabilities": ["store"], "agents": [EXTRACTOR, glob]}]})
    assert list(violations) == ["spec.rules[1].agents[1]"], violations
    assert said in violations["spec.rules[1].agents[1]"]
    assert "spiffe://hivemesh.local/agent/extractor" in violations["spec.rules[1].agents[1]"]  # what is accepted


def test_every_bad_agent_is_named_at_once_beside_the_schemas_mistakes() -> None:
    violations = _mistakes({"rules": [{"capabilities": ["Extract"], "agents": ["extractor", f"{TD}/client/demo"]},
                                      {"capabilities": ["store"], "agents": [EXTRACTOR, "mallory"]}]})
    assert set(violations) == {"spec.rules[0].capabilities[0]", "spec.rules[0].agents[0]",
                               "spec.rules[0].agents[1]", "spec.rules[1].agents[1]"}, violations
    assert "names a client, which serves nothing" in violations["spec.rules[0].agents[1]"]


def test_a_bad_document_among_several_is_named_with_its_index_and_nothing_is_accepted() -> None:
    good = {"kind": "providers", "name": "good", "spec": {"rules": [{"capabilities": ["a"], "agents": [EXTRACTOR]}]}}
    bad = {"kind": "providers", "name": "bad", "spec": {"rules": [{"capabilities": ["a"], "agents": ["mallory"]}]}}
    with pytest.raises(InvalidInputError) as refused:
        validate_documents([good, bad])
    assert list(refused.value.field_violations) == ["documents[1].spec.rules[0].agents[0]"]
    assert "documents[1] (providers/bad)" in refused.value.message


def test_no_document_leaves_every_capability_open() -> None:
    empty = PROVIDERS.empty()
    assert empty.empty and empty.restriction("extract") is None
    assert empty.allows("extract", MALLORY)


def test_a_capability_a_rule_matches_may_be_served_only_by_the_agents_it_names() -> None:
    table = _table(_doc("pipeline", {"capabilities": ["extract"], "agents": [EXTRACTOR]},
                        {"capabilities": ["store*"], "agents": [f"{TD}/agent/storage-*"]}))
    assert table.allows("extract", EXTRACTOR) and not table.allows("extract", MALLORY)
    assert table.allows("store", f"{TD}/agent/storage-eu") and table.allows("store-bulk", f"{TD}/agent/storage-1")
    assert not table.allows("store", f"{TD}/agent/storage") and not table.allows("store", MALLORY)
    assert not table.allows("extract", f"{TD}/agent/extractor-2")  # an exact id is exact
    assert not table.allows("extract", "spiffe://other.domain/agent/extractor")  # nor across trust domains
    assert table.allows("ocr", MALLORY) and table.restriction("ocr") is None  # no rule names it: open
    assert table.restriction("extracted") is None  # a glob-free capability is matched whole
    found = table.restriction("extract")
    assert found is not None
    assert found.rules == ("providers/pipeline rules[0]",) and found.policies == ("pipeline",)
    assert found.describe() == f"providers/pipeline lets only {EXTRACTOR} serve 'extract'"


def test_every_rule_matching_a_capability_adds_its_agents_across_documents() -> None:
    table = _table(
        _doc("b-team", {"capabilities": ["extract*"], "agents": [f"{TD}/agent/extractor-eu"]}),
        _doc("a-team", {"capabilities": ["extract"], "agents": [EXTRACTOR]},
             {"capabilities": ["*"], "agents": [f"{TD}/agent/auditor"]}),
    )
    found = table.restriction("extract")
    assert found is not None
    assert found.policies == ("a-team", "b-team")
    assert found.rules == ("providers/a-team rules[0]", "providers/a-team rules[1]", "providers/b-team rules[0]")
    for allowed in (EXTRACTOR, f"{TD}/agent/extractor-eu", f"{TD}/agent/auditor"):
        assert table.allows("extract", allowed), allowed
    assert not table.allows("extract", MALLORY)
    assert "providers/a-team, providers/b-team let only" in found.describe()
    # The catch-all rule restricts every capability to the auditor (plus each capability's own rules).
    assert table.allows("ocr", f"{TD}/agent/auditor") and not table.allows("ocr", MALLORY)


def test_the_lookup_is_remembered_per_capability_and_the_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    table = _table(_doc("p", {"capabilities": ["cap-*"], "agents": [EXTRACTOR]}))
    first = table.restriction("cap-1")
    assert first is not None and table.restriction("cap-1") is first  # the same object: a dict read
    monkeypatch.setattr(providers, "CACHE_MAX", 8)
    for i in range(50):
        assert table.restriction(f"cap-{i}") is not None
        assert table.restriction(f"other-{i}") is None
        assert len(table._memo) <= 8
    assert table.allows("cap-49", EXTRACTOR) and not table.allows("cap-49", MALLORY)


def test_hivemesh_up_covers_each_demo_with_the_agents_it_starts() -> None:
    """Every demo `up` runs has its providers document (`demo-<name>`), and each capability the demo's agents
    serve may be served by them: the demo completes under its own policy."""
    from hivemesh.agents.demos import DEMOS
    from hivemesh.agents.run import SDK_AGENTS

    docs = {item.doc.name: item.doc for item in validate_documents(
        parse_documents(DEMO_PROVIDERS.read_text(), source=str(DEMO_PROVIDERS)))}
    assert set(docs) == {f"demo-{name}" for name in DEMOS}
    served = {"validator": ["validate"]}  # the plain gRPC agent behind its sidecar
    for agent, (module, cls) in SDK_AGENTS.items():
        served[agent] = [c.name for c in getattr(importlib.import_module(module), cls)().card().capabilities]
    pipeline_agents = ("ocr", "extractor", "validator", "storage")
    for name, demo in DEMOS.items():
        table = compile_providers(MappingProxyType({f"demo-{name}": docs[f"demo-{name}"]}))
        agents = demo.agents or pipeline_agents
        for agent in agents:
            for cap in served[agent]:
                assert table.allows(cap, f"{TD}/agent/{agent}"), (name, agent, cap)
                assert not table.allows(cap, MALLORY), (name, cap)
        assert {c for a in agents for c in served[a]} >= set(demo.capabilities), name


def test_authz_check_reports_the_providers_gate_per_agent() -> None:
    table = _table(_doc("pipeline", {"capabilities": ["extract"], "agents": [EXTRACTOR]}))
    assert provider_gate(table, "extract", EXTRACTOR) == {
        "serves": True, "policies": ["providers/pipeline"],
        "reason": f"providers/pipeline lets only {EXTRACTOR} serve 'extract', {EXTRACTOR} among them"}
    left_out = provider_gate(table, "extract", MALLORY)
    assert left_out["serves"] is False and left_out["policies"] == ["providers/pipeline"]
    assert f"{MALLORY} is left out" in left_out["reason"]
    assert provider_gate(table, "ocr", MALLORY) == {
        "serves": True, "policies": [], "reason": "no providers policy names 'ocr': any agent may serve it"}
    # No agent serves it now: the target is a glob, which is told who may serve, not judged.
    assert provider_gate(table, "extract", f"{TD}/agent/*")["serves"] is True


def test_policy_list_shows_the_capabilities_a_providers_document_restricts() -> None:
    """`hivemesh policy list` showed `*` for every providers document (its spec has rules, not capabilities)."""
    from hivemesh.controlplane.cli.policy import _targets

    assert _targets({"rules": [{"capabilities": ["extract", "ocr"], "agents": [EXTRACTOR]},
                               {"capabilities": ["ocr", "store*"], "agents": [EXTRACTOR]}]}) == ["extract", "ocr",
                                                                                                  "store*"]
    assert _targets({"capabilities": ["a"]}) == ["a"] and _targets({"rules": []}) == ["*"]

"""`validate_document` names every bad field of a document at once, the envelope's and the spec's, so one
`policy apply` lists what to fix (the compiled schema validator stops at its first mistake, and three bad fields
took three applies to learn). Each field reads the same whether it was found first or alongside others; the first
one stays first; a check that compares fields still runs once the fields hold; and a spec with very many
mistakes is listed in part, saying so. Real documents of the registered kinds, no stand-ins."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hivemesh.controlplane.policies import validate_document, validate_documents
from hivemesh.mesh.errors import InvalidInputError
from hivemesh.mesh.policy import PolicyError
from tests.support.cli_offline import hivemesh

RETRY_FIELDS = "unknown field (allowed: attempts, backoff, budget, capabilities, per_try_timeout_ms, retryable_codes)"


def _mistakes(raw: dict[str, Any]) -> PolicyError:
    with pytest.raises(PolicyError) as refused:
        validate_document(raw)
    return refused.value


def test_every_bad_field_of_a_spec_is_named_the_first_first_and_checks_across_fields_after() -> None:
    err = _mistakes({"kind": "retries", "name": "default",
                     "spec": {"attempts": -1, "bogus": 1, "per_try_timeout_ms": -5}})
    assert str(err) == "spec.attempts: must be >= 1"
    assert err.violations == {
        "spec.attempts": "must be >= 1",
        "spec.per_try_timeout_ms": "must be >= 1",
        "spec.bogus": RETRY_FIELDS,
    }

    # A check that compares fields (two rules of one name) runs once every field holds, and names its finding.
    same = [{"name": "same", "action": "ALLOW"}, {"name": "same", "action": "DENY"}]
    fields = _mistakes({"kind": "authz", "name": "a", "spec": {"mode": "loud", "bogus": 1, "rules": same}})
    assert fields.violations == {"spec.mode": "must be one of: enforce, dry-run (got 'loud')",
                                 "spec.bogus": "unknown field (allowed: mode, rules, teams)"}
    check = _mistakes({"kind": "authz", "name": "a", "spec": {"rules": same}})
    assert check.violations == {"spec.rules[1].name": "duplicate rule name (also rules[0])"}


def test_the_envelope_and_the_spec_are_reported_together() -> None:
    err = _mistakes({"kind": "retries", "name": "Bad Name", "colour": "red", "version": -1,
                     "spec": {"attempts": 11, "backoff": {"base_ms": "soon", "extra": 1}}})
    assert list(err.violations.items()) == [
        ("colour", "unknown field (allowed: apiVersion, kind, name, description, version, spec)"),
        ("name", "must be a string matching [a-z0-9][a-z0-9._-]{0,62}"),
        ("version", "must be an integer >= 0 (the version you expect; 0: must not exist yet)"),
        ("spec.attempts", "must be <= 10"),
        ("spec.backoff.base_ms", "must be an integer, not string"),
        ("spec.backoff.extra", "unknown field (allowed: base_ms, jitter, max_ms, multiplier)"),
    ]


def test_list_items_missing_fields_and_keys_are_each_named() -> None:
    authz = _mistakes({"kind": "authz", "name": "a", "spec": {
        "teams": {"Ops": ["x"], "ok": []},
        "rules": [{"name": "a", "action": "MAYBE"}, {"action": "ALLOW", "from": {"callers": "x"}}],
    }})
    assert authz.violations == {
        "spec.teams": "must be named by propertyName definition",
        "spec.teams.ok": "must have at least 1 item(s)",
        "spec.rules[0].action": "must be one of: ALLOW, DENY, CUSTOM (got 'MAYBE')",
        "spec.rules[1].name": "is required",
        "spec.rules[1].from.callers": "must be an array, not string",
    }
    retries = _mistakes({"kind": "retries", "name": "r", "spec": {"per_try_timeout_ms": 0, "zz": 1, "aa": 2}})
    assert retries.violations == {"spec.attempts": "is required", "spec.per_try_timeout_ms": "must be >= 1",
                                  "spec.zz": RETRY_FIELDS, "spec.aa": RETRY_FIELDS}
    grants = _mistakes({"kind": "grants", "name": "g", "spec": {"subjects": [], "capabilities": [1], "bogus": 1}})
    assert grants.violations == {"spec.subjects": "must have at least 1 item(s)",
                                 "spec.capabilities[0]": "must be a string, not number",
                                 "spec.bogus": "unknown field (allowed: audiences, capabilities, subjects)"}


@pytest.mark.parametrize("kind, base, mistakes", [
    ("retries", {"attempts": 3}, [
        {"attempts": 0}, {"per_try_timeout_ms": "x"}, {"backoff": {"jitter": 2}}, {"retryable_codes": ["NOPE"]},
        {"capabilities": ["Bad Cap"]}, {"budget": {"window_s": 0}}, {"unknown": True},
    ]),
    ("authz", {"rules": [{"name": "r", "action": "ALLOW"}]}, [
        {"mode": "loud"}, {"teams": {"Ops": ["x"]}},
        {"rules": [{"name": "r", "action": "ALLOW", "from": {"callers": []}}]},
    ]),
])
def test_a_field_reads_the_same_found_first_or_alongside_others(
    kind: str, base: dict[str, Any], mistakes: list[dict[str, Any]]
) -> None:
    alone: dict[str, str] = {}
    for mistake in mistakes:
        one = _mistakes({"kind": kind, "name": "x", "spec": {**base, **mistake}}).violations
        assert len(one) == 1, one
        alone.update(one)
    merged = {k: v for m in mistakes for k, v in m.items()}  # each mistake in a field of its own
    together = _mistakes({"kind": kind, "name": "x", "spec": {**base, **merged}}).violations
    assert together == alone


def test_very_many_mistakes_are_listed_in_part_and_say_so() -> None:
    many = _mistakes({"kind": "authz", "name": "a", "spec": {
        "rules": [{"name": f"r{i}", "action": "MAYBE"} for i in range(100)]}}).violations
    assert len(many) == 51 and many["spec"] == "has more mistakes than the 50 listed", many
    assert many["spec.rules[0].action"].startswith("must be one of: ALLOW, DENY, CUSTOM")

    huge = _mistakes({"kind": "retries", "name": "r",
                      "spec": {"attempts": 0, "capabilities": ["Bad"] * 3000}}).violations
    assert huge == {"spec.capabilities": "must have at most 64 item(s)",
                    "spec": "not checked past its first mistake: it holds more than 2,000 values"}


def test_validate_documents_counts_every_mistake_of_every_document() -> None:
    with pytest.raises(InvalidInputError) as refused:
        validate_documents([
            {"kind": "retries", "name": "a", "spec": {"attempts": -1, "bogus": 1, "per_try_timeout_ms": -5}},
            {"kind": "timeouts", "name": "b", "spec": {"default_ms": 0, "capabilities": {}}},
        ])
    err = refused.value
    assert err.message == "documents[0] (retries/a): spec.attempts: must be >= 1; and 4 more mistakes"
    assert set(err.field_violations) == {
        "documents[0].spec.attempts", "documents[0].spec.per_try_timeout_ms", "documents[0].spec.bogus",
        "documents[1].spec.default_ms", "documents[1].spec.capabilities",
    }


def test_policy_apply_prints_every_mistake(home: Path) -> None:
    path = home / "retries.yaml"
    path.write_text("kind: retries\nname: default\nspec: {attempts: -1, bogus: 1, per_try_timeout_ms: -5}\n")
    result = hivemesh(home, "policy", "apply", "-f", str(path))
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert lines[0] == ("error: retries/default: spec.attempts: must be >= 1; and 2 more mistakes "
                        "(INVALID_ARGUMENT, INVALID_INPUT)"), lines
    assert lines[1:] == ["  spec.attempts: must be >= 1", "  spec.per_try_timeout_ms: must be >= 1",
                         f"  spec.bogus: {RETRY_FIELDS}"], lines

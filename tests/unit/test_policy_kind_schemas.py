"""Policy kinds compile their spec's JSON Schema on first use, not when their module loads (start-up CPU of
every hivemesh process); so a broken schema must still be caught here, before it ships, and say which kind."""

from __future__ import annotations

import pytest

from hivemesh.controlplane.policies import KINDS
from hivemesh.mesh.policy import PolicyDoc, PolicyError, PolicyKind


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_stored_kind_has_a_valid_schema(name: str) -> None:
    assert callable(KINDS[name].validator)


def test_the_schema_compiles_on_first_use_and_once() -> None:
    kind: PolicyKind[None] = PolicyKind(
        "lazy-test", {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}},
        compile=lambda _docs: None)
    assert "validator" not in vars(kind)  # nothing compiled by defining the kind
    kind.validate(PolicyDoc("lazy-test", "a", {"n": 1}))
    compiled = vars(kind)["validator"]
    with pytest.raises(PolicyError) as refused:
        kind.validate(PolicyDoc("lazy-test", "b", {"n": "x"}))
    assert refused.value.path == "spec.n"
    assert kind.validator is compiled


def test_an_invalid_schema_is_a_value_error_naming_the_kind() -> None:
    kind: PolicyKind[None] = PolicyKind("broken-test", {"type": "no-such-type"}, compile=lambda _docs: None)
    with pytest.raises(ValueError, match="policy kind 'broken-test': invalid spec schema"):
        kind.validate(PolicyDoc("broken-test", "a", {}))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_spec_holding_nan_or_infinity_is_refused_before_it_is_stored(bad: float) -> None:
    """YAML's `.nan` (or NaN in an RPC's spec_json, which json reads) was stored: read back it printed `NaN`, no
    JSON, and an SLO's alert could never fire, a webhook's retry pause never end. The document is refused."""
    from hivemesh.controlplane.policies import validate_document

    raw = {"kind": "slo", "name": "s", "spec": {"capability": "echo", "availability": bad}}
    with pytest.raises(PolicyError) as refused:
        validate_document(raw)
    assert "spec" in refused.value.violations, refused.value.violations
    assert "not JSON compliant" in refused.value.violations["spec"]

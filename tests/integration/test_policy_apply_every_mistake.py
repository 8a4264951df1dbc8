"""`hivemesh policy apply` (the real CLI, as the operator, against a real control plane over mutual TLS) names every
mistake of every document in one apply, and writes nothing: the checks beyond the schema run beside the schema's
findings and list each of their own (a retries document with a wrong number and two never-retried codes took three
applies to learn them), conflicts between documents name the document they are in (`documents[i].`), and
documents are numbered one way, from 0, in the message as in the paths. The control plane's own answer (its
ApplyPolicies validates anew) carries the same field violations as the CLI prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hivemesh.controlplane.cli.policy_client import PolicyClient
from hivemesh.mesh.errors import HivemeshError
from tests.support.meshenv import MeshEnv, run_cli

NEVER = ("is never retried: the same request would fail the same way (never INVALID_ARGUMENT, PERMISSION_DENIED, "
         "UNAUTHENTICATED, FAILED_PRECONDITION)")
AMBIGUOUS = "which one applies would be ambiguous"
BOUNDS = "use one of 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000"
TAIL = " (INVALID_ARGUMENT, INVALID_INPUT)"


def _retries(name: str, **spec: Any) -> dict[str, Any]:
    return {"kind": "retries", "name": name, "spec": {"attempts": 3, **spec}}


async def _refused(env: MeshEnv, tmp: Path, docs: list[dict[str, Any]]) -> tuple[list[str], dict[str, str]]:
    """Apply docs (one document, or a JSON list of several) through the CLI, as text and as --json, and through
    the control plane's service: refused alike; (the text's stderr lines, the field violations)."""
    path = tmp / "policies.json"
    path.write_text(json.dumps(docs[0] if len(docs) == 1 else docs))
    code, out, err = await run_cli(env, "policy", "apply", "-f", str(path))
    assert (code, out) == (1, ""), out + err
    code, out, as_json = await run_cli(env, "policy", "apply", "-f", str(path), "--json")
    assert (code, out) == (1, ""), out + as_json
    error = json.loads(as_json)["error"]
    violations: dict[str, str] = error["details"]["field_violations"]
    assert error["code"] == "INVALID_ARGUMENT" and err.splitlines()[0] == f"error: {error['message']}{TAIL}"
    with pytest.raises(HivemeshError) as served:
        await PolicyClient(env.operator).apply(docs)
    assert served.value.field_violations == violations and served.value.message == error["message"]
    return err.splitlines(), violations


async def _stored(env: MeshEnv, kind: str) -> list[str]:
    code, out, err = await run_cli(env, "policy", "list", kind, "--json")
    assert code == 0, err
    return [d["name"] for d in json.loads(out)]


async def test_a_retries_document_lists_its_schema_and_check_mistakes_at_once(mesh_env: MeshEnv,
                                                                             tmp_path: Path) -> None:
    codes = ["UNAVAILABLE", "INVALID_ARGUMENT", "PERMISSION_DENIED"]
    lines, violations = await _refused(mesh_env, tmp_path, [_retries("r", attempts=11, retryable_codes=codes)])
    assert lines == [
        f"error: retries/r: spec.attempts: must be <= 10; and 2 more mistakes{TAIL}",
        "  spec.attempts: must be <= 10",
        f"  spec.retryable_codes[1]: INVALID_ARGUMENT {NEVER}",
        f"  spec.retryable_codes[2]: PERMISSION_DENIED {NEVER}",
    ]
    # With the number right, the check still names both codes, not only the first.
    _lines, violations = await _refused(mesh_env, tmp_path, [_retries("r", retryable_codes=codes)])
    assert violations == {"spec.retryable_codes[1]": f"INVALID_ARGUMENT {NEVER}",
                          "spec.retryable_codes[2]": f"PERMISSION_DENIED {NEVER}"}
    assert await _stored(mesh_env, "retries") == []


async def test_an_slos_document_lists_every_objective_mistake(mesh_env: MeshEnv, tmp_path: Path) -> None:
    objective = {"capability": "extract", "availability": 1.5, "window_days": 100,
                 "latency": {"threshold_ms": 300, "target": 2}}
    _lines, violations = await _refused(mesh_env, tmp_path, [
        {"kind": "slos", "name": "s", "spec": {"objectives": [objective]}}])
    assert violations == {
        "spec.objectives[0].availability": "must be < 1",
        "spec.objectives[0].window_days": "must be <= 90",
        "spec.objectives[0].latency.target": "must be < 1",
        "spec.objectives[0].latency.threshold_ms": f"300 ms is not a histogram bucket bound; {BOUNDS}",
    }
    # Two of the check's own findings in one document: a threshold off the buckets, and a capability twice.
    _lines, violations = await _refused(mesh_env, tmp_path, [{"kind": "slos", "name": "s", "spec": {"objectives": [
        {"capability": "extract", "latency": {"threshold_ms": 300, "target": 0.9}},
        {"capability": "extract", "availability": 0.99},
    ]}}])
    assert violations == {
        "spec.objectives[0].latency.threshold_ms": f"300 ms is not a histogram bucket bound; {BOUNDS}",
        "spec.objectives[1].capability": "capability 'extract' has two objectives here (also objectives[0])",
    }
    assert await _stored(mesh_env, "slos") == []


async def test_conflicts_between_documents_name_the_document_they_are_in(mesh_env: MeshEnv, tmp_path: Path) -> None:
    # Two kinds' conflicts in one file: each listed, under the document it is in, both sides of each.
    lines, violations = await _refused(mesh_env, tmp_path, [
        _retries("ra", capabilities=["extract"]), _retries("rb", capabilities=["ocr", "extract"]),
        {"kind": "timeouts", "name": "ta", "spec": {"default_ms": 500}},
        {"kind": "timeouts", "name": "tb", "spec": {"default_ms": 900}},
    ])
    assert violations == {
        "documents[0].spec.capabilities[0]": f"retries/ra and retries/rb both target 'extract': {AMBIGUOUS}",
        "documents[1].spec.capabilities[1]": f"retries/rb and retries/ra both target 'extract': {AMBIGUOUS}",
        "documents[2].spec.capabilities": f"timeouts/ta and timeouts/tb both target '*': {AMBIGUOUS}",
        "documents[3].spec.capabilities": f"timeouts/tb and timeouts/ta both target '*': {AMBIGUOUS}",
    }
    assert lines[0] == (f"error: documents[0] (retries/ra): spec.capabilities[0]: retries/ra and retries/rb both "
                        f"target 'extract': {AMBIGUOUS}; and 3 more mistakes{TAIL}")
    assert await _stored(mesh_env, "retries") == [] and await _stored(mesh_env, "timeouts") == []

    # Against a stored document, the conflict is named in the document applied, at its own field.
    (tmp_path / "rb.json").write_text(json.dumps(_retries("rb", capabilities=["extract"])))
    code, out, err = await run_cli(mesh_env, "policy", "apply", "-f", str(tmp_path / "rb.json"))
    assert code == 0 and "retries/rb is created" in out, out + err
    lines, violations = await _refused(mesh_env, tmp_path, [
        {"kind": "timeouts", "name": "fine", "spec": {"default_ms": 500}},
        _retries("ra", capabilities=["ocr", "extract"]),
    ])
    assert violations == {
        "documents[1].spec.capabilities[1]": f"retries/ra and retries/rb both target 'extract': {AMBIGUOUS}"}
    assert lines[0].startswith("error: documents[1] (retries/ra): spec.capabilities[1]: retries/ra and retries/rb")
    assert await _stored(mesh_env, "retries") == ["rb"] and await _stored(mesh_env, "timeouts") == []


async def test_documents_are_numbered_from_0_in_the_message_as_in_the_paths(mesh_env: MeshEnv,
                                                                         tmp_path: Path) -> None:
    twice = {"kind": "timeouts", "name": "a", "spec": {"default_ms": 500}}
    lines, _violations = await _refused(mesh_env, tmp_path, [twice, twice])
    assert lines == [f"error: documents[1] (timeouts/a): name: timeouts/a is also documents[0]{TAIL}",
                     "  documents[1].name: timeouts/a is also documents[0]"]
    # A repeated document is named even when it has mistakes of its own, beside them.
    lines, violations = await _refused(mesh_env, tmp_path, [twice, {**twice, "spec": {"default_ms": 0}}])
    assert violations == {"documents[1].spec.default_ms": "must be >= 1",
                          "documents[1].name": "timeouts/a is also documents[0]"}
    assert lines[0] == f"error: documents[1] (timeouts/a): spec.default_ms: must be >= 1; and 1 more mistake{TAIL}"
    assert await _stored(mesh_env, "timeouts") == []


ROUTES_FIELDS = "needs a version or labels to select"


@pytest.mark.parametrize("kind, spec, expected", [
    ("routes", {"capabilities": ["extract"], "fallback": "extract", "shadow": {"percent": 500},
                "rules": [{"pin": {"version": "1.*"}, "split": [{"weight": 0}, {"weight": 0, "version": 5}]}]}, {
        "spec.rules[0].split[1].version": "must be a string, not number",
        "spec.shadow.percent": "must be <= 100",
        "spec.rules[0]": "give pin or split, not both",
        "spec.rules[0].split": "weights must not all be 0",
        "spec.rules[0].split[0]": f"{ROUTES_FIELDS} instances",
        "spec.shadow": f"{ROUTES_FIELDS} the candidate instances",
        "spec.fallback": "a capability cannot fall back to itself",
    }),
    ("breakers", {"instance": {"open_ms": 5000, "max_open_ms": 100}, "capability": {"open_ms": -1}}, {
        "spec.capability.open_ms": "must be >= 1",
        "spec.instance": "needs consecutive_failures or failure_ratio to know when to open",
        "spec.instance.max_open_ms": "must be >= open_ms",
        "spec.capability": "needs consecutive_failures or failure_ratio to know when to open",
    }),
    ("ratelimits", {"total_rps": -1, "cluster_total_rps": 5, "scope": "cluster"}, {
        "spec.total_rps": "must be >= 0",
        "spec.cluster_total_rps": "give total_rps (per instance) or cluster_total_rps, not both",
        "spec.scope": "scope applies to per_identity_rps and overrides, and there is neither (the total is per "
                      "instance as total_rps, or cluster-wide as cluster_total_rps)",
    }),
    # Checks that meet wrong types skip them (the schema names them) and still judge the rest.
    ("concurrency", {"max_in_flight": "x", "classes": [{"name": "a", "min_priority": 1},
                                                       {"name": "a", "min_priority": "z"}, 5]}, {
        "spec.max_in_flight": "must be an integer, not string",
        "spec.classes[1].min_priority": "must be an integer, not string",
        "spec.classes[2]": "must be an object, not number",
        "spec.classes[1].name": "class 'a' is defined twice (also classes[0])",
    }),
    ("rollouts", {"capability": "work", "stable": {"version": "1"}, "canary": {"version": "1"}, "steps": [50, 25],
                  "bogus": 1}, {
        "spec.bogus": "unknown field (allowed: canary, capability, interval_s, max_error_rate, "
                      "max_error_rate_increase, max_latency_ratio, min_calls, routes, stable, steps)",
        "spec.steps[1]": "steps must grow (e.g. 5, 25, 50, 100); the last step must be 100 (the canary takes all "
                         "traffic)",
        "spec.canary": "the canary must select other instances than the stable version",
    }),
])
async def test_every_traffic_kind_lists_its_checks_findings_beside_the_schemas(
    mesh_env: MeshEnv, tmp_path: Path, kind: str, spec: dict[str, Any], expected: dict[str, str]
) -> None:
    lines, violations = await _refused(mesh_env, tmp_path, [{"kind": kind, "name": "x", "spec": spec}])
    assert violations == expected
    assert lines[1:] == [f"  {path}: {why}" for path, why in expected.items()]
    assert await _stored(mesh_env, kind) == []

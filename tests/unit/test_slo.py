"""The `slos` policy kind: what it accepts, what it refuses (with the field), and the burn-rate thresholds."""

from __future__ import annotations

import pytest

from hivemesh.controlplane.slo import ALERT_WINDOWS, SLOS, _burn_factor, objectives, render_rules
from hivemesh.mesh.policy import PolicyDoc, PolicyError


def _doc(*objs: dict[str, object]) -> PolicyDoc:
    return PolicyDoc("slos", "t", {"objectives": list(objs)})


def test_workbook_burn_rates_for_a_30_day_window() -> None:
    assert [_burn_factor(a, 30) for a in ALERT_WINDOWS] == [14.4, 6.0, 3.0, 1.0]
    assert [_burn_factor(a, 28) for a in ALERT_WINDOWS] == [13.44, 5.6, 2.8, 0.9333]


@pytest.mark.parametrize(("objective", "path", "words"), [
    ({"capability": "x"}, "spec.objectives[0]", "availability, latency or both"),
    ({"capability": "x", "latency": {"threshold_ms": 300, "target": 0.9}}, "spec.objectives[0].latency.threshold_ms",
     "not a histogram bucket bound"),
    ({"capability": "x", "availability": 1.0}, "spec.objectives[0].availability", ""),
    ({"capability": "X!", "availability": 0.9}, "spec.objectives[0].capability", ""),
])
def test_bad_objectives_are_refused_with_the_field(objective: dict[str, object], path: str, words: str) -> None:
    with pytest.raises(PolicyError) as err:
        SLOS.validate(_doc(objective))
    assert path in str(err.value) and words in str(err.value)


def test_two_objectives_for_one_capability_in_a_document_are_refused() -> None:
    with pytest.raises(PolicyError, match="two objectives"):
        SLOS.validate(_doc({"capability": "x", "availability": 0.9}, {"capability": "x", "availability": 0.99}))


def test_rules_name_each_capability_and_only_the_objectives_given() -> None:
    doc = SLOS.validate(_doc({"capability": "a", "availability": 0.99},
                             {"capability": "b", "latency": {"threshold_ms": 250, "target": 0.95}}))
    rules = render_rules(objectives({"t": doc}))
    records, alerts = rules["groups"][0]["rules"], rules["groups"][1]["rules"]
    assert {(r["labels"]["capability"], r["labels"]["slo"]) for r in records} == {("a", "availability"),
                                                                               ("b", "latency")}
    assert len(records) == 2 * 7
    assert all('le="0.25"' in r["expr"] for r in records if r["labels"]["slo"] == "latency")
    assert sorted((a["labels"]["capability"], a["alert"]) for a in alerts) == [
        ("a", "HivemeshSLOBurnFast"), ("a", "HivemeshSLOBurnSlow"), ("b", "HivemeshSLOBurnFast"),
        ("b", "HivemeshSLOBurnSlow")]
    fast_a = next(a for a in alerts if a["labels"]["capability"] == "a" and a["alert"] == "HivemeshSLOBurnFast")
    assert "(13.44 * 0.01)" in fast_a["expr"] and "ratio_rate5m" in fast_a["expr"]

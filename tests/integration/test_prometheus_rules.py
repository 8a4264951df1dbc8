"""The shipped alert rules and the SLO rules `hivemesh slo rules` renders, checked and unit-tested by Prometheus's
own promtool (TEST_MATRIX O3): every alert fires on its synthetic series and stays silent on a healthy one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from hivemesh.controlplane.slo import SLOS, objectives, render_rules
from hivemesh.mesh.metrics import exported_names
from hivemesh.mesh.policy import PolicyDoc
from tests.support.prometheus_server import promtool

REPO = Path(__file__).resolve().parents[2]
PROM = REPO / "deploy" / "prometheus"


def test_shipped_alert_rules_check_and_pass_their_unit_tests() -> None:
    assert "SUCCESS: 14 rules found" in promtool("check", "rules", "alerts.yml", cwd=PROM)
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yml", cwd=PROM)
    # Every alert in the file has at least one test that expects it to fire.
    names = {r["alert"] for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    tests = yaml.safe_load((PROM / "alerts.test.yml").read_text())["tests"]
    fired = {t["alertname"] for case in tests for t in case["alert_rule_test"] if t.get("exp_alerts")}
    assert names == fired, f"alerts without a firing test: {sorted(names - fired)}"


def test_rendered_slo_rules_burn_fast_on_an_outage_and_stay_silent_when_healthy(tmp_path: Path) -> None:
    doc = SLOS.validate(PolicyDoc("slos", "extract", {"objectives": [
        {"capability": "extract", "availability": 0.999, "latency": {"threshold_ms": 500, "target": 0.99},
         "window_days": 30},
        {"capability": "ocr", "availability": 0.99},
    ]}))
    (tmp_path / "slo.yml").write_text(yaml.safe_dump(render_rules(objectives({"extract": doc}))))
    assert "SUCCESS" in promtool("check", "rules", "slo.yml", cwd=tmp_path)
    ok = 'hivemesh_requests_total{direction="inbound",capability="%s",code="%s"}'
    bucket = 'hivemesh_request_duration_seconds_bucket{direction="inbound",capability="extract",le="%s"}'
    count = 'hivemesh_request_duration_seconds_count{direction="inbound",capability="extract"}'
    test = {
        "rule_files": ["slo.yml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                # extract: 20% of calls fail and 10% are slower than 500 ms, from minute 0 on: both budgets burn fast.
                {"series": ok % ("extract", "OK"), "values": "0+80x90"},
                {"series": ok % ("extract", "UNAVAILABLE"), "values": "0+20x90"},
                {"series": bucket % "0.5", "values": "0+90x90"},
                {"series": bucket % "+Inf", "values": "0+100x90"},
                {"series": count, "values": "0+100x90"},
                # ocr: healthy (0.5% failures against a 1% budget: burn rate 0.5, below every threshold).
                {"series": ok % ("ocr", "OK"), "values": "0+995x90"},
                {"series": ok % ("ocr", "INTERNAL"), "values": "0+5x90"},
                {"series": ok % ("ocr", "INVALID_ARGUMENT"), "values": "0+500x90"},
            ],
            "alert_rule_test": [
                {"eval_time": "70m", "alertname": "HivemeshSLOBurnFast", "exp_alerts": [
                    {"exp_labels": {"severity": "critical", "capability": "extract", "slo": s},
                     "exp_annotations": {
                         "summary": f"extract: {s} error budget burning fast",
                         "description": (f"The {s} objective of extract ({o} over 30 d) is spending its error "
                                         "budget at a rate that exhausts it early (page threshold)."),
                     }} for s, o in (("availability", "0.999"), ("latency", "0.99"))
                ]},
            ],
        }],
    }
    (tmp_path / "slo.test.yml").write_text(yaml.safe_dump(test))
    assert "SUCCESS" in promtool("test", "rules", "slo.test.yml", cwd=tmp_path)


def test_slo_burn_pages_for_an_overloaded_agent_not_for_one_caller_over_its_own_quota(tmp_path: Path) -> None:
    """A caller refused by its rate limit or token budget spends no error budget (as in HivemeshHighErrorRate);
    an agent shedding load (OVERLOADED) does. Both capabilities refuse the same share of their calls."""
    doc = SLOS.validate(PolicyDoc("slos", "quota", {"objectives": [
        {"capability": "extract", "availability": 0.99}, {"capability": "ocr", "availability": 0.99}]}))
    (tmp_path / "slo.yml").write_text(yaml.safe_dump(render_rules(objectives({"quota": doc}))))
    assert "SUCCESS" in promtool("check", "rules", "slo.yml", cwd=tmp_path)
    series = ('hivemesh_requests_total{direction="inbound",capability="%s",caller="%s",code="%s",reason="%s"}')
    test = {
        "rule_files": ["slo.yml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                # extract: every admitted call succeeds; one caller calls past its rate limit and token budget.
                {"series": series % ("extract", "ingest", "OK", ""), "values": "0+30x90"},
                {"series": series % ("extract", "greedy", "OK", ""), "values": "0+30x90"},
                {"series": series % ("extract", "greedy", "RESOURCE_EXHAUSTED", "RATE_LIMITED"),
                 "values": "0+90x90"},
                {"series": series % ("extract", "greedy", "RESOURCE_EXHAUSTED", "TOKEN_BUDGET_EXCEEDED"),
                 "values": "0+30x90"},
                # ocr: the agent is at its in-flight limit and sheds the same share of calls.
                {"series": series % ("ocr", "ingest", "OK", ""), "values": "0+60x90"},
                {"series": series % ("ocr", "ingest", "RESOURCE_EXHAUSTED", "OVERLOADED"), "values": "0+120x90"},
            ],
            "promql_expr_test": [
                {"expr": 'hivemesh:slo_errors:ratio_rate1h{capability="extract"}', "eval_time": "70m",
                 "exp_samples": [{"labels": 'hivemesh:slo_errors:ratio_rate1h{capability="extract",'
                                            'slo="availability"}', "value": 0}]},
                {"expr": 'hivemesh:slo_errors:ratio_rate1h{capability="ocr"}', "eval_time": "70m",
                 "exp_samples": [{"labels": 'hivemesh:slo_errors:ratio_rate1h{capability="ocr",'
                                            'slo="availability"}', "value": 2 / 3}]},
            ],
            "alert_rule_test": [
                {"eval_time": "70m", "alertname": "HivemeshSLOBurnFast", "exp_alerts": [
                    {"exp_labels": {"severity": "critical", "capability": "ocr", "slo": "availability"},
                     "exp_annotations": {
                         "summary": "ocr: availability error budget burning fast",
                         "description": ("The availability objective of ocr (0.99 over 28 d) is spending its error "
                                         "budget at a rate that exhausts it early (page threshold)."),
                     }},
                ]},
                {"eval_time": "70m", "alertname": "HivemeshSLOBurnSlow", "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "capability": "ocr", "slo": "availability"},
                     "exp_annotations": {
                         "summary": "ocr: availability error budget burning slowly",
                         "description": ("The availability objective of ocr (0.99 over 28 d) is spending its error "
                                         "budget at a rate that exhausts it early (ticket threshold)."),
                     }},
                ]},
            ],
        }],
    }
    (tmp_path / "slo.test.yml").write_text(yaml.safe_dump(test))
    assert "SUCCESS" in promtool("test", "rules", "slo.test.yml", cwd=tmp_path)


_NAME = re.compile(r"\b(hivemesh[_:][A-Za-z0-9_:]*)")
_SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def _unknown_names(expr: str, recorded: set[str]) -> set[str]:
    exported = exported_names()
    bad = set()
    for name in _NAME.findall(expr):
        if ":" in name:
            if name not in recorded:
                bad.add(name)
            continue
        base = next((name[: -len(s)] for s in _SUFFIXES if name.endswith(s) and name[: -len(s)] in exported), name)
        if base not in exported:
            bad.add(name)
    return bad


def test_dashboards_and_alerts_name_only_metrics_the_mesh_exports() -> None:
    doc = SLOS.validate(PolicyDoc("slos", "any", {"objectives": [
        {"capability": "x", "availability": 0.99, "latency": {"threshold_ms": 500, "target": 0.9}}]}))
    recorded = {r["record"] for r in render_rules(objectives({"any": doc}))["groups"][0]["rules"]}
    exprs: list[tuple[str, str]] = []
    for path in sorted((REPO / "deploy" / "grafana").glob("*.json")):
        dash = json.loads(path.read_text())
        exprs += [(f"{path.name}: {p['title']}", t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]:
        exprs += [(f"alerts.yml: {r['alert']}", r["expr"]) for r in g["rules"]]
    assert len(exprs) > 20
    problems = {where: sorted(bad) for where, expr in exprs if (bad := _unknown_names(expr, recorded))}
    assert not problems, f"queries name metrics the mesh does not export: {problems}"
    # The check itself bites on a made-up name.
    assert _unknown_names("rate(hivemesh_made_up_total[5m])", recorded) == {"hivemesh_made_up_total"}


def test_the_scrape_config_is_valid() -> None:
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml", cwd=PROM)

"""`slos` documents kept by the real policy store (straight, and through `hivemesh policy apply` and the control
plane's Policies service), rendered by `hivemesh slo rules` (the real CLI, as the operator, over etcd with mutual
TLS) into a rule file Prometheus's promtool accepts; a bad document is refused with the field that is wrong."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from hivemesh.controlplane.policies import apply_text
from hivemesh.controlplane.slo import SLOS, objectives, render_rules
from hivemesh.mesh.errors import InvalidInputError
from hivemesh.mesh.etcd import client, wait_connected
from hivemesh.mesh.policy import PolicyDoc
from tests.support.meshenv import MeshEnv, apply_policies_text, controlplane_access, run_cli

EXTRACT = {"kind": "slos", "name": "documents", "spec": {"objectives": [
    {"capability": "extract", "availability": 0.999, "latency": {"threshold_ms": 500, "target": 0.99},
     "window_days": 30},
    {"capability": "ocr", "availability": 0.99},
]}}
SUMMARIZE = {"kind": "slos", "name": "llm", "description": "the model-backed capabilities", "spec": {"objectives": [
    {"capability": "summarize", "latency": {"threshold_ms": 10000, "target": 0.95}, "window_days": 7},
]}}


def _promtool_check(rules: dict[str, Any], tmp: Path) -> str:
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool (Debian's prometheus package) is installed by ./run"
    (tmp / "slo.yml").write_text(yaml.safe_dump(rules))
    out = subprocess.run([promtool, "check", "rules", "slo.yml"], cwd=tmp, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's tables and error lines unwrapped (run_cli hands the child this process's environment)."""
    monkeypatch.setenv("COLUMNS", "200")


async def test_slo_rules_render_the_stored_objectives(mesh_env: MeshEnv, tmp_path: Path) -> None:
    await apply_policies_text(mesh_env.etcd, yaml.safe_dump(EXTRACT))  # the store, as the control plane runs it
    path = tmp_path / "llm.yaml"
    path.write_text(yaml.safe_dump(SUMMARIZE))
    code, out, err = await run_cli(mesh_env, "policy", "apply", "-f", str(path))  # through the Policies service
    assert code == 0 and "slos/llm is created" in out, out + err

    # Four read-only commands: their processes run at once.
    rendered, as_json, listed, table = await asyncio.gather(
        run_cli(mesh_env, "slo", "rules"), run_cli(mesh_env, "slo", "rules", "--json"),
        run_cli(mesh_env, "slo", "list", "--json"), run_cli(mesh_env, "slo", "list"))
    code, out, err = rendered
    assert code == 0, err
    assert out.startswith("# Rendered by `hivemesh slo rules` from the slos policies: documents, llm.")
    rules = yaml.safe_load(out)
    expected = render_rules(objectives({
        d["name"]: SLOS.validate(PolicyDoc("slos", d["name"], d["spec"])) for d in (EXTRACT, SUMMARIZE)}))
    assert rules == expected
    # extract: availability and latency, ocr: availability, summarize: latency; 7 windows each, 2 alerts each.
    assert "SUCCESS: 36 rules found" in _promtool_check(rules, tmp_path)
    alerts = rules["groups"][1]["rules"]
    fast = next(a for a in alerts if a["labels"] == {"severity": "critical", "capability": "summarize",
                                                     "slo": "latency"})
    assert "(3.36 * 0.05)" in fast["expr"]  # 2% of a 7-day budget in an hour: 0.02 * 168 / 1
    assert 'le="10.0"' in next(r["expr"] for r in rules["groups"][0]["rules"]
                                if r["labels"] == {"capability": "summarize", "slo": "latency"})

    code, out, err = as_json
    assert code == 0 and json.loads(out) == expected, err

    code, out, err = listed
    assert code == 0, err
    assert json.loads(out) == [
        {"capability": "extract", "policy": "documents", "availability": 0.999, "latency_threshold_ms": 500.0,
         "latency_target": 0.99, "window_days": 30, "availability_budget_min": 43.2},
        {"capability": "ocr", "policy": "documents", "availability": 0.99, "latency_threshold_ms": None,
         "latency_target": None, "window_days": 28, "availability_budget_min": 403.2},
        {"capability": "summarize", "policy": "llm", "availability": None, "latency_threshold_ms": 10000.0,
         "latency_target": 0.95, "window_days": 7, "availability_budget_min": None},
    ]
    code, out, err = table
    assert code == 0, err
    row = next(line for line in out.splitlines() if "extract" in line)
    assert "99.900%" in row and "99.00% within 500 ms" in row and "43.2 min" in row and "documents" in row


async def test_no_objectives_render_an_empty_rule_file_and_say_so(mesh_env: MeshEnv, tmp_path: Path) -> None:
    code, out, err = await run_cli(mesh_env, "slo", "rules")
    assert code == 0 and "no slos policies are stored" in err
    rules = yaml.safe_load(out)
    assert [g["rules"] for g in rules["groups"]] == [[], []]
    assert "SUCCESS: 0 rules found" in _promtool_check(rules, tmp_path)


async def test_a_bad_slos_document_is_refused_with_the_field(mesh_env: MeshEnv, tmp_path: Path) -> None:
    bad = {"kind": "slos", "name": "bad", "spec": {"objectives": [
        {"capability": "extract", "latency": {"threshold_ms": 300, "target": 0.99}}]}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    code, out, err = await run_cli(mesh_env, "policy", "apply", "-f", str(path))
    assert code == 1, out + err
    assert "spec.objectives[0].latency.threshold_ms" in err and "not a histogram bucket bound" in err

    bad["spec"]["objectives"][0] = {"capability": "extract", "availability": 1.5}  # type: ignore[index]
    c = client(controlplane_access(mesh_env.etcd))  # the store itself, as the control plane reaches etcd
    try:
        await wait_connected(c)
        with pytest.raises(InvalidInputError) as info:
            await apply_text(c, yaml.safe_dump(bad))
    finally:
        await c.close()
    assert "spec.objectives[0].availability" in info.value.field_violations

    code, out, err = await run_cli(mesh_env, "slo", "list", "--json")
    assert code == 0 and json.loads(out) == [], err  # nothing was stored

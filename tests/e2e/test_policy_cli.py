"""`hivemesh policy ...` and `hivemesh status` as an operator runs them (the real CLI in a child process), over
the control plane's Policies service; and that service refusing anyone but an operator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from pathlib import Path

import aetcd
import pytest

from hivemesh.controlplane.cli.policy_client import PolicyClient
from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.errors import HivemeshError, InvalidInputError, NotFoundError, PermissionDeniedError
from hivemesh.mesh.policy import policy_key
from hivemesh.mesh.tls import Workload
from hivemesh.v1 import policy_pb2
from tests.support.cli_zygote import run_hivemesh
from tests.support.meshenv import MeshEnv
from tests.support.resilience_rig import fleet
from tests.support.traffic_status import wait_traffic_status

POLICIES = """
kind: retries
name: default
description: retry what was never served
spec:
  attempts: 3
  retryable_codes: [UNAVAILABLE]
---
kind: breakers
name: work
spec:
  capabilities: [work]
  instance: {consecutive_failures: 5, open_ms: 2000}
"""


async def hivemesh(env: MeshEnv, tmp: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    s = env.base_settings()
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMESH_")}
    child_env.update(HIVEMESH_ETCD=s.etcd, HIVEMESH_CONTROLPLANE=s.controlplane, HIVEMESH_JOIN=s.join,
                     HIVEMESH_CA=str(s.ca_bundle), HIVEMESH_TRUST_DOMAIN=s.trust_domain, COLUMNS="220")
    argv = ["--certs-dir", str(tmp / "certs"), "--home", str(tmp / "cli-home"), *args]
    code, out, err = await run_hivemesh(argv, child_env, stdin=stdin.encode() if stdin is not None else None)
    return subprocess.CompletedProcess(argv, code, out, err)


async def test_policy_cli_apply_get_list_delete(mesh_env: MeshEnv, etcd: aetcd.Client, tmp_path: Path) -> None:
    path = tmp_path / "policies.yaml"
    path.write_text(POLICIES)
    dry = await hivemesh(mesh_env, tmp_path, "policy", "apply", "-f", str(path), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["dry_run"] is True
    assert await etcd.get(policy_key("retries", "default").encode()) is None

    applied = await hivemesh(mesh_env, tmp_path, "policy", "apply", "-f", str(path))
    assert applied.returncode == 0, applied.stderr
    assert "retries/default is created" in applied.stdout and "breakers/work is created" in applied.stdout
    kv = await etcd.get(policy_key("retries", "default").encode())
    assert kv is not None

    again = await hivemesh(mesh_env, tmp_path, "policy", "apply", "-f", "-", "--json", stdin=POLICIES)
    assert [a["action"] for a in json.loads(again.stdout)["applied"]] == ["unchanged", "unchanged"]

    got = await hivemesh(mesh_env, tmp_path, "policy", "get", "retries", "default", "--json")
    doc = json.loads(got.stdout)
    assert doc["version"] == kv.mod_revision and doc["spec"]["attempts"] == 3
    yaml_out = await hivemesh(mesh_env, tmp_path, "policy", "get", "retries", "default")
    assert "attempts: 3" in yaml_out.stdout and "kind: retries" in yaml_out.stdout

    listed = await hivemesh(mesh_env, tmp_path, "policy", "list", "--json")
    names = {(d["kind"], d["name"]) for d in json.loads(listed.stdout)}
    assert {("retries", "default"), ("breakers", "work"), ("grants", "tests-clients")} <= names
    table = await hivemesh(mesh_env, tmp_path, "policy", "list", "retries")
    assert "default" in table.stdout and "work" not in table.stdout

    # A bad document: one line naming the field, exit code 1, nothing written.
    bad = tmp_path / "bad.yaml"
    bad.write_text(POLICIES.replace("attempts: 3", "attempts: 11"))
    refused = await hivemesh(mesh_env, tmp_path, "policy", "apply", "-f", str(bad))
    assert refused.returncode == 1
    assert "documents[0].spec.attempts: must be <= 10" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert (await etcd.get(policy_key("retries", "default").encode())).mod_revision == kv.mod_revision

    kinds = await hivemesh(mesh_env, tmp_path, "policy", "kinds", "--json")
    assert {"routes", "retries", "timeouts", "breakers", "ratelimits", "concurrency"} <= {
        k["name"] for k in json.loads(kinds.stdout)}

    # Delete asks first; "n" changes nothing, --yes deletes; deleting again is NOT_FOUND.
    declined = await hivemesh(mesh_env, tmp_path, "policy", "delete", "retries", "default", stdin="n\n")
    assert declined.returncode == 1 and await etcd.get(policy_key("retries", "default").encode()) is not None
    deleted = await hivemesh(mesh_env, tmp_path, "policy", "delete", "retries", "default", "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert await etcd.get(policy_key("retries", "default").encode()) is None
    missing = await hivemesh(mesh_env, tmp_path, "policy", "delete", "retries", "default", "--yes")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


@pytest.mark.slow
async def test_status_cli_reports_breakers_limiters_in_flight_and_errors(
    mesh_env: MeshEnv, etcd: aetcd.Client, tmp_path: Path
) -> None:
    async with fleet(mesh_env) as f:
        path = tmp_path / "p.yaml"
        path.write_text(POLICIES.replace("open_ms: 2000", "open_ms: 60000") + """---
kind: ratelimits
name: work
spec: {agents: [flaky], capabilities: [work], total_rps: 1000}
""")
        assert (await hivemesh(mesh_env, tmp_path, "policy", "apply", "-f", str(path))).returncode == 0
        for node in f.nodes():
            assert await node.policies.watch.wait_for(
                lambda _s, n=node: n.traffic.policy.breakers("work") is not None, 5)
        f.agents[0].mode = "INTERNAL"
        for _ in range(30):
            with contextlib.suppress(HivemeshError):  # some fail on purpose
                await f.client.call("work", {}, timeout=5)
        def open_after_30(nodes: list[policy_pb2.NodeTraffic]) -> bool:
            return any(n.identity.endswith("/client/tester") and c.capability == "work" and c.calls >= 30
                       and any(i.instance == "flaky/flaky-a" and i.breaker == "open" for i in c.instances)
                       for n in nodes for c in n.capabilities)

        # Polled in-process first (a CLI process per poll is slow): then the CLI's view, usually at once.
        await wait_traffic_status(mesh_env, open_after_30, 20)
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            res = await hivemesh(mesh_env, tmp_path, "status", "--json")
            assert res.returncode == 0, res.stderr
            nodes = json.loads(res.stdout)
            client = next((n for n in nodes if n["identity"].endswith("/client/tester")), None)
            caps = {c["capability"]: c for c in (client or {}).get("capabilities", [])}
            instances = {i["instance"]: i for i in caps.get("work", {}).get("instances", [])}
            # Status is a published snapshot: the breaker can show open before the last calls are counted.
            if instances.get("flaky/flaky-a", {}).get("breaker") == "open" and caps["work"]["calls"] >= 30:
                break
            assert asyncio.get_running_loop().time() < deadline, nodes
            await asyncio.sleep(0.5)
        work = caps["work"]
        assert work["direction"] == "outbound" and work["calls"] >= 30 and 0 < work["error_rate"] < 1
        served = [n for n in nodes if n["identity"].endswith("/agent/flaky")]
        inbound = [c for n in served for c in n["capabilities"] if c["direction"] == "inbound"]
        assert inbound and all(c["limit_rps"] == 1000 for c in inbound)
        table = await hivemesh(mesh_env, tmp_path, "status")
        assert any("flaky-a" in row and " open " in row for row in table.stdout.splitlines()), table.stdout


async def test_policies_service_is_for_operators_only(mesh_env: MeshEnv, tmp_path: Path) -> None:
    async with fleet(mesh_env, ("a",)) as f:
        workload: Workload = f.client.node.workload
        as_client = ControlPlaneClient(mesh_env.controlplane.address, workload)
        try:
            with pytest.raises(PermissionDeniedError, match="only operators"):
                await PolicyClient(as_client).list_policies()
        finally:
            await as_client.close()
    operator = PolicyClient(mesh_env.operator)
    with pytest.raises(InvalidInputError) as info:
        await operator.apply([{"kind": "timeouts", "name": "t", "spec": {"default_ms": "soon"}}])
    assert info.value.field_violations == {"spec.default_ms": "must be an integer, not string"}
    with pytest.raises(NotFoundError):
        await operator.get("timeouts", "t")
    resp = await operator.apply([{"kind": "timeouts", "name": "t", "spec": {"default_ms": 250}}], dry_run=True)
    assert resp.dry_run and resp.applied[0].action == "created"
    resp = await operator.apply([{"kind": "timeouts", "name": "t", "spec": {"default_ms": 250}}])
    got = await operator.get("timeouts", "t")
    assert got.version == resp.revision and json.loads(got.spec_json) == {"default_ms": 250}
    assert await operator.delete("timeouts", "t", version=got.version) > got.version

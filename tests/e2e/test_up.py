"""`hivemesh up` end to end, as a user runs it: real processes, real etcd, the demo over the mesh, a real Prometheus
scraping the nodes through the discovery files `up` writes, clean exit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aetcd
import grpc
import pytest
from aetcd import rpc

from hivemesh.controlplane.etcd_certs import controlplane_etcd_tls
from hivemesh.mesh.etcd import EtcdTls, client
from tests.support.cli_zygote import run_hivemesh
from tests.support.prometheus_server import prometheus, query

HIVEMESH = [sys.executable, "-m", "hivemesh.controlplane.cli"]


@pytest.fixture(autouse=True)
def _own_user_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each `up` notes itself in the user's state folder: a private one per test (the children inherit it)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent just has not reaped it yet).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _assert_all_gone(pids: list[int], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)], "processes left behind after hivemesh up stopped"


def _etcd_lockdown(endpoint: str, certs_dir: Path) -> dict[str, str]:
    """Try `up`'s etcd as an outsider would (no credentials), then ask it, as the control plane, whether auth is
    on."""
    async def outsider(tls: EtcdTls | None) -> str:
        c = client(endpoint, timeout=2, tls=tls)
        try:
            await c.get_prefix(b"/")
            return "read"
        except aetcd.exceptions.ConnectionFailedError:
            return "refused"
        finally:
            await c.close()

    out = {"plaintext": asyncio.run(outsider(None)),
           "TLS without a client certificate": asyncio.run(outsider(EtcdTls((certs_dir / "ca.pem").read_bytes())))}
    with grpc.secure_channel(endpoint, controlplane_etcd_tls(certs_dir).credentials()) as channel:
        status = rpc.AuthStub(channel).AuthStatus(rpc.AuthStatusRequest(), timeout=10)
    out["auth"] = "enabled" if status.enabled else "off"
    return out


def _pids(text: str) -> list[int]:
    return [int(p) for p in re.findall(r"pid (\d+)", text)]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a child process (forked from one that imported it already: `tests.support.cli_zygote`)."""
    code, out, err = asyncio.run(run_hivemesh(args, dict(os.environ), timeout=60))
    return subprocess.CompletedProcess(args, code, out, err)


@pytest.mark.slow
@pytest.mark.timeout(300)  # its own waits allow `up` 240 s (the suite's default is 120 s)
def test_up_once_runs_the_pipeline_over_the_mesh(tmp_path: Path) -> None:
    base = [*HIVEMESH, "--home", str(tmp_path / "home"), "--certs-dir", str(tmp_path / "certs")]
    proc = subprocess.run([*base, "up", "--once", "--json"], capture_output=True, text=True, timeout=240)
    failed = [line for line in proc.stdout.splitlines() if '"error"' in line or "FAILED" in line]
    assert proc.returncode == 0, proc.stderr[-3000:] + "\n".join(failed)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    results = [r for r in lines if "source" in r]
    by_source = {r["source"]: r for r in results}
    assert set(by_source) == {"invoice-001", "receipt-002", "invoice-003", "invoice-004", "receipt-005"}
    assert by_source["invoice-001"]["status"] == "stored"
    assert by_source["invoice-001"]["document"]["invoice_number"] == "INV-2024-001"
    assert by_source["invoice-004"]["status"] == "rejected"
    assert any(e["field"] == "subtotal" for e in by_source["invoice-004"]["errors"])
    for result in results:
        steps = {s["step"]: s for s in result["steps"]}
        assert list(steps) == ["ocr", "extract", "validate", "store"]
        # validate is a plain gRPC server behind a sidecar process; the others run the layers in-process.
        assert steps["validate"]["packaging"] == "sidecar"
        assert [h["kind"] for h in steps["validate"]["hops"]] == ["sidecar"]
        assert steps["ocr"]["packaging"] == "in-process"
        assert [h["kind"] for h in steps["ocr"]["hops"]] == ["agent"]
    # The tour: each of the five patterns ran as durable workflows, with progress and a summary at the end.
    demos = {r["demo"]: r for r in lines if "demo" in r}
    assert list(demos) == ["research", "helpdesk", "support", "content", "contract"]
    assert all(r["state"] == "COMPLETED" for r in demos.values()), demos
    assert demos["support"]["highlight"] == "enterprise request decided by a person (COMPLETED)"
    assert demos["content"]["highlight"] == demos["contract"]["highlight"].replace("signed off", "approved")
    assert demos["helpdesk"]["highlight"].startswith("routed to network, application, security")
    (summary,) = [r["summary"] for r in lines if "summary" in r]
    assert [r["demo"] for r in summary] == list(demos)
    assert all(r["tokens"] > 0 for r in summary if r["demo"] in ("helpdesk", "support", "content"))
    assert "escalation esc-" in proc.stderr and "round 2: all three approve" in proc.stderr
    assert "stopped: agents, sidecar, control plane and etcd" in proc.stderr
    # The supervisor spawns on asyncio's loop (vfork + exec): on uvloop's every spawn is a fork() gRPC logs.
    assert "fork" not in proc.stderr + proc.stdout
    pids = _pids(proc.stderr)
    assert len(pids) >= 11  # etcd, control plane, 3 SDK agents, plain agent, sidecar, one process per tour demo
    _assert_all_gone(pids)
    assert not (tmp_path / "home" / "mesh.json").exists()
    # Private keys never land in the repo: they are in the certs folder given, readable by the owner only.
    assert oct((tmp_path / "certs" / "ca.key").stat().st_mode & 0o777) == "0o600"


@pytest.mark.slow
@pytest.mark.timeout(300)  # its own waits allow `up` 240 s (the suite's default is 120 s)
def test_up_serves_the_cli_until_sigterm(tmp_path: Path) -> None:
    opts = ["--home", str(tmp_path / "home"), "--certs-dir", str(tmp_path / "certs")]
    up = subprocess.Popen([*HIVEMESH, *opts, "up"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    stack = contextlib.ExitStack()
    try:
        # A real Prometheus on the discovery files `up` writes, started with it (so it is ready when the mesh is).
        sd = tmp_path / "home" / "prometheus"
        scraper = stack.enter_context(prometheus(tmp_path / "prometheus-server", sd))
        assert up.stdout is not None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            if not line:
                break
            output.append(line)
            if "mesh is up" in line:
                break
        assert any("mesh is up" in line for line in output), "".join(output)[-3000:]
        # The embedded etcd is locked down like any other (issue 10): https with client certificates, auth on.
        etcd_endpoint = json.loads((tmp_path / "home" / "mesh.json").read_text())["etcd"]
        assert _etcd_lockdown(etcd_endpoint, tmp_path / "certs") == {
            "plaintext": "refused", "TLS without a client certificate": "refused", "auth": "enabled"}

        agents = _cli(*opts, "agents", "--json")
        assert agents.returncode == 0, agents.stderr
        rows = json.loads(agents.stdout)
        assert {r["agent"] for r in rows} >= {"ocr", "extractor", "validator", "storage", "research", "tier1"}
        assert {r["packaging"] for r in rows if r["agent"] == "validator"} == {"sidecar"}

        called = _cli(*opts, "call", "extract", "--json", "--data", json.dumps({"text": "INVOICE #A-1\nTOTAL: $5.00"}))
        assert called.returncode == 0, called.stderr
        assert json.loads(called.stdout)["total"] == 5.0

        refused = _cli(*opts, "call", "extract", "--data", '{"nope": 1}')
        assert refused.returncode == 1
        assert "INVALID_ARGUMENT" in refused.stderr and "Traceback" not in refused.stderr

        # A short deadline: the CLI waits up to it (at most 3 s) for a capability to register, and this one never does.
        unknown = _cli(*opts, "call", "teleport", "--data", "{}", "--timeout", "1")
        assert unknown.returncode == 1 and "UNKNOWN_CAPABILITY" in unknown.stderr

        # Every node it started is in the Prometheus discovery files it wrote, and serves its metrics.
        said = "".join("".join(output).split())  # the console wraps long lines
        assert f"file_sd):{sd / 'nodes.json'}" in said, "".join(output)[:6000]
        nodes = {g["labels"]["node"]: g for g in json.loads((sd / "nodes.json").read_text())}
        assert {"ocr", "extractor", "storage", "validator", "research", "tier1", "demo"} <= set(nodes)
        assert all(g["labels"]["job"] == "hivemesh" for g in nodes.values())
        (cp,) = json.loads((sd / "controlplane.json").read_text())
        assert cp["labels"] == {"job": "hivemesh-controlplane", "node": "controlplane"}
        with urllib.request.urlopen(f"http://{nodes['extractor']['targets'][0]}/metrics", timeout=10) as resp:
            exposition = resp.read().decode()
        assert ('capability="extract",code="INVALID_ARGUMENT",direction="inbound",reason="INVALID_INPUT"} 1.0'
                in exposition)
        with urllib.request.urlopen(f"http://{cp['targets'][0]}/metrics", timeout=10) as resp:
            assert 'packaging="controlplane"' in resp.read().decode()
        # ...and Prometheus, knowing nothing but those files, has the extractor's call counter for our calls.
        promql = ('hivemesh_requests_total{job="hivemesh",node="extractor",direction="inbound",capability="extract",'
                  'code="OK"}')
        deadline = time.monotonic() + 60
        while not (found := query(scraper, promql)) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert found and float(found[0]["value"][1]) >= 1, f"Prometheus never returned {promql}"
        # The demo client's own port: the caller-side view (the dashboard's caller-side p99) of the demo's calls.
        promql = ('sum(hivemesh_request_duration_seconds_count{job="hivemesh",node="demo",direction="outbound",'
                  'capability="extract"})')
        while not (found := query(scraper, promql)) and time.monotonic() < deadline + 30:
            time.sleep(0.25)
        assert found and float(found[0]["value"][1]) >= 1, f"Prometheus never returned {promql}"
    finally:
        stack.close()  # Prometheus stops first
        up.send_signal(signal.SIGTERM)
        try:
            rest, _ = up.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
            rest, _ = up.communicate()
        output.append(rest or "")
    text = "".join(output)
    assert up.returncode == 0, text[-3000:]
    assert "stopped: agents, sidecar, control plane and etcd" in text
    _assert_all_gone(_pids(text))
    assert json.loads((tmp_path / "home" / "prometheus" / "nodes.json").read_text()) == []  # targets gone


@pytest.mark.slow
@pytest.mark.timeout(300)  # its own waits allow `up` 240 s (the suite's default is 120 s)
def test_a_killed_up_leaves_nothing_behind(tmp_path: Path) -> None:
    """Killed as soon as every child serves (their metrics ports announced), while the demo starts: the demo
    itself adds no process, and a kill in the middle of its calls is no easier for the children."""
    base = [*HIVEMESH, "--home", str(tmp_path / "home"), "--certs-dir", str(tmp_path / "certs")]
    up = subprocess.Popen([*base, "up"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    try:
        assert up.stdout is not None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            if not line:
                break
            output.append(line)
            if "Prometheus targets" in line:
                break
        text = "".join(output)
        assert "Prometheus targets" in text, text[-3000:]
        pids = _pids(text)
        assert len(pids) >= 11  # etcd, control plane, 3 SDK agents, plain agent, sidecar, one per tour demo
    finally:
        up.kill()  # SIGKILL: no chance to clean up; the children must notice on their own
        up.communicate(timeout=60)
    _assert_all_gone(pids, timeout=30)


def test_up_demo_menu_and_bad_choice(tmp_path: Path) -> None:
    """In-process (click's CliRunner): listing the demos and refusing an unknown one start nothing."""
    from click.testing import CliRunner

    from hivemesh.controlplane.cli.app import cli

    base = ["--home", str(tmp_path / "home"), "--certs-dir", str(tmp_path / "certs")]
    menu = CliRunner().invoke(cli, [*base, "up", "--demo", "list", "--json"], prog_name="hivemesh")
    assert menu.exit_code == 0, menu.output
    assert [d["demo"] for d in json.loads(menu.stdout)] == [
        "pipeline", "research", "helpdesk", "support", "content", "contract", "leads", "risk", "sales", "tools"]
    bad = CliRunner().invoke(cli, [*base, "up", "--demo", "nope"], prog_name="hivemesh")
    assert bad.exit_code == 2 and "unknown demo 'nope'" in bad.stderr, bad.output
    assert bad.exception is None or isinstance(bad.exception, SystemExit), bad.exc_info  # no traceback
    assert not (tmp_path / "home" / "etcd").exists()  # nothing was started

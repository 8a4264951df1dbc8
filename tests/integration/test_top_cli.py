"""`hivemesh top --once` (the real CLI in a child process) against two real MetricsServers serving populated
MeshMetrics, found through a file-SD targets file and --endpoint, with one target down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from hivemesh.mesh.metrics import MetricsServer
from tests.support.metrics_nodes import serve

REPO = Path(__file__).resolve().parents[2]
INTERVAL = 0.5


class _NotMetrics(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<html><body>a web page</body></html>\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def hivemesh(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMESH_")}
    env["COLUMNS"] = "200"
    return subprocess.run([sys.executable, "-m", "hivemesh.controlplane.cli", *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=REPO)


@pytest.fixture
def nodes() -> Iterator[tuple[dict[str, MetricsServer], str]]:
    servers, dead = serve()
    try:
        yield servers, dead
    finally:
        for s in servers.values():
            s.stop()


def test_top_once_json_from_a_targets_file_and_endpoints(
    nodes: tuple[dict[str, MetricsServer], str], tmp_path: Path
) -> None:
    servers, dead = nodes
    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps([{"targets": [servers["a"].address, dead], "labels": {"job": "hivemesh"}}]))
    run = hivemesh("top", "--once", "--json", "--interval", str(INTERVAL), "--targets", str(targets),
                   "--endpoint", servers["b"].address, "--sort", "errors")
    assert run.returncode == 0, run.stderr
    view = json.loads(run.stdout)
    assert [(t["address"], t["up"]) for t in view["targets"]] == [
        (servers["a"].address, True), (dead, False), (servers["b"].address, True)]
    assert view["targets"][1]["error"]  # why it is down
    assert view["sort"] == "errors" and view["direction"] == "inbound"
    summarize, echo = view["capabilities"]  # by error share: 100% before ~17%
    assert (summarize["capability"], summarize["error_pct"], summarize["p50_ms"]) == ("summarize", 100.0, 3750.0)

    # echo: instance a served 40 calls (10 failed) and b 20 between the two scrapes.
    a, b = echo["instances"]
    assert (a["instance"], b["instance"]) == ("echo/i-a", "echo/i-b")
    assert a["error_pct"] == 25.0 and b["error_pct"] == 0.0
    assert 40 / (INTERVAL + 10) < a["calls_per_s"] <= 40 / INTERVAL
    assert 20 / (INTERVAL + 10) < b["calls_per_s"] <= 20 / INTERVAL
    assert echo["calls_per_s"] == pytest.approx(a["calls_per_s"] + b["calls_per_s"], abs=0.01)
    assert echo["error_pct"] == pytest.approx(100 * 10 / 60, rel=0.1)
    # a: 30 at 4 ms, 10 at 200 ms -> p50 in (2.5, 5] ms, p99 in (100, 250] ms, as histogram_quantile interpolates.
    assert a["p50_ms"] == pytest.approx(2.5 + 2.5 * 20 / 30, abs=0.01)
    assert a["p99_ms"] == pytest.approx(100 + 150 * 9.6 / 10, abs=0.01)
    assert b["p50_ms"] == pytest.approx(10 + 15 * 10 / 20, abs=0.01)
    # Breakers as b (a caller) reports them; gauges as the nodes hold them.
    assert (echo["breaker"], a["breaker"], b["breaker"]) == ("half-open", "open", "")
    assert (echo["in_flight"], echo["queue"], a["in_flight"], a["queue"]) == (2, 1, 2, 1)
    # Spend per batch: 100 tokens and 0.01 USD with a's 40 calls.
    assert a["tokens_per_s"] / a["calls_per_s"] == pytest.approx(100 / 40, rel=1e-3)
    assert a["cost_per_min"]["USD"] / a["calls_per_s"] == pytest.approx(60 * 0.01 / 40, rel=1e-3)
    assert view["total"]["tokens_per_s"] == pytest.approx(a["tokens_per_s"], rel=1e-3)


def test_top_once_prints_a_table_and_fails_when_nothing_answers(
    nodes: tuple[dict[str, MetricsServer], str], tmp_path: Path
) -> None:
    servers, dead = nodes
    run = hivemesh("top", "--once", "--interval", str(INTERVAL), "--endpoint", servers["a"].address,
                   "--endpoint", servers["b"].address)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "2/2 targets up" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.strip()}
    assert {"echo", "summarize", "└"} <= set(rows) and "half-open" in rows["echo"]
    assert any("echo/i-a" in line and "open" in line.split() for line in lines)

    # Nothing listening, and a web server that is not a metrics port: both down, each with its reason.
    web = ThreadingHTTPServer(("127.0.0.1", 0), _NotMetrics)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        run = hivemesh("top", "--once", "--json", "--interval", str(INTERVAL), "--endpoint", dead,
                       "--endpoint", f"127.0.0.1:{web.server_address[1]}")
    finally:
        web.shutdown()
        web.server_close()
    assert run.returncode == 1 and "no target answered" in run.stderr
    down = json.loads(run.stdout)["targets"]
    assert [t["up"] for t in down] == [False, False]
    assert "refused" in down[0]["error"] and "not a Prometheus exposition" in down[1]["error"]


def test_top_reads_the_files_hivemesh_up_writes_by_default(
    nodes: tuple[dict[str, MetricsServer], str], tmp_path: Path
) -> None:
    servers, _dead = nodes
    sd = tmp_path / "home" / "prometheus"
    sd.mkdir(parents=True)
    for job, file, server in (("hivemesh", "nodes.json", "a"), ("hivemesh-controlplane", "controlplane.json", "b")):
        (sd / file).write_text(json.dumps([{"targets": [servers[server].address], "labels": {"job": job}}]))
    run = hivemesh("--home", str(tmp_path / "home"), "top", "--once", "--json", "--interval", str(INTERVAL))
    assert run.returncode == 0, run.stderr
    assert {(t["node"], t["up"]) for t in json.loads(run.stdout)["targets"]} == {("echo/i-a", True),
                                                                                  ("echo/i-b", True)}


def test_top_usage_mistakes_say_what_to_fix(tmp_path: Path) -> None:
    """In-process (click's CliRunner): each mistake is refused before top reads a target."""
    from click.testing import CliRunner

    from hivemesh.controlplane.cli.app import cli

    def top(*args: str) -> tuple[int, str]:
        run = CliRunner().invoke(cli, list(args), prog_name="hivemesh", env={"COLUMNS": "200"})
        assert run.exception is None or isinstance(run.exception, SystemExit), run.exc_info
        return run.exit_code, run.stderr

    code, err = top("--home", str(tmp_path / "home"), "top", "--once")
    assert code == 2 and "--targets FILE" in err and "--endpoint HOST:PORT" in err
    assert str(tmp_path / "home" / "prometheus") in err
    code, err = top("top", "--json", "--endpoint", "127.0.0.1:9")
    assert code == 2 and "--json needs --once" in err
    bad = tmp_path / "targets.json"
    bad.write_text(json.dumps([{"targets": ["no-port"]}]))
    code, err = top("top", "--once", "--targets", str(bad))
    assert code == 2 and "[0].targets[0]: 'no-port' is not HOST:PORT" in err, err
    code, err = top("top", "--endpoint", "127.0.0.1:9")  # live view, but stdout is not a terminal
    assert code == 2 and "not a terminal" in err

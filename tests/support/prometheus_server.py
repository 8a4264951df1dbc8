"""A real Prometheus server (Debian's `prometheus`) for tests: scraping the file_sd folder `hivemesh up` writes
(`nodes*.json` as job hivemesh, `controlplane*.json` as job hivemesh-controlplane) every second, on 127.0.0.1 with a
free port and a temporary TSDB, and always stopped; plus one query of its HTTP API."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hivemesh.mesh.ports import free_port

CONFIG = """
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: hivemesh
    file_sd_configs:
      - files: ["{sd}/nodes*.json"]
        refresh_interval: 1s
  - job_name: hivemesh-controlplane
    file_sd_configs:
      - files: ["{sd}/controlplane*.json"]
        refresh_interval: 1s
"""


@contextlib.contextmanager
def prometheus(tmp: Path, sd: Path, *, config: str | None = None) -> Iterator[str]:
    """A Prometheus server scraping the file_sd folder sd (or with config, a configuration of the test's own);
    yields its base URL. Always stopped."""
    binary = shutil.which("prometheus")
    assert binary is not None, "Debian's prometheus package is required (./run installs it)"
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "prometheus.yml"
    path.write_text(CONFIG.replace("{sd}", str(sd)) if config is None else config)
    port = free_port()
    log = (tmp / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [binary, f"--config.file={path}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def query(base: str, promql: str) -> list[dict[str, Any]]:
    """The series an instant query returns now ([] while the server is not listening yet)."""
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.loads(resp.read())
    except OSError:
        return []  # not listening yet
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def promtool(*args: str, cwd: Path) -> str:
    """Debian's promtool run with args in cwd: its output (the test fails, showing it, when promtool does)."""
    tool = shutil.which("promtool")
    assert tool is not None, "promtool (Debian's prometheus package) is installed by ./run"
    out = subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr

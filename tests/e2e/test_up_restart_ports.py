"""`hivemesh up` restarting a child that died, as Prometheus sees it: the restarted agent or sidecar serves its
metrics on the port the file_sd targets name (the one it had; a new one written there when another process took
it meanwhile), and its other ports (mutual TLS, the sidecar's Mesh socket) are the ones it had. Restarted on free
ports, a killed agent stayed a dead target ("connection refused") for the rest of the run. Real processes: `up`
on 127.0.0.1 with its own home, certificates and user state folder under tmp_path."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.up_process import Up


def _targets(home: Path) -> dict[str, str]:
    """node -> HOST:PORT, as the file_sd file `up` writes for the `hivemesh` job says."""
    groups = json.loads((home / "prometheus" / "nodes.json").read_text())
    return {g["labels"]["node"]: g["targets"][0] for g in groups}


def _serving(address: str) -> str | None:
    """The node label of the metrics at address (None: nothing answers /metrics there)."""
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except (OSError, urllib.error.URLError):
        return None
    m = re.search(r'^hivemesh_node_info\{[^}]*node="([^"]+)"', text, re.MULTILINE)
    return m.group(1) if m else None


def _pid_of(instance: str | None) -> int | None:
    """The pid in a node label `name/<host>-<pid>-<6 hex>` (the default instance id)."""
    m = re.search(r"-(\d+)-[0-9a-f]{6}$", instance or "")
    return int(m.group(1)) if m else None


@contextlib.contextmanager
def _taken(address: str, limit_s: float) -> Iterator[None]:
    """Listen on address's port as another process would, as soon as the killed node let it go (bounded)."""
    host, _, port = address.rpartition(":")
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    deadline = time.monotonic() + limit_s
    try:
        while True:
            try:
                holder.bind((host, int(port)))
                break
            except OSError:
                assert time.monotonic() < deadline, f"{address} was not let go within {limit_s} s"
                time.sleep(0.01)
        holder.listen(1)
        yield
    finally:
        holder.close()


def _ready_lines(log: Path, pattern: str, count: int, limit_s: float) -> list[re.Match[str]]:
    deadline = time.monotonic() + limit_s
    while len(found := list(re.finditer(pattern, log.read_text(errors="replace")))) < count:
        assert time.monotonic() < deadline, f"{log} has not {count} lines matching {pattern!r}"
        time.sleep(0.05)
    return found


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_restarted_agents_and_sidecar_stay_prometheus_targets(tmp_path: Path, up_runs: list[Up]) -> None:
    up = Up(tmp_path, "--demo", "pipeline")
    up_runs.append(up)
    up.wait_for("mesh is up", 180)
    home = tmp_path / "home"
    first = _targets(home)
    assert {"ocr", "extractor", "storage", "validator", "demo"} <= set(first), first
    killed = {
        "ocr": int(up.wait_for(r"agent ocr: SDK, in-process mesh layers \(pid (\d+)\)", 1).group(1)),
        "extractor": int(up.wait_for(r"agent extractor: SDK, in-process mesh layers \(pid (\d+)\)", 1).group(1)),
        "validator": int(up.wait_for(r"behind a sidecar \(pid (\d+)\)", 1).group(1)),
    }
    for pid in killed.values():
        os.kill(pid, signal.SIGKILL)
    # Another process takes the extractor's metrics port while `up` restarts it: it cannot have it back.
    with _taken(first["extractor"], 10):
        for name in ("ocr", "extractor", "validator-sidecar"):
            up.wait_for(rf"{name} restarted \(pid \d+\)", 60)
        deadline = time.monotonic() + 30
        while True:
            now = _targets(home)
            serving = {node: _serving(address) for node, address in now.items()}
            restarted = {node: _pid_of(serving[node]) for node in killed}
            if (all(instance is not None and instance.split("/")[0] == node for node, instance in serving.items())
                    and all(pid is not None and pid != killed[node] for node, pid in restarted.items())):
                break
            assert time.monotonic() < deadline, (
                f"the file_sd targets {now} do not all serve their node's metrics ({serving}); before the kills "
                f"they were {first}")
            time.sleep(0.2)
    # The ports the first start bound, kept where they were free (was: new ones, the targets left on the old).
    assert now["ocr"] == first["ocr"] and now["validator"] == first["validator"], (first, now)
    assert now["extractor"] != first["extractor"]  # held by someone else: the target follows the new port
    held = first["extractor"].rpartition(":")[2]
    assert f"extractor: its metrics port {held} is taken by another process now: it starts on a free one" in up.text
    assert f"Prometheus targets rewritten: extractor restarted with metrics on extractor {now['extractor']}" in up.text
    # What else others were told: the agents' mutual-TLS ports, the sidecar's inbound port and Mesh socket.
    logs = home / "logs"
    for agent in ("ocr", "extractor"):
        starts = _ready_lines(logs / f"{agent}.log", rf"agent {agent} serving on (\S+) as", 2, 10)
        assert starts[0].group(1) == starts[-1].group(1), [m.group(0) for m in starts]
    starts = _ready_lines(logs / "validator-sidecar.log", r"sidecar ready inbound=(\S+) mesh=(\S+)", 2, 10)
    assert starts[0].groups() == starts[-1].groups(), [m.group(0) for m in starts]
    assert "Traceback" not in up.text

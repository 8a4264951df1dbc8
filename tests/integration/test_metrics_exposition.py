"""The metrics catalog as Prometheus sees it: scraped over a real socket, and checked by Prometheus's own
`promtool check metrics` (names, units, help text, label hygiene)."""

from __future__ import annotations

import platform
import shutil
import ssl
import subprocess
import urllib.request
from importlib import metadata

import pytest

from hivemesh.mesh.metrics import LATENCY_BUCKETS, MeshMetrics, MetricsServer


def _populated() -> MeshMetrics:
    m = MeshMetrics(packaging="in-process", node="echo/i-1")
    m.red.observe("inbound", "echo", "spiffe://hivemesh.local/client/cli", "OK", "", 0.004)
    m.red.observe("inbound", "echo", "spiffe://hivemesh.local/client/cli", "RESOURCE_EXHAUSTED", "RATE_LIMITED", 0.0002)
    m.red.observe("outbound", "extract", "spiffe://hivemesh.local/agent/ocr", "UNAVAILABLE", "NO_LIVE_INSTANCE", 0.001)
    m.state.add("hivemesh_requests_in_flight", lambda: [({"direction": "inbound", "capability": "echo"}, 1.0)])
    m.events.retries.labels("extract").inc(3)
    m.events.llm_tokens.labels("rule-based", "spiffe://hivemesh.local/client/cli", "input").inc(120)
    m.events.llm_cost.labels("rule-based", "spiffe://hivemesh.local/client/cli", "USD").inc(0.0012)
    m.events.workflow_step_duration.labels("doc-pipeline").observe(0.2)
    m.state.add("hivemesh_registry_live_instances", lambda: [({"capability": "echo"}, 2.0)])
    m.state.add("hivemesh_certificate_expiry_seconds", lambda: [({}, 3500.0)])
    m.state.add("hivemesh_registry_impostors_refused", lambda: [({}, 4.0)])
    return m


def test_a_scrape_over_http_returns_every_family() -> None:
    m = _populated()
    server = MetricsServer(m, "127.0.0.1", 0)
    server.start()
    try:
        with urllib.request.urlopen(f"http://{server.address}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    finally:
        server.stop()
    assert ('hivemesh_requests_total{caller="spiffe://hivemesh.local/client/cli",capability="echo",code="OK",'
            'direction="inbound",reason=""} 1.0') in text
    assert 'reason="RATE_LIMITED"' in text
    assert 'hivemesh_registry_live_instances{capability="echo"} 2.0' in text
    assert "hivemesh_certificate_expiry_seconds 3500.0" in text
    assert "hivemesh_registry_impostors_refused_total 4.0" in text
    # Every bucket bound the catalog promises, 1 ms to 60 s.
    assert LATENCY_BUCKETS[0] <= 0.001 and LATENCY_BUCKETS[-1] >= 60.0
    for bound in LATENCY_BUCKETS:
        assert f'le="{bound}"' in text
    assert 'hivemesh_node_info{node="echo/i-1",packaging="in-process"} 1.0' in text
    runtime = (f'grpcio="{metadata.version("grpcio")}",openssl="{ssl.OPENSSL_VERSION}",'
               f'python="{platform.python_implementation()} {platform.python_version()}",'
               f'version="{metadata.version("hivemesh")}"')
    assert f"hivemesh_build_info{{{runtime}}} 1.0" in text


def test_a_broken_state_reading_skips_only_that_family() -> None:
    m = _populated()

    def broken() -> list[tuple[dict[str, str], float]]:
        raise RuntimeError("spool unreadable")

    m.state.add("hivemesh_audit_spool_lag_records", broken)
    text = m.exposition().decode()
    assert not any(line.startswith("hivemesh_audit_spool_lag_records") for line in text.splitlines())
    assert "hivemesh_metrics_read_errors_total 1.0" in text
    assert 'hivemesh_registry_live_instances{capability="echo"} 2.0' in text
    with pytest.raises(ValueError, match="already registered"):
        m.state.add("hivemesh_audit_spool_lag_records", broken)
    with pytest.raises(ValueError, match="not in the metrics catalog"):
        m.state.add("hivemesh_made_up", broken)


def test_promtool_finds_nothing_to_fix() -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool (Debian's prometheus package) is installed by ./run"
    text = _populated().exposition()
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()
    assert out.stdout.decode().strip() == "" and out.stderr.decode().strip() == "", out


async def test_idle_half_sent_requests_cannot_hold_the_port() -> None:
    """Each connection closes after the idle timeout, past the bound new ones close at once, and a scrape still
    works afterwards: 400 half-sent requests had held 400 threads for good."""
    import asyncio
    import socket
    import threading

    from tests.support.waiting import until

    def _scrape(address: str) -> bytes:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
            assert resp.status == 200
            body: bytes = resp.read()
            return body

    server = MetricsServer(MeshMetrics(packaging="test", node="test/1"), "127.0.0.1", 0,
                           max_connections=4, idle_timeout_s=0.5)
    server.start()
    idle: list[socket.socket] = []
    try:
        before = threading.active_count()
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
            idle.append(s)
        assert await until(lambda: threading.active_count() >= before + 4, 10), "the four were not served"
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        try:
            assert extra.recv(1) == b""  # past the bound: closed at once
        finally:
            extra.close()
        for s in idle:
            assert s.recv(1) == b""  # closed by the server after 0.5 s of silence (recv waits at most 10 s)
        assert await until(lambda: threading.active_count() <= before, 10), "their threads did not end"
        assert b"hivemesh_node_info" in await asyncio.to_thread(_scrape, server.address)
    finally:
        for s in idle:
            s.close()
        server.stop()

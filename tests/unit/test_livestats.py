"""`hivemesh top`'s numbers (hivemesh.controlplane.livestats) from real exposition text of populated MeshMetrics:
rates from two scrapes, error share, quantiles as PromQL's histogram_quantile, restarts, breakers, spend, sorting,
and the file-SD targets file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hivemesh.controlplane.livestats import (
    Scrape,
    Target,
    compute,
    load_targets,
    parse_endpoint,
    parse_exposition,
    quantile,
)
from hivemesh.mesh.metrics import MeshMetrics
from tests.support.metrics_nodes import set_in_flight

CLI = "spiffe://hivemesh.local/client/cli"


def _scrape(m: MeshMetrics, address: str, at: float) -> Scrape:
    return Scrape(Target(address), at, parse_exposition(m.exposition().decode()))


def _calls(m: MeshMetrics, capability: str, n: int, seconds: float, code: str = "OK", reason: str = "",
           direction: str = "inbound") -> None:
    for _ in range(n):
        m.red.observe(direction, capability, CLI, code, reason, seconds)


def test_quantile_interpolates_inside_the_bucket_like_promql() -> None:
    # 100 observations: 50 in (0, 0.01], 40 in (0.01, 0.1], 10 above 1 s (in +Inf).
    buckets = [(0.01, 50.0), (0.1, 90.0), (1.0, 90.0), (float("inf"), 100.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.01)
    assert quantile(0.25, buckets) == pytest.approx(0.005)  # half way into the first bucket, from 0
    assert quantile(0.7, buckets) == pytest.approx(0.01 + 0.09 * 20 / 40)
    assert quantile(0.99, buckets) == 1.0  # in +Inf: the highest finite bound, as histogram_quantile says
    assert quantile(0.5, [(0.01, 0.0), (float("inf"), 0.0)]) is None
    assert quantile(0.5, []) is None


def test_rates_errors_and_latency_from_two_scrapes_of_two_nodes() -> None:
    a, b = MeshMetrics(packaging="sidecar", node="echo/i-a"), MeshMetrics(packaging="in-process", node="echo/i-b")
    _calls(a, "echo", 5, 0.004)  # before the first scrape: not in the rates
    before = [_scrape(a, "10.0.0.1:9100", 100.0), _scrape(b, "10.0.0.2:9100", 100.0)]
    _calls(a, "echo", 30, 0.004)
    _calls(a, "echo", 10, 0.2, "UNAVAILABLE", "NO_LIVE_INSTANCE")
    _calls(b, "echo", 40, 0.02)  # a series b never had at the first scrape counts from zero
    _calls(b, "ocr", 8, 3.0, "INVALID_ARGUMENT", "BAD_INPUT")
    _calls(b, "echo", 99, 0.001, direction="outbound")  # calls b made: not in the inbound view
    set_in_flight(a, "inbound", "echo", 2)
    set_in_flight(b, "inbound", "echo", 1)
    after = [_scrape(a, "10.0.0.1:9100", 102.0), _scrape(b, "10.0.0.2:9100", 104.0)]

    view = compute(before, after)
    echo, ocr = view.rows
    assert (echo.capability, ocr.capability) == ("echo", "ocr")
    ia, ib = echo.instances
    assert (ia.instance, ia.calls_per_s, ia.error_pct) == ("echo/i-a", 20.0, 25.0)  # 40 calls in 2 s, 10 failed
    assert (ib.instance, ib.calls_per_s, ib.error_pct) == ("echo/i-b", 10.0, 0.0)  # 40 calls in 4 s
    assert echo.calls_per_s == 30.0 and echo.error_pct == pytest.approx(100 * 5 / 30)
    assert (echo.in_flight, ia.in_flight, ib.in_flight) == (3, 2, 1)
    # i-a: 30 at 4 ms (bucket 2.5-5 ms) and 10 at 200 ms (100-250 ms); p50 falls in the first, p99 in the last.
    assert ia.p50_ms == pytest.approx(2.5 + 2.5 * (20 - 0) / 30)
    assert ia.p99_ms == pytest.approx(100 + 150 * (39.6 - 30) / 10)
    # The capability's quantiles weigh each node by its rate: 15 calls/s at 4 ms, 5 at 200 ms, 10 at 20 ms.
    assert echo.p50_ms == pytest.approx(2.5 + 2.5 * 15 / 15)
    assert echo.p99_ms == pytest.approx(100 + 150 * (29.7 - 25) / 5)
    assert ocr.calls_per_s == 2.0 and ocr.error_pct == 100.0 and ocr.p50_ms == pytest.approx(2500 + 2500 * 0.5)
    assert view.total.calls_per_s == 32.0
    assert [t.up for t in view.targets] == [True, True] and [t.node for t in view.targets] == ["echo/i-a", "echo/i-b"]

    out = compute(before, after, direction="outbound")
    assert [(r.capability, r.calls_per_s) for r in out.rows] == [("echo", 99 / 4)]


def test_a_restarted_node_counts_from_zero_and_a_node_scraped_once_has_no_rates() -> None:
    old = MeshMetrics(packaging="sidecar", node="echo/i-a")
    _calls(old, "echo", 2, 0.004)
    before = [_scrape(old, "10.0.0.1:9100", 10.0)]
    new = MeshMetrics(packaging="sidecar", node="echo/i-a")  # same address, a new process: counters restart
    started = [m.registry.get_sample_value("hivemesh_node_start_time_seconds") for m in (old, new)]
    assert started[0] != started[1]
    _calls(new, "echo", 6, 0.004)
    late = MeshMetrics(packaging="sidecar", node="ocr/i-c")
    _calls(late, "ocr", 3, 0.004)
    set_in_flight(late, "inbound", "ocr", 4)
    after = [_scrape(new, "10.0.0.1:9100", 12.0), _scrape(late, "10.0.0.3:9100", 12.0)]
    echo, ocr = compute(before, after).rows
    assert echo.calls_per_s == 3.0  # 6 since the restart over 2 s, not (6 - 2) / 2
    assert ocr.calls_per_s is None and ocr.error_pct is None and ocr.p99_ms is None  # never scraped before
    assert ocr.in_flight == 4  # gauges need one scrape only


def test_breakers_callers_report_land_on_the_capability_and_on_its_instances() -> None:
    served = MeshMetrics(packaging="sidecar", node="extract/i-1")
    _calls(served, "extract", 2, 0.01)
    caller = MeshMetrics(packaging="client", node="cli/i-9")
    states = [({"capability": "extract", "peer_instance": ""}, 1.0),
              ({"capability": "extract", "peer_instance": "i-1"}, 2.0),
              ({"capability": "extract", "peer_instance": "i-gone"}, 2.0)]
    caller.state.add("hivemesh_breaker_state", lambda: states)
    # The queue is the agent's (label `agent`, not a capability): it lands on the rows of the node that serves,
    # whatever the agent is called, and a queue on a node that serves nothing lands nowhere.
    served.state.add("hivemesh_admission_queue_depth", lambda: [({"agent": "docs"}, 7.0)])
    caller.state.add("hivemesh_admission_queue_depth", lambda: [({"agent": "cli"}, 3.0)])
    before = [_scrape(served, "h:1", 0.0), _scrape(caller, "h:2", 0.0)]
    after = [_scrape(served, "h:1", 1.0), _scrape(caller, "h:2", 1.0)]
    (row,) = compute(before, after).rows
    assert row.breaker == "half-open" and row.queue == 7
    assert [i.queue for i in row.instances] == [7, 0]
    assert [(i.instance, i.breaker, i.scraped) for i in row.instances] == [
        ("extract/i-1", "open", True), ("i-gone", "open", False)]


def test_tokens_and_cost_per_node_and_in_total() -> None:
    a, b = MeshMetrics(packaging="in-process", node="summarize/i-1"), MeshMetrics(packaging="sidecar", node="x/i-2")
    before = [_scrape(a, "h:1", 0.0), _scrape(b, "h:2", 0.0)]
    _calls(a, "summarize", 4, 0.5)
    a.events.llm_tokens.labels("gpt-x", CLI, "input").inc(300)
    a.events.llm_tokens.labels("gpt-x", CLI, "output").inc(100)
    a.events.llm_cost.labels("gpt-x", CLI, "USD").inc(0.02)
    _calls(b, "translate", 2, 0.5)
    b.events.llm_cost.labels("small", CLI, "EUR").inc(0.5)
    after = [_scrape(a, "h:1", 2.0), _scrape(b, "h:2", 2.0)]
    view = compute(before, after).sorted("cost")
    assert [r.capability for r in view.rows] == ["translate", "summarize"]  # 15 EUR/min before 0.6 USD/min
    summarize = view.rows[1]
    assert summarize.tokens_per_s == 200.0 and summarize.cost_per_min == pytest.approx({"USD": 0.6})
    assert summarize.instances[0].tokens_per_s == 200.0
    assert view.total.tokens_per_s == 200.0
    assert view.total.cost_per_min == pytest.approx({"USD": 0.6, "EUR": 15.0})
    doc = view.to_json()
    assert json.loads(json.dumps(doc)) == doc
    assert doc["capabilities"][1]["instances"][0]["instance"] == "summarize/i-1"


def test_sorting_by_each_key_largest_first() -> None:
    m = MeshMetrics(packaging="sidecar", node="n/i")
    before = [_scrape(m, "h:1", 0.0)]
    _calls(m, "busy", 50, 0.002)
    _calls(m, "slow", 5, 20.0)
    _calls(m, "flaky", 10, 0.001)
    _calls(m, "flaky", 10, 0.001, "INTERNAL", "AGENT_ERROR")
    view = compute(before, [_scrape(m, "h:1", 1.0)])
    assert [r.capability for r in view.sorted("calls").rows] == ["busy", "flaky", "slow"]
    assert [r.capability for r in view.sorted("errors").rows] == ["flaky", "busy", "slow"]
    assert [r.capability for r in view.sorted("p99").rows] == ["slow", "busy", "flaky"]
    with pytest.raises(ValueError, match="cannot sort by 'name'"):
        view.sorted("name")


def test_a_target_that_did_not_answer_is_listed_as_down() -> None:
    m = MeshMetrics(packaging="sidecar", node="n/i")
    down = Scrape(Target("10.0.0.9:9100"), 1.0, None, "connection refused")
    view = compute([], [_scrape(m, "h:1", 1.0), down])
    assert [(t.address, t.up, t.error) for t in view.targets] == [
        ("h:1", True, ""), ("10.0.0.9:9100", False, "connection refused")]


def test_file_sd_targets_and_endpoints(tmp_path: Path) -> None:
    good = tmp_path / "targets.json"
    good.write_text(json.dumps([
        {"targets": ["127.0.0.1:9101", "[::1]:9102"], "labels": {"job": "hivemesh", "node": "echo"}},
        {"targets": ["localhost:9103"]},
    ]))
    targets = load_targets(good)
    assert [t.address for t in targets] == ["127.0.0.1:9101", "[::1]:9102", "localhost:9103"]
    assert targets[0].labels == {"job": "hivemesh", "node": "echo"} and targets[2].labels == {}
    for text, words in [
        ("{}", "a JSON list"),
        ("[{\"labels\": {}}]", "[0]: needs \"targets\""),
        ("[{\"targets\": [\"nohost\"]}]", "[0].targets[0]: 'nohost' is not HOST:PORT"),
        ("[{\"targets\": [\"h:1\"], \"labels\": {\"a\": 1}}]", "[0].labels: must map names to strings"),
        ("[", "is not JSON"),
    ]:
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ValueError, match=None) as err:
            load_targets(bad)
        assert words in str(err.value) and str(bad) in str(err.value)
    with pytest.raises(ValueError, match="cannot read"):
        load_targets(tmp_path / "missing.json")
    assert parse_endpoint(" 127.0.0.1:9100 ").address == "127.0.0.1:9100"
    for bad_endpoint in ("127.0.0.1", ":9100", "h:0", "h:http", "h:70000"):
        with pytest.raises(ValueError, match="is not HOST:PORT"):
            parse_endpoint(bad_endpoint)


def test_a_target_exporting_odd_samples_neither_stops_the_view_nor_puts_nan_in_json() -> None:
    """One endpoint's +Inf breaker state raised OverflowError, a bucket with no `le` KeyError, and a NaN counter
    reached `--json` as NaN (not JSON): `hivemesh top` showed nothing for any node."""
    odd = (
        '# TYPE hivemesh_breaker_state gauge\nhivemesh_breaker_state{capability="x",instance="a/b"} +Inf\n'
        '# TYPE hivemesh_requests_total counter\n'
        'hivemesh_requests_total{direction="inbound",capability="x",code="OK"} NaN\n'
        '# TYPE hivemesh_request_duration_seconds_bucket gauge\n'
        'hivemesh_request_duration_seconds_bucket{direction="inbound",capability="x"} 3\n'
    )
    good = MeshMetrics(packaging="test", node="echo/i-a")
    _calls(good, "echo", 10, 0.004)
    before = [Scrape(Target("10.0.0.9:9100"), 100.0, parse_exposition(odd)), _scrape(good, "10.0.0.1:9100", 100.0)]
    _calls(good, "echo", 20, 0.004)
    after = [Scrape(Target("10.0.0.9:9100"), 102.0, parse_exposition(odd)), _scrape(good, "10.0.0.1:9100", 102.0)]
    view = compute(before, after)
    text = json.dumps(view.to_json(), allow_nan=False)  # raises on NaN or infinity
    rows = {r.capability: r for r in view.rows}
    assert rows["echo"].calls_per_s == 10.0 and "echo" in text

"""The node's metrics hooks on their own: bounded labels, refusals by kind, the price table, listen addresses
and the file-based discovery file `hivemesh up` writes for Prometheus."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import grpc
import pytest

from hivemesh.controlplane.metrics_sd import JOB_CONTROLPLANE, JOB_NODES, ScrapeTarget, write_file_sd
from hivemesh.mesh.errors import (
    InvalidInputError,
    NoLiveInstanceError,
    OverloadedError,
    PolicyDeniedError,
    RateLimitedError,
)
from hivemesh.mesh.layers.base import Inbound
from hivemesh.mesh.layers.budget import usage_tokens
from hivemesh.mesh.node_metrics import (
    GONE_KEPT_S,
    LiveInstances,
    NodeMetrics,
    PriceTable,
    metrics_listen,
    parse_listen,
)
from hivemesh.mesh.registry import CapabilityInfo
from hivemesh.v1 import agent_pb2


def _call(capability: str) -> Inbound:
    return Inbound(method="Invoke", request=agent_pb2.InvokeRequest(capability=capability), wire_size=0,
                   metadata={}, auth_context={})


def _metrics() -> NodeMetrics:
    return NodeMetrics(packaging="in-process", node="t/1", listen="127.0.0.1:0", prices=PriceTable({}))


def test_a_made_up_capability_is_counted_as_other() -> None:
    m = _metrics()
    observe = m.inbound_observer([agent_pb2.Capability(name="echo")])
    for made_up in ("x-1", "x-2", "echo"):
        observe(_call(made_up), InvalidInputError("no such capability"), grpc.StatusCode.INVALID_ARGUMENT, 0.001)
    text = m.metrics.exposition().decode()
    assert 'capability="x-1"' not in text and 'capability="x-2"' not in text
    assert ('hivemesh_requests_total{caller="",capability="_other",code="INVALID_ARGUMENT",direction="inbound",'
            'reason="INVALID_INPUT"} 2.0') in text
    assert 'capability="echo",code="INVALID_ARGUMENT"' in text


def test_refusals_are_counted_by_kind() -> None:
    m = _metrics()
    observe = m.inbound_observer([agent_pb2.Capability(name="echo")])
    observe(_call("echo"), RateLimitedError("slow down"), grpc.StatusCode.RESOURCE_EXHAUSTED, 0.0)
    observe(_call("echo"), OverloadedError("full"), grpc.StatusCode.RESOURCE_EXHAUSTED, 0.0)
    observe(_call("echo"), PolicyDeniedError("no"), grpc.StatusCode.PERMISSION_DENIED, 0.0)
    text = m.metrics.exposition().decode()
    assert 'hivemesh_ratelimit_refusals_total{capability="echo"} 1.0' in text
    assert 'hivemesh_admission_shed_total{capability="echo"} 1.0' in text
    assert 'hivemesh_refusals_total{reason="POLICY_DENIED"} 1.0' in text


def test_outbound_capability_names_are_capped() -> None:
    m = _metrics()
    for i in range(300):
        m.finished(f"cap-{i}", None, 0.001, 0)
    text = m.metrics.exposition().decode()
    assert 'capability="cap-255"' in text and 'capability="cap-256"' not in text
    assert ('hivemesh_requests_total{caller="",capability="_other",code="OK",direction="outbound",'
            'reason=""} 44.0') in text


def test_usage_is_priced_from_the_table() -> None:
    prices = PriceTable.parse(json.dumps({"m": {"input_per_1k": 1.0, "output_per_1k": 3.0, "currency": "USD"}}))
    m = NodeMetrics(packaging="sidecar", node="t/1", listen="127.0.0.1:0", prices=prices)
    resp = agent_pb2.InvokeResponse(usage=agent_pb2.Usage(input_tokens=500, output_tokens=1000, model="m"))
    m.usage("spiffe://td/client/c", resp.SerializeToString(), "Invoke")
    text = m.metrics.exposition().decode()
    assert 'hivemesh_llm_cost_total{caller="spiffe://td/client/c",currency="USD",model="m"} 3.5' in text
    assert 'hivemesh_llm_tokens_total{caller="spiffe://td/client/c",direction="output",model="m"} 1000.0' in text


def test_a_noted_usage_is_counted_for_the_bytes_it_was_noted_for_only() -> None:
    """An SDK agent notes the usage it wrote into its answer (`Inbound.written`), so the meter and the budget
    layer need not parse the answer; other bytes (an answering layer's rewrite) are read, not trusted to it."""
    m = NodeMetrics(packaging="in-process", node="t/1", listen="127.0.0.1:0", prices=PriceTable({}))
    meter = m.usage_layer()
    call = _call("echo")
    answer = agent_pb2.InvokeResponse(usage=agent_pb2.Usage(input_tokens=5, output_tokens=7, model="m"))
    wire = answer.SerializeToString()
    call.written = (wire, agent_pb2.Usage(input_tokens=50, output_tokens=70, model="noted"))  # differs on purpose
    meter.settle(call, wire)
    meter.settle(call, bytes(bytearray(wire)))  # equal bytes, another object: read from the answer
    text = m.metrics.exposition().decode()
    assert 'hivemesh_llm_tokens_total{caller="",direction="output",model="noted"} 70.0' in text
    assert 'hivemesh_llm_tokens_total{caller="",direction="output",model="m"} 7.0' in text
    assert usage_tokens("Invoke", wire, call.noted_usage(wire)) == 120
    assert usage_tokens("Invoke", bytes(bytearray(wire)), call.noted_usage(bytes(bytearray(wire)))) == 12
    assert _call("echo").noted_usage(wire) is None  # nothing noted: None, and the answer is read


@pytest.mark.parametrize("text", ["{", "[]", '{"m": {"input_per_1k": 1}}', '{"m": {"input_per_1k": "x", '
                                  '"output_per_1k": 1, "currency": "USD"}}'])
def test_a_bad_price_table_says_why(text: str) -> None:
    with pytest.raises(ValueError, match="price"):
        PriceTable.parse(text)


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:9100") == ("::1", 9100)
    assert parse_listen("off") is None
    for bad in ("9100", "host:", "host:99999", ":80"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_listen(bad)


def test_the_environment_chooses_when_the_config_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HIVEMESH_METRICS_LISTEN", raising=False)
    assert metrics_listen(None, None) is None
    assert metrics_listen(None, "127.0.0.1:0") == "127.0.0.1:0"
    monkeypatch.setenv("HIVEMESH_METRICS_LISTEN", "off")
    assert metrics_listen(None, "127.0.0.1:0") is None
    assert metrics_listen("127.0.0.1:9", "127.0.0.1:0") == "127.0.0.1:9"


def test_the_discovery_file_is_prometheus_file_sd(tmp_path: Path) -> None:
    nodes, cp = write_file_sd(tmp_path / "p", [ScrapeTarget("127.0.0.1:9100", JOB_NODES, "ocr"),
                                               ScrapeTarget("127.0.0.1:9101", JOB_CONTROLPLANE, "controlplane")])
    assert json.loads(nodes.read_text()) == [
        {"targets": ["127.0.0.1:9100"], "labels": {"job": "hivemesh", "node": "ocr"}}]
    assert json.loads(cp.read_text()) == [
        {"targets": ["127.0.0.1:9101"], "labels": {"job": "hivemesh-controlplane", "node": "controlplane"}}]
    assert sorted(p.name for p in nodes.parent.iterdir()) == ["controlplane.json", "nodes.json"]
    with pytest.raises(ValueError, match="job"):
        ScrapeTarget("127.0.0.1:1", "agent", "x")


def test_workflow_events_are_counted_per_definition() -> None:
    m = _metrics()
    m.workflow_event("doc-pipeline", "started", {})
    m.workflow_event("doc-pipeline", "step_completed", {"step": "ocr", "result": {"elapsed_ms": 250.0}})
    m.workflow_event("doc-pipeline", "note", {"key": "handoff-1", "data": {"from": "triage", "to": "billing"}})
    m.workflow_event("doc-pipeline", "input_required", {"step": "approve"})
    m.workflow_event("doc-pipeline", "completed", {"output": {}})
    text = m.metrics.exposition().decode()
    for event in ("started", "escalated", "completed"):
        assert f'hivemesh_workflows_total{{definition="doc-pipeline",event="{event}"}} 1.0' in text
    assert 'hivemesh_workflow_step_duration_seconds_sum{definition="doc-pipeline"} 0.25' in text
    assert 'hivemesh_handoffs_total{capability="triage"} 1.0' in text


def test_every_exported_family_is_documented() -> None:
    from hivemesh.mesh.metrics import exported_names

    doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    counters = {"hivemesh_requests", "hivemesh_retries"}  # documented with their _total suffix, like every counter
    missing = [n for n in exported_names() if f"`{n}`" not in doc and f"`{n}_total`" not in doc]
    assert not missing, missing
    assert counters <= exported_names()


async def test_the_attempt_loop_reports_budget_refusals_and_ejections() -> None:
    """The real attempt loop (the rig of test_outbound_attempts) with a NodeMetrics as its events listener."""
    import time

    from hivemesh.mesh.errors import AgentError, AgentUnavailableError
    from hivemesh.mesh.outbound.attempts import AttemptParts, Attempts
    from hivemesh.mesh.outbound.call import OutboundCall
    from hivemesh.mesh.resilience.breaker import BreakerPolicy
    from hivemesh.mesh.resilience.kinds import BreakerSettings
    from hivemesh.mesh.resilience.retry import RetryPolicy
    from hivemesh.mesh.resilience.view import OutboundPolicies
    from tests.unit.test_outbound_attempts import NO_WAIT, _Agents, _Rig, sent_failure

    m = _metrics()

    def attempts(rig: _Rig, agents: _Agents, policies: OutboundPolicies) -> Attempts:
        parts = AttemptParts(rig.selector, agents.prepare, agents.send, agents.forget, m)
        return Attempts(parts, OutboundCall("work", b"req", (), time.monotonic() + 5, None, ""), policies)

    rig = _Rig()
    budget = RetryPolicy(attempts=3, backoff=NO_WAIT, budget_ratio=0.0, budget_min_per_s=0.1, budget_window_s=10)
    agents = _Agents([sent_failure(), b"ok", sent_failure()])
    await attempts(rig, agents, OutboundPolicies(None, None, None, budget)).run()
    with pytest.raises(AgentUnavailableError):
        await attempts(rig, agents, OutboundPolicies(None, None, None, budget)).run()

    rig = _Rig(("a", "b", "c", "d"))
    eject = BreakerSettings("b", instance=BreakerPolicy(consecutive_failures=1, open_s=60, max_open_s=60),
                            capability=None, max_ejected_share=0.5)
    with pytest.raises(AgentError):
        await attempts(rig, _Agents([sent_failure(AgentError("bug"))]),
                       OutboundPolicies(None, None, eject, RetryPolicy(backoff=NO_WAIT))).run()
    text = m.metrics.exposition().decode()
    assert 'hivemesh_retry_budget_refusals_total{capability="work"} 1.0' in text
    assert 'hivemesh_ejections_total{capability="work"} 1.0' in text


def _served(**instances: int) -> list[CapabilityInfo]:
    return [CapabilityInfo(agent_pb2.Capability(name=n), (n,), k) for n, k in instances.items()]


def test_a_capability_gone_reads_zero_until_it_was_gone_and_uncalled_for_an_hour() -> None:
    """The series of a capability whose last instance left stays, at 0 (an absent series cannot be alerted on or
    graphed as an outage), and goes once nobody here called it for GONE_KEPT_S: bounded in time."""
    now = [0.0]
    live = LiveInstances(clock=lambda: now[0])
    assert dict_of(live.read(_served(validate=1, ocr=2))) == {"validate": 1.0, "ocr": 2.0}
    now[0] = 10.0
    assert dict_of(live.read(_served(ocr=2))) == {"validate": 0.0, "ocr": 2.0}
    now[0] = 10.0 + GONE_KEPT_S - 60
    live.called("validate")  # a caller here still wants it: kept an hour from this call
    live.called("never-seen")  # not a series this node reported: nothing kept for it
    now[0] = 10.0 + GONE_KEPT_S + 60
    assert dict_of(live.read(_served(ocr=2))) == {"validate": 0.0, "ocr": 2.0}
    now[0] = 10.0 + 2 * GONE_KEPT_S
    assert dict_of(live.read(_served(ocr=2))) == {"ocr": 2.0}
    # Back, then gone again: reported again, and kept from its new departure.
    assert dict_of(live.read(_served(validate=1, ocr=2))) == {"validate": 1.0, "ocr": 2.0}
    assert dict_of(live.read(_served())) == {"validate": 0.0, "ocr": 0.0}


def test_zeros_past_the_cap_drop_the_longest_gone_first() -> None:
    now = [0.0]
    live = LiveInstances(limit=2, clock=lambda: now[0])
    live.read(_served(a=1, b=1, c=1))
    now[0] = 1.0
    live.read(_served(b=1, c=1))  # a gone first
    now[0] = 2.0
    live.read(_served(d=1))  # then b and c: three zeros, two kept
    assert dict_of(live.read(_served(d=1))) == {"b": 0.0, "c": 0.0, "d": 1.0}


def test_a_no_live_instance_refusal_keeps_the_zero_of_the_capability_it_called() -> None:
    """NodeMetrics.finished (the hook the outbound pipeline calls) notes the refusal: the zero outlives the hour."""
    m = _metrics()
    now = [0.0]
    m.live_instances = LiveInstances(clock=lambda: now[0])
    m.live_instances.read(_served(validate=1, ocr=1))
    m.live_instances.read(_served())
    now[0] = GONE_KEPT_S - 1
    m.finished("validate", NoLiveInstanceError("none"), 0.001, 0)
    m.finished("ocr", None, 0.001, 0)
    now[0] = GONE_KEPT_S + 1
    assert dict_of(m.live_instances.read(_served())) == {"validate": 0.0}


def dict_of(series: list[tuple[Mapping[str, str], float]]) -> dict[str, float]:
    return {labels["capability"]: value for labels, value in series}

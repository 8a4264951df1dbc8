"""The operator review's fixes, piece by piece (the real mesh runs them in
tests/integration/test_operator_review_status_degraded.py): the limit a rate limiter reports follows the policy
in force; a degraded answer's marker reaches `CallResult.degraded` and reads plainly in `hivemesh call`; a shadow
audit row names its caller; `call --detailed` refuses `--stream`."""

from __future__ import annotations

from pathlib import Path

from hivemesh.controlplane.cli.audit import _row
from hivemesh.controlplane.cli.operate import _degraded_how
from hivemesh.mesh.outbound import DEGRADED_KEY
from hivemesh.mesh.resilience.ratelimit import RateLimiter, RateLimitPolicy
from hivemesh.mesh.wire import metadata_entry
from hivemesh.sdk.client import _result
from hivemesh.v1 import agent_pb2, mesh_pb2
from tests.support.cli_offline import hivemesh


def test_the_limit_reported_is_the_policy_in_force_asked_when_reported() -> None:
    in_force: dict[str, RateLimitPolicy] = {"cap": RateLimitPolicy(total_rps=1)}
    live = {"cap": 4}
    lim = RateLimiter()
    lim.follow(in_force.get, live.__getitem__)
    assert lim.check(in_force["cap"], "cap", "x") == 0.0
    assert lim.usage("cap") == (1, 0, 1.0)
    in_force["cap"] = RateLimitPolicy(per_identity_rps=1000)  # replaced by one without a total: no limit
    assert lim.usage("cap")[2] == 0.0
    in_force["cap"] = RateLimitPolicy(cluster_total_rps=40)  # a cluster total: this instance's share of it
    assert lim.usage("cap")[2] == 10.0
    live["cap"] = 1
    assert lim.usage("cap")[2] == 40.0
    del in_force["cap"]  # deleted: no limit, though no call has been checked since
    assert lim.usage("cap") == (1, 0, 0.0)


def test_a_degraded_marker_reaches_the_call_result() -> None:
    raw = agent_pb2.InvokeResponse(output=b'{"a": 1}', content_type="application/json").SerializeToString()
    instance = mesh_pb2.AgentInstance(instance_id="i")
    assert _result(raw, instance).degraded == ""
    fallback = _result(raw + metadata_entry(DEGRADED_KEY, "fallback:lite"), instance)
    assert (fallback.output, fallback.degraded) == ({"a": 1}, "fallback:lite")
    assert _result(raw + metadata_entry(DEGRADED_KEY, "cache"), instance).degraded == "cache"


def test_hivemesh_call_says_how_an_answer_was_degraded_in_plain_words() -> None:
    assert _degraded_how("extract", "cache") == (
        "extract failed; answered with its cached last good answer to the same input")
    assert _degraded_how("extract", "fallback:extract-lite") == "extract failed; answered by its fallback extract-lite"
    assert _degraded_how("extract", "odd") == "extract was answered in a degraded mode (odd)"
    assert "\x1b" not in _degraded_how("extract", "fallback:\x1b[2Jx")  # an agent's text never steers the terminal


def test_a_shadow_row_names_its_caller_and_an_older_record_its_node() -> None:
    node = "spiffe://hivemesh.local/client/tester"
    record = {"kind": "shadow", "decision": "different", "capability": "work", "node": node}
    assert _row({"seq": 1, "record": {**record, "caller": node}})["caller"] == node
    assert _row({"seq": 1, "record": record})["caller"] == node  # written before shadow records named a caller
    assert _row({"seq": 1, "record": {**record, "kind": "inbound"}})["caller"] == "?"


def test_call_detailed_is_refused_with_stream(home: Path) -> None:
    result = hivemesh(home, "call", "work", "--detailed", "--stream")
    assert result.exit_code == 2, result.output
    assert "--detailed describes a single call's answer; it does not apply to --stream" in result.output

"""The rules behind shadow traffic and rollouts, without etcd: what the routes `shadow` block and the
`rollouts` kind refuse (naming the field), the rollout's judgment (error rate, increase over stable, latency),
the exact mirrored share, and how answers compare."""

from __future__ import annotations

import json

import pytest

from hivemesh.controlplane.rollouts import RolloutState, VersionStats, decide, judge, routes_spec
from hivemesh.controlplane.shadow_check import non_idempotent, unsafe_shadow
from hivemesh.mesh.outbound.shadow import ShadowTraffic, same_answer
from hivemesh.mesh.policy import PolicyDoc, PolicyError
from hivemesh.mesh.resilience.kinds import ROLLOUTS, ROUTES
from hivemesh.v1 import agent_pb2, mesh_pb2

BASE = {"capability": "work", "stable": {"version": "1.*"}, "canary": {"version": "2.*"}, "steps": [5, 50, 100]}


def _rollout(**spec: object) -> PolicyDoc:
    return ROLLOUTS.validate(PolicyDoc("rollouts", "r", {**BASE, **spec}))


def test_rollouts_kind_refuses_what_cannot_roll_out() -> None:
    for spec, where in [({"steps": [50, 25, 100]}, "spec.steps[1]"), ({"steps": [5, 50]}, "spec.steps[1]"),
                        ({"canary": {"version": "1.*"}}, "spec.canary"), ({"steps": [0, 100]}, "spec.steps")]:
        with pytest.raises(PolicyError) as err:
            _rollout(**spec)
        assert err.value.path.startswith(where), (spec, err.value)
    a, b = _rollout(), _rollout(routes="other")
    with pytest.raises(PolicyError, match="both drive capability 'work'"):
        ROLLOUTS.compile({"a": PolicyDoc("rollouts", "a", a.spec), "b": PolicyDoc("rollouts", "b", b.spec)})
    spec = ROLLOUTS.compile({"r": _rollout()})["r"]
    assert (spec.routes, spec.steps, spec.min_calls) == ("rollout-r", (5, 50, 100), 20)


def test_routes_shadow_needs_a_candidate_and_compiles() -> None:
    with pytest.raises(PolicyError) as err:
        ROUTES.validate(PolicyDoc("routes", "w", {"capabilities": ["work"], "shadow": {"percent": 10}}))
    assert err.value.path == "spec.shadow"
    doc = ROUTES.validate(PolicyDoc("routes", "w", {"capabilities": ["work"],
                                                   "shadow": {"version": "2.*", "percent": 10, "sandbox": True}}))
    policy = ROUTES.compile({"w": doc}).lookup("work")
    assert policy is not None and policy.shadow is not None
    assert (policy.shadow.percent, policy.shadow.sandbox, policy.shadow.compare) == (10.0, True, "json")


def test_non_idempotent_capabilities_are_unsafe_to_mirror_unless_sandboxed() -> None:
    card = agent_pb2.AgentCard(name="a", capabilities=[agent_pb2.Capability(name="charge"),
                                                       agent_pb2.Capability(name="work", idempotent=True)])
    unsafe = non_idempotent([mesh_pb2.AgentInstance(card=card)])
    assert unsafe == {"charge"}
    shadow = {"version": "2.*", "percent": 5}
    assert unsafe_shadow(PolicyDoc("routes", "x", {"capabilities": ["ch*"], "shadow": shadow}), unsafe) == "charge"
    assert unsafe_shadow(PolicyDoc("routes", "x", {"capabilities": ["work"], "shadow": shadow}), unsafe) is None
    sandbox = {**shadow, "sandbox": True}
    assert unsafe_shadow(PolicyDoc("routes", "x", {"capabilities": ["charge"], "shadow": sandbox}), unsafe) is None


def test_judgment_against_the_stable_version() -> None:
    spec = ROLLOUTS.compile({"r": _rollout(min_calls=10, max_error_rate=0.1, max_error_rate_increase=0.02,
                                           max_latency_ratio=1.5)})["r"]
    ok = VersionStats(100, 1, 20.0)
    assert judge(spec, ok, VersionStats(10, 0, 25.0)) is None
    assert "max_error_rate" in (judge(spec, ok, VersionStats(10, 2)) or "")
    assert "by more than" in (judge(spec, ok, VersionStats(100, 5)) or "")
    assert "latency" in (judge(spec, ok, VersionStats(10, 0, 31.0)) or "")
    assert judge(spec, VersionStats(5, 0, 1.0), VersionStats(10, 0, 31.0)) is None  # too few stable calls to compare
    state = RolloutState(version=1, step=0, since=0.0)
    assert decide(spec, state, ok, VersionStats(9, 9), 999).action == "hold"  # too few canary calls to judge
    assert decide(spec, state, ok, VersionStats(10, 0), spec.interval_s - 1).action == "hold"
    assert decide(spec, state, ok, VersionStats(10, 0), spec.interval_s).action == "step"
    assert decide(spec, RolloutState(1, step=2), ok, VersionStats(10, 0), 999).action == "done"
    assert decide(spec, RolloutState(1, phase="rolled-back"), ok, VersionStats(10, 9), 999).action == "hold"
    routes = routes_spec(spec, {"capabilities": ["work"], "rules": [{"name": "x", "pin": {"version": "1.*"}}]}, 50)
    assert [r["name"] for r in routes["rules"]] == ["rollout", "x"]
    ROUTES.validate(PolicyDoc("routes", "w", routes_spec(spec, None, 100)))  # 0/100 is a valid split


def test_the_mirrored_share_is_exact_and_answers_compare_as_json() -> None:
    async def never(*_args: object) -> bytes:
        raise AssertionError("not sent in this test")

    shadow = ShadowTraffic(never)
    assert sum(shadow._sampled("work", 10.0) for _ in range(100)) == 10
    assert sum(shadow._sampled("other", 100.0) for _ in range(7)) == 7

    def answer(output: object, raw: bytes | None = None) -> bytes:
        body = raw if raw is not None else json.dumps(output).encode()
        return agent_pb2.InvokeResponse(output=body, content_type="application/json").SerializeToString()

    assert same_answer(answer({"a": 1, "b": 2}), answer(None, b'{"b": 2, "a": 1}'), "json")
    assert not same_answer(answer({"a": 1, "b": 2}), answer(None, b'{"b": 2, "a": 1}'), "exact")
    assert not same_answer(answer({"a": 1}), answer({"a": 2}), "json")
    assert same_answer(answer(None, b"not json"), answer(None, b"not json"), "json")
    deep = b"[" * 100_000 + b"]" * 100_000  # JSON json cannot read (RecursionError): compared as bytes
    assert same_answer(answer(None, deep), answer(None, deep), "json")
    assert not same_answer(answer(None, deep), answer(None, deep[:-1] + b"}"), "json")
    assert same_answer(answer(None, b'{"n": 18446744073709551617, "x": 0.1}'),
                       answer(None, b'{"x": 0.1, "n": 18446744073709551617}'), "json")  # read as json reads them

"""The pieces of a new user's review, one by one (the real mesh runs them in
tests/integration/test_new_user_review_status_top.py): what a rate limiter reports of its per-identity limit, how
`hivemesh status` draws it, and which published metrics addresses `hivemesh top` scrapes."""

from __future__ import annotations

import threading

import pytest

from hivemesh.controlplane.cli.policy import _limiter
from hivemesh.controlplane.metrics_sd import JOB_NODES, ScrapeTarget, targets_from_status
from hivemesh.mesh.globs import Globs
from hivemesh.mesh.resilience.ratelimit import IdentityOverride, IdentityUsage, RateLimiter, RateLimitPolicy
from hivemesh.mesh.resilience.traffic import TrafficState
from hivemesh.v1 import policy_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_per_identity_limit_and_the_identities_it_refused_are_reported() -> None:
    clock = Clock()
    lim = RateLimiter(clock=clock)
    policy = RateLimitPolicy(per_identity_rps=2, burst_s=1, total_rps=50,
                             overrides=(IdentityOverride(Globs(["vip"]), 100),))
    results = [lim.check(policy, "cap", "noisy") for _ in range(20)]
    assert results.count(0.0) == 2
    assert lim.check(policy, "cap", "quiet") == 0.0
    assert lim.usage("cap") == (3, 18, 50.0)  # every refusal counts as limited, as before
    assert lim.identity_usage() == {"cap": IdentityUsage(rate=2.0, overrides=1, limited=18, identities=1)}

    clock.now += 0.5  # another caller at its limit too
    for _ in range(3):
        lim.check(policy, "cap", "quiet")
    assert lim.identity_usage()["cap"].identities == 2

    clock.now += 11  # refusals older than the window no longer count
    assert lim.identity_usage()["cap"] == IdentityUsage(rate=2.0, overrides=1, limited=0, identities=0)


def test_a_refusal_by_the_total_is_not_put_on_an_identity_and_shares_follow_the_policy_in_force() -> None:
    clock = Clock()
    lim = RateLimiter(clock=clock)
    tight_total = RateLimitPolicy(per_identity_rps=100, total_rps=1, burst_s=1)
    assert [lim.check(tight_total, "cap", f"id-{i}") for i in range(3)].count(0.0) == 1
    assert lim.usage("cap")[1] == 2 and lim.identity_usage()["cap"].limited == 0
    assert lim.identity_usage()["cap"].identities == 0

    in_force = {"cap": RateLimitPolicy(per_identity_rps=30)}  # cluster scope: this instance's share of 3
    lim.follow(in_force.get, lambda _cap: 3)
    assert lim.identity_usage()["cap"].rate == 10.0
    in_force["cap"] = RateLimitPolicy(per_identity_rps=30, identity_scope="instance")
    assert lim.identity_usage()["cap"].rate == 30.0
    del in_force["cap"]
    assert lim.identity_usage()["cap"] == IdentityUsage(limited=0, identities=0)


def test_the_status_snapshot_carries_the_per_identity_fields() -> None:
    state = TrafficState(clock=Clock())
    policy = RateLimitPolicy(per_identity_rps=2, burst_s=1)
    for _ in range(5):
        state.limiter.check(policy, "cap", "noisy")
    (entry,) = state.snapshot(identity="spiffe://td/agent/a", instance="i").capabilities
    assert (entry.limit_rps, entry.limiter_use, entry.rate_limited) == (0.0, 0.0, 3)  # no total: as before
    assert (entry.identity_limit_rps, entry.identity_overrides, entry.identity_limited,
            entry.identities_limited) == (2.0, 0, 3, 1)


def test_the_limiter_cell_names_each_limit() -> None:
    cap = policy_pb2.CapabilityTraffic
    assert _limiter(cap()) == ""
    assert _limiter(cap(limit_rps=50, limiter_use=0.25)) == "25% of 50/s"
    assert _limiter(cap(identity_limit_rps=2, identities_limited=1)) == "per identity 2/s, 1 at limit"
    assert _limiter(cap(limit_rps=50, identity_limit_rps=2.5, identity_overrides=2)) == \
        "0% of 50/s; per identity 2.5/s +2 overrides"
    assert _limiter(cap(identity_overrides=1, identities_limited=3)) == "per identity: 1 override, 3 at limit"


def test_top_scrapes_the_metrics_addresses_nodes_publish_and_skips_what_cannot_be_dialled() -> None:
    def node(identity: str, address: str, instance: str = "i") -> policy_pb2.NodeTraffic:
        return policy_pb2.NodeTraffic(identity=identity, instance=instance, metrics_address=address)

    nodes = [
        node("spiffe://td/agent/mine", "127.0.0.1:9464"),
        node("spiffe://td/agent/mine", "127.0.0.1:9464", "again"),  # the same port once
        node("spiffe://td/client/demo", "[::1]:9465"),
        node("spiffe://td/agent/quiet", ""),  # metrics off
        node("spiffe://td/agent/wild", "0.0.0.0:9466"),  # listens everywhere: no address to dial
        node("spiffe://td/agent/wild6", "[::]:9467"),
        node("spiffe://td/agent/bad", "no-port"),
        node("not-a-spiffe-id", "127.0.0.1:9468"),
    ]
    assert targets_from_status(nodes) == [ScrapeTarget("127.0.0.1:9464", JOB_NODES, "mine"),
                                          ScrapeTarget("[::1]:9465", JOB_NODES, "demo")]


def test_top_asks_the_mesh_again_off_the_view_one_ask_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A control plane slow to answer (up to its 10 s timeout) must not freeze the live view."""
    from hivemesh.controlplane.cli import top
    from hivemesh.controlplane.livestats import Target

    monkeypatch.setattr(top, "DISCOVER_EVERY_S", 0.0)  # every refresh is due
    release = threading.Event()
    answers: list[list[Target] | Exception] = [[Target("127.0.0.1:9464", {"node": "mine"})], RuntimeError("down")]

    def discover() -> list[Target]:
        assert release.wait(10)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    targets = top._Targets([], ["127.0.0.1:9"], discover)
    assert [t.address for t in targets.now()] == ["127.0.0.1:9"]  # the ask waits in its thread; the view goes on
    first = targets._asking
    assert first is not None
    assert [t.address for t in targets.now()] == ["127.0.0.1:9"] and targets._asking is first  # one at a time
    release.set()
    first.join(10)
    assert [t.address for t in targets.now()] == ["127.0.0.1:9", "127.0.0.1:9464"]
    second = targets._asking
    assert second is not None and second is not first
    second.join(10)  # this ask failed: the last list stays, and why is kept to be said
    assert targets.discover_error == "down"
    assert [t.address for t in targets.now()][:2] == ["127.0.0.1:9", "127.0.0.1:9464"]

"""Each resilience module alone, on a fake clock where time matters: window counts, backoff and the retry
budget, the breaker's state machine, token buckets and fairness, the priority gate, the balancer, routes and
the compiled policy tables."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import pytest

from hivemesh.mesh.errors import DeadlineExceededError, OverloadedError
from hivemesh.mesh.layers.admission import Admission
from hivemesh.mesh.layers.base import Inbound
from hivemesh.mesh.link_context import FrameContext
from hivemesh.mesh.policy import PolicyDoc, PolicyError
from hivemesh.mesh.resilience.balancer import LEAST_OUTSTANDING, ROUND_ROBIN, Balancer
from hivemesh.mesh.resilience.breaker import BreakerPolicy, CircuitBreaker, State
from hivemesh.mesh.resilience.concurrency import ConcurrencyGate, ConcurrencyPolicy, PriorityClass, overdue
from hivemesh.mesh.resilience.kinds import BREAKERS, CONCURRENCY, RATELIMITS, RETRIES, ROUTES, TIMEOUTS
from hivemesh.mesh.resilience.ratelimit import RateLimiter, RateLimitPolicy, TokenBucket
from hivemesh.mesh.resilience.retry import NEVER_RETRIED, Backoff, RetryBudget, RetryPolicy, may_resend
from hivemesh.mesh.resilience.routes import SplitState, select
from hivemesh.mesh.resilience.traffic import Traffic
from hivemesh.mesh.resilience.window import WindowCounter
from hivemesh.v1 import agent_pb2, mesh_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, s: float) -> None:
        self.now += s


# --- window -------------------------------------------------------------------------------------------------------
def test_window_counts_slide_out() -> None:
    clock = Clock()
    w = WindowCounter(10.0, width=2, clock=clock)
    w.add(0, 5)
    clock.advance(5)
    w.add(1, 2)
    assert w.totals() == (5, 2)
    clock.advance(6)  # the first slice left the window
    assert w.totals() == (0, 2)
    clock.advance(100)
    assert w.totals() == (0, 0)


# --- retries ------------------------------------------------------------------------------------------------------
def test_backoff_grows_exponentially_with_jitter_within_bounds() -> None:
    b = Backoff(base_s=0.1, max_s=1.0, multiplier=2.0, jitter=0.5)
    assert b.delay(1, rng=lambda: 0.0) == pytest.approx(0.1)
    assert b.delay(3, rng=lambda: 0.0) == pytest.approx(0.4)
    assert b.delay(10, rng=lambda: 0.0) == pytest.approx(1.0)
    rng = random.Random(1)
    delays = [b.delay(2, rng=rng.random) for _ in range(200)]
    assert all(0.1 <= d <= 0.2 for d in delays) and len({round(d, 6) for d in delays}) > 100


def test_retry_policy_never_retries_the_four_forbidden_codes() -> None:
    with pytest.raises(ValueError, match="never be retried"):
        RetryPolicy(retryable=frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT}))
    p = RetryPolicy(retryable=frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL}))
    for code in NEVER_RETRIED:
        assert not p.is_retryable(code)
        assert not p.is_retryable(code, per_try_timed_out=True)
    assert p.is_retryable(grpc.StatusCode.UNAVAILABLE)
    assert not p.is_retryable(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert p.is_retryable(grpc.StatusCode.DEADLINE_EXCEEDED, per_try_timed_out=True)
    assert may_resend(idempotent=True, idempotency_key=False)
    assert may_resend(idempotent=False, idempotency_key=True)
    assert not may_resend(idempotent=False, idempotency_key=False)


def test_retry_budget_caps_retries_at_the_ratio_under_sustained_failure() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_s=1.0, window_s=10.0, clock=clock)
    calls = attempts = 0
    for _ in range(3000):  # 100 calls/s for 30 s, every attempt failing, each call wanting 2 retries
        clock.advance(0.01)
        budget.record_call()
        calls += 1
        attempts += 1
        for _retry in range(2):
            if not budget.try_spend():
                break
            attempts += 1
    assert attempts / calls <= 1.2 + 1e-9
    assert attempts / calls > 1.15  # the budget is used, not just refused
    assert budget.denied > 0


def test_retry_budget_floor_lets_a_trickle_retry() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_s=1.0, window_s=10.0, clock=clock)
    budget.record_call()
    assert budget.try_spend()  # 1 call: 0.2 retries by ratio, but the floor allows 10 per window


# --- breaker ------------------------------------------------------------------------------------------------------
def test_breaker_opens_after_consecutive_failures_then_half_open_probe_closes_it() -> None:
    clock = Clock()
    b = CircuitBreaker(BreakerPolicy(consecutive_failures=3, open_s=1.0, half_open_probes=1), clock=clock)
    for i in range(3):
        assert b.allow()
        opened = b.on_failure()
        assert opened == (i == 2)
    assert b.state is State.OPEN and not b.allow() and b.ejected
    clock.advance(1.01)
    assert b.state is State.HALF_OPEN
    assert b.allow()  # the one probe
    assert not b.allow()  # probe slot taken
    b.on_success()
    assert b.state is State.CLOSED and b.closed_count == 1


def test_breaker_failed_probe_reopens_for_longer() -> None:
    clock = Clock()
    b = CircuitBreaker(BreakerPolicy(consecutive_failures=1, open_s=1.0, max_open_s=10.0), clock=clock)
    b.allow()
    b.on_failure()
    clock.advance(1.01)
    assert b.allow()
    assert b.on_failure()  # probe failed
    clock.advance(1.5)
    assert b.state is State.OPEN  # 2 s this time
    clock.advance(0.6)
    assert b.state is State.HALF_OPEN


def test_breaker_failure_ratio_needs_min_calls_and_successes_reset_consecutive() -> None:
    clock = Clock()
    b = CircuitBreaker(BreakerPolicy(consecutive_failures=None, failure_ratio=0.5, min_calls=10), clock=clock)
    for _ in range(4):
        b.on_failure()
        b.on_success()
    assert b.state is State.CLOSED and b.consecutive_failures == 0
    b.on_failure()
    assert b.state is State.CLOSED  # 9 calls: below min_calls
    assert b.on_failure()  # 10 calls, 6 failed
    assert b.state is State.OPEN


def test_breaker_respects_may_open() -> None:
    b = CircuitBreaker(BreakerPolicy(consecutive_failures=1))
    assert not b.on_failure(lambda: False)
    assert b.state is State.CLOSED
    assert b.on_failure(lambda: True)


def test_neutral_outcome_frees_the_probe_slot() -> None:
    clock = Clock()
    b = CircuitBreaker(BreakerPolicy(consecutive_failures=1, open_s=1.0), clock=clock)
    b.on_failure()
    clock.advance(2)
    assert b.allow() and not b.allow()
    b.on_neutral()
    assert b.allow()


# --- rate limits --------------------------------------------------------------------------------------------------
def test_token_bucket_refills_at_its_rate_and_says_when() -> None:
    b = TokenBucket(rate=10.0, capacity=2.0, now=0.0)
    assert b.wait_time(0.0) == 0.0
    b.take()
    b.take()
    assert b.wait_time(0.0) == pytest.approx(0.1)
    assert b.wait_time(0.1) == 0.0


def test_rate_limiter_total_and_per_identity_fairness() -> None:
    clock = Clock()
    lim = RateLimiter(clock=clock)
    policy = RateLimitPolicy(total_rps=60, per_identity_rps=30, burst_s=0.05)
    admitted: Counter[str] = Counter()
    for tick in range(1000):  # 10 s in 10 ms ticks; a floods at 80/s, b asks 20/s
        clock.advance(0.01)
        if tick % 10 < 8 and lim.check(policy, "cap", "a") == 0.0:
            admitted["a"] += 1
        if tick % 10 in (3, 8) and lim.check(policy, "cap", "b") == 0.0:
            admitted["b"] += 1
    assert 270 <= admitted["a"] <= 330  # capped at its own 30/s even though the total has room
    assert admitted["b"] >= 195  # b gets what it asks for (~20/s): a cannot crowd it out


def test_rate_limiter_cluster_total_divides_by_live_instances_and_reports_delay() -> None:
    clock = Clock()
    lim = RateLimiter(clock=clock)
    policy = RateLimitPolicy(cluster_total_rps=100, burst_s=0.01)
    assert lim.check(policy, "c", "x", instances=4) == 0.0
    wait = lim.check(policy, "c", "x", instances=4)
    assert wait == pytest.approx(1 / 25, rel=0.01)  # 100/4 per second here
    assert lim.usage("c")[2] == 25
    clock.advance(0.01)
    lim.check(policy, "c", "x", instances=1)
    assert lim.usage("c")[2] == 100
    with pytest.raises(ValueError):
        RateLimitPolicy(total_rps=1, cluster_total_rps=1)



def test_per_identity_limits_are_divided_among_live_instances_unless_their_scope_is_instance() -> None:
    clock = Clock()
    lim = RateLimiter(clock=clock)
    shared = RateLimitPolicy(per_identity_rps=30, burst_s=1.0)
    assert shared.shared and shared.identity_rate("x", 3) == 10  # cluster is the default scope
    admitted = 0
    for _ in range(1000):  # 10 s in 10 ms ticks; one caller floods this one of 3 instances
        clock.advance(0.01)
        admitted += lim.check(shared, "cap", "x", instances=3) == 0.0
    assert 100 <= admitted <= 10 + 100 + 1  # its 10/s share plus the bucket it started with
    local = RateLimitPolicy(per_identity_rps=30, identity_scope="instance")
    assert not local.shared and local.identity_rate("x", 3) == 30
    with pytest.raises(ValueError):
        RateLimitPolicy(per_identity_rps=1, identity_scope="galaxy")

    def compiled(spec: dict[str, object]) -> RateLimitPolicy:
        doc = RATELIMITS.validate(PolicyDoc("ratelimits", "r", {"agents": ["a"], "capabilities": ["c"], **spec}))
        policy = RATELIMITS.compile({"r": doc}).lookup("c", "a")
        assert isinstance(policy, RateLimitPolicy)
        return policy

    assert compiled({"per_identity_rps": 5}).identity_scope == "cluster"
    assert compiled({"per_identity_rps": 5, "scope": "instance"}).identity_scope == "instance"
    with pytest.raises(PolicyError, match="scope applies to per_identity_rps and overrides"):
        compiled({"total_rps": 5, "scope": "instance"})
    with pytest.raises(PolicyError):
        compiled({"per_identity_rps": 5, "scope": "everywhere"})


# --- concurrency --------------------------------------------------------------------------------------------------
async def test_gate_admits_high_priority_first_and_sheds_when_the_queue_is_full() -> None:
    gate = ConcurrencyGate(ConcurrencyPolicy(max_in_flight=1, max_queue=2, queue_timeout_s=5))
    await gate.acquire(0)
    order: list[str] = []

    async def waiter(name: str, prio: int) -> None:
        await gate.acquire(prio)
        order.append(name)

    low = asyncio.create_task(waiter("low", 0))
    await asyncio.sleep(0)
    high = asyncio.create_task(waiter("high", 10))
    await asyncio.sleep(0)
    with pytest.raises(OverloadedError):
        await gate.acquire(0)  # queue full, and not above anyone queued
    urgent = asyncio.create_task(waiter("urgent", 20))  # evicts "low" from the full queue
    with pytest.raises(OverloadedError):
        await low
    gate.release()
    await asyncio.sleep(0)
    gate.release()
    await asyncio.gather(high, urgent)
    assert order == ["urgent", "high"]
    assert gate.shed == 2


async def test_gate_reserves_slots_for_high_priority_and_times_out() -> None:
    policy = ConcurrencyPolicy(max_in_flight=3, max_queue=4, queue_timeout_s=0.05,
                               classes=(PriorityClass("critical", 10, reserved=1),))
    gate = ConcurrencyGate(policy)
    await gate.acquire(0)
    await gate.acquire(0)
    with pytest.raises(OverloadedError):
        await gate.acquire(0)  # the third slot is reserved for priority >= 10; waits 50 ms, then shed
    await gate.acquire(10)  # passes at once
    assert gate.in_flight == 3
    with pytest.raises(DeadlineExceededError):
        await gate.acquire(10, timeout=0.01)
    assert policy.class_of(11) == "critical" and policy.class_of(0) == "default"


def test_a_call_that_waited_its_queue_timeout_in_the_agent_is_overdue() -> None:
    policy = ConcurrencyPolicy(max_in_flight=4, queue_timeout_s=0.25, classes=(PriorityClass("urgent", 10, 1),))
    assert overdue(policy, 0.249, 0) is None
    late = overdue(policy, 0.25, 10)
    assert isinstance(late, OverloadedError) and late.retry_after_s is not None
    assert "waited 0.250 s" in late.message and late.metadata == {"max_in_flight": "4", "class": "urgent"}
    # queue_timeout 0 means "no queue": only a full house sheds, however long the loop kept the call.
    assert overdue(ConcurrencyPolicy(max_in_flight=4, queue_timeout_s=0), 30.0, 0) is None


async def test_the_wait_before_asking_counts_against_the_queue_timeout() -> None:
    gate = ConcurrencyGate(ConcurrencyPolicy(max_in_flight=1, max_queue=4, queue_timeout_s=30))
    await gate.acquire(0)
    # It waited all but 10 ms of its 30 s on the loop before it asked: it queues for what is left, not 30 s more.
    with pytest.raises(OverloadedError):
        await asyncio.wait_for(gate.acquire(0, waited=29.99), 5)
    gate.release()
    await asyncio.wait_for(gate.acquire(0, waited=29.99), 5)  # a free slot still admits it
    assert gate.in_flight == 1


def test_with_no_policy_a_call_is_shed_for_a_long_wait_not_a_short_stall() -> None:
    admission = Admission(Traffic(), "busy")  # no concurrency policy names it
    call = Inbound(method="Invoke", request=agent_pb2.InvokeRequest(capability="work"), wire_size=0, metadata={},
                   auth_context={})
    admission.too_late(call, 0.14, 0.06)  # 30% of a 0.2 s deadline, but a 60 ms stall: kept
    admission.too_late(call, 2.3, 0.7)  # 23% of its deadline: kept
    admission.too_late(call, None, 30.0)  # no deadline: nobody gave up, never shed for waiting
    with pytest.raises(OverloadedError, match="over 25% of its deadline") as shed:
        admission.too_late(call, 2.1, 0.9)  # 30%
    assert shed.value.retry_after_s is not None
    with pytest.raises(DeadlineExceededError, match="before the call could start"):
        admission.too_late(call, 0.0, 0.3)
    admission.too_late(Inbound(method="Describe", request=None, wire_size=0, metadata={}, auth_context={}), 0.0, 9)


def test_a_link_calls_deadline_runs_from_when_its_frame_was_read() -> None:
    read = time.monotonic() - 0.3
    context = FrameContext(None, (), 1.0, {}, received=read)  # type: ignore[arg-type]  # no stream needed
    left = context.time_remaining()
    assert left is not None and 0 < left <= 0.7
    assert context.received == read
    assert FrameContext(None, (), 0.0, {}).time_remaining() is None  # type: ignore[arg-type]  # no deadline


async def test_gate_hands_a_slot_on_when_a_granted_waiter_is_cancelled() -> None:
    gate = ConcurrencyGate(ConcurrencyPolicy(max_in_flight=1, max_queue=4, queue_timeout_s=5))
    await gate.acquire(0)
    first = asyncio.create_task(gate.acquire(0))
    second = asyncio.create_task(gate.acquire(0))
    await asyncio.sleep(0)
    gate.release()
    first.cancel()  # granted in release(), cancelled before it ran
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.wait_for(second, 1)
    assert gate.in_flight == 1


# --- balancer -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Inst:
    instance_id: str
    labels: dict[str, str] = field(default_factory=dict)
    card: agent_pb2.AgentCard = field(default_factory=agent_pb2.AgentCard)


def test_round_robin_rotates_and_p2c_prefers_fewer_outstanding() -> None:
    b = Balancer(rng=random.Random(3).random)
    insts = [Inst("a"), Inst("b"), Inst("c")]
    firsts = [b.order("cap", insts, ROUND_ROBIN)[0].instance_id for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    for _ in range(5):
        b.started("/a")  # the instance key of Inst("a") (agent name "")
    picks = Counter(b.order("cap", insts, LEAST_OUTSTANDING)[0].instance_id for _ in range(300))
    assert picks["a"] == 0  # a is busier than whichever other instance it is paired with
    b.started("/b")
    picks = Counter(b.order("cap", insts, LEAST_OUTSTANDING)[0].instance_id for _ in range(300))
    assert picks["c"] > picks["b"] > 0 and picks["a"] == 0
    for _ in range(5):
        b.finished("/a")
    assert b.outstanding("/a") == 0


# --- routes -------------------------------------------------------------------------------------------------------
def _instance(iid: str, version: str, **labels: str) -> mesh_pb2.AgentInstance:
    return mesh_pb2.AgentInstance(instance_id=iid, card=agent_pb2.AgentCard(name="x", version=version),
                                  labels=labels)


def _route(spec: dict[str, object]) -> object:
    doc = ROUTES.validate(PolicyDoc("routes", "r", {"capabilities": ["cap"], **spec}))
    return ROUTES.compile({"r": doc}).lookup("cap")


def test_weighted_split_is_exact_and_skips_subsets_with_no_instance() -> None:
    policy = _route({"rules": [{"name": "canary", "split": [{"weight": 9, "version": "1.*"},
                                                               {"weight": 1, "version": "2.*"}]}]})
    insts = [_instance("v1a", "1.0.0"), _instance("v1b", "1.2.0"), _instance("v2", "2.0.0")]
    states: dict[int, SplitState] = {}

    def state(rule: int, n: int) -> SplitState:
        return states.setdefault(rule, SplitState(n))

    versions = Counter()
    for _ in range(100):
        chosen, why = select(policy, insts, dict, state)  # type: ignore[arg-type]
        versions[chosen[0].card.version[0]] += 1
        assert why.startswith("canary: split")
    assert versions == {"1": 90, "2": 10}
    only_v1 = insts[:2]
    assert all(select(policy, only_v1, dict, state)[0] == only_v1 for _ in range(20))  # type: ignore[arg-type]


def test_pin_and_metadata_match_and_labels() -> None:
    policy = _route({"rules": [
        {"name": "beta", "match": {"metadata": {"x-tenant": "beta-*"}}, "pin": {"labels": {"track": "canary"}}},
        {"name": "rest", "pin": {"version": "1.*"}},
    ]})
    insts = [_instance("old", "1.0.0"), _instance("new", "2.0.0", track="canary")]
    chosen, why = select(policy, insts, lambda: {"x-tenant": "beta-7"}, lambda r, n: SplitState(n))  # type: ignore[arg-type]
    assert [i.instance_id for i in chosen] == ["new"] and why.startswith("beta")
    chosen, why = select(policy, insts, lambda: {"x-tenant": "acme"}, lambda r, n: SplitState(n))  # type: ignore[arg-type]
    assert [i.instance_id for i in chosen] == ["old"] and why.startswith("rest")
    chosen, _ = select(policy, insts[1:], lambda: {}, lambda r, n: SplitState(n))  # type: ignore[arg-type]
    assert chosen == []  # pinned to 1.* with none live: the caller degrades or fails NO_LIVE_INSTANCE


# --- compiled tables ----------------------------------------------------------------------------------------------
def test_most_specific_document_wins_and_ties_are_refused() -> None:
    docs = {
        "all": RETRIES.validate(PolicyDoc("retries", "all", {"attempts": 2})),
        "ext": RETRIES.validate(PolicyDoc("retries", "ext", {"capabilities": ["ext*"], "attempts": 3})),
        "one": RETRIES.validate(PolicyDoc("retries", "one", {"capabilities": ["extract"], "attempts": 4})),
    }
    table = RETRIES.compile(docs)
    assert table.lookup("extract").attempts == 4
    assert table.lookup("extend").attempts == 3
    assert table.lookup("other").attempts == 2
    assert RETRIES.empty().lookup("extract") is None
    clash = RETRIES.validate(PolicyDoc("retries", "clash", {"capabilities": ["extract"], "attempts": 5}))
    with pytest.raises(ValueError, match="ambiguous"):
        RETRIES.compile({**docs, "clash": clash})


def test_inbound_tables_select_by_agent_and_capability() -> None:
    rl = RATELIMITS.validate(PolicyDoc("ratelimits", "a", {"agents": ["ocr"], "capabilities": ["scan"],
                                                          "per_identity_rps": 5}))
    table = RATELIMITS.compile({"a": rl})
    assert table.lookup("scan", "ocr") is not None and table.lookup("scan", "other") is None
    cc = CONCURRENCY.validate(PolicyDoc("concurrency", "c", {"agents": ["ocr"], "max_in_flight": 4}))
    assert CONCURRENCY.compile({"c": cc}).lookup("*", "ocr").max_in_flight == 4
    t = TIMEOUTS.compile({"t": TIMEOUTS.validate(PolicyDoc("timeouts", "t", {"default_ms": 250}))})
    assert t.lookup("anything") == 0.25
    br = BREAKERS.validate(PolicyDoc("breakers", "b", {"instance": {"consecutive_failures": 2,
                                                                     "max_ejected_share": 0.34}}))
    settings = BREAKERS.compile({"b": br}).lookup("x")
    assert settings.instance.consecutive_failures == 2 and settings.capability is None
    assert settings.max_ejected_share == 0.34

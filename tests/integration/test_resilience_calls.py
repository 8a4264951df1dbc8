"""Traffic policies on the real mesh (real etcd, real TLS, agents failing on purpose): circuit breakers with
the counts the issue asks for, which codes are retried, idempotency keys, graceful degradation, canary
splits, least-outstanding balancing, priorities and shedding, default deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter

import aetcd
import grpc
import pytest

from hivemesh.mesh.errors import (
    AgentError,
    CircuitOpenError,
    DeadlineExceededError,
    HivemeshError,
    InvalidInputError,
    OverloadedError,
)
from hivemesh.mesh.outbound import DEGRADED_KEY
from hivemesh.mesh.resilience.breaker import State
from hivemesh.mesh.resilience.traffic import breaker_states
from hivemesh.sdk import AgentServer, MeshClient
from hivemesh.v1 import agent_pb2
from tests.support.agents_for_tests import EchoAgent
from tests.support.meshenv import MeshEnv
from tests.support.resilience_rig import BackupAgent, FlakyAgent, FlakyV2, apply, fleet, wait_until

THRESHOLD = 5
BREAKERS = f"""
kind: breakers
name: work
spec:
  capabilities: [work]
  instance: {{consecutive_failures: {THRESHOLD}, open_ms: 400, half_open_probes: 1, max_ejected_share: 0.5}}
"""


async def test_breaker_ejects_a_failing_replica_and_readmits_it_after_it_heals(
    mesh_env: MeshEnv, etcd: aetcd.Client
) -> None:
    async with fleet(mesh_env) as f:
        # open_ms well above the 0.3 s "while open" sample, so a slow call on a loaded machine cannot straddle
        # the switch to half-open and count a probe as a call that reached it while open.
        await apply(etcd, BREAKERS.replace("open_ms: 400", "open_ms: 1500"), f.nodes())
        bad, *good = f.agents
        bad_id = f.servers[0].instance_key
        bad.mode = "INTERNAL"
        failed_before_open = 0
        calls = 0
        while True:  # one call at a time: the exact count the breaker lets through
            calls += 1
            try:
                await f.client.call("work", {}, timeout=5)
            except AgentError:
                failed_before_open += 1
            if breaker_states(f.client.node.traffic.state, "work").get(bad_id) == "open":
                break
            assert calls < 100, "the breaker never opened"
        reached_before_open = bad.calls["work"]
        opened_at = time.monotonic()
        # While open, calls stop reaching it and none fail.
        served: Counter[str] = Counter()
        while time.monotonic() - opened_at < 0.3:
            served[(await f.client.call("work", {}, timeout=5))["served_by"]] += 1
        reached_while_open = bad.calls["work"] - reached_before_open
        # It heals; after open_ms a half-open probe closes the breaker and it gets its share back.
        bad.mode = "ok"
        healed_at = time.monotonic()
        while breaker_states(f.client.node.traffic.state, "work").get(bad_id) != "closed":
            await f.client.call("work", {}, timeout=5)
            assert time.monotonic() - healed_at < 5, "the breaker did not close after the replica healed"
        closed_after = time.monotonic() - healed_at
        after: Counter[str] = Counter()
        for _ in range(300):
            after[(await f.client.call("work", {}, timeout=5))["served_by"]] += 1
        breaker = f.client.node.traffic.state.peek_instance_breaker("work", bad_id)
        assert breaker is not None
        print(
            f"\nbreaker figures: threshold {THRESHOLD}; calls failed before it opened {failed_before_open} "
            f"(attempts reaching the failing replica {reached_before_open}); calls reaching it while open "
            f"{reached_while_open} of {sum(served.values())}; closed {closed_after:.2f} s after it healed "
            f"(open_ms 1500); share of the next 300 calls {dict(after)}; opened {breaker.opened_count}x, "
            f"closed {breaker.closed_count}x"
        )
    assert failed_before_open == THRESHOLD
    assert reached_while_open == 0 and set(served) == {"b", "c"}
    assert abs(after["a"] - 100) <= 2 and abs(after["b"] - 100) <= 2
    # The healthy replicas were never ejected.
    for gid in (s.instance_key for s in f.servers[1:]):
        b = f.client.node.traffic.state.peek_instance_breaker("work", gid)
        assert b is None or b.opened_count == 0
    assert all(g.calls["work"] > 0 for g in good)


async def test_max_ejected_share_keeps_instances_serving_and_retries_hide_the_failures(
    mesh_env: MeshEnv, etcd: aetcd.Client
) -> None:
    async with fleet(mesh_env) as f:
        # No timing in the outcome: the ejected replica stays ejected for the whole test (no half-open probe
        # lands mid-run), and the retry budget covers the worst case of every call (two retries: both failing
        # replicas before the healthy one), however the 8 workers interleave on a loaded machine.
        await apply(etcd, BREAKERS.replace("open_ms: 400", "open_ms: 600000") + """---
kind: retries
name: work
spec:
  capabilities: [work]
  attempts: 3
  retryable_codes: [INTERNAL, UNAVAILABLE]
  backoff: {base_ms: 1}
  budget: {ratio: 2.0}
""", f.nodes())
        f.agents[0].mode = f.agents[1].mode = "INTERNAL"  # two of three fail
        results: Counter[str] = Counter()
        failures = 0

        async def worker() -> None:
            nonlocal failures
            for _ in range(40):
                try:
                    results[(await f.client.call("work", {}, timeout=5))["served_by"]] += 1
                except HivemeshError:
                    failures += 1

        await asyncio.gather(*(worker() for _ in range(8)))
        states = breaker_states(f.client.node.traffic.state, "work")
        print(f"\n2 of 3 failing, max_ejected_share 0.5: breakers {states}, served {dict(results)}, failed {failures}")
    assert list(states.values()).count("open") == 1  # one of the two failing replicas, never both
    failing_ids = {f.servers[0].instance_key, f.servers[1].instance_key}
    assert {i for i, s in states.items() if s == "open"} <= failing_ids
    assert states.get(f.servers[2].instance_key, "closed") == "closed"
    assert results["c"] == 320 - failures
    assert failures == 0  # a retry goes to an instance the call has not tried: the healthy one


async def test_a_capability_breaker_fails_fast_and_falls_back_then_serves_the_cached_answer(
    mesh_env: MeshEnv, etcd: aetcd.Client
) -> None:
    backup = BackupAgent()
    async with fleet(mesh_env, ("solo",)) as f, AgentServer(backup, await mesh_env.settings_for("backup")):
        assert await f.client.node.registry.wait_for_capability("work-lite", 1, timeout=10)
        await apply(etcd, """
kind: breakers
name: work
spec:
  capabilities: [work]
  capability: {consecutive_failures: 3, open_ms: 60000}
---
kind: routes
name: work
spec:
  capabilities: [work]
  fallback: work-lite
""", f.nodes())
        assert await f.client.call("work", {"text": "x"}, timeout=5) == {"served_by": "solo"}
        f.agents[0].mode = "UNAVAILABLE"
        outcomes = [await f.client.call_detailed("work", {"text": "x"}, timeout=5) for _ in range(6)]
        assert all(o.output == {"served_by": "backup"} for o in outcomes)
        reached = f.agents[0].calls["work"]
        assert reached == 1 + 3  # after three failures the capability breaker stops sending to it at all
        raw, _ = await f.client.node.outbound.invoke(
            agent_pb2.InvokeRequest(capability="work", input=b'{"text":"x"}').SerializeToString(),
            capability="work", idempotency_key="", timeout=5,
        )
        assert agent_pb2.InvokeResponse.FromString(raw).metadata[DEGRADED_KEY] == "fallback:work-lite"
        # Without a fallback, an open capability breaker is CIRCUIT_OPEN, at once.
        await apply(etcd, "kind: routes\nname: work\nspec: {capabilities: [work], cache: {ttl_s: 60}}", f.nodes())
        t0 = time.monotonic()
        with pytest.raises(CircuitOpenError) as info:
            await f.client.call("work", {"text": "x"}, timeout=5)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and time.monotonic() - t0 < 0.05
        # A cacheable capability answers a degraded call with its last good answer for that input.
        await etcd.delete(b"/hivemesh/policies/breakers/work")
        f.agents[0].mode = "ok"
        await asyncio.sleep(0.2)
        assert await f.client.call("work", {"text": "cached"}, timeout=5) == {"served_by": "solo"}
        f.agents[0].mode = "UNAVAILABLE"
        stale = await f.client.call_detailed("work", {"text": "cached"}, timeout=5)
        assert stale.output == {"served_by": "solo"}
        with pytest.raises(HivemeshError) as miss:
            await f.client.call("work", {"text": "never seen"}, timeout=5)
        assert miss.value.code == grpc.StatusCode.UNAVAILABLE
    assert backup.calls == 7


@pytest.mark.parametrize("code", ["INVALID_ARGUMENT", "PERMISSION_DENIED", "UNAUTHENTICATED", "FAILED_PRECONDITION",
                                  "RESOURCE_EXHAUSTED", "UNAVAILABLE"])
async def test_only_retryable_codes_are_retried(mesh_env: MeshEnv, etcd: aetcd.Client, code: str) -> None:
    async with fleet(mesh_env, ("a",)) as f:
        await apply(etcd, """
kind: retries
name: all
spec: {attempts: 4, retryable_codes: [UNAVAILABLE, INTERNAL, UNKNOWN, DEADLINE_EXCEEDED], backoff: {base_ms: 1}}
""", f.nodes())
        with pytest.raises(HivemeshError) as info:
            await f.client.call("fail-with", {"code": code}, timeout=5)
        assert info.value.code.name == code
        attempts = f.agents[0].calls[code]
    assert attempts == (4 if code == "UNAVAILABLE" else 1)


async def test_non_idempotent_calls_retry_only_with_a_key_and_take_effect_once(
    mesh_env: MeshEnv, etcd: aetcd.Client
) -> None:
    async with fleet(mesh_env, ("a", "b")) as f:
        await apply(etcd, """
kind: retries
name: charge
spec: {capabilities: [charge], attempts: 3, per_try_timeout_ms: 150, backoff: {base_ms: 5}}
""", f.nodes())
        for a in f.agents:
            a.first_call_delay = 0.6  # the first attempt of a key is slow (a stall); later ones are quick
        # Without a key a timed-out attempt is not retried: running it again could apply it twice.
        with pytest.raises(DeadlineExceededError):
            await f.client.call("charge", {}, timeout=5)
        assert sum(a.calls["charge"] for a in f.agents) == 1
        # With a key it is retried, on the same instance (where the key is remembered), and takes effect once.
        out = await f.client.call("charge", {}, timeout=5, idempotency_key="order-1")
        agent = next(a for a in f.agents if a.tag == out["served_by"])
        assert out["effects"] == 1 and agent.started["order-1"] == 2
        # The caller re-sends the whole call (it never saw the answer, say): replayed, not re-run.
        again = await f.client.call("charge", {}, timeout=5, idempotency_key="order-1")
        assert again == out
        # Concurrent duplicates join one run.
        for a in f.agents:
            a.first_call_delay, a.delay = None, 0.1
        dupes = await asyncio.gather(*(f.client.call("charge", {}, timeout=5, idempotency_key="order-2")
                                       for _ in range(5)))
        effects = sum(a.effects["order-2"] for a in f.agents)
        print(f"\nidempotency: order-1 started {agent.started['order-1']}x, took effect {agent.effects['order-1']}x; "
              f"order-2 sent 5x concurrently, took effect {effects}x on {len({d['served_by'] for d in dupes})} "
              "instance(s)")
    assert sum(a.effects["order-1"] for a in f.agents) == 1
    # Round robin may send duplicates to both instances (per-process memory): at most once per instance.
    assert all(a.effects["order-2"] <= 1 for a in f.agents) and all(d["effects"] == 1 for d in dupes)


async def test_canary_split_pin_and_metadata_match(mesh_env: MeshEnv, etcd: aetcd.Client) -> None:
    async with fleet(mesh_env, ("v1a", "v1b", "v2"), agent_types=[FlakyAgent, FlakyAgent, FlakyV2]) as f:
        await apply(etcd, """
kind: routes
name: canary
spec:
  capabilities: [work]
  rules:
    - name: beta-testers
      match: {metadata: {x-tenant: "beta-*"}}
      pin: {version: "2.*"}
    - name: canary
      split:
        - {weight: 90, version: "1.*"}
        - {weight: 10, version: "2.*"}
""", f.nodes())
        served: Counter[str] = Counter()
        for _ in range(200):
            served[(await f.client.call("work", {}, timeout=5))["served_by"]] += 1
        assert served["v2"] == 20 and served["v1a"] + served["v1b"] == 180
        assert abs(served["v1a"] - served["v1b"]) <= 1
        req = agent_pb2.InvokeRequest(capability="work", input=b"{}", metadata={"x-tenant": "beta-9"})
        for _ in range(10):
            _raw, inst = await f.client.node.outbound.invoke(
                req.SerializeToString(), capability="work", idempotency_key="", timeout=5)
            assert inst.card.version == "2.0.0"


async def test_least_outstanding_sends_less_to_a_slow_replica(mesh_env: MeshEnv, etcd: aetcd.Client) -> None:
    async with fleet(mesh_env) as f:
        await apply(etcd, "kind: routes\nname: lb\nspec: {load_balancer: least_outstanding}", f.nodes())
        f.agents[0].delay = 0.05  # 50 ms; the others answer at once
        served: Counter[str] = Counter()

        async def worker() -> None:
            for _ in range(30):
                served[(await f.client.call("work", {}, timeout=5))["served_by"]] += 1

        await asyncio.gather(*(worker() for _ in range(8)))
        print(f"\nleast outstanding (P2C) with one replica 50 ms slower: {dict(served)}")
    assert served["a"] < 0.2 * sum(served.values())


async def test_priority_passes_first_and_excess_load_is_shed(mesh_env: MeshEnv, etcd: aetcd.Client) -> None:
    async with fleet(mesh_env, ("a",)) as f:
        await apply(etcd, """
kind: concurrency
name: flaky
spec:
  agents: [flaky]
  max_in_flight: 2
  max_queue: 3
  queue_timeout_ms: 5000
  classes: [{name: urgent, min_priority: 10, reserved: 1}]
""", f.nodes())
        f.agents[0].delay = 0.3
        done: list[str] = []

        async def call(name: str, priority: int) -> str:
            try:
                await f.client.call("work", {}, timeout=10, context=agent_pb2.CallContext(priority=priority))
            except OverloadedError as err:
                assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.retry_after_s is not None
                return "shed"
            done.append(name)
            return "ok"

        low = [asyncio.create_task(call(f"low{i}", 0)) for i in range(6)]
        traffic = f.servers[0].node.traffic.state
        await wait_until(lambda: (g := traffic.gate_of("flaky")) is not None and g.queued >= 3, 5, "a full queue")
        metrics = f.servers[0].node.metrics
        assert metrics is not None  # an agent's metrics are on by default
        full = metrics.metrics.exposition().decode()  # read in the same step as the queue: nothing moved since
        urgent = asyncio.create_task(call("urgent", 10))
        results = await asyncio.gather(*low, urgent)
        gate = traffic.gate_of("flaky")
        assert gate is not None
        drained = metrics.metrics.exposition().decode()
        print(f"\npriority: completion order {done}; shed {gate.shed}")
    # One slot of two is reserved for urgent calls: one low call runs, three queue, two are shed at once;
    # the urgent call runs in its reserved slot at once and finishes before any queued low call.
    assert results.count("shed") == 2 and results[-1] == "ok"
    assert done.index("urgent") <= 1
    assert gate.in_flight == 0
    # The node's /metrics said the same: the queue depth while it was full, then empty, and the two shed.
    assert 'hivemesh_admission_queue_depth{agent="flaky"} 3.0' in full
    assert 'hivemesh_admission_queue_depth{agent="flaky"} 0.0' in drained
    assert 'hivemesh_admission_shed_total{capability="work"} 2.0' in drained


async def test_default_deadline_applies_only_when_the_caller_gives_none(mesh_env: MeshEnv, etcd: aetcd.Client) -> None:
    async with fleet(mesh_env, ("a",)) as f:
        await apply(etcd, "kind: timeouts\nname: work\nspec: {capabilities: [work], default_ms: 150}", f.nodes())
        f.agents[0].delay = 10.0  # far past the default: a call without it would take 10 s
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            await f.client.call("work", {})
        took = time.monotonic() - t0
        assert 0.14 <= took < 5.0
        f.agents[0].delay = 0.4
        assert await f.client.call("work", {}, timeout=2) == {"served_by": "a"}  # the caller's deadline wins
        # A timeout that is no number of seconds is refused, not sent: NaN went over a link as no deadline.
        for bad in (float("nan"), float("inf")):
            with pytest.raises(InvalidInputError, match="finite number of seconds") as refused:
                await f.client.call("work", {}, timeout=bad)
            assert "timeout" in refused.value.field_violations
    assert MeshClient  # the SDK client is what applied the policy default


async def test_breaker_state_shows_in_the_published_status(mesh_env: MeshEnv, etcd: aetcd.Client) -> None:
    from hivemesh.mesh.status import read_status

    async with fleet(mesh_env) as f:
        await apply(etcd, BREAKERS.replace("open_ms: 400", "open_ms: 60000"), f.nodes())
        f.agents[0].mode = "INTERNAL"
        for _ in range(20):
            with contextlib.suppress(AgentError):
                await f.client.call("work", {}, timeout=5)
        assert f.client.node.traffic.state.peek_instance_breaker("work", "flaky/flaky-a").state is State.OPEN

        async def client_status() -> dict[str, str]:
            for node in await read_status(etcd):
                if node.identity.endswith("/client/tester"):
                    for cap in node.capabilities:
                        if cap.capability == "work" and cap.direction == "outbound":
                            return {i.instance: i.breaker for i in cap.instances}
            return {}

        deadline = time.monotonic() + 6
        while (seen := await client_status()).get("flaky/flaky-a") != "open":
            assert time.monotonic() < deadline, f"status never showed the open breaker: {seen}"
            await asyncio.sleep(0.2)
        nodes = await read_status(etcd)
        served = [n for n in nodes if n.identity.endswith("/agent/flaky")]
        assert len(served) == 3 and all(any(c.direction == "inbound" for c in n.capabilities) for n in served)


async def test_a_pinned_instance_with_an_open_breaker_fails_fast_with_circuit_open(
    mesh_env: MeshEnv, etcd: aetcd.Client
) -> None:
    async with fleet(mesh_env, ("v1a", "v1b", "v2"), agent_types=[FlakyAgent, FlakyAgent, FlakyV2]) as f:
        await apply(etcd, BREAKERS.replace("open_ms: 400", "open_ms: 60000") + """---
kind: routes
name: pin
spec: {capabilities: [work], rules: [{pin: {version: "2.*"}}]}
""", f.nodes())
        f.agents[2].mode = "INTERNAL"
        for _ in range(THRESHOLD):
            with pytest.raises(AgentError):
                await f.client.call("work", {}, timeout=5)
        t0 = time.monotonic()
        with pytest.raises(CircuitOpenError):
            await f.client.call("work", {}, timeout=5)
        assert time.monotonic() - t0 < 0.05
    assert f.agents[2].calls["work"] == THRESHOLD


async def test_an_agent_stopping_gracefully_under_traffic_fails_no_call(mesh_env: MeshEnv) -> None:
    async with fleet(mesh_env, ("a", "b")) as f:
        outcomes: Counter[str] = Counter()
        stop = asyncio.Event()

        async def loop() -> None:
            while not stop.is_set():
                try:
                    await f.client.call("work", {}, timeout=5)
                    outcomes["ok"] += 1
                except HivemeshError as err:
                    outcomes[f"{err.code.name}/{err.reason}"] += 1

        workers = [asyncio.ensure_future(loop()) for _ in range(8)]
        await wait_until(lambda: outcomes["ok"] >= 300, 10, "traffic")
        # Deregister, let callers hear it, then drain: a caller never picks an instance that stopped taking calls.
        await f.servers[0].stop()
        after = outcomes["ok"]
        await wait_until(lambda: outcomes["ok"] >= after + 300, 10, "traffic after the stop")
        stop.set()
        await asyncio.gather(*workers)
    assert set(outcomes) == {"ok"}, outcomes


async def test_a_cluster_wide_limit_is_divided_among_live_instances(mesh_env: MeshEnv, etcd: aetcd.Client) -> None:
    async with fleet(mesh_env, ("a", "b")) as f:
        await apply(etcd, """
kind: ratelimits
name: shared
spec: {agents: [flaky], capabilities: [work], cluster_total_rps: 40}
""", f.nodes())
        for _ in range(4):
            await f.client.call("work", {}, timeout=5)
        limits = [s.node.traffic.state.limiter.usage("work")[2] for s in f.servers]
        assert limits == [20.0, 20.0]
        await f.servers[1].stop()  # membership changes: the survivor's share becomes the whole limit
        await wait_until(lambda: len(f.servers[0].node.registry.instances("work")) == 1, 5, "the survivor alone")
        await f.client.call("work", {}, timeout=5)
        assert f.servers[0].node.traffic.state.limiter.usage("work")[2] == 40.0


async def test_a_rate_limited_call_through_a_sidecar_says_so_to_any_grpc_client(
    mesh_env: MeshEnv, etcd: aetcd.Client
) -> None:
    from google.rpc import error_details_pb2, status_pb2

    from hivemesh.mesh.errors import PUSHBACK_KEY
    from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
    from tests.support.plain_agent import PlainAgent

    await apply(etcd, """
kind: ratelimits
name: echo
spec: {agents: [echo], capabilities: [echo], per_identity_rps: 1, burst_s: 1}
""")
    plain = PlainAgent("plain", prefix="plain-")
    async with plain, AgentServer(EchoAgent("e"), await mesh_env.settings_for("echo")), \
            Sidecar(SidecarConfig(agent=plain.endpoint), await mesh_env.settings_for("plain")) as sidecar:
        assert sidecar.node is not None
        assert await sidecar.node.registry.wait_for_capability("echo", 1, timeout=10)
        # A plain gRPC client (as any language would be) calling the sidecar's Mesh service: the plain agent
        # calls another agent's capability, whose rate limit refuses the second call.
        async with grpc.aio.insecure_channel(sidecar.mesh_endpoint) as channel:
            call = channel.unary_unary("/hivemesh.v1.Mesh/Call")
            req = agent_pb2.InvokeRequest(capability="echo", input=b'{"text": "hi"}').SerializeToString()
            await call(req, timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(req, timeout=5)
    exc = info.value
    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(exc.trailing_metadata() or ())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    found: dict[str, object] = {}
    for detail in status.details:
        info_msg, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
        if detail.Unpack(info_msg):
            found["reason"] = info_msg.reason
        elif detail.Unpack(retry):
            found["retry_ms"] = retry.retry_delay.ToMilliseconds()
    assert found["reason"] == "RATE_LIMITED" and 0 < int(str(found["retry_ms"])) <= 1000
    assert 0 < int(trailers[PUSHBACK_KEY]) <= 1000

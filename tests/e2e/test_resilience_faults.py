"""The issue's fault tests with figures, on real processes, real etcd and real TLS: a replica killed under load,
rate limits at twice their rate, a retry storm, a deadline across three hops, a policy applied under traffic,
and an etcd member killed under traffic. Figures are printed (run with -s) and recorded in docs/resilience.md."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aetcd
import grpc
import pytest

from hivemesh.controlplane.cli.policy_client import PolicyClient
from hivemesh.mesh.errors import (
    PUSHBACK_KEY,
    DeadlineExceededError,
    HivemeshError,
    RateLimitedError,
    from_rpc_error,
)
from hivemesh.mesh.etcd import EtcdCluster, client, wait_connected
from hivemesh.mesh.registry import Registration
from hivemesh.mesh.resilience.kinds import ROUTES
from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
from hivemesh.sdk import AgentServer, MeshClient
from hivemesh.v1 import agent_pb2, mesh_pb2, mesh_pb2_grpc
from tests.conftest import SessionCa
from tests.support.agents_for_tests import EchoAgent
from tests.support.meshenv import MeshEnv, start_mesh_env, stop_mesh_env
from tests.support.plain_agent import PlainAgent
from tests.support.resilience_rig import (
    CHAIN_GRANT,
    FlakyAgent,
    FlakyV2,
    HopA,
    HopB,
    HopC,
    Hops,
    apply,
    fleet,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]


# --- replicas as processes ------------------------------------------------------------------------------------------
@dataclass
class Replica:
    tag: str
    proc: asyncio.subprocess.Process
    log: IO[bytes]


@contextlib.asynccontextmanager
async def replica_processes(env: MeshEnv, tmp: Path, tags: list[str]) -> AsyncIterator[list[Replica]]:
    """EchoAgent replicas, each its own process (tests.support.replica_main), stopped (or killed) afterwards."""
    started: list[Replica] = []

    async def start(tag: str) -> Replica:
        join = await env.operator.create_join_token("echo", "agent", 120)
        s = env.base_settings()
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMESH_")}
        child_env.update(
            HIVEMESH_HOME=str(tmp / "home"), HIVEMESH_ETCD=s.etcd, HIVEMESH_CONTROLPLANE=s.controlplane,
            HIVEMESH_JOIN=s.join, HIVEMESH_CA=str(s.ca_bundle), HIVEMESH_TRUST_DOMAIN=s.trust_domain,
            HIVEMESH_JOIN_TOKEN=join.token, HIVEMESH_REPLICA_TAG=tag, HIVEMESH_LEASE_TTL_S="3",
        )
        log = (tmp / f"{tag}.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.support.replica_main", cwd=REPO, env=child_env, stdout=asyncio.subprocess.PIPE,
            stderr=log, start_new_session=True,
        )
        replica = Replica(tag, proc, log)
        started.append(replica)
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("ready"), f"replica {tag} said {line!r} (log {tmp / tag}.log)"
        return replica

    try:
        yield list(await asyncio.gather(*(start(t) for t in tags)))
    finally:
        for r in started:
            if r.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    r.proc.terminate()
                try:
                    await asyncio.wait_for(r.proc.wait(), 5)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        r.proc.kill()
                    await r.proc.wait()
            r.log.close()


@dataclass
class Outcome:
    start: float
    end: float
    served_by: str | None
    error: str = ""


@pytest.mark.slow
async def test_killing_one_of_three_replicas_under_load_fails_no_call(
    mesh_env: MeshEnv, etcd: aetcd.Client, tmp_path: Path
) -> None:
    async with replica_processes(mesh_env, tmp_path, ["r1", "r2", "r3"]) as replicas:
        settings = await mesh_env.settings_for("loader", "client")
        async with MeshClient.connect(name="loader", settings=settings) as mesh:
            assert await mesh.node.registry.wait_for_capability("echo", 3, timeout=15)
            await apply(etcd, """
kind: retries
name: echo
spec: {capabilities: [echo], attempts: 3, retryable_codes: [UNAVAILABLE], backoff: {base_ms: 5, max_ms: 50}}
---
kind: breakers
name: echo
spec: {capabilities: [echo], instance: {consecutive_failures: 3, open_ms: 1000}}
""", [mesh.node])
            victim = replicas[0]
            outcomes: list[Outcome] = []
            total, concurrency = 2000, 16
            issued = 0
            killed_at = 0.0
            excluded_at = 0.0

            async def worker() -> None:
                nonlocal issued
                while issued < total:
                    issued += 1
                    t0 = time.monotonic()
                    try:
                        out = await mesh.call("echo", {"text": "x"}, timeout=5)
                        outcomes.append(Outcome(t0, time.monotonic(), out["served_by"]))
                    except HivemeshError as err:
                        error = f"{err.code.name}/{err.reason}: {err.message}"
                        outcomes.append(Outcome(t0, time.monotonic(), None, error))

            async def kill_mid_way() -> None:
                nonlocal killed_at, excluded_at
                await wait_until(lambda: len(outcomes) >= 600, 60, "600 calls before the kill", step=0.002)
                assert victim.proc.pid is not None
                os.kill(victim.proc.pid, signal.SIGKILL)
                killed_at = time.monotonic()
                traffic, liveness = mesh.node.traffic.state, mesh.node.liveness

                def excluded() -> bool:
                    b = traffic.peek_instance_breaker("echo", "echo/r1")
                    return liveness.is_suspect("echo/r1") or (b is not None and b.ejected)

                excluded_at = await wait_until(excluded, 10, "the dead replica to be avoided", step=0.001)

            started = time.monotonic()
            await asyncio.gather(kill_mid_way(), *(worker() for _ in range(concurrency)))
            elapsed = time.monotonic() - started
            gone = await wait_until(lambda: len(mesh.node.registry.instances("echo")) == 2, 10, "deregistration")
    failed = [o for o in outcomes if o.served_by is None]
    around = [o for o in outcomes if o.start <= killed_at <= o.end or killed_at <= o.start <= killed_at + 1.0]
    latencies = sorted(o.end - o.start for o in outcomes)
    after = Counter(o.served_by for o in outcomes if o.start > excluded_at)
    worst = 1000 * max(o.end - o.start for o in around)
    p50, p99 = 1000 * statistics.median(latencies), 1000 * latencies[int(0.99 * len(latencies))]
    print(
        f"\nkill 1 of 3 under load: {len(outcomes)} calls at concurrency {concurrency} in {elapsed:.2f} s, "
        f"{len(failed)} failed; failover (kill -> dead replica avoided) {1000 * (excluded_at - killed_at):.1f} ms; "
        f"worst latency of calls in flight at the kill or within 1 s after {worst:.1f} ms (p50 overall "
        f"{p50:.2f} ms, p99 {p99:.1f} ms); kill -> deregistered {gone - killed_at:.2f} s (lease TTL 3 s); "
        f"after failover served by {dict(after)}"
    )
    assert len(outcomes) == total
    assert failed == [], failed[:5]
    assert excluded_at - killed_at < 1.0
    assert "r1" not in after


# --- rate limits ---------------------------------------------------------------------------------------------------
async def offered_load(rate: float, seconds: float, call: Callable[[], Awaitable[Any]]) -> list[Any]:
    """Open loop: start call() `rate` times a second for `seconds`, whatever the answers; gather the results."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks: list[asyncio.Task[Any]] = []
    for i in range(int(rate * seconds)):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(call()))
    return list(await asyncio.gather(*tasks))


async def _outcome(mesh: MeshClient) -> str | RateLimitedError:
    try:
        await mesh.call("work", {}, timeout=5)
        return "ok"
    except RateLimitedError as err:
        return err


@pytest.mark.slow
async def test_twice_the_rate_limit_for_ten_seconds_admits_the_limit(mesh_env: MeshEnv, etcd: aetcd.Client) -> None:
    n, seconds, burst_s = 50, 10.0, 0.5  # a half-second burst absorbs arrival jitter on a busy 2-core machine
    async with fleet(mesh_env, ("a",)) as f:
        assert await _outcome(f.client) == "ok"  # token and link ready before the limit exists (see fairness)
        await apply(etcd, f"""
kind: ratelimits
name: work
spec: {{agents: [flaky], capabilities: [work], total_rps: {n}, burst_s: {burst_s}}}
""", f.nodes())
        results = await offered_load(2 * n, seconds, lambda: _outcome(f.client))
        accepted = results.count("ok")
        steady = (accepted - n * burst_s) / seconds  # the bucket starts full: take its capacity out
        refused = [r for r in results if isinstance(r, RateLimitedError)]
        delays = [r.retry_after_s for r in refused]
        # The refusal on the wire: RESOURCE_EXHAUSTED, ErrorInfo RATE_LIMITED, RetryInfo and the pushback trailer.
        instance = f.client.node.registry.instances("work")[0]
        token = await f.client.node.outbound.tokens.get(instance.identity, "work")
        endpoint = f.client.node.outbound.channels.get(instance.endpoint, instance.identity, instance.link_endpoint)
        request = agent_pb2.InvokeRequest(capability="work", input=b"{}").SerializeToString()
        trailers: dict[str, Any] = {}
        for _ in range(50):
            try:
                await endpoint.invoke(request, timeout=5, metadata=[("authorization", f"Bearer {token}")])
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert from_rpc_error(exc).reason == "RATE_LIMITED"
                trailers = dict(exc.trailing_metadata() or ())
                break
        print(f"\nrate limit {n}/s, offered {2 * n}/s for 10 s: accepted {accepted} ({steady:.1f}/s after the "
              f"initial burst of {n * burst_s:g}), refused "
              f"{len(refused)} with retry delays {min(delays) * 1000:.1f}-{max(delays) * 1000:.1f} ms; "
              f"pushback trailer {trailers.get(PUSHBACK_KEY)!r} ms; agent ran {f.agents[0].calls['work']} calls")
    assert abs(steady - n) <= 0.1 * n  # within 10% of N
    assert len(refused) + accepted == len(results)
    assert all(d is not None and 0 < d <= 1.0 for d in delays)
    assert int(trailers[PUSHBACK_KEY]) >= 0


@pytest.mark.slow
async def test_per_identity_fairness_gives_each_caller_its_share(mesh_env: MeshEnv, etcd: aetcd.Client) -> None:
    async with fleet(mesh_env, ("a",)) as f, MeshClient.connect(
        name="other", settings=await mesh_env.settings_for("other", "client")
    ) as other:
        assert await other.node.registry.wait_for_capability("work", 1, timeout=10)
        # Each caller's first call fetches its token and opens its link. Made inside the measured window, those
        # half-seconds leave both buckets full and idle, and the tokens they would have earned are lost: once on
        # the 2-core CI machine both callers were admitted ~3/s short over 5 s. Warm both before the limit exists.
        assert await asyncio.gather(_outcome(f.client), _outcome(other)) == ["ok", "ok"]
        await apply(etcd, """
kind: ratelimits
name: fair
spec: {agents: [flaky], capabilities: [work], total_rps: 70, per_identity_rps: 30, burst_s: 2.0}
""", [*f.nodes(), other.node])
        seconds = 5.0
        heavy, light = await asyncio.gather(
            offered_load(120, seconds, lambda: _outcome(f.client)),  # 4x its share
            offered_load(45, seconds, lambda: _outcome(other)),  # 1.5x its share
        )
        # Each identity's bucket starts full: its burst is taken out. A full bucket drops the tokens a pause in the
        # arrivals would have earned: callers and agent share this test's event loop, and on the busy 2-core CI
        # machine it stalled over a second once (26.2/s admitted with a 1 s bucket); a 2 s bucket absorbs that.
        burst = 30 * 2.0
        got = {"heavy": (heavy.count("ok") - burst) / seconds, "light": (light.count("ok") - burst) / seconds}
        print(f"\nfairness, total 70/s, 30/s per identity, offered 120/s and 45/s for {seconds:g} s: admitted "
              f"{got['heavy']:.1f}/s and {got['light']:.1f}/s")
    assert abs(got["heavy"] - 30) <= 3 and abs(got["light"] - 30) <= 3


# --- retry storm ---------------------------------------------------------------------------------------------------
STORM_SECONDS = float(os.environ.get("HIVEMESH_STORM_SECONDS", "10"))  # the issue: 30 s; see docs


@pytest.mark.slow
async def test_a_retry_storm_is_capped_by_the_budget(mesh_env: MeshEnv, etcd: aetcd.Client) -> None:
    async with fleet(mesh_env, ("a", "b")) as f:
        await apply(etcd, """
kind: retries
name: storm
spec:
  capabilities: [work]
  attempts: 3
  retryable_codes: [UNAVAILABLE]
  backoff: {base_ms: 1, max_ms: 5}
  budget: {ratio: 0.2, min_retries_per_s: 0, window_s: 10}  # no floor: the cap must hold at any rate
""", f.nodes())
        for a in f.agents:
            a.mode = "UNAVAILABLE"
        calls = 0
        stop_at = time.monotonic() + STORM_SECONDS

        async def worker() -> None:
            nonlocal calls
            while time.monotonic() < stop_at:
                calls += 1
                with contextlib.suppress(HivemeshError):
                    await f.client.call("work", {}, timeout=5)

        await asyncio.gather(*(worker() for _ in range(8)))
        attempts = sum(a.calls["work"] for a in f.agents)
        budget = f.client.node.traffic.state.budget("work", f.client.node.traffic.policy.retries("work"))  # type: ignore[arg-type]
        print(f"\nretry storm, target failing 100% for {STORM_SECONDS:g} s: {calls} calls, {attempts} attempts, "
              f"attempts/calls {attempts / calls:.3f} (3.0 without a budget); retries refused by the budget "
              f"{budget.denied}")
    assert attempts / calls <= 1.2
    assert attempts > calls  # retries did happen, within the budget


# --- deadlines and cancellation across three hops ------------------------------------------------------------------
@contextlib.asynccontextmanager
async def chain(env: MeshEnv, etcd: aetcd.Client) -> AsyncIterator[tuple[MeshClient, Hops]]:
    await apply(etcd, CHAIN_GRANT)
    hops = Hops()
    async with contextlib.AsyncExitStack() as stack:
        for agent in (HopA(hops), HopB(hops), HopC(hops)):
            await stack.enter_async_context(AgentServer(agent, await env.settings_for(agent.name)))
        mesh = await stack.enter_async_context(
            MeshClient.connect(name="tester", settings=await env.settings_for("tester", "client"))
        )
        for cap in ("hop-a", "hop-b", "hop-c"):
            assert await mesh.node.registry.wait_for_capability(cap, 1, timeout=10)
        await mesh.call("hop-a", {"seconds": 0.0}, timeout=10)  # warm: tokens and channels on every hop
        hops.reset()
        yield mesh, hops


async def test_a_200ms_deadline_stops_every_hop_of_a_three_hop_chain(mesh_env: MeshEnv, etcd: aetcd.Client) -> None:
    async with chain(mesh_env, etcd) as (mesh, hops):
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            await mesh.call("hop-a", {"seconds": 5.0}, timeout=0.2)
        caller = time.monotonic() - t0
        await wait_until(lambda: len(hops.stopped) == 3, 2, "every hop to stop")
        stops = {h: hops.stopped[h] - t0 for h in "abc"}
        print(f"\n200 ms deadline over 3 hops: caller got DEADLINE_EXCEEDED after {caller * 1000:.0f} ms; hops stopped "
              f"at {', '.join(f'{h}={s * 1000:.0f} ms ({hops.how[h]})' for h, s in stops.items())}")
    assert caller < 0.3
    assert all(s < 0.3 for s in stops.values()), stops
    assert hops.how["c"] in ("cancelled", "DEADLINE_EXCEEDED")


async def test_a_cancelled_caller_cancels_every_hop_downstream(mesh_env: MeshEnv, etcd: aetcd.Client) -> None:
    async with chain(mesh_env, etcd) as (mesh, hops):
        task = asyncio.ensure_future(mesh.call("hop-a", {"seconds": 30.0}, timeout=60))
        await wait_until(lambda: "c" in hops.started, 5, "the last hop to start")
        cancelled_at = time.monotonic()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await wait_until(lambda: len(hops.stopped) == 3, 5, "every hop to stop after the caller cancelled")
        lags = {h: (hops.stopped[h] - cancelled_at) * 1000 for h in "abc"}
        shown = ", ".join(f"{h} +{ms:.0f} ms ({hops.how[h]})" for h, ms in lags.items())
        print(f"\ncancelled caller: hops stopped {shown}")
    assert all(hops.how[h] in ("cancelled", "CANCELLED") for h in "abc"), hops.how
    assert all(ms < 500 for ms in lags.values())


# --- a policy applied under traffic ----------------------------------------------------------------------------------
@pytest.mark.slow
async def test_a_policy_applied_under_traffic_is_in_force_everywhere_within_a_second(
    mesh_env: MeshEnv, etcd: aetcd.Client
) -> None:
    plain = PlainAgent("plain", prefix="plain-")
    # The plain agent calls `work` through its sidecar: grant it (a grants document, applied like any policy).
    await apply(etcd, """
kind: grants
name: plain-work
spec: {subjects: ["spiffe://hivemesh.local/agent/plain"], capabilities: [work]}
""")
    async with fleet(mesh_env, ("v1a", "v1b", "v2"), agent_types=[FlakyAgent, FlakyAgent, FlakyV2]) as f, plain:
        sidecar = Sidecar(SidecarConfig(agent=plain.endpoint), await mesh_env.settings_for("plain"))
        async with sidecar, MeshClient.connect(name="second", settings=await mesh_env.settings_for("second", "client")
                                               ) as second:
            assert sidecar.node is not None
            for node in (sidecar.node, second.node):
                assert await node.registry.wait_for_capability("work", 3, timeout=10)
            nodes = [*f.nodes(), second.node, sidecar.node]
            channel = grpc.aio.insecure_channel(sidecar.mesh_endpoint)
            mesh_call = channel.unary_unary("/hivemesh.v1.Mesh/Call")
            served: dict[str, list[tuple[float, str]]] = {"client": [], "second": [], "sidecar": []}
            failures: list[str] = []
            stop = asyncio.Event()

            async def sdk_loop(name: str, m: MeshClient) -> None:
                while not stop.is_set():
                    try:
                        out = await m.call_detailed("work", {}, timeout=5)
                        served[name].append((time.monotonic(), out.instance.card.version))
                    except HivemeshError as err:
                        failures.append(f"{name}: {err!r}")

            async def sidecar_loop() -> None:
                req = agent_pb2.InvokeRequest(capability="work", input=b"{}").SerializeToString()
                while not stop.is_set():
                    try:
                        raw = await mesh_call(req, timeout=5)
                        hop = agent_pb2.InvokeResponse.FromString(raw).hops[-1]
                        version = "2.0.0" if hop.instance.endswith("v2") else "1.0.0"
                        served["sidecar"].append((time.monotonic(), version))
                    except grpc.aio.AioRpcError as exc:
                        failures.append(f"sidecar: {exc.code()} {exc.details()}")

            loops = [asyncio.ensure_future(x) for x in (sdk_loop("client", f.client), sdk_loop("second", second),
                                                        sidecar_loop())]
            try:
                await wait_until(lambda: all(len(v) >= 20 for v in served.values()) or bool(failures), 10,
                                 "traffic everywhere")
                assert failures == []
                seen_at: dict[str, float] = {}

                async def watch(node: Any) -> None:
                    # Wakes on each swap of the node's compiled view: when the pin is in the view it is in force.
                    assert await node.policies.watch.wait_for(
                        lambda _snap: node.policies.get(ROUTES).lookup("work") is not None, 5
                    )
                    seen_at[f"{node.kind}/{node.name}/{node.instance_id}"] = time.monotonic()

                watchers = [asyncio.ensure_future(watch(n)) for n in nodes]
                policies = PolicyClient(mesh_env.operator)
                t0 = time.monotonic()
                resp = await policies.apply([{
                    "kind": "routes", "name": "pin-v2",
                    "spec": {"capabilities": ["work"], "rules": [{"name": "v2", "pin": {"version": "2.*"}}]},
                }])
                applied = time.monotonic()
                assert resp.revision > 0
                await asyncio.wait_for(asyncio.gather(*watchers), 5)
                await wait_until(lambda: all(sum(1 for t, _ in v if t > applied + 1.0) >= 10 for v in served.values()),
                                 10, "traffic after the change")
                # When each traffic source's calls became v2-only for good (end time of its last v1 call).
                shifted = {name: max((t for t, ver in v if ver != "2.0.0"), default=t0) for name, v in served.items()}
            finally:
                stop.set()
                await asyncio.gather(*loops, return_exceptions=True)
                await channel.close()
    in_force = {k: (t - t0) * 1000 for k, t in seen_at.items()}
    worst = max(in_force.values())
    median = statistics.median(in_force.values())
    print(f"\npolicy applied under traffic (RPC took {(applied - t0) * 1000:.1f} ms): in force on all {len(nodes)} "
          f"nodes within {worst:.1f} ms of the apply (median {median:.1f} ms); last v1 answer after the apply: "
          f"{', '.join(f'{n} {(t - t0) * 1000:.0f} ms' for n, t in shifted.items())}; "
          f"calls {sum(len(v) for v in served.values())}, failed {len(failures)}")
    assert failures == []
    assert len(in_force) == len(nodes) and worst < 1000
    assert all(t - t0 < 1.0 for t in shifted.values()), shifted
    for name, v in served.items():
        late = [ver for t, ver in v if t > t0 + 1.0]
        assert late and set(late) == {"2.0.0"}, name


# --- a 3-member etcd cluster losing a member -----------------------------------------------------------------------
@pytest.mark.slow
async def test_losing_one_of_three_etcd_members_under_traffic_fails_no_call(
    tmp_path: Path, session_ca: SessionCa
) -> None:
    cluster = EtcdCluster(tmp_path / "etcd", size=3, tls=session_ca.tls)
    await asyncio.to_thread(cluster.start)
    env = None
    try:
        env = await start_mesh_env(tmp_path, cluster.endpoints)
        async with AgentServer(EchoAgent("one"), await env.settings_for("echo")), AgentServer(
            EchoAgent("two"), await env.settings_for("echo")
        ), MeshClient.connect(name="tester", settings=await env.settings_for("tester", "client")) as mesh:
            assert await mesh.node.registry.wait_for_capability("echo", 2, timeout=10)
            probe = client(cluster.access)
            await wait_connected(probe)
            status = await probe.status()
            leader = status.leader.name
            await probe.close()
            ok = 0
            failures: list[str] = []
            stop = asyncio.Event()

            async def loop() -> None:
                nonlocal ok
                while not stop.is_set():
                    try:
                        await mesh.call("echo", {"text": "x"}, timeout=5)
                        ok += 1
                    except HivemeshError as err:
                        failures.append(repr(err))
                    await asyncio.sleep(0.002)

            workers = [asyncio.ensure_future(loop()) for _ in range(4)]
            try:
                await wait_until(lambda: ok >= 100, 10, "traffic")
                before = ok
                await asyncio.to_thread(cluster.member(leader).kill)
                killed_at = time.monotonic()
                # Registrations continue: a lease and a registration straight after the kill...
                instance = mesh_pb2.AgentInstance(
                    card=agent_pb2.AgentCard(name="late", capabilities=[agent_pb2.Capability(name="late-cap")]),
                    instance_id="late-1", endpoint="127.0.0.1:9", identity="spiffe://hivemesh.local/agent/late",
                    packaging="in-process",
                )
                async with Registration(cluster.access, instance, ttl_s=5):
                    lease_registered = time.monotonic() - killed_at
                    assert await mesh.node.registry.wait_for_capability("late-cap", 1, timeout=10)
                # Registration continues: a new agent joins (one-time join token, certificate) and registers.
                upper = EchoAgent("three")
                join_settings = None
                join_failures: list[str] = []
                while join_settings is None:
                    try:
                        join_settings = await env.settings_for("echo")
                    except HivemeshError as err:
                        join_failures.append(f"{time.monotonic() - killed_at:.2f} s: {err.reason}")
                        assert time.monotonic() - killed_at < 15
                        await asyncio.sleep(0.2)
                joined = time.monotonic() - killed_at
                async with AgentServer(upper, join_settings) as third:
                    registered = time.monotonic() - killed_at
                    seen = await wait_until(lambda: any(i.instance_id == third.instance_id
                                                        for i in mesh.node.registry.instances("echo")),
                                            15, "the client to see the new instance")
                    await wait_until(lambda: upper.calls > 0, 10, "calls to reach the new instance")
                    await wait_until(lambda: ok >= before + 300, 20, "traffic after the member was lost")
                    stop.set()  # before the new agent stops: its shutdown is not what this test is about
                    await asyncio.gather(*workers, return_exceptions=True)
            finally:
                stop.set()
                await asyncio.gather(*workers, return_exceptions=True)
        print(f"\netcd 3 members, leader {leader} killed under traffic: {ok} calls, {len(failures)} failed; "
              f"a registration "
              f"{lease_registered:.2f} s after the kill; a join token after {joined:.2f} s (failed attempts: "
              f"{join_failures}), a new agent registered {registered:.2f} s after the kill, visible to callers "
              f"after {seen - killed_at:.2f} s")
        assert failures == []
    finally:
        if env is not None:
            await stop_mesh_env(env)
        await asyncio.to_thread(cluster.stop)
    assert mesh_pb2_grpc  # the Mesh service stubs are part of the contract the sidecar loop above uses

"""Registry faults with real processes and a real etcd: a replica killed mid-load (its lease expires, callers
fail over to the survivor) and etcd stopped for seconds (calls keep flowing from the caches; the registry
catches up when etcd returns). Every wait is bounded; every process is stopped in `finally`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import aetcd
import pytest

from hivemesh.mesh.errors import HivemeshError
from hivemesh.mesh.etcd import EtcdServer
from hivemesh.mesh.registry import agent_key
from hivemesh.sdk import Agent, AgentServer, MeshClient, capability
from tests.support.agents_for_tests import EchoAgent, Text
from tests.support.meshenv import MeshEnv, start_mesh_env, stop_mesh_env
from tests.support.spawn import freeze

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
LEASE_TTL_S = 3


# --- replicas as child processes ------------------------------------------------------------------------------
@dataclass
class Replica:
    tag: str
    proc: asyncio.subprocess.Process
    endpoint: str
    instance_id: str
    log_file: IO[bytes]


def _open_log(path: Path) -> IO[bytes]:
    return path.open("wb")  # closed in Replicas.stop_all


class Replicas:
    """Starts `tests.support.replica_main` processes and guarantees they are gone afterwards."""

    def __init__(self, env: MeshEnv, tmp: Path) -> None:
        self._env = env
        self._tmp = tmp
        self.started: list[Replica] = []

    async def start(self, tag: str, timeout: float = 30.0) -> Replica:
        join = await self._env.operator.create_join_token("echo", "agent", 120)
        s = self._env.base_settings()
        env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMESH_")}
        env.update(
            HIVEMESH_HOME=str(self._tmp / "hivemesh-home"),  # never pick up a developer's `hivemesh up` state
            HIVEMESH_ETCD=s.etcd,
            HIVEMESH_CONTROLPLANE=s.controlplane,
            HIVEMESH_JOIN=s.join,
            HIVEMESH_CA=str(s.ca_bundle),
            HIVEMESH_TRUST_DOMAIN=s.trust_domain,
            HIVEMESH_JOIN_TOKEN=join.token,
            HIVEMESH_REPLICA_TAG=tag,
            HIVEMESH_LEASE_TTL_S=str(LEASE_TTL_S),
        )
        log_file = _open_log(self._tmp / f"{tag}.log")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.support.replica_main",
            cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=log_file, start_new_session=True,
        )
        replica = Replica(tag, proc, "", "", log_file)
        self.started.append(replica)
        assert proc.stdout is not None
        try:
            line = (await asyncio.wait_for(proc.stdout.readline(), timeout)).decode().split()
        except TimeoutError:
            raise AssertionError(f"replica {tag} not ready within {timeout} s (log: {self._tmp / tag}.log)") from None
        assert line[:1] == ["ready"], f"replica {tag} said {line!r} (log: {self._tmp / tag}.log)"
        replica.endpoint, replica.instance_id = line[1], line[2]
        return replica

    async def stop_all(self) -> None:
        for r in self.started:
            if r.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    r.proc.terminate()
                try:
                    await asyncio.wait_for(r.proc.wait(), 5.0)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        r.proc.kill()
                    await asyncio.wait_for(r.proc.wait(), 5.0)
            r.log_file.close()


@pytest.fixture
async def replicas(mesh_env: MeshEnv, tmp_path: Path) -> AsyncIterator[Replicas]:
    pool = Replicas(mesh_env, tmp_path)
    try:
        yield pool
    finally:
        await pool.stop_all()


@dataclass(frozen=True)
class Outcome:
    start: float
    end: float
    served_by: str | None  # None: the call failed
    error: str = ""


async def _call_loop(mesh: MeshClient, stop: asyncio.Event, outcomes: list[Outcome], timeout: float) -> None:
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            out = await mesh.call("echo", {"text": "x"}, timeout=timeout)
            outcomes.append(Outcome(t0, time.monotonic(), out["served_by"]))
        except HivemeshError as err:
            outcomes.append(Outcome(t0, time.monotonic(), None, f"{err.code.name}/{err.reason}: {err.message}"))
        await asyncio.sleep(0.005)


class CallLoops:
    """n loops calling echo through mesh (each call's outcome kept) until stopped: the load of a fault test."""

    def __init__(self, mesh: MeshClient, n: int = 3, *, timeout: float = 3.0) -> None:
        self.outcomes: list[Outcome] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(_call_loop(mesh, self._stop, self.outcomes, timeout)) for _ in range(n)]

    def served(self, tag: str, since: float = 0.0) -> int:
        """Calls started at or after since that tag served."""
        return sum(1 for o in self.outcomes if o.served_by == tag and o.start >= since)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 10)


async def _wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll predicate() until true; return when it became true (monotonic). Fails the test on timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic()


@contextlib.asynccontextmanager
async def _two_replicas_under_load(
    mesh_env: MeshEnv, replicas: Replicas, *, timeout: float = 3.0
) -> AsyncIterator[tuple[Replica, Replica, MeshClient, CallLoops]]:
    """Replicas a and b of echo, a MeshClient that sees both, and CallLoops (deadline `timeout`) calling through
    it until each replica served 10; the loops are stopped on the way out, after the body's own cleanup."""
    a, b = await asyncio.gather(replicas.start("replica-a"), replicas.start("replica-b"))
    settings = await mesh_env.settings_for("tester", "client")
    async with MeshClient.connect(name="tester", settings=settings) as mesh:
        assert await mesh.node.registry.wait_for_capability("echo", 2, timeout=10)
        loops = CallLoops(mesh, timeout=timeout)
        try:
            await _wait_until(lambda: loops.served(a.tag) >= 10 and loops.served(b.tag) >= 10, 15, "both serving")
            yield a, b, mesh, loops
        finally:
            await loops.stop()


@pytest.mark.slow
async def test_killed_replica_leaves_the_registry_and_calls_fail_over(
    mesh_env: MeshEnv, replicas: Replicas, etcd: aetcd.Client
) -> None:
    async with _two_replicas_under_load(mesh_env, replicas) as (victim, survivor, mesh, loops):
        registry = mesh.node.registry
        outcomes, served = loops.outcomes, loops.served
        before_kill = time.monotonic()
        assert victim.proc.pid is not None
        os.kill(victim.proc.pid, signal.SIGKILL)
        killed = time.monotonic()

        def victim_listed() -> bool:
            return any(i.instance_id == victim.instance_id for i in registry.instances("echo"))

        gone = await _wait_until(lambda: not victim_listed(), LEASE_TTL_S + 2, "the killed replica to leave")
        assert await etcd.get(agent_key("echo", victim.instance_id).encode()) is None
        await _wait_until(lambda: served("replica-b", since=gone) >= 30, 15, "calls after deregistration")

    after = [o for o in outcomes if o.start >= gone]
    between = [o for o in outcomes if killed < o.start < gone]
    failed = [o for o in outcomes if o.served_by is None]
    report = (
        f"kill->deregistered {gone - killed:.2f} s (TTL {LEASE_TTL_S} s); calls {len(outcomes)}, "
        f"failed {len(failed)}; between kill and deregistration {len(between)} "
        f"(served by {dict(Counter(o.served_by for o in between))}); after {len(after)} "
        f"(served by {dict(Counter(o.served_by for o in after))})"
    )
    print(report)
    log.info(report)
    assert gone - killed <= LEASE_TTL_S + 2
    assert after and all(o.served_by == survivor.tag for o in after), [o for o in after if o.served_by != "replica-b"]
    for o in failed:
        # Only a call in flight when the replica died may fail; anything started later must fail over.
        assert o.start <= killed and o.end >= before_kill, f"a call not in flight at the kill failed: {o}"
    assert not [o for o in outcomes if o.start > killed and o.served_by == victim.tag]


@pytest.mark.slow
async def test_a_replica_paused_past_its_lease_gets_no_calls_then_registers_again_on_resume(
    mesh_env: MeshEnv, replicas: Replicas, etcd: aetcd.Client
) -> None:
    """E2: a replica frozen (SIGSTOP) for twice its lease's TTL leaves the registry once the lease expires, and
    no call started after that is routed to it (every one is served by the other replica). Resumed, its keepalive
    hears that the lease is gone, it registers again under a new lease and takes calls again. Calls a frozen
    replica holds end at their deadline (3 s here), never later; only calls started before it left may fail.
    And it rejects work fenced by the old revision: a caller whose registry view froze before the pause (its
    watch cut off) still routes by the old entry, and every such call is refused there unrun and served by the
    other replica. (Before the lease expires, the calls it holds mark it unanswering: the next test.)"""
    async with (
        _two_replicas_under_load(mesh_env, replicas) as (paused, other, mesh, loops),
        MeshClient.connect(name="stale", settings=await mesh_env.settings_for("stale", "client")) as stale,
    ):
        key = agent_key("echo", paused.instance_id).encode()
        old = await etcd.get(key)
        assert old is not None
        assert await stale.node.registry.wait_for_capability("echo", 2, timeout=10)
        await stale.node.registry.stop()  # its view stays as it is now, holding the registration about to be lost
        registry = mesh.node.registry
        outcomes, served = loops.outcomes, loops.served

        def listed() -> bool:
            return any(i.instance_id == paused.instance_id for i in registry.instances("echo"))

        assert paused.proc.pid is not None
        try:
            freeze(paused.proc.pid)
            frozen = time.monotonic()
            gone = await _wait_until(lambda: not listed(), LEASE_TTL_S + 2, "the frozen replica to leave")
            # The loops' callers may all be waiting out calls the frozen replica holds: these start now, for sure.
            for _ in range(20):
                t0 = time.monotonic()
                out = await mesh.call("echo", {"text": "after"}, timeout=3)
                outcomes.append(Outcome(t0, time.monotonic(), out["served_by"]))
            # Frozen for twice its TTL in all; the loops keep calling meanwhile.
            await asyncio.sleep(max(0.0, frozen + 2 * LEASE_TTL_S - time.monotonic()))  # the pause itself
            os.kill(paused.proc.pid, signal.SIGCONT)
            resumed = time.monotonic()
            back = await _wait_until(listed, LEASE_TTL_S + 5, "the resumed replica to register again")
            await _wait_until(lambda: served("replica-a", since=back) >= 10, 15, "calls to the resumed replica")
            fenced = [(await stale.call("echo", {"text": "stale"}, timeout=3))["served_by"] for _ in range(10)]
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(paused.proc.pid, signal.SIGCONT)
    new = await etcd.get(key)
    assert new is not None and new.lease != old.lease, "registered again under a new lease"
    assert new.create_revision > old.create_revision
    assert fenced == [other.tag] * 10, "calls routed by the old registration were served by the resumed replica"
    while_gone = [o for o in outcomes if gone <= o.start < resumed]
    failed = [o for o in outcomes if o.served_by is None]
    report = (f"frozen {resumed - frozen:.1f} s (TTL {LEASE_TTL_S} s): left the registry after {gone - frozen:.2f} s, "
              f"back {back - resumed:.2f} s after resuming; calls {len(outcomes)}, failed {len(failed)}, "
              f"started while it was gone {len(while_gone)} "
              f"(served by {dict(Counter(o.served_by for o in while_gone))})")
    print(report)
    log.info(report)
    assert len(while_gone) >= 20 and all(o.served_by == other.tag for o in while_gone), [
        o for o in while_gone if o.served_by != other.tag][:3]
    for o in failed:
        assert o.start < gone, f"a call started after the frozen replica left failed: {o}"
        assert o.end - o.start < 3.0 + 1.0, f"a call outlived its deadline: {o}"


HELD_CALL_TIMEOUT_S = 0.4


@pytest.mark.slow
async def test_a_frozen_replica_is_avoided_once_the_calls_it_held_time_out(
    mesh_env: MeshEnv, replicas: Replicas
) -> None:
    """E2 before the lease expires: a frozen replica (SIGSTOP) keeps its connection and its lease, so only the
    calls it holds show that it stopped. Each caller loses at most the call it had sent there (at its deadline);
    from the first such timeout on, every call goes to the other replica while the frozen one is avoided,
    instead of every other call waiting out its deadline. Resumed, it takes calls again."""
    async with _two_replicas_under_load(mesh_env, replicas, timeout=HELD_CALL_TIMEOUT_S) as (
            paused, other, _mesh, loops):
        outcomes, served = loops.outcomes, loops.served
        assert paused.proc.pid is not None
        try:
            freeze(paused.proc.pid)
            frozen = time.monotonic()
            first = await _wait_until(lambda: any(o.served_by is None for o in outcomes), 5,
                                      "a call the frozen replica held to time out")
            # Well within the frozen replica's suspicion (2 s from its first timeout) and its lease (3 s TTL).
            await _wait_until(lambda: served(other.tag, since=first) >= 30, 1.2, "calls after the first timeout")
            await asyncio.sleep(max(0.0, first + 1.0 - time.monotonic()))  # the rest of the pause: 1 s avoided
            os.kill(paused.proc.pid, signal.SIGCONT)
            resumed = time.monotonic()
            await _wait_until(lambda: served(paused.tag, since=resumed) >= 5, 10, "calls to the resumed replica")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(paused.proc.pid, signal.SIGCONT)
    held = [o for o in outcomes if first <= o.start < resumed]
    failed = [o for o in outcomes if o.served_by is None]
    report = (f"first timeout {first - frozen:.2f} s after the freeze; calls {len(outcomes)}, failed {len(failed)}; "
              f"started from the first timeout to the resume ({resumed - first:.2f} s): {len(held)} "
              f"(served by {dict(Counter(o.served_by for o in held))})")
    print(report)
    log.info(report)
    assert len(held) >= 30 and all(o.served_by == other.tag for o in held), [
        o for o in held if o.served_by != other.tag][:3]
    assert 1 <= len(failed) <= 3, failed  # at most the one call each of the 3 loops had sent to it
    for o in failed:
        assert o.start < first and o.end - o.start < HELD_CALL_TIMEOUT_S + 1.0, o


class UpperAgent(Agent):
    """Registered only after etcd came back: proves the registry view caught up."""

    name = "upper-agent"

    @capability(description="Upper-case the text")
    async def upper(self, req: Text) -> Text:
        return {"text": req["text"].upper()}


@pytest.mark.slow
async def test_calls_continue_through_an_etcd_outage(own_etcd: EtcdServer, tmp_path: Path) -> None:
    env = await start_mesh_env(tmp_path, own_etcd.endpoint)
    try:
        async with AgentServer(EchoAgent("steady"), await env.settings_for("echo")) as server:
            settings = await env.settings_for("tester", "client")
            async with MeshClient.connect(name="tester", settings=settings) as mesh:
                registry = mesh.node.registry
                assert await registry.wait_for_capability("echo", 1, timeout=10)
                assert (await mesh.call("echo", {"text": "warm-up"}, timeout=5))["served_by"] == "steady"

                await asyncio.to_thread(own_etcd.stop)
                down = time.monotonic()
                ok = 0
                failures: list[str] = []
                saw_disconnected = False
                while time.monotonic() - down < 4.0:
                    saw_disconnected |= not registry.cache.connected
                    try:
                        out = await mesh.call("echo", {"text": "during the outage"}, timeout=2)
                        assert out["served_by"] == "steady"
                        ok += 1
                    except HivemeshError as err:
                        failures.append(f"{err.code.name}/{err.reason}: {err.message}")
                    await asyncio.sleep(0.05)
                print(f"etcd down {time.monotonic() - down:.1f} s: {ok} calls ok, {len(failures)} failed")
                assert saw_disconnected, "the registry never noticed etcd was gone: the outage did not happen"
                assert failures == []
                assert ok >= 20

                await asyncio.to_thread(own_etcd.start)
                # The control plane's etcd client reconnects on its own; give it a bounded while.
                deadline = time.monotonic() + 15
                while True:
                    try:
                        upper_settings = await env.settings_for("upper-agent")
                        break
                    except HivemeshError:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.2)
                async with AgentServer(UpperAgent(), upper_settings) as upper:
                    assert await registry.wait_for_capability("upper", 1, timeout=15), (
                        "the client's registry did not pick up an agent registered after etcd returned"
                    )
                    assert registry.instances("upper")[0].instance_id == upper.instance_id
                    assert await mesh.call("upper", {"text": "back"}, timeout=5) == {"text": "BACK"}
                    assert (await mesh.call("echo", {"text": "still"}, timeout=5))["served_by"] == "steady"
                    assert [i.instance_id for i in registry.instances("echo")] == [server.instance_id]
    finally:
        await stop_mesh_env(env)

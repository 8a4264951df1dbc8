"""Overload: goodput as the offered load ramps to 3x capacity (TEST_MATRIX L5, "goodput >= 90% of peak without
collapse; report the RESOURCE_EXHAUSTED and UNAVAILABLE shares").

An SDK agent in its own process serves a capability that burns a fixed CPU time per call on its event loop, as a
Python agent that parses or scores does: the agent's core is the bottleneck. A `MeshClient` in this process, on
the same mesh (etcd with mutual TLS and auth, the control plane, tokens, authz, audit: every default on), first
measures the agent's capacity closed loop (16 in flight), then offers calls open loop (each on its own schedule,
so slow answers do not slow the offers, as independent users do) at multiples of that capacity, each call with a
deadline. Per step it reports the offered and good calls/s, goodput / capacity, how the other calls ended, the
good calls' p50/p99 and the agent's CPU. Calls offered in a step's first seconds (a queue building up) are not
counted: the figures are the steady state.

Two arms, interleaved round by round, two agent processes of the same code:
    defaults   no `concurrency` policy: every call the agent receives is taken;
    shedding   a `concurrency` policy for the agent (docs/resilience.md): a few calls in flight, a short bounded
               queue and a queue timeout; the excess is shed at once with RESOURCE_EXHAUSTED / OVERLOADED.

    .venv/bin/python bench/overload.py                      # ~4 min on 2 shared cores
    .venv/bin/python bench/overload.py --quick              # a smoke run (~1 min)
    .venv/bin/python bench/overload.py --json /tmp/overload.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _rig import Mesh, machine, running_mesh

from hivemesh.mesh.errors import HivemeshError
from hivemesh.sdk import Agent, AgentServer, AgentServerConfig, MeshClient, capability

log = logging.getLogger("bench.overload")
ANY_OBJECT: dict[str, Any] = {"type": "object"}
PAYLOAD = {"text": "x" * 200}
ARMS = ("defaults", "shedding")
_WORK_S = [0.002]
"""The CPU a call burns in the agent (set from --work-us in the agent's process)."""
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _burn() -> None:
    end = time.perf_counter() + _WORK_S[0]
    while time.perf_counter() < end:
        pass


def _worker(arm: str) -> type[Agent]:
    """The arm's agent: the same code under its own name and capability (a policy names agents)."""

    class Worker(Agent):
        name = f"overload-{arm}"

        @capability(name=f"work-{arm}", idempotent=True, input_schema=ANY_OBJECT)
        async def work(self, req: dict[str, Any]) -> dict[str, Any]:
            """Burn the call's CPU time on the event loop."""
            _burn()
            return {"done": True}

    return Worker


WORKERS: dict[str, type[Agent]] = {arm: _worker(arm) for arm in ARMS}


# ==== the agent's process ==========================================================================================
async def serve_agent(arm: str) -> None:
    """Serve the arm's agent until standard input closes (settings from the HIVEMESH_* environment)."""
    from hivemesh.mesh.settings import MeshSettings

    agent = WORKERS[arm]()
    config = AgentServerConfig(instance_id=f"{arm}-1", metrics_listen="off", lease_ttl_s=30)
    async with AgentServer(agent, MeshSettings.resolve(), config):
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


# ==== the driver ===================================================================================================
class AgentProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK


@contextlib.asynccontextmanager
async def agent_process(mesh: Mesh, arm: str, work_us: int) -> AsyncIterator[AgentProcess]:
    settings = await mesh.settings(WORKERS[arm].name)
    env = {**os.environ, "HIVEMESH_ETCD": settings.etcd, "HIVEMESH_CONTROLPLANE": settings.controlplane,
           "HIVEMESH_JOIN": settings.join, "HIVEMESH_CA": str(settings.ca_bundle),
           "HIVEMESH_TRUST_DOMAIN": settings.trust_domain, "HIVEMESH_JOIN_TOKEN": settings.join_token or "",
           "HIVEMESH_METRICS_LISTEN": "off"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve-agent", arm, "--work-us", str(work_us), env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if line.strip() != b"ready":
            raise RuntimeError(f"the {arm} agent did not start: {line!r}")
        yield AgentProcess(proc)
    finally:
        if proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, HivemeshError):
        return f"{exc.code.name}/{exc.reason}"
    return type(exc).__name__


async def capacity(client: MeshClient, cap: str, seconds: float, concurrency: int, timeout: float) -> float:
    """Calls/s closed loop at `concurrency` in flight (the agent saturated)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while loop.time() < end:
            await client.call(cap, PAYLOAD, timeout=timeout)
            done += 1

    started = loop.time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (loop.time() - started)


async def offer(client: MeshClient, agent: AgentProcess, cap: str, rate: float, seconds: float, warm_s: float,
                timeout: float) -> dict[str, Any]:
    """Offer calls open loop at `rate` for `seconds`; count those offered after warm_s."""
    loop = asyncio.get_running_loop()
    outcomes: Counter[str] = Counter()
    good: list[float] = []
    tasks: set[asyncio.Task[None]] = set()
    total = int(rate * seconds)
    counted_from = int(rate * warm_s)

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        try:
            await client.call(cap, PAYLOAD, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - every ending is counted, by its status
            if i >= counted_from:
                outcomes[_outcome(exc)] += 1
        else:
            if i >= counted_from:
                outcomes["OK"] += 1
                good.append(time.perf_counter() - t0)

    start = loop.time()
    cpu0 = wall0 = 0.0
    n = 0
    while n < total:
        now = loop.time()
        if n == counted_from:
            cpu0, wall0 = agent.cpu_s(), now
        while n < total and start + n / rate <= now:
            task = asyncio.create_task(one(n))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
            if n == counted_from:
                cpu0, wall0 = agent.cpu_s(), loop.time()
        await asyncio.sleep(max(0.0, start + n / rate - loop.time()))
    window = loop.time() - wall0
    agent_cores = (agent.cpu_s() - cpu0) / window
    if tasks:
        await asyncio.wait(tasks, timeout=timeout + 30)
    counted = sum(outcomes.values())
    good.sort()
    return {
        "offered_per_s": rate, "counted": counted, "good_per_s": outcomes["OK"] / window,
        "outcomes": dict(outcomes), "agent_cores": agent_cores,
        "p50_ms": 1000 * statistics.median(good) if good else None,
        "p99_ms": 1000 * good[min(len(good) - 1, int(0.99 * len(good)))] if good else None,
        "unfinished": len(tasks),
    }


async def driver(opts: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"options": vars(opts), "machine": machine(), "rounds": []}
    started = time.perf_counter()
    async with running_mesh() as mesh:
        await mesh.apply({"kind": "concurrency", "name": "overload-shedding", "spec": {
            "agents": [WORKERS["shedding"].name], "max_in_flight": opts.max_in_flight, "max_queue": opts.max_queue,
            "queue_timeout_ms": opts.queue_timeout_ms}})
        async with contextlib.AsyncExitStack() as stack:
            agents = {arm: await stack.enter_async_context(agent_process(mesh, arm, opts.work_us)) for arm in ARMS}
            client = await stack.enter_async_context(MeshClient.connect(
                name="bench-overload", settings=await mesh.settings("bench-overload", "client")))
            for arm in ARMS:
                cap = f"work-{arm}"
                if not await client.node.registry.wait_for_capability(cap, 1, timeout=60):
                    raise RuntimeError(f"{cap} did not register within 60 s")
                await capacity(client, cap, 1.0, opts.concurrency, opts.timeout)  # warm-up: links, tokens
            for r in range(opts.rounds):
                order = ARMS if r % 2 == 0 else ARMS[::-1]
                for arm in order:
                    cap = f"work-{arm}"
                    peak = await capacity(client, cap, opts.capacity_s, opts.concurrency, opts.timeout)
                    log.warning("round %d %s: capacity %.0f calls/s", r + 1, arm, peak)
                    steps = []
                    for mult in opts.multiples:
                        step = await offer(client, agents[arm], cap, mult * peak, opts.seconds, opts.warm_s,
                                           opts.timeout)
                        step["multiple"] = mult
                        step["goodput_ratio"] = step["good_per_s"] / peak
                        log.warning("round %d %s %.1fx: %s", r + 1, arm, mult, json.dumps(step))
                        steps.append(step)
                        await asyncio.sleep(opts.rest_s)  # the agent's queue drains between steps
                    out["rounds"].append({"round": r + 1, "arm": arm, "capacity_per_s": peak, "steps": steps})
    out["elapsed_s"] = time.perf_counter() - started
    return out


def report(data: dict[str, Any]) -> str:
    o, m = data["options"], data["machine"]
    lines = ["| round | arm | capacity calls/s | offered | good calls/s | goodput ÷ capacity | other endings "
             "(share of counted calls) | good p50 / p99 ms | agent cores |", "|---|---|---|---|---|---|---|---|---|"]
    for rnd in data["rounds"]:
        for s in rnd["steps"]:
            other = ", ".join(f"{k} {v / max(s['counted'], 1):.1%}" for k, v in sorted(s["outcomes"].items())
                              if k != "OK") or "none"
            lat = (f"{s['p50_ms']:.1f} / {s['p99_ms']:.1f}" if s["p50_ms"] is not None else "–")
            lines.append(f"| {rnd['round']} | {rnd['arm']} | {rnd['capacity_per_s']:,.0f} | {s['multiple']:g}× "
                         f"({s['offered_per_s']:,.0f}/s) | {s['good_per_s']:,.0f} | {s['goodput_ratio']:.2f} | "
                         f"{other} | {lat} | {s['agent_cores']:.2f} |")
    worst = {arm: min((s["goodput_ratio"] for r in data["rounds"] if r["arm"] == arm for s in r["steps"]
                       if s["multiple"] >= 1), default=0.0) for arm in ARMS}
    lines += ["", "Lowest goodput ÷ capacity at or past 1× (TEST_MATRIX L5's target: ≥ 0.90): " +
              ", ".join(f"{arm} {v:.2f}" for arm, v in worst.items()), "",
              f"work {o['work_us']} µs of CPU a call; deadline {o['timeout']:g} s a call; steps {o['seconds']:g} s, "
              f"the first {o['warm_s']:g} s not counted; capacity closed loop at {o['concurrency']} in flight for "
              f"{o['capacity_s']:g} s; shedding policy max_in_flight {o['max_in_flight']}, max_queue "
              f"{o['max_queue']}, queue_timeout_ms {o['queue_timeout_ms']}",
              f"machine: {m['cpus']} CPUs ({m['cpu']}), Python {m['python']}, grpcio {m['grpcio']}, {m['when']}, "
              f"load average at start {m['loadavg']}; run took {data['elapsed_s']:.0f} s"]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve-agent", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="one round, short steps (a smoke run)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work-us", type=int, default=2000, help="CPU a call burns in the agent")
    p.add_argument("--timeout", type=float, default=1.0, help="each call's deadline, seconds")
    p.add_argument("--multiples", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0, 3.0],
                   help="offered load, as multiples of the capacity measured in the same round")
    p.add_argument("--seconds", type=float, default=8.0, help="each step's offers")
    p.add_argument("--warm-s", type=float, default=3.0, help="calls offered this early in a step are not counted")
    p.add_argument("--rest-s", type=float, default=1.5, help="pause between steps")
    p.add_argument("--capacity-s", type=float, default=4.0)
    p.add_argument("--concurrency", type=int, default=16, help="in flight while measuring capacity")
    p.add_argument("--max-in-flight", type=int, default=4)
    p.add_argument("--max-queue", type=int, default=16)
    p.add_argument("--queue-timeout-ms", type=int, default=250)
    p.add_argument("--json", help="also write every figure to this file")
    p.add_argument("--report", help="only print the report of a saved --json file")
    opts = p.parse_args(argv)
    if opts.serve_agent:
        _WORK_S[0] = opts.work_us / 1e6
        logging.basicConfig(level=logging.WARNING)
        asyncio.run(serve_agent(opts.serve_agent))
        return 0
    if opts.report:
        sys.stdout.write(report(json.loads(Path(opts.report).read_text())) + "\n")
        return 0
    if opts.quick:
        opts.rounds, opts.seconds, opts.warm_s, opts.capacity_s, opts.rest_s = 1, 4.0, 1.5, 2.0, 1.0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HIVEMESH_METRICS_LISTEN", "off")
    data = asyncio.run(driver(opts))
    if opts.json:
        Path(opts.json).write_text(json.dumps(data, indent=1))
    sys.stdout.write(report(data) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

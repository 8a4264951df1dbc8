"""The source design's headline table, measured with the mesh (issue 14).

The source design claims, for a multi-agent system over single agents: 10-50x throughput, 3x faster decisions
from parallel processing, 60% fewer errors from resilience, 45% fewer hand-offs from routing. This bench puts
each claim's two arms side by side in one run, on workloads it states, over a real mesh (etcd with mutual TLS
and auth, the control plane, join tokens, grants, authz, SDK agents and a `MeshClient`, every default on):

    throughput  N documents through the four-step pipeline (ocr -> extract -> validate -> store) with R replicas
                per step and documents in parallel (`Pipeline`), vs one agent doing every step in sequence;
    decisions   a `FanOut` of K independent analyses vs the same K analyses called one after another;
    errors      10% injected transient faults (UNAVAILABLE) per attempt, with a retries + breakers + fallback
                policy vs the same capability with no policy;
    hand-offs   a triage agent running `Router` to pick the specialist vs a fixed chain that hands the request
                on until a specialist fits.

No real model runs: each agent sleeps an LLM-like time drawn from a lognormal distribution (stated median and
sigma), seeded and keyed by the work item, so both arms of a claim see the same draws. Every agent instance
works on one request at a time (one model worker), unless stated. Everything runs in this process on
127.0.0.1; the agents' sleeps dominate, the mesh's own work is measured by `bench/mesh_cost.py`.

    .venv/bin/python bench/seed_claims.py                 # all four claims (~2-3 min on 2 shared cores)
    .venv/bin/python bench/seed_claims.py --quick         # a smoke run (~30 s)
    .venv/bin/python bench/seed_claims.py --only errors --json /tmp/claims.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _rig import Mesh, machine, running_mesh

from hivemesh.mesh.errors import AgentUnavailableError, HivemeshError
from hivemesh.sdk import Agent, AgentServer, AgentServerConfig, Context, MeshClient, capability
from hivemesh.sdk.patterns import FanOut, Pipeline, Router

log = logging.getLogger("bench.seed_claims")
ANY_OBJECT: dict[str, Any] = {"type": "object"}
STEPS = ("ocr", "extract", "validate", "store")
ARMS = {"none": "classify-none", "defaults": "classify-default", "policies": "classify"}
ANALYSES = ("analyze-market", "analyze-risk", "analyze-legal", "analyze-tech", "analyze-finance")
DOMAINS: dict[str, tuple[str, ...]] = {  # the specialists, in the fixed chain's order, and the words of each
    "network": ("vpn", "wifi", "dns", "latency", "router", "firewall", "proxy", "bandwidth"),
    "security": ("phishing", "malware", "password", "breach", "virus", "suspicious", "mfa", "ransomware"),
    "billing": ("invoice", "refund", "charge", "payment", "subscription", "receipt", "overcharged", "plan"),
    "hardware": ("laptop", "monitor", "keyboard", "printer", "battery", "screen", "mouse", "dock"),
    "account": ("login", "username", "locked", "profile", "signup", "email", "permissions", "sso"),
}
FILLER = ("please", "help", "my", "the", "is", "not", "working", "since", "yesterday", "urgent", "again",
          "today", "team", "cannot", "issue", "problem", "with", "our", "office", "after", "update")


def draw_ms(seed: int, key: str, median_ms: float, sigma: float) -> float:
    """One LLM-like latency: lognormal with this median and sigma, a pure function of (seed, key)."""
    rng = random.Random(f"{seed}|{key}")
    return median_ms * math.exp(sigma * rng.gauss(0.0, 1.0))


class SimAgent(Agent):
    """A simulated LLM agent: sleeps a drawn time per item; `slots` requests at a time (None: no limit)."""

    version = "1.0.0"
    owner = "bench"

    def __init__(self, opts: argparse.Namespace, slots: int | None = 1, fault_rate: float = 0.0, tag: str = "") -> None:
        super().__init__()
        self.opts = opts
        self._slots = asyncio.Semaphore(slots) if slots else None
        self._faults = random.Random(f"{opts.seed}|faults|{tag}")
        self.fault_rate = fault_rate
        self.calls = 0
        self.faults = 0

    async def think(self, key: str, median_ms: float | None = None) -> float:
        """Sleep the drawn time for key (holding a slot) and fail transiently at fault_rate."""
        ms = draw_ms(self.opts.seed, key, median_ms or self.opts.median_ms, self.opts.sigma)
        async with self._slots if self._slots is not None else contextlib.nullcontext():
            self.calls += 1
            await asyncio.sleep(ms / 1000)
        if self.fault_rate and self._faults.random() < self.fault_rate:
            self.faults += 1
            raise AgentUnavailableError("injected transient fault")
        return ms


def step_agent(step: str) -> type[SimAgent]:
    class StepAgent(SimAgent):
        name = f"sim-{step}"

        @capability(name=step, idempotent=True, input_schema=ANY_OBJECT, description=f"the {step} step")
        async def run(self, req: dict[str, Any]) -> dict[str, Any]:
            await self.think(f"{req['doc']}/{step}")
            return {"doc": req["doc"], "done": [*req.get("done", []), step]}

    return StepAgent


class MonolithAgent(SimAgent):
    """The single agent: every pipeline step in sequence, with the same draws as the step agents."""

    name = "sim-monolith"

    @capability(name="process-document", idempotent=True, input_schema=ANY_OBJECT)
    async def process(self, req: dict[str, Any]) -> dict[str, Any]:
        """All four steps of one document."""
        async with self._slots if self._slots is not None else contextlib.nullcontext():
            for step in STEPS:
                await asyncio.sleep(draw_ms(self.opts.seed, f"{req['doc']}/{step}", self.opts.median_ms,
                                            self.opts.sigma) / 1000)
        return {"doc": req["doc"], "done": list(STEPS)}


def analysis_agent(cap: str) -> type[SimAgent]:
    class AnalysisAgent(SimAgent):
        name = f"sim-{cap}"

        @capability(name=cap, idempotent=True, input_schema=ANY_OBJECT, description=f"{cap} of a decision")
        async def run(self, req: dict[str, Any]) -> dict[str, Any]:
            await self.think(f"{req['decision']}/{cap}")
            return {"analysis": cap, "score": random.Random(f"{req['decision']}{cap}").random()}

    return AnalysisAgent


class ClassifyAgent(SimAgent):
    """Serves the same work three ways: `classify` (the policies target it), `classify-default` (idempotent, no
    policy: the mesh's default failover only) and `classify-none` (not idempotent, no policy: no resilience)."""

    name = "sim-classifier"

    async def _work(self, req: dict[str, Any]) -> dict[str, Any]:
        await self.think(f"{req['item']}/classify", self.opts.fault_median_ms)
        return {"item": req["item"], "label": "a", "by": "classifier"}

    @capability(idempotent=True, input_schema=ANY_OBJECT)
    async def classify(self, req: dict[str, Any]) -> dict[str, Any]:
        """Classify an item (faults injected)."""
        return await self._work(req)

    @capability(name="classify-default", idempotent=True, input_schema=ANY_OBJECT)
    async def classify_default(self, req: dict[str, Any]) -> dict[str, Any]:
        """The same, with no policy."""
        return await self._work(req)

    @capability(name="classify-none", input_schema=ANY_OBJECT)
    async def classify_none(self, req: dict[str, Any]) -> dict[str, Any]:
        """The same, not idempotent and with no policy: the mesh never sends it twice."""
        return await self._work(req)


class ClassifyLite(SimAgent):
    """The fallback: a lesser classifier (faults injected at the same rate)."""

    name = "sim-classifier-lite"

    @capability(name="classify-lite", idempotent=True, input_schema=ANY_OBJECT)
    async def lite(self, req: dict[str, Any]) -> dict[str, Any]:
        """A cheaper classification."""
        await self.think(f"{req['item']}/lite", self.opts.fault_median_ms)
        return {"item": req["item"], "label": "a", "by": "lite"}


def specialist_agent(domain: str) -> type[SimAgent]:
    order = list(DOMAINS)
    nxt = order[(order.index(domain) + 1) % len(order)]

    class Specialist(SimAgent):
        name = f"sim-{domain}-support"

        @capability(name=f"{domain}-support", idempotent=True, input_schema=ANY_OBJECT, tags=["helpdesk", domain],
                    description=f"{domain} support: {', '.join(DOMAINS[domain])}", recursion=1)
        async def run(self, req: dict[str, Any], ctx: Context) -> dict[str, Any]:
            await self.think(f"{req['id']}/{domain}", self.opts.handoff_median_ms)
            if req["domain"] == domain:  # the specialist recognises its own kind of problem
                return {"id": req["id"], "served_by": domain, "handoffs": req["handoffs"], "path": req["path"]}
            onward = {**req, "handoffs": req["handoffs"] + 1, "path": [*req["path"], nxt]}
            out: dict[str, Any] = await ctx.call_capability(f"{nxt}-support", onward)  # hand it on along the chain
            return out

    return Specialist


class TriageAgent(SimAgent):
    """Routes each request to a specialist with `Router` over the registry (keywords against descriptions)."""

    name = "sim-triage"

    def __init__(self, opts: argparse.Namespace) -> None:
        super().__init__(opts, slots=None)
        self.router = Router(candidates_tag="helpdesk", fallback=f"{next(iter(DOMAINS))}-support")
        self.routes: Counter[str] = Counter()

    @capability(idempotent=True, input_schema=ANY_OBJECT)
    async def triage(self, req: dict[str, Any], ctx: Context) -> dict[str, Any]:
        """Pick the specialist for a helpdesk request and hand it over."""
        await self.think(f"{req['id']}/triage", self.opts.handoff_median_ms)
        result = await self.router.run(ctx, {**req, "handoffs": 1, "path": ["triage"]})
        route = result.details["route"]
        self.routes[str(route["method"])] += 1
        out: dict[str, Any] = result.output
        return out


# ==== the harness =================================================================================================
class Fleet:
    """Agents serving on the mesh for one claim; stopped at the end of it."""

    def __init__(self, mesh: Mesh, stack: contextlib.AsyncExitStack) -> None:
        self.mesh = mesh
        self.stack = stack
        self.agents: list[SimAgent] = []
        self.servers: dict[str, AgentServer] = {}

    async def serve(self, agents: Sequence[tuple[SimAgent, str]]) -> None:
        """Start the agents, a few at a time (dozens of joins at once overrun a loaded machine's etcd)."""
        gate = asyncio.Semaphore(4)

        async def one(agent: SimAgent, instance: str) -> None:
            async with gate:
                await start(agent, instance)

        async def start(agent: SimAgent, instance: str) -> None:
            server = AgentServer(agent, await self.mesh.settings(agent.name), AgentServerConfig(
                instance_id=instance, metrics_listen="off", lease_ttl_s=30))
            await self.stack.enter_async_context(server)
            self.agents.append(agent)
            self.servers[instance] = server

        await asyncio.gather(*(one(a, i) for a, i in agents))


@contextlib.asynccontextmanager
async def fleet(mesh: Mesh) -> AsyncIterator[Fleet]:
    async with contextlib.AsyncExitStack() as stack:
        yield Fleet(mesh, stack)


async def wait_for(client: MeshClient, caps: dict[str, int]) -> None:
    for cap, count in caps.items():
        if not await client.node.registry.wait_for_capability(cap, count, timeout=60):
            raise RuntimeError(f"{cap}: fewer than {count} instances registered within 60 s")


async def bounded(n: int, concurrency: int, job: Callable[[int], Awaitable[Any]]) -> list[Any]:
    """Run job(0..n-1) with at most `concurrency` in flight; results (or exceptions) in order."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Any:
        async with sem:
            try:
                return await job(i)
            except HivemeshError as err:
                return err

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


# ==== the claims ==================================================================================================
async def claim_throughput(mesh: Mesh, client: MeshClient, opts: argparse.Namespace) -> dict[str, Any]:
    r = opts.replicas
    async with fleet(mesh) as f:
        agents: list[tuple[SimAgent, str]] = [(MonolithAgent(opts), "monolith")]
        for step in STEPS:
            agents += [(step_agent(step)(opts), f"{step}-{i}") for i in range(r)]
        await f.serve(agents)
        await mesh.apply({"kind": "routes", "name": "pipeline-steps",
                          "spec": {"capabilities": list(STEPS), "load_balancer": "least_outstanding"}})
        await wait_for(client, {"process-document": 1, **dict.fromkeys(STEPS, r)})
        pipeline = Pipeline(list(STEPS))
        # warm the connections to every instance, so neither arm pays for the handshakes
        await bounded(2 * r, 4 * r, lambda i: pipeline.run(client, {"doc": f"warm-{i}"}))
        t0 = time.perf_counter()
        for i in range(opts.baseline_docs):
            await client.call("process-document", {"doc": f"doc-{i}"}, timeout=120)
        single_s = time.perf_counter() - t0
        parallel = opts.parallel_docs or 8 * r
        t0 = time.perf_counter()
        results = await bounded(opts.docs, parallel, lambda i: pipeline.run(client, {"doc": f"doc-{i}"}))
        mesh_s = time.perf_counter() - t0
    failed = sum(isinstance(x, BaseException) for x in results)
    single_rate = opts.baseline_docs / single_s
    mesh_rate = (opts.docs - failed) / mesh_s
    return {
        "single_docs": opts.baseline_docs, "single_s": single_s, "single_docs_per_s": single_rate,
        "mesh_docs": opts.docs, "mesh_failed": failed, "mesh_s": mesh_s, "mesh_docs_per_s": mesh_rate,
        "replicas": r, "parallel_docs": parallel, "ideal_speedup": 4 * r, "speedup": mesh_rate / single_rate,
    }


async def claim_decisions(mesh: Mesh, client: MeshClient, opts: argparse.Namespace) -> dict[str, Any]:
    async with fleet(mesh) as f:
        await f.serve([(analysis_agent(cap)(opts, slots=None), cap) for cap in ANALYSES])
        await wait_for(client, dict.fromkeys(ANALYSES, 1))
        fan = FanOut(list(ANALYSES), branch_timeout=60, min_success=len(ANALYSES))
        await fan.run(client, {"decision": "warm"})
        seq_ms: list[float] = []
        fan_ms: list[float] = []
        for d in range(opts.decisions):
            payload = {"decision": f"decision-{d}"}

            async def sequential(payload: dict[str, Any] = payload) -> None:
                for cap in ANALYSES:
                    await client.call(cap, payload, timeout=60)

            async def parallel(payload: dict[str, Any] = payload) -> None:
                await fan.run(client, payload)

            order = [(sequential, seq_ms), (parallel, fan_ms)]
            for run, sink in order if d % 2 == 0 else reversed(order):  # alternate, so drift hits both arms
                t0 = time.perf_counter()
                await run()
                sink.append((time.perf_counter() - t0) * 1000)
    return {
        "analyses": len(ANALYSES), "decisions": opts.decisions,
        "sequential_p50_ms": statistics.median(seq_ms), "fanout_p50_ms": statistics.median(fan_ms),
        "sequential_mean_ms": statistics.fmean(seq_ms), "fanout_mean_ms": statistics.fmean(fan_ms),
        "speedup_mean": statistics.fmean(seq_ms) / statistics.fmean(fan_ms),
    }


async def claim_errors(mesh: Mesh, client: MeshClient, opts: argparse.Namespace) -> dict[str, Any]:
    async with fleet(mesh) as f:
        agents = [ClassifyAgent(opts, slots=None, fault_rate=opts.fault_rate, tag=f"c{i}") for i in range(3)]
        lite = ClassifyLite(opts, slots=None, fault_rate=opts.fault_rate, tag="lite")
        await f.serve([*((a, f"classifier-{i}") for i, a in enumerate(agents)), (lite, "classifier-lite")])
        revision = await mesh.apply(
            {"kind": "retries", "name": "classify", "spec": {
                "capabilities": ["classify"], "attempts": 3, "retryable_codes": ["UNAVAILABLE"],
                "backoff": {"base_ms": 10, "max_ms": 100}}},
            {"kind": "breakers", "name": "classify", "spec": {
                "capabilities": ["classify"], "instance": {"consecutive_failures": 5, "open_ms": 5000},
                "capability": {"consecutive_failures": 20, "open_ms": 2000}}},
            {"kind": "routes", "name": "classify", "spec": {"capabilities": ["classify"], "fallback": "classify-lite"}},
        )
        if not await client.node.policies.wait_for_revision(revision, 30):
            raise RuntimeError("the client did not get the resilience policies within 30 s")
        await wait_for(client, {"classify": 3, "classify-default": 3, "classify-none": 3, "classify-lite": 1})
        errors: dict[str, Counter[str]] = {arm: Counter() for arm in ARMS}
        degraded = 0
        n = opts.error_calls
        chunk = 50
        for start in range(0, n, chunk):  # interleave the arms in chunks
            for arm, cap in ARMS.items():
                async def call(i: int, cap: str = cap, base: int = start) -> Any:
                    return await client.call_detailed(cap, {"item": f"item-{base + i}"}, timeout=30)

                for out in await bounded(min(chunk, n - start), opts.concurrency, call):
                    if isinstance(out, HivemeshError):
                        errors[arm][out.code.name] += 1
                    elif out.output.get("by") == "lite":
                        degraded += 1
        attempts = sum(a.calls for a in agents) + lite.calls
        faults = sum(a.faults for a in agents) + lite.faults
    rate = {arm: sum(errors[arm].values()) / n for arm in ARMS}
    return {
        "calls_per_arm": n, "fault_rate": opts.fault_rate, "concurrency": opts.concurrency,
        "errors": {arm: dict(c) for arm, c in errors.items()}, "error_rate": rate,
        "resilient_degraded_answers": degraded, "attempts_all_arms": attempts, "faults_injected": faults,
        "fewer_errors": 1 - rate["policies"] / rate["none"] if rate["none"] else float("nan"),
        "fewer_errors_defaults": 1 - rate["defaults"] / rate["none"] if rate["none"] else float("nan"),
    }


def helpdesk_requests(seed: int, n: int) -> list[dict[str, Any]]:
    """n requests, domains uniform; each has 1-2 words of its domain, 3-6 filler words, and in 1 of 5 a
    distracting word of another domain (so keyword routing can be wrong)."""
    rng = random.Random(f"{seed}|helpdesk")
    out = []
    names = list(DOMAINS)
    for i in range(n):
        domain = names[i % len(names)]
        words = rng.sample(DOMAINS[domain], rng.randint(1, 2)) + rng.sample(FILLER, rng.randint(3, 6))
        if rng.random() < 0.2:
            other = rng.choice([d for d in names if d != domain])
            words.append(rng.choice(DOMAINS[other]))
        rng.shuffle(words)
        out.append({"id": f"req-{i}", "domain": domain, "text": " ".join(words)})
    rng.shuffle(out)
    return out


async def claim_handoffs(mesh: Mesh, client: MeshClient, opts: argparse.Namespace) -> dict[str, Any]:
    async with fleet(mesh) as f:
        triage = TriageAgent(opts)
        await f.serve([(specialist_agent(d)(opts, slots=None), d) for d in DOMAINS] + [(triage, "triage")])
        await wait_for(client, {**{f"{d}-support": 1 for d in DOMAINS}, "triage": 1})
        for d in DOMAINS:  # the triage agent routes from its own registry view
            if not await f.servers["triage"].node.registry.wait_for_capability(f"{d}-support", 1, timeout=60):
                raise RuntimeError(f"triage does not see {d}-support")
        first = f"{next(iter(DOMAINS))}-support"
        requests = helpdesk_requests(opts.seed, opts.handoff_requests)
        chain: list[dict[str, Any]] = []
        routed: list[dict[str, Any]] = []
        chain_ms: list[float] = []
        routed_ms: list[float] = []

        async def run_chain(i: int) -> None:
            t0 = time.perf_counter()
            chain.append(await client.call(first, {**requests[i], "handoffs": 0, "path": [first]}, timeout=60))
            chain_ms.append((time.perf_counter() - t0) * 1000)

        async def run_routed(i: int) -> None:
            t0 = time.perf_counter()
            routed.append(await client.call("triage", requests[i], timeout=60))
            routed_ms.append((time.perf_counter() - t0) * 1000)

        errors = [x for x in await bounded(len(requests), opts.concurrency, run_chain) if x is not None]
        errors += [x for x in await bounded(len(requests), opts.concurrency, run_routed) if x is not None]
    if errors:
        raise RuntimeError(f"hand-off calls failed: {errors[:3]}")
    right_first = sum(1 for r in routed if r["handoffs"] == 1)
    chain_h = statistics.fmean(r["handoffs"] for r in chain)
    routed_h = statistics.fmean(r["handoffs"] for r in routed)
    return {
        "requests": len(requests), "specialists": len(DOMAINS),
        "chain_handoffs_mean": chain_h, "routed_handoffs_mean": routed_h,
        "router_first_pick_right": right_first / len(routed), "router_methods": dict(triage.routes),
        "chain_p50_ms": statistics.median(chain_ms), "routed_p50_ms": statistics.median(routed_ms),
        "fewer_handoffs": 1 - routed_h / chain_h,
    }


CLAIMS: dict[str, Callable[[Mesh, MeshClient, argparse.Namespace], Awaitable[dict[str, Any]]]] = {
    "throughput": claim_throughput, "decisions": claim_decisions, "errors": claim_errors, "handoffs": claim_handoffs,
}


# ==== report ======================================================================================================
def render(data: dict[str, Any]) -> str:
    o = data["options"]
    res = data["results"]
    lat = f"lognormal, median {o['median_ms']:g} ms, sigma {o['sigma']:g}"
    rows = []
    if "throughput" in res:
        t = res["throughput"]
        rows.append((
            "10-50x throughput",
            f"4-step pipeline, each step {lat}; {t['replicas']} replicas/step, {t['parallel_docs']} docs in "
            f"flight, {t['mesh_docs']} docs vs 1 agent doing the 4 steps per doc, {t['single_docs']} docs",
            f"**{t['speedup']:.1f}x** ({t['mesh_docs_per_s']:.2f} vs {t['single_docs_per_s']:.2f} docs/s; "
            f"ideal {t['ideal_speedup']}x; {t['mesh_failed']} failed)"))
    if "decisions" in res:
        d = res["decisions"]
        rows.append((
            "3x faster decisions",
            f"{d['analyses']} independent analyses per decision, each {lat}; FanOut vs in sequence, "
            f"{d['decisions']} decisions",
            f"**{d['speedup_mean']:.2f}x** (mean {d['fanout_mean_ms']:.0f} vs {d['sequential_mean_ms']:.0f} ms; "
            f"p50 {d['fanout_p50_ms']:.0f} vs {d['sequential_p50_ms']:.0f} ms)"))
    if "errors" in res:
        e = res["errors"]
        rows.append((
            "60% fewer errors",
            f"{e['fault_rate']:.0%} transient UNAVAILABLE per attempt, 3 replicas + a fallback, "
            f"{e['calls_per_arm']} calls per arm, {e['concurrency']} in flight; retries(3) + breakers + "
            f"fallback vs no resilience (a non-idempotent capability, no policy)",
            f"**{e['fewer_errors']:.0%} fewer** ({e['error_rate']['policies']:.2%} vs {e['error_rate']['none']:.2%} "
            f"failed; {e['resilient_degraded_answers']} answers from the fallback; the mesh's defaults alone "
            f"(idempotent failover, no policy): {e['error_rate']['defaults']:.2%}, "
            f"{e['fewer_errors_defaults']:.0%} fewer)"))
    if "handoffs" in res:
        h = res["handoffs"]
        rows.append((
            "45% fewer hand-offs",
            f"{h['requests']} helpdesk requests over {h['specialists']} specialists (uniform, 1 in 5 with a "
            f"distracting word); triage agent with Router vs a fixed chain",
            f"**{h['fewer_handoffs']:.0%} fewer** ({h['routed_handoffs_mean']:.2f} vs {h['chain_handoffs_mean']:.2f}"
            f" per request; router right first {h['router_first_pick_right']:.0%}; p50 {h['routed_p50_ms']:.0f} vs "
            f"{h['chain_p50_ms']:.0f} ms)"))
    lines = ["| claim | workload | measured (mesh vs single / none) |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    m = data["machine"]
    lines += ["", f"machine: {m['cpus']} CPUs ({m['cpu']}), Python {m['python']}, grpcio {m['grpcio']}, "
              f"load average at start {m['loadavg']}; seed {o['seed']}; run took {data['elapsed_s']:.0f} s"]
    return "\n".join(lines)


async def driver(opts: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    out: dict[str, Any] = {"options": vars(opts), "machine": machine(), "results": {}}
    async with running_mesh() as mesh, MeshClient.connect(
        name="bench-claims", settings=await mesh.settings("bench-claims", "client"), default_timeout=60
    ) as client:
        for name in opts.only or list(CLAIMS):
            log.warning("claim %s ...", name)
            out["results"][name] = await CLAIMS[name](mesh, client, opts)
            log.warning("claim %s: %s", name, json.dumps(out["results"][name]))
    out["elapsed_s"] = time.perf_counter() - started
    return out


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(CLAIMS))
    p.add_argument("--quick", action="store_true", help="smaller counts (a smoke run)")
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--median-ms", type=float, default=200.0, help="median simulated step/analysis time")
    p.add_argument("--sigma", type=float, default=0.5, help="lognormal sigma of the simulated times")
    p.add_argument("--replicas", type=int, default=8, help="replicas per pipeline step")
    p.add_argument("--parallel-docs", type=int, default=0,
                   help="documents in flight (default 8 x replicas: 2 per worker, so none idles for want of work)")
    p.add_argument("--docs", type=int, default=240)
    p.add_argument("--baseline-docs", type=int, default=10)
    p.add_argument("--decisions", type=int, default=16)
    p.add_argument("--fault-rate", type=float, default=0.10)
    p.add_argument("--fault-median-ms", type=float, default=20.0)
    p.add_argument("--error-calls", type=int, default=1000)
    p.add_argument("--handoff-median-ms", type=float, default=20.0)
    p.add_argument("--handoff-requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--json", help="also write every figure to this file")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.docs, opts.baseline_docs, opts.decisions, opts.error_calls, opts.handoff_requests = 64, 4, 6, 300, 60
        opts.replicas = min(opts.replicas, 4)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HIVEMESH_METRICS_LISTEN", "off")
    data = asyncio.run(driver(opts))
    if opts.json:
        Path(opts.json).write_text(json.dumps(data, indent=1))
    sys.stdout.write(render(data) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

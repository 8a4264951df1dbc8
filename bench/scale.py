"""The mesh at scale (issue 14): the registry with 10,000 instances, wide fan-outs, many streams, and a soak.

    registry  10,000 instances of 1,000 capabilities in etcd: what the registry watch cache costs each node
              (RSS growth of a fresh RegistryView loading them), how long a new instance takes to become
              routable (etcd put -> visible in a running MeshClient's registry, p50/p99 over 200 registrations;
              goal p99 <= 100 ms), and the re-list after a compaction (a fresh node's full list, and a running
              node's re-list of the unchanged prefix);
    index     the same registry's index in process (no etcd): one change applied incrementally vs rebuilt;
    fanout    a FanOut of 100 branches over 4 replicas (simulated 50 ms work), vs one call;
    streams   1,000 concurrent InvokeStream calls held open: memory per stream; and mutual-TLS connections
              opened one by one with a node's certificate: memory per connection;
    soak      calls at a steady rate for --soak-minutes (default off: 0; 30 by hand), RSS and open fds sampled
              every 10 s, failed calls counted, and the audit checked complete (every call one inbound ALLOW
              record in the control plane's audit log, and the log's hash chain verified).

Everything runs in this process on 127.0.0.1 over the real mesh (etcd with mutual TLS and auth, the control
plane, SDK agents, a MeshClient); memory is the process's RSS (client, agent and caches together, so a
per-item figure includes both ends unless stated).

    .venv/bin/python bench/scale.py registry fanout streams      # ~2 min
    .venv/bin/python bench/scale.py soak --soak-minutes 30       # by hand
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _rig import TRUST_DOMAIN, Mesh, machine, running_mesh

from hivemesh.mesh.registry import RegistryView, agent_key
from hivemesh.sdk import Agent, AgentServer, AgentServerConfig, MeshClient, capability
from hivemesh.sdk.patterns import Branch, FanOut
from hivemesh.v1 import agent_pb2, mesh_pb2

log = logging.getLogger("bench.scale")
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def settled_rss() -> float:
    gc.collect()
    return rss_mib()


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2() -> Any:
    try:
        fn = ctypes.CDLL(None).mallinfo2  # glibc 2.33+
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()


def heap_in_use_mib() -> float:
    """Bytes malloc has handed out and not had back (gRPC core's and OpenSSL's memory, Python's large objects),
    after a collection. Unlike RSS it does not hide what reuses memory freed earlier in the run (RSS stays put
    while freed memory is reused, and can shrink when malloc gives pages back), so a per-item figure stays
    positive and comparable. Python's small-object arenas are not in it. NaN without glibc's mallinfo2."""
    gc.collect()
    if _MALLINFO2 is None:
        return float("nan")
    info = _MALLINFO2()
    return (info.uordblks + info.hblkhd) / 2**20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def fake_instance(agent: str, instance_id: str, caps: Sequence[str], port: int = 9) -> mesh_pb2.AgentInstance:
    """A registry entry as an SDK agent writes it (never called: the bench only routes to it)."""
    card = agent_pb2.AgentCard(name=agent, version="1.0.0", description=f"scale agent {agent}", owner="bench",
                               capabilities=[agent_pb2.Capability(
                                   name=c, description=f"capability {c} of the scale bench", idempotent=True,
                                   input_modes=["application/json"], output_modes=["application/json"],
                                   tags=["scale"]) for c in caps])
    return mesh_pb2.AgentInstance(
        card=card, instance_id=instance_id, endpoint=f"127.0.0.1:{port}",
        identity=f"spiffe://{TRUST_DOMAIN}/agent/{agent}", packaging="in-process",
        registered_at_unix_ms=int(time.time() * 1000),
    )


# ==== registry =====================================================================================================
async def bench_registry(mesh: Mesh, opts: argparse.Namespace) -> dict[str, Any]:
    n_caps, per_cap = opts.capabilities, opts.instances // opts.capabilities
    c = mesh.etcd_client()
    await c.connect()
    try:
        t0 = time.perf_counter()
        gate = asyncio.Semaphore(64)

        async def put(i: int) -> None:
            cap = f"cap-{i % n_caps:04d}"
            agent = f"scale-{cap}"
            inst = fake_instance(agent, f"i-{i // n_caps:03d}", [cap])
            async with gate:
                await c.put(agent_key(agent, inst.instance_id).encode(), inst.SerializeToString())

        await asyncio.gather(*(put(i) for i in range(n_caps * per_cap)))
        fill_s = time.perf_counter() - t0
        entry_bytes = len(fake_instance("scale-cap-0000", "i-000", ["cap-0000"]).SerializeToString())

        async with MeshClient.connect(name="scale-node", settings=await mesh.settings("scale-node", "client")) as node:
            registry = node.node.registry
            assert await registry.wait_for_capability(f"cap-{n_caps - 1:04d}", per_cap, timeout=60)

            # memory of one more node's watch cache: a fresh RegistryView loading every entry
            views: list[RegistryView] = []
            growth: list[float] = []
            cold_load_s: list[float] = []
            for _ in range(opts.views):
                before = settled_rss()
                view = RegistryView(mesh.etcd.access, trust_domain=TRUST_DOMAIN)
                t0 = time.perf_counter()
                await view.start(timeout=60)
                cold_load_s.append(time.perf_counter() - t0)
                views.append(view)
                growth.append(settled_rss() - before)
            assert len(views[-1].instances("cap-0000")) == per_cap
            for view in views:  # the registrations below are timed with one node's view in this process
                await view.stop()

            # time to routable: put a new leased instance, wait until the node's registry routes to it
            lease = await c.lease(3600)
            routable_ms: list[float] = []
            for i in range(opts.registrations):
                cap = f"cap-{i % n_caps:04d}"
                agent = f"scale-{cap}"
                inst = fake_instance(agent, f"new-{i:03d}", [cap])
                want = per_cap + 1

                t0 = time.perf_counter()
                await c.put(agent_key(agent, inst.instance_id).encode(), inst.SerializeToString(), lease=lease.id)
                if not await registry.wait_for_capability(cap, want, timeout=10):
                    raise RuntimeError(f"instance new-{i:03d} of {cap} not routable within 10 s")
                routable_ms.append((time.perf_counter() - t0) * 1000)
            await c.revoke_lease(lease.id)

            # compaction, then (a) a fresh node's full list and (b) a running node's re-list of the prefix
            head = int((await c.get_prefix(b"/hivemesh/bench-none", keys_only=True)).header.revision)
            await c.compact(head)
            cold_after: list[float] = []
            for _ in range(3):
                view = RegistryView(mesh.etcd.access, trust_domain=TRUST_DOMAIN)
                t0 = time.perf_counter()
                await view.start(timeout=60)
                cold_after.append(time.perf_counter() - t0)
                await view.stop()
            relist: list[float] = []
            view = RegistryView(mesh.etcd.access, trust_domain=TRUST_DOMAIN)
            await view.start(timeout=60)
            lc = mesh.etcd_client()
            await lc.connect()
            try:
                for _ in range(3):
                    t0 = time.perf_counter()
                    await view.cache._list(lc)  # the re-list a compacted watch falls back to
                    relist.append((time.perf_counter() - t0) * 1000)
            finally:
                await lc.close()
                await view.stop()
    finally:
        await c.close()
    return {
        "instances": n_caps * per_cap, "capabilities": n_caps, "entry_bytes": entry_bytes, "fill_s": fill_s,
        "cache_rss_growth_mib": growth, "cache_rss_mib_median": statistics.median(growth),
        "cache_bytes_per_instance": statistics.median(growth) * 2**20 / (n_caps * per_cap),
        "cold_load_s": cold_load_s, "registrations": len(routable_ms),
        "routable_p50_ms": statistics.median(routable_ms), "routable_p99_ms": pct(routable_ms, 0.99),
        "routable_max_ms": max(routable_ms),
        "fresh_list_after_compaction_s": statistics.median(cold_after),
        "relist_unchanged_ms": statistics.median(relist),
    }


# ==== the registry's index, in process (no etcd) ===================================================================
async def bench_index(mesh: Mesh | None, opts: argparse.Namespace) -> dict[str, Any]:
    """One registration's cost to a node's registry view at 10,000 instances, both ways in one run: the index
    built from scratch (what every watch event cost before the incremental index) vs updated for the change."""
    from types import MappingProxyType

    from hivemesh.mesh.registry import _IndexBuilder

    n_caps, per_cap = opts.capabilities, opts.instances // opts.capabilities
    data: dict[str, mesh_pb2.AgentInstance] = {}
    for i in range(n_caps * per_cap):
        cap = f"cap-{i % n_caps:04d}"
        inst = fake_instance(f"scale-{cap}", f"i-{i // n_caps:03d}", [cap])
        data[agent_key(f"scale-{cap}", inst.instance_id)] = inst
    builder = _IndexBuilder()
    builder.update(MappingProxyType(data))
    full_ms: list[float] = []
    incr_ms: list[float] = []
    for r in range(opts.index_rounds):
        cap = f"cap-{r % n_caps:04d}"
        data = dict(data)  # a new snapshot per event, as the watch cache publishes them
        data[agent_key(f"scale-{cap}", f"new-{r}")] = fake_instance(f"scale-{cap}", f"new-{r}", [cap])
        snap = MappingProxyType(data)
        t0 = time.perf_counter()
        _IndexBuilder().update(snap)
        full_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        builder.update(snap)
        incr_ms.append((time.perf_counter() - t0) * 1000)
    return {"instances": len(data), "rounds": opts.index_rounds, "full_p50_ms": statistics.median(full_ms),
            "incremental_p50_ms": statistics.median(incr_ms),
            "ratio": statistics.median(full_ms) / statistics.median(incr_ms)}


# ==== fan-out =====================================================================================================
class Worker(Agent):
    """Simulated work: sleeps `ms` and answers; no limit on concurrent calls."""

    name = "scale-worker"
    version = "1.0.0"

    @capability(name="fan-work", idempotent=True, input_schema=ANY_OBJECT)
    async def work(self, req: dict[str, Any]) -> dict[str, Any]:
        """Sleep, then answer."""
        await asyncio.sleep(float(req.get("ms", 50)) / 1000)
        return {"ok": True}

    @capability(name="hold-stream", input_schema=ANY_OBJECT)
    async def hold(self, req: dict[str, Any]) -> Any:
        """Yield one item, hold the stream open until released, then yield a last one."""
        yield {"open": True}
        await self.release.wait()
        yield {"done": True}

    @capability(name="soak-echo", idempotent=True, input_schema=ANY_OBJECT)
    async def echo(self, req: dict[str, Any]) -> dict[str, Any]:
        """Echo the input."""
        return req

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()


@contextlib.asynccontextmanager
async def workers(mesh: Mesh, n: int, **config: Any) -> Any:
    async with contextlib.AsyncExitStack() as stack:
        agents = [Worker() for _ in range(n)]
        servers = []
        for i, a in enumerate(agents):
            server = AgentServer(a, await mesh.settings("scale-worker"), AgentServerConfig(
                instance_id=f"worker-{i}", metrics_listen="off", **config))
            await stack.enter_async_context(server)
            servers.append(server)
        client = await stack.enter_async_context(MeshClient.connect(
            name="scale-client", settings=await mesh.settings("scale-client", "client"), default_timeout=120))
        assert await client.node.registry.wait_for_capability("fan-work", n, timeout=30)
        yield agents, servers, client


async def bench_fanout(mesh: Mesh, opts: argparse.Namespace) -> dict[str, Any]:
    async with workers(mesh, 4) as (_agents, _servers, client):
        fan = FanOut([Branch("fan-work", name=f"b{i:03d}") for i in range(opts.branches)],
                     branch_timeout=60, min_success=opts.branches)
        await fan.run(client, {"ms": 50})  # warm every connection
        one_ms, fan_ms = [], []
        for _ in range(opts.fanout_rounds):
            t0 = time.perf_counter()
            await client.call("fan-work", {"ms": 50})
            one_ms.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            result = await fan.run(client, {"ms": 50})
            fan_ms.append((time.perf_counter() - t0) * 1000)
            assert len(result.details["succeeded"]) == opts.branches
    return {"branches": opts.branches, "replicas": 4, "work_ms": 50, "rounds": opts.fanout_rounds,
            "one_call_p50_ms": statistics.median(one_ms), "fanout_p50_ms": statistics.median(fan_ms),
            "fanout_max_ms": max(fan_ms)}


# ==== streams and connections =====================================================================================
async def bench_streams(mesh: Mesh, opts: argparse.Namespace) -> dict[str, Any]:
    from hivemesh.mesh.outbound.channels import ChannelPool

    async with workers(mesh, 1) as (agents, _servers, client):
        agent = agents[0]
        await client.call("fan-work", {"ms": 1})  # the connection and the token exist before the baseline
        opened = asyncio.Event()
        count = 0
        failures: list[BaseException] = []

        async def hold() -> None:
            nonlocal count
            try:
                async for item in client.stream("hold-stream", {}, timeout=300):
                    if item.get("open"):
                        count += 1
                        if count == opts.streams:
                            opened.set()
            except Exception as exc:  # noqa: BLE001 - counted and reported
                failures.append(exc)
                opened.set()

        # connections before the streams, whose memory would be reused by them once freed (RSS figures still
        # depend on what ran earlier in the process; heap_in_use_mib's do not): each ChannelPool dials its own
        # mutual-TLS channel to the agent with the client's certificate
        inst = client.node.registry.instances("fan-work")[0]
        pools = []
        base_c, heap_c, fds_c = settled_rss(), heap_in_use_mib(), open_fds()
        for _ in range(opts.connections):
            pool = ChannelPool(client.node.workload)
            ep = pool.get(inst.endpoint, inst.identity)
            await asyncio.wait_for(ep.channel.channel_ready(), 30)
            pools.append(pool)
        conn_rss, conn_heap, fds_c1 = settled_rss(), heap_in_use_mib(), open_fds()
        for pool in pools:
            await pool.close()

        base, heap0, fds0 = settled_rss(), heap_in_use_mib(), open_fds()
        tasks = [asyncio.create_task(hold()) for _ in range(opts.streams)]
        t0 = time.perf_counter()
        await asyncio.wait_for(opened.wait(), 300)
        open_s = time.perf_counter() - t0
        held, heap1, fds1 = settled_rss(), heap_in_use_mib(), open_fds()
        agent.release.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        if failures:
            raise RuntimeError(f"{len(failures)} streams failed, e.g. {failures[0]!r}")
    return {
        "streams": opts.streams, "open_all_s": open_s, "streams_rss_mib": held - base,
        "kib_per_stream": (held - base) * 1024 / opts.streams, "fds_for_streams": fds1 - fds0,
        "heap_kib_per_stream": (heap1 - heap0) * 1024 / opts.streams,
        "connections": opts.connections, "kib_per_connection": (conn_rss - base_c) * 1024 / opts.connections,
        "heap_kib_per_connection": (conn_heap - heap_c) * 1024 / opts.connections,
        "fds_per_connection": (fds_c1 - fds_c) / opts.connections,
    }


# ==== soak ==========================================================================================================
async def bench_soak(mesh: Mesh, opts: argparse.Namespace) -> dict[str, Any]:
    from hivemesh.controlplane.audit.checkpoints import verify_log
    from hivemesh.controlplane.audit.query import AuditFilter

    async with workers(mesh, 2) as (_agents, _servers, client):
        await client.call("soak-echo", {"i": -1})
        duration = opts.soak_minutes * 60
        interval = 1.0 / opts.soak_rate
        samples: list[dict[str, float]] = []
        ok = failed = 0
        errors: dict[str, int] = {}
        inflight: set[asyncio.Task[None]] = set()

        async def one(i: int) -> None:
            nonlocal ok, failed
            try:
                await client.call("soak-echo", {"i": i}, timeout=30)
                ok += 1
            except Exception as exc:  # noqa: BLE001 - counted and reported
                failed += 1
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

        start = time.perf_counter()
        next_sample = start
        i = 0
        while (now := time.perf_counter()) - start < duration:
            if now >= next_sample:
                samples.append({"t_s": round(now - start, 1), "rss_mib": round(rss_mib(), 1), "fds": open_fds(),
                                "calls": i})
                next_sample += 10
            t = asyncio.create_task(one(i))
            inflight.add(t)
            t.add_done_callback(inflight.discard)
            i += 1
            await asyncio.sleep(max(0.0, start + i * interval - time.perf_counter()))
        await asyncio.gather(*inflight)
        samples.append({"t_s": round(time.perf_counter() - start, 1), "rss_mib": round(rss_mib(), 1),
                        "fds": open_fds(), "calls": i})
        # audit: every call is one inbound record at the serving agent, shipped to the control plane
        # The control plane's log (state_dir/audit/log.jsonl), read as `hivemesh audit verify` would: each call is
        # one inbound ALLOW record, and the hash chain is intact (checkpoint signatures are not checked here).
        log_path = mesh.tmp / "cp-state" / "audit" / "log.jsonl"
        flt = AuditFilter(capability="soak-echo", kind="inbound", decision="allow")
        deadline = time.monotonic() + 60
        stored = 0
        while time.monotonic() < deadline:
            stored = sum(1 for _ in _matching(log_path, flt))
            if stored >= ok + 1:
                break
            await asyncio.sleep(0.5)
        report = verify_log(log_path.read_bytes().splitlines() if log_path.exists() else [])
    first, last = samples[min(1, len(samples) - 1)], samples[-1]
    return {
        "minutes": opts.soak_minutes, "rate_per_s": opts.soak_rate, "calls": i, "ok": ok, "failed": failed,
        "errors": errors, "audit_records": stored, "audit_expected": ok + 1, "audit_chain_ok": bool(report.ok),
        "rss_first_mib": first["rss_mib"], "rss_last_mib": last["rss_mib"], "rss_max_mib": max(
            s["rss_mib"] for s in samples), "fds_first": first["fds"], "fds_last": last["fds"],
        "fds_max": max(s["fds"] for s in samples), "samples": samples,
    }


def _matching(log_path: Path, flt: Any) -> Any:
    if not log_path.exists():
        return
    for raw in log_path.read_bytes().splitlines():
        with contextlib.suppress(ValueError):
            if flt.matches(json.loads(raw)):
                yield raw


BENCHES: dict[str, Callable[[Any, argparse.Namespace], Any]] = {
    "registry": bench_registry, "index": bench_index, "fanout": bench_fanout, "streams": bench_streams,
    "soak": bench_soak,
}


def render(data: dict[str, Any]) -> str:
    r = data["results"]
    lines = ["| what | workload | measured |", "|---|---|---|"]
    if "registry" in r:
        g = r["registry"]
        lines += [
            f"| registry watch cache per node | {g['instances']:,} instances of {g['capabilities']:,} capabilities "
            f"({g['entry_bytes']} B each in etcd) | {g['cache_rss_mib_median']:.1f} MiB RSS "
            f"(~{g['cache_bytes_per_instance'] / 1024:.1f} KiB per instance); cold list + index "
            f"{statistics.median(g['cold_load_s']):.2f} s |",
            f"| time to routable | {g['registrations']} new leased instances, one at a time, with "
            f"{g['instances']:,} in the registry: etcd put -> in a running MeshClient's registry | "
            f"p50 **{g['routable_p50_ms']:.1f} ms**, p99 **{g['routable_p99_ms']:.1f} ms** (max "
            f"{g['routable_max_ms']:.1f}; goal p99 <= 100 ms) |",
            f"| re-list after compaction | the same {g['instances']:,} instances | fresh node (list + decode + index) "
            f"{g['fresh_list_after_compaction_s']:.2f} s; running node's re-list of the unchanged prefix "
            f"{g['relist_unchanged_ms']:.0f} ms |",
        ]
    if "index" in r:
        x = r["index"]
        lines.append(
            f"| a registration's cost to one node's view | {x['instances']:,} instances, {x['rounds']} changes, "
            f"in process | index updated **{x['incremental_p50_ms']:.1f} ms** vs rebuilt {x['full_p50_ms']:.0f} ms "
            f"(p50; {x['ratio']:.0f}x) |")
    if "fanout" in r:
        f = r["fanout"]
        lines.append(
            f"| FanOut of {f['branches']} | {f['branches']} branches over {f['replicas']} replicas, "
            f"{f['work_ms']} ms of work each, {f['rounds']} rounds | p50 {f['fanout_p50_ms']:.0f} ms "
            f"(one call {f['one_call_p50_ms']:.0f} ms; max {f['fanout_max_ms']:.0f} ms) |")
    if "streams" in r:
        s = r["streams"]
        lines += [
            f"| concurrent streams | {s['streams']:,} InvokeStream calls held open, one client, one agent | "
            f"{s['kib_per_stream']:.1f} KiB RSS per stream (client + agent; malloc'd "
            f"{s.get('heap_kib_per_stream', float('nan')):.1f} KiB), {s['fds_for_streams']} more fds; all open "
            f"in {s['open_all_s']:.1f} s |",
            f"| connections | {s['connections']} mutual-TLS channels to one agent | "
            f"{s['kib_per_connection']:.0f} KiB RSS per connection (both ends; malloc'd "
            f"{s.get('heap_kib_per_connection', float('nan')):.0f} KiB), {s['fds_per_connection']:.1f} fds |",
        ]
    if "soak" in r:
        k = r["soak"]
        lines.append(
            f"| soak | {k['minutes']:g} min at {k['rate_per_s']:g} calls/s, 2 replicas | {k['calls']:,} calls, "
            f"{k['failed']} failed; RSS {k['rss_first_mib']:.0f} -> {k['rss_last_mib']:.0f} MiB (max "
            f"{k['rss_max_mib']:.0f}); fds {k['fds_first']} -> {k['fds_last']} (max {k['fds_max']}); audit "
            f"{k['audit_records']:,}/{k['audit_expected']:,} records, chain "
            f"{'verified' if k['audit_chain_ok'] else 'BROKEN'} |")
    m = data["machine"]
    lines += ["", f"machine: {m['cpus']} CPUs ({m['cpu']}), Python {m['python']}, grpcio {m['grpcio']}, load "
              f"average at start {m['loadavg']}; run took {data['elapsed_s']:.0f} s"]
    return "\n".join(lines)


async def driver(opts: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    out: dict[str, Any] = {"options": vars(opts), "machine": machine(), "results": {}}
    if opts.benches == ["index"]:  # no mesh needed
        out["results"]["index"] = await bench_index(None, opts)
        out["elapsed_s"] = time.perf_counter() - started
        return out
    async with running_mesh() as mesh:
        for name in opts.benches:
            if name == "soak" and opts.soak_minutes <= 0:
                continue
            log.warning("bench %s ...", name)
            out["results"][name] = await BENCHES[name](mesh, opts)
            brief = {k: v for k, v in out["results"][name].items() if k != "samples"}
            log.warning("bench %s: %s", name, json.dumps(brief))
    out["elapsed_s"] = time.perf_counter() - started
    return out


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("benches", nargs="*", metavar="BENCH",
                   help=f"any of {', '.join(BENCHES)} (default: registry index fanout streams)")
    p.add_argument("--instances", type=int, default=10_000)
    p.add_argument("--capabilities", type=int, default=1_000)
    p.add_argument("--registrations", type=int, default=200)
    p.add_argument("--views", type=int, default=3, help="fresh registry views loaded to measure cache memory")
    p.add_argument("--index-rounds", type=int, default=20)
    p.add_argument("--branches", type=int, default=100)
    p.add_argument("--fanout-rounds", type=int, default=10)
    p.add_argument("--streams", type=int, default=1_000)
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--soak-minutes", type=float, default=0.0, help="0: no soak (run 30 by hand)")
    p.add_argument("--soak-rate", type=float, default=50.0, help="calls per second during the soak")
    p.add_argument("--json", help="also write every figure to this file")
    opts = p.parse_args(argv)
    opts.benches = opts.benches or ["registry", "index", "fanout", "streams"]
    unknown = sorted(set(opts.benches) - set(BENCHES))
    if unknown:
        p.error(f"unknown bench {', '.join(unknown)}: choose from {', '.join(BENCHES)}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    data = asyncio.run(driver(opts))
    if opts.json:
        Path(opts.json).write_text(json.dumps(data, indent=1))
    sys.stdout.write(render(data) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

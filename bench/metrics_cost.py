"""What Prometheus metrics cost the in-process call path: metrics off vs on, same run, interleaved rounds.

One process holds a real mesh (etcd behind mutual TLS, the control plane) and two identical pairs of
MeshClient (proxyless) → SDK AgentServer (mTLS, token, authz, input guard, audit): one pair with metrics off
(`metrics_listen="off"`), the other with metrics on, scraped by a background thread once a second as
Prometheus would. Rounds alternate off/on (then on/off) so drift hits both. Two figures: calls/s (wall clock,
at the mercy of whatever else the machine runs) and calls per CPU-second of this process, which holds the whole
path (client, server, control plane): the steadier one on a shared machine. Each is the median of the per-round
on/off ratios. The goal is a cost under 5%.

    .venv/bin/python bench/metrics_cost.py                  # 6 rounds × 4 s at 16 in flight (~1 min)
    .venv/bin/python bench/metrics_cost.py --rounds 10 --seconds 5 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, TypedDict

from hivemesh.sdk import Agent, Context, capability

TRUST_DOMAIN = "hivemesh.local"
_AUTHZ = {"kind": "authz", "name": "bench", "spec": {"rules": [
    {"name": "all", "action": "ALLOW", "from": {"callers": ["*"]}, "to": {"agents": ["*"], "capabilities": ["*"]}}]}}
_GRANTS = {"grants": [{"name": "all", "subjects": [f"spiffe://{TRUST_DOMAIN}/client/*"], "capabilities": ["*"]}]}


class Text(TypedDict):
    text: str


class EchoOff(Agent):
    name = "benchoff"

    @capability(description="echo", name="echo-off", idempotent=True)
    async def echo(self, req: Text, ctx: Context) -> Text:
        return {"text": req["text"]}


class EchoOn(Agent):
    name = "benchon"

    @capability(description="echo", name="echo-on", idempotent=True)
    async def echo(self, req: Text, ctx: Context) -> Text:
        return {"text": req["text"]}


AGENTS = {"off": EchoOff, "on": EchoOn}


async def _throughput(client: Any, cap: str, concurrency: int, seconds: float) -> tuple[float, float]:
    """(calls per wall second, calls per CPU second of this process)."""
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await client.call(cap, {"text": "x" * 180}, timeout=10)
            done += 1

    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - t0), done / (time.process_time() - c0)


def hook_cost_us(n: int = 200_000) -> float:
    """Microseconds the metrics hooks add to one call (the inbound observer, the usage meter's settle on a
    response with no usage, the outbound `finished`), timed alone: the deterministic part of the cost."""
    import grpc

    from hivemesh.mesh.layers.base import Inbound
    from hivemesh.mesh.node_metrics import NodeMetrics, PriceTable
    from hivemesh.v1 import agent_pb2

    m = NodeMetrics(packaging="in-process", node="bench", listen="127.0.0.1:0", prices=PriceTable({}))
    observe = m.inbound_observer([agent_pb2.Capability(name="echo")])
    meter = m.usage_layer()
    call = Inbound(method="Invoke", request=agent_pb2.InvokeRequest(capability="echo"), wire_size=0, metadata={},
                   auth_context={})
    resp = agent_pb2.InvokeResponse(output=b"{}")
    ok = grpc.StatusCode.OK
    t0 = time.perf_counter()
    for _ in range(n):
        observe(call, None, ok, 0.001)
        meter.settle(call, resp)
        m.finished("echo", None, 0.001, 0)
    return (time.perf_counter() - t0) / n * 1e6


def _scraper(address: str, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
            resp.read()


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    from hivemesh.controlplane.ca import init_ca, load_ca
    from hivemesh.controlplane.etcd_certs import issue_etcd_certs
    from hivemesh.controlplane.policies import apply_text
    from hivemesh.controlplane.server import ControlPlaneConfig, ControlPlaneServer
    from hivemesh.mesh.controlplane_client import ControlPlaneClient
    from hivemesh.mesh.etcd import EtcdServer, client, wait_connected
    from hivemesh.mesh.settings import MeshSettings
    from hivemesh.sdk import AgentServer, AgentServerConfig, MeshClient

    tmp = Path(tempfile.mkdtemp(prefix="hivemesh-metrics-bench-"))
    certs = init_ca(tmp / "certs", TRUST_DOMAIN)
    etcd = EtcdServer(data_dir=tmp / "etcd", log_path=tmp / "etcd.log",
                      tls=issue_etcd_certs(load_ca(certs.certs_dir), certs.certs_dir))
    etcd.start()
    grants = tmp / "grants.yaml"
    grants.write_text(json.dumps(_GRANTS))
    cp = ControlPlaneServer(ControlPlaneConfig(etcd_endpoints=etcd.endpoint, certs_dir=tmp / "certs",
                                               state_dir=tmp / "cp", grants_file=grants, metrics_listen="off"))
    stopper = threading.Event()
    servers: list[Any] = []
    clients: list[Any] = []
    try:
        await cp.start()
        root = client(etcd.access)
        await wait_connected(root)
        await apply_text(root, json.dumps(_AUTHZ))
        await root.close()
        operator = ControlPlaneClient.from_certs_dir(cp.address, tmp / "certs")

        async def settings(name: str, kind: str) -> MeshSettings:
            token = (await operator.create_join_token(name, kind, 600)).token
            return MeshSettings(etcd=etcd.endpoint, controlplane=cp.address, join=cp.join_address,
                                ca_bundle=certs.ca_cert, trust_domain=TRUST_DOMAIN, join_token=token,
                                identity_dir=tmp / "ids")

        pairs: dict[str, tuple[Any, str]] = {}
        for mode, listen in (("off", "off"), ("on", "127.0.0.1:0")):
            cap = f"echo-{mode}"
            server = AgentServer(AGENTS[mode](), await settings(f"bench{mode}", "agent"),
                                 AgentServerConfig(metrics_listen=listen, audit_dir=tmp / f"audit-{mode}"))
            await server.start()
            servers.append(server)
            mc = MeshClient.connect(name=f"bench-{mode}", settings=await settings(f"bench-{mode}", "client"),
                                    metrics_listen=listen, audit_dir=tmp / f"audit-c-{mode}")
            await mc.start()
            clients.append(mc)
            assert await mc.node.registry.wait_for_capability(cap, 1, timeout=30)
            pairs[mode] = (mc, cap)
        on_client = pairs["on"][0]
        for address in (servers[1].metrics_address, on_client.node.metrics.address):
            threading.Thread(target=_scraper, args=(address, stopper), daemon=True).start()
        for mode in ("off", "on"):  # warm up: channels, tokens, caches
            await _throughput(pairs[mode][0], pairs[mode][1], opts.concurrency, 1.0)
        rates: dict[str, list[float]] = {"off": [], "on": []}
        per_cpu: dict[str, list[float]] = {"off": [], "on": []}
        for r in range(opts.rounds):
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            for mode in order:
                mc, cap = pairs[mode]
                rate, cpu_rate = await _throughput(mc, cap, opts.concurrency, opts.seconds)
                rates[mode].append(rate)
                per_cpu[mode].append(cpu_rate)
                print(f"round {r + 1} metrics {mode:>3}: {rate:8.0f} calls/s {cpu_rate:8.0f} calls/CPU-s",  # noqa: T201
                      file=sys.stderr)
        await operator.close()
        wall = statistics.median(on / off for on, off in zip(rates["on"], rates["off"], strict=True))
        cpu = statistics.median(on / off for on, off in zip(per_cpu["on"], per_cpu["off"], strict=True))
        hook_us = hook_cost_us()
        cpu_us_per_call = 1e6 / statistics.median(per_cpu["off"])
        return {"hook_us_per_call": round(hook_us, 2), "cpu_us_per_call_off": round(cpu_us_per_call, 1),
                "hook_share_percent": round(hook_us / cpu_us_per_call * 100, 2),
                "concurrency": opts.concurrency, "seconds": opts.seconds, "rounds": opts.rounds,
                "calls_per_s": {m: round(statistics.median(v)) for m, v in rates.items()},
                "calls_per_cpu_s": {m: round(statistics.median(v)) for m, v in per_cpu.items()},
                "ratio_on_to_off": {"wall": round(wall, 4), "cpu": round(cpu, 4)},
                "cost_percent": {"wall": round((1 - wall) * 100, 2), "cpu": round((1 - cpu) * 100, 2)},
                "samples": {"calls_per_s": rates, "calls_per_cpu_s": per_cpu}}
    finally:
        stopper.set()
        for c in clients:
            await c.close()
        for s in servers:
            await s.stop(0.5)
        await cp.stop(0.5)
        etcd.stop()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    opts = p.parse_args(argv)
    result = asyncio.run(run(opts))
    if opts.json:
        print(json.dumps(result, indent=2))  # noqa: T201
    else:
        c, k, r = result["calls_per_s"], result["calls_per_cpu_s"], result["ratio_on_to_off"]
        print(f"in-process call path, {opts.concurrency} in flight, metrics off vs on:\n"  # noqa: T201
              f"  calls/s      {c['off']:>7} {c['on']:>7}  on/off {r['wall']}\n"
              f"  calls/CPU-s  {k['off']:>7} {k['on']:>7}  on/off {r['cpu']}  (cost {result['cost_percent']['cpu']}%)\n"
              f"  the hooks alone: {result['hook_us_per_call']} µs per call = {result['hook_share_percent']}% of "
              f"the {result['cpu_us_per_call_off']} µs of CPU a call takes with metrics off")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

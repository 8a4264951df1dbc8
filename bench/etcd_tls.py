"""What etcd behind mutual TLS and roles costs the mesh's store traffic: plaintext vs TLS + auth, same run.

Two real etcd members on loopback (one plaintext with auth off, as before; one as `hivemesh up` now runs it:
https, `--client-cert-auth`, auth on, the bench's identity an agent with its prefix-scoped role). For each:

- **registration**: `put` of an AgentInstance-sized value with a lease, as `Registration` writes it (and the
  full first registration: lease grant + put);
- **raw put**: the same put through etcd's KV stub on the same channel, no aetcd in between (why the TLS client
  is an aetcd subclass and not raw stubs: the difference is what aetcd costs);
- **watch delivery**: from the start of a put until a node's `PrefixCache` (the registry's watch) has applied it.

Rounds alternate between the members so drift hits both. The call path never touches etcd (DESIGN.md): these
numbers bound how fast registration and registry/policy/trust changes propagate, not call latency.

    .venv/bin/python bench/etcd_tls.py              # ~1 min on 2 cores
    .venv/bin/python bench/etcd_tls.py --rounds 5 --n 300
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aetcd import rpc

from hivemesh.controlplane.ca import init_ca, load_ca
from hivemesh.controlplane.etcd_certs import controlplane_etcd_tls, issue_etcd_certs
from hivemesh.mesh.etcd import EtcdAccess, EtcdServer, EtcdTls, client, wait_connected
from hivemesh.mesh.etcd_roles import ensure_workload_user
from hivemesh.mesh.pki import new_key_and_csr
from hivemesh.mesh.watch import PrefixCache

TD = "hivemesh.local"
AGENT = "bench"
PREFIX = f"/hivemesh/agents/{AGENT}/"
VALUE = b"x" * 600  # an AgentInstance with a small card is a few hundred bytes


async def _timed(n: int, op: Callable[[int], Awaitable[Any]]) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await op(i)
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def measure(access: EtcdAccess, n: int, tag: str) -> dict[str, list[float]]:
    c = client(access)
    await wait_connected(c)
    lease = await c.lease(60)
    res: dict[str, list[float]] = {}
    res["registration: put with lease"] = await _timed(n, lambda i: c.put(f"{PREFIX}{tag}-{i}".encode(), VALUE,
                                                                          lease=lease))
    res["first registration: lease grant + put"] = await _timed(
        n // 4, lambda i: _grant_and_put(c, f"{PREFIX}{tag}-g{i}".encode()))
    stub = rpc.KVStub(c.channel)
    res["raw KV stub put (no aetcd)"] = await _timed(n, lambda i: stub.Put(
        rpc.PutRequest(key=f"{PREFIX}{tag}-r{i}".encode(), value=VALUE, lease=lease.id), timeout=5))
    # Watch delivery into a real PrefixCache (the registry view's machinery), as the same identity.
    seen: dict[str, float] = {}
    arrived = asyncio.Event()

    def on_change() -> None:
        now = time.perf_counter()
        for k in cache.snapshot():
            seen.setdefault(k, now)
        arrived.set()

    cache: PrefixCache[bytes] = PrefixCache(access, PREFIX + "w/", on_change=on_change)
    await cache.start(timeout=10)
    delays = []
    for i in range(n):
        key = f"{PREFIX}w/{tag}-{i}"
        arrived.clear()
        t0 = time.perf_counter()
        await c.put(key.encode(), VALUE, lease=lease)
        while key not in seen:
            await asyncio.wait_for(arrived.wait(), 5)
            arrived.clear()
        delays.append((seen[key] - t0) * 1000)
    res["watch delivery: put -> PrefixCache applied"] = delays
    await cache.stop()
    await lease.revoke()
    await c.close()
    return res


async def _grant_and_put(c: Any, key: bytes) -> None:
    lease = await c.lease(60)
    await c.put(key, VALUE, lease=lease)


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


async def run(rounds: int, n: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="etcd-tls-bench-"))
    files = init_ca(tmp / "certs", TD)
    ca = load_ca(files.certs_dir)
    plain = EtcdServer(data_dir=tmp / "plain", log_path=tmp / "plain.log")
    secure = EtcdServer(data_dir=tmp / "tls", log_path=tmp / "tls.log", tls=issue_etcd_certs(ca, files.certs_dir))
    plain.start()
    secure.start()
    try:
        root = client(secure.endpoint, tls=controlplane_etcd_tls(files.certs_dir))
        await wait_connected(root)
        await ensure_workload_user(root, "agent", AGENT)
        await root.close()
        sid = f"spiffe://{TD}/agent/{AGENT}"
        key, csr = new_key_and_csr(sid)
        agent_tls = EtcdTls(files.ca_cert.read_bytes(), ca.sign_csr(csr, sid), key)
        targets = {"plaintext, auth off": EtcdAccess(plain.endpoint),
                   "mTLS + auth (agent role)": EtcdAccess(secure.endpoint, agent_tls)}
        results: dict[str, dict[str, list[float]]] = {t: {} for t in targets}
        for r in range(rounds):
            order = list(targets) if r % 2 == 0 else list(reversed(targets))
            for t in order:
                for metric, xs in (await measure(targets[t], n, f"r{r}")).items():
                    results[t].setdefault(metric, []).extend(xs)
        out = sys.stdout.write
        out(f"\netcd, {rounds} rounds x {n} samples, loopback; latency in ms (p50 / p90 / p99)\n\n")
        metrics = list(next(iter(results.values())))
        width = max(len(m) for m in metrics)
        out(f"{'':{width}}  " + "  ".join(f"{t:>26}" for t in targets) + "   ratio p50\n")
        for m in metrics:
            cells = []
            for t in targets:
                xs = results[t][m]
                cells.append(f"{statistics.median(xs):7.2f} /{_pct(xs, 90):6.2f} /{_pct(xs, 99):6.2f}")
            a, b = (statistics.median(results[t][m]) for t in targets)
            out(f"{m:{width}}  " + "  ".join(f"{c:>26}" for c in cells) + f"   x{b / a:.2f}\n")
    finally:
        plain.stop()
        secure.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    asyncio.run(run(args.rounds, args.n))


if __name__ == "__main__":
    main()

"""What one shipped audit record costs the control plane and etcd (issue 14's AuditAppend cost).

Each side is its own etcd (mutual TLS + auth, as `hivemesh up` runs it) and its own control-plane process started
with a given Python (so two worktrees' venvs compare in one run). The driver ships chained, realistic inbound
records as a node's shipper does (one batch in flight, `--batch` records every `--every-ms`) and reads the
utime + stime of the control plane and of etcd from /proc around each window. Rounds interleave the sides.

    .venv/bin/python bench/audit_cost.py --side new=.venv/bin/python --side old=/work/main/.venv/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hivemesh.mesh.audit.chain import GENESIS, seal
from hivemesh.mesh.lifeline import PARENT_ENV

TRUST_DOMAIN = "hivemesh.local"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of pid, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def inbound_fields(i: int, node: str) -> dict[str, Any]:
    """A record shaped like `decision_fields` writes for an allowed call with a token (~600 bytes)."""
    return {
        "v": 1, "time": f"2026-01-01T00:00:{i % 60:02d}.{i % 1000000:06d}Z", "kind": "inbound",
        "method": "/hivemesh.v1.Agent/Invoke", "capability": "echo-link", "decision": "allow", "status": "OK",
        "reason": "", "latency_us": 900 + i % 500, "caller": f"spiffe://{TRUST_DOMAIN}/client/bench-client-link",
        "remote": "ipv4:127.0.0.1:45678", "jti": f"{i:032x}", "principal": f"spiffe://{TRUST_DOMAIN}/client/bench",
        "trace_id": f"{i * 7919:032x}", "call_id": f"c-{i:012d}", "rule": "trust-domain", "node": node,
        "instance": "5f0c2a9e",
    }


@dataclass
class Side:
    """One etcd + control plane, started with one Python."""

    name: str
    python: str
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="hivemesh-auditcost-")))
    etcd: Any = None
    cp: asyncio.subprocess.Process | None = None
    client: Any = None
    node: str = ""
    seq: int = 0
    prev: str = GENESIS
    source: str = "bench-source"

    async def start(self, profile: str) -> None:
        from hivemesh.controlplane.ca import init_ca, load_ca
        from hivemesh.controlplane.etcd_certs import issue_etcd_certs
        from hivemesh.mesh.controlplane_client import ControlPlaneClient
        from hivemesh.mesh.etcd import EtcdServer
        from hivemesh.mesh.pki import load_cert, uri_sans

        certs = init_ca(self.tmp / "certs", TRUST_DOMAIN)
        tls = issue_etcd_certs(load_ca(certs.certs_dir), certs.certs_dir)
        self.etcd = EtcdServer(data_dir=self.tmp / "etcd", log_path=self.tmp / "etcd.log", tls=tls)
        self.etcd.start()
        prof = ["-m", "cProfile", "-o", f"{profile}.{self.name}.prof"] if profile else []
        log_file = open(self.tmp / "cp.log", "wb")  # noqa: SIM115, ASYNC230 - the child's stderr, set-up only
        self.cp = await asyncio.create_subprocess_exec(
            self.python, *prof, "-m", "hivemesh.controlplane.cli", "--home", str(self.tmp / "home"),
            "--certs-dir", str(self.tmp / "certs"), "controlplane", "--etcd", self.etcd.endpoint,
            stdout=asyncio.subprocess.PIPE, stderr=log_file, cwd=str(self.tmp),
            env={**os.environ, PARENT_ENV: str(os.getpid())},
        )
        assert self.cp.stdout is not None
        while True:
            line = (await asyncio.wait_for(self.cp.stdout.readline(), 60)).decode()
            if not line:
                raise RuntimeError(f"{self.name}: control plane exited; see {self.tmp / 'cp.log'}")
            if line.startswith("ready controlplane="):
                break
        address = line.split()[1].split("=", 1)[1]
        self.client = ControlPlaneClient.from_certs_dir(address, self.tmp / "certs")
        self.node = uri_sans(load_cert((self.tmp / "certs" / "operator.pem").read_bytes()))[0]
        await self.client.audit_source_state(self.source)

    def batch(self, n: int) -> list[bytes]:
        out = []
        for _ in range(n):
            line, self.prev = seal(inbound_fields(self.seq + 1, self.node), self.seq + 1, self.prev)
            self.seq += 1
            out.append(line)
        return out

    def cpu(self) -> tuple[float, float]:
        assert self.cp is not None
        return cpu_seconds(self.cp.pid), cpu_seconds(self.etcd.pid)

    async def window(self, records: int, batch: int, every_s: float) -> dict[str, float]:
        """Ship `records` in batches of `batch`, one every every_s (or back to back when shipping is slower)."""
        before, t0 = self.cpu(), time.monotonic()
        shipped = 0
        while shipped < records:
            started = time.monotonic()
            n = min(batch, records - shipped)
            acked = await self.client.audit_append(self.source, self.batch(n))
            assert acked == self.seq, (acked, self.seq)
            shipped += n
            await asyncio.sleep(max(0.0, every_s - (time.monotonic() - started)))
        await asyncio.sleep(0.6)  # the follow loop's next round and the head cadence land inside the window
        after, wall = self.cpu(), time.monotonic() - t0
        return {"cp_us": (after[0] - before[0]) / records * 1e6, "etcd_us": (after[1] - before[1]) / records * 1e6,
                "wall_s": wall}

    async def idle(self, seconds: float) -> dict[str, float]:
        before = self.cpu()
        await asyncio.sleep(seconds)
        after = self.cpu()
        return {"cp_ms_per_s": (after[0] - before[0]) / seconds * 1e3,
                "etcd_ms_per_s": (after[1] - before[1]) / seconds * 1e3}

    async def stop(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()
        if self.cp is not None and self.cp.returncode is None:
            self.cp.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.cp.wait(), 15)
            except TimeoutError:
                self.cp.kill()
                await self.cp.wait()
        if self.etcd is not None:
            self.etcd.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


async def main(opts: argparse.Namespace) -> None:
    sides = [Side(*spec.split("=", 1)) for spec in opts.side]
    try:
        for side in sides:
            await side.start(opts.profile)
        for side in sides:  # warm up: connections, first checkpoint, JIT-free but cache-warm
            await side.window(opts.batch * 4, opts.batch, opts.every_ms / 1000)
        rows: dict[str, list[dict[str, float]]] = {s.name: [] for s in sides}
        for rnd in range(opts.rounds):
            order = sides if rnd % 2 == 0 else sides[::-1]
            for side in order:
                idle = await side.idle(opts.idle_s) if opts.idle_s else {}
                got = {**await side.window(opts.records, opts.batch, opts.every_ms / 1000), **idle}
                rows[side.name].append(got)
                print(f"round {rnd + 1} {side.name:>6}: control plane {got['cp_us']:7.1f} µs/record  "  # noqa: T201
                      f"etcd {got['etcd_us']:7.1f} µs/record  ({got['wall_s']:.1f} s)"
                      + (f"  idle cp {got['cp_ms_per_s']:.1f} ms/s etcd {got['etcd_ms_per_s']:.1f} ms/s"
                         if idle else ""), flush=True)
        summary = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in rows.items()}
        result = {"batch": opts.batch, "every_ms": opts.every_ms, "records": opts.records, "rounds": opts.rounds,
                  "median": summary}
        print(json.dumps(result, indent=1))  # noqa: T201
    finally:
        for side in sides:
            await side.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", action="append", required=True, help="NAME=PYTHON (a venv's python)")
    parser.add_argument("--records", type=int, default=3000, help="records per measured window")
    parser.add_argument("--batch", type=int, default=45, help="records per AppendBatch (the shipper's at ~900/s)")
    parser.add_argument("--every-ms", type=float, default=50.0, help="one batch this often (the shipper's linger)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-s", type=float, default=0.0, help="also measure this long idle before each window")
    parser.add_argument("--profile", default="", help="cProfile the control planes to <PREFIX>.<side>.prof")
    asyncio.run(main(parser.parse_args()))
    sys.exit(0)

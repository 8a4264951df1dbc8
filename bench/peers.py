"""hivemesh against its peers, in one run: the same echo call between two agents, set up as each system's user would.

    hivemesh  etcd (mutual TLS + auth) and the control plane as `hivemesh up` starts them, an SDK echo agent and a
              MeshClient each joined with a join token; every security default on (mTLS, token, authz, input
              guard with schema and content screen, audit)
    AutoGen   autogen-core + autogen-ext[grpc] (pinned, in bench/.venv-autogen, installed by this script): the
              GrpcWorkerAgentRuntimeHost, an echo worker and a calling worker, three processes; no TLS, no authz
    A2A       an a2a-sdk agent (DefaultRequestHandler, JSON-RPC over HTTP on 127.0.0.1, uvicorn) called by a2a-sdk's
              own client; no TLS, no authz

Every system is driven by the same load loop (bench/peer_load.py) at 200 B and 64 KiB, 1 and 16 calls in flight,
each window bounded by time and by a call count. Each window starts once the machine has settled (`settle`: the
work a window leaves behind, such as a mesh's audit records still being stored, lands in no other system's window)
and its CPU is counted until the machine settles after it, for every process the system's calls use (hivemesh's:
the caller, the agent, the control plane, which stores the audit, and etcd). Rounds interleave the systems (and
bench/mesh_cost.py's internal paths, measured in the same run with its own code), starting from a different one
each round; figures are medians over rounds; ratios compare systems within this run only. Around and during each
window, bench/host_speed.py probes how fast the host itself runs (here it flips between two speeds about 2x apart
within a second, with no steal), and the report gives that beside each system's calls/s.

    .venv/bin/python bench/peers.py                 # full run (3 rounds, ~6 min on 2 cores)
    .venv/bin/python bench/peers.py --quick         # smoke run (1 round, short windows, ~2 min)
    .venv/bin/python bench/peers.py --internal none # the three systems only
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import host_speed
import mesh_cost
import peer_load

log = logging.getLogger("bench.peers")

HERE = Path(__file__).resolve().parent
AUTOGEN_VENV = HERE / ".venv-autogen"
AUTOGEN_PINS = ["autogen-core==0.7.5", "autogen-ext[grpc]==0.7.5"]
TITLES = {"hivemesh": "hivemesh", "autogen": "AutoGen gRPC runtime", "a2a": "A2A (a2a-sdk)",
          "hivemesh-grpc": "hivemesh, Agent/Link over gRPC"}
"""hivemesh-grpc: the same agent and caller with direct links off at the agent (HIVEMESH_LINK_DIRECT=0), so the
caller's links go over gRPC as before direct links: the baseline a direct link is measured against."""
BASELINES = ("hivemesh", "hivemesh-grpc")
"""Not peers: the goals compare hivemesh with the other systems only."""
_TD = mesh_cost.TRUST_DOMAIN
_RULES = [{"name": f"peers-client{sfx}-calls-echo{sfx}", "action": "ALLOW",
           "from": {"callers": [f"spiffe://{_TD}/client/peers-client{sfx}"]},
           "to": {"agents": [f"spiffe://{_TD}/agent/peers-echo{sfx}"], "capabilities": [f"echo{sfx}"]}}
          for sfx in ("", "-grpc")]
"""hivemesh's caller may call its echo agent (hivemesh-grpc's: theirs, suffixed -grpc): authorization is default
deny."""


def autogen_python() -> str:
    """AutoGen's own virtual environment (created and filled on first use; versions pinned)."""
    py = AUTOGEN_VENV / "bin" / "python"
    if not py.exists():
        log.info("creating %s with %s", AUTOGEN_VENV, " ".join(AUTOGEN_PINS))
        subprocess.run([sys.executable, "-m", "venv", str(AUTOGEN_VENV)], check=True)
    probe = subprocess.run([str(py), "-c", "import autogen_core, autogen_ext.runtimes.grpc"], capture_output=True)
    if probe.returncode != 0:
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *AUTOGEN_PINS],
                       check=True)
    return str(py)


# ==== the hivemesh caller (a child of this file) ================================================================
async def child_hivemesh_caller(capability: str, name: str) -> None:
    """A user's MeshClient (client name) calling the echo capability, driven by the shared load loop."""
    from hivemesh.mesh.settings import MeshSettings
    from hivemesh.sdk import MeshClient

    async with MeshClient.connect(name=name, kind="client", settings=MeshSettings.resolve()) as mesh:
        if not await mesh.node.registry.wait_for_capability(capability, 1, timeout=mesh_cost.READY_TIMEOUT_S):
            raise RuntimeError(f"capability {capability} never appeared in the registry")

        async def call(payload: dict[str, str]) -> dict[str, Any]:
            out: dict[str, Any] = await mesh.call(capability, payload, timeout=mesh_cost.CALL_TIMEOUT_S)
            return out

        await peer_load.serve_commands(call)


def child_main(argv: Sequence[str]) -> None:
    from hivemesh.mesh import loop
    from hivemesh.mesh.lifeline import die_with_parent_if_asked

    die_with_parent_if_asked()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    profile_to = os.environ.get("BENCH_PROFILE_TO")
    coro = child_hivemesh_caller(argv[1], argv[2] if len(argv) > 2 else "peers-client")
    if not profile_to:
        loop.run(coro)  # hivemesh's loop, as hivemesh.sdk.run_main gives a user's program
        return
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    try:
        loop.run(coro)  # hivemesh's loop, as hivemesh.sdk.run_main gives a user's program
    finally:
        prof.disable()
        prof.dump_stats(profile_to)


# ==== driver ====================================================================================================
SETTLE_MAX_S = 10.0
SETTLE_BUSY_CORES = 0.3
"""`settle` waits for half a second in which the whole machine used at most this many cores (ours and others')."""


@dataclass
class Peer:
    """One system under test: its calling process, the processes its calls pass through, and the processes of
    the mesh it shares with another system (pids: hivemesh's control plane and etcd), whose CPU its calls use."""

    key: str
    client: mesh_cost.Child
    servers: list[mesh_cost.Child] = field(default_factory=list)
    shared: dict[str, int] = field(default_factory=dict)

    @property
    def processes(self) -> list[mesh_cost.Child]:
        return [self.client, *self.servers]

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of every process this system's calls use, by label."""
        return {label: mesh_cost.cpu_seconds(pid) for label, pid in self.pids().items()}

    def pids(self) -> dict[str, int]:
        """Every process this system's calls use, by label."""
        return {**{c.label: c.pid for c in self.processes}, **self.shared}

    def sched(self) -> dict[str, tuple[float, float]]:
        """(CPU seconds, seconds waiting for a core) so far of every process this system's calls use, by label."""
        return {label: (mesh_cost.cpu_seconds(pid), mesh_cost.run_delay_seconds(pid))
                for label, pid in self.pids().items()}


async def settle(max_s: float = SETTLE_MAX_S) -> tuple[float, bool]:
    """Wait (at most max_s) for half a second in which the whole machine used at most SETTLE_BUSY_CORES: the
    seconds waited, and whether it settled. Bounded: on a machine others keep busy it gives up, and the sample
    records that."""
    return await mesh_cost.wait_idle(max_s, SETTLE_BUSY_CORES)


HOST_SAMPLE_S = 0.1
"""How often the driver, idle during a window, runs host_speed's Python probe (~0.3 ms: ~0.3% of a core)."""


async def _sample_host(done: asyncio.Event, out: list[float]) -> None:
    """Sample the host's speed every HOST_SAMPLE_S into out until done is set."""
    while not done.is_set():
        out.append(host_speed.python_rate())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), HOST_SAMPLE_S)


class PeersBench(mesh_cost.Bench):
    """mesh_cost's mesh (etcd, control plane, internal paths) plus the three systems, measured interleaved."""

    def __init__(self, opts: argparse.Namespace, internal: argparse.Namespace) -> None:
        super().__init__(internal)
        self.peer_opts = opts
        self.peers: list[Peer] = []
        self.peer_samples: list[dict[str, Any]] = []

    async def _apply_authz(self) -> None:
        from hivemesh.controlplane.policies import apply_text
        from hivemesh.mesh.etcd import client, wait_connected

        policy = json.loads(json.dumps(mesh_cost._AUTHZ))
        policy["spec"]["rules"].extend(_RULES)
        c = client(self.etcd.access)
        try:
            await wait_connected(c)
            await apply_text(c, json.dumps(policy))
        finally:
            await c.close()

    async def start(self) -> None:
        await super().start()
        starters = {"hivemesh": self._start_hivemesh, "autogen": self._start_autogen, "a2a": self._start_a2a,
                    "hivemesh-grpc": self._start_hivemesh_grpc}
        for key in self.peer_opts.systems:  # one after the other: parallel start-ups time out on a busy machine
            await starters[key]()

    async def _start_hivemesh(self, key: str = "hivemesh", suffix: str = "",
                              agent_env: dict[str, str] | None = None) -> None:
        agent_name, client_name, capability = f"peers-echo{suffix}", f"peers-client{suffix}", f"echo{suffix}"
        agent = await self.spawn_role(f"{key}.agent", "sdk-agent", "--name", agent_name, "--capability", capability,
                                      env={**await self.join_env(agent_name, "agent"), **(agent_env or {})})
        await self._ready(agent)
        client = await self.spawn(f"{key}.client", [sys.executable, __file__, "_child", capability, client_name],
                                  env=await self.join_env(client_name, "client"))
        await self._ready(client)
        shared = {c.label: c.pid for c in self.children if c.label == "controlplane"}
        if self.etcd is not None and self.etcd.pid:
            shared["etcd"] = self.etcd.pid
        self.peers.append(Peer(key, client, [agent], shared))

    async def _start_hivemesh_grpc(self) -> None:
        await self._start_hivemesh("hivemesh-grpc", "-grpc", {"HIVEMESH_LINK_DIRECT": "0"})

    async def _start_autogen(self) -> None:
        py, script = self.peer_opts.autogen_python, str(HERE / "peer_autogen.py")
        host = await self.spawn("ag.host", [py, script, "host"])
        address = f"127.0.0.1:{(await self._ready(host))['port']}"
        echo = await self.spawn("ag.echo", [py, script, "echo", "--host", address])
        await self._ready(echo)
        client = await self.spawn("ag.caller", [py, script, "caller", "--host", address])
        await self._ready(client)
        self.peers.append(Peer("autogen", client, [host, echo]))

    async def _start_a2a(self) -> None:
        script = str(HERE / "peer_a2a.py")
        agent = await self.spawn("a2a.agent", [sys.executable, script, "agent"])
        url = (await self._ready(agent))["url"]
        client = await self.spawn("a2a.caller", [sys.executable, script, "caller", "--url", url])
        await self._ready(client)
        self.peers.append(Peer("a2a", client, [agent]))

    async def stop(self) -> None:
        for peer in self.peers:  # a clean exit lets a profiled caller write its profile
            with contextlib.suppress(Exception):
                await peer.client.command({"op": "quit"}, 5.0)
                await asyncio.wait_for(peer.client.proc.wait(), 5.0)
        await super().stop()

    async def run_peer_cell(self, rnd: int, peer: Peer, size: int) -> None:
        o = self.peer_opts
        await peer.client.command({"op": "warmup", "size": size, "n": o.warmup, "max_s": 60.0}, 90.0)
        for conc in o.concurrency:
            cmd = {"op": "run", "size": size, "concurrency": conc, "seconds": o.seconds, "max_calls": o.max_calls}
            host_before = host_speed.probe()  # before settling: the probes' own CPU is not the window's
            settled_s, settled = await settle()
            before = peer.cpu()
            (busy0, _, steal0), wall0, sched0 = mesh_cost.system_cpu_seconds(), time.monotonic(), peer.sched()
            done, inside = asyncio.Event(), []
            sampler = asyncio.create_task(_sample_host(done, inside))
            try:
                result = await peer.client.command(cmd, o.seconds + 60)
            finally:
                done.set()
                await sampler
            (busy1, _, steal1), wall1, sched1 = mesh_cost.system_cpu_seconds(), time.monotonic(), peer.sched()
            settled_after_s, settled_after = await settle()  # the window's own leftover work is its calls' too
            after = peer.cpu()
            host_after = host_speed.probe()
            if result["failed"]:
                raise RuntimeError(f"{TITLES[peer.key]} at {conc} in flight, {size} B: errors {result['errors']}")
            calls = max(1, result["calls"])
            self.peer_samples.append({
                "round": rnd, "system": peer.key, "size": size, "concurrency": conc, "calls": result["calls"],
                "calls_per_s": result["calls_per_s"], "p50_us": result["p50_us"], "p99_us": result["p99_us"],
                "cpu_us_per_call": {k: (after[k] - before[k]) * 1e6 / calls for k in before},
                "machine_busy_cores": (busy1 - busy0) / (wall1 - wall0),
                "steal_cores": (steal1 - steal0) / (wall1 - wall0),
                # Each process's cores in the window, running and runnable but waiting for a core.
                "sched_cores": {k: [(sched1[k][i] - sched0[k][i]) / (wall1 - wall0) for i in (0, 1)]
                                for k in sched0},
                "settle_s": [round(settled_s, 2), round(settled_after_s, 2)],
                "settled": [settled, settled_after],
                # The host's speed just before and just after the window (bench/host_speed.py).
                "host": [host_before, host_after],
                # And during it: the Python probe every HOST_SAMPLE_S (bench/host_speed.py).
                "host_in_window": [round(x, 3) for x in inside],
            })
            log.info("round %d %-22s %6d B @%-2d %8.0f calls/s  p50 %8.0f µs  p99 %8.0f µs", rnd + 1,
                     TITLES[peer.key], size, conc, result["calls_per_s"], result["p50_us"], result["p99_us"])

    async def run(self) -> None:
        cells: list[tuple[str, Any]] = [("peer", p) for p in self.peers] + [("internal", p) for p in self.paths]
        for rnd in range(self.peer_opts.rounds):
            shift = rnd % len(cells)
            for kind, item in cells[shift:] + cells[:shift]:
                for size in self.peer_opts.sizes:
                    if kind == "peer":
                        await self.run_peer_cell(rnd, item, size)
                    else:
                        await self.run_cell(rnd, item, size)


# ==== report ====================================================================================================
def summarize(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds per (system, size, concurrency)."""
    out: dict[str, Any] = {}
    for key in sorted({(s["system"], s["size"], s["concurrency"]) for s in samples}):
        rows = [s for s in samples if (s["system"], s["size"], s["concurrency"]) == key]
        out["/".join(map(str, key))] = {
            "rounds": len(rows),
            "calls_per_s": statistics.median(r["calls_per_s"] for r in rows),
            "p50_us": statistics.median(r["p50_us"] for r in rows),
            "p99_us": statistics.median(r["p99_us"] for r in rows),
            "cpu_us": statistics.median(sum(r["cpu_us_per_call"].values()) for r in rows),
        }
    return out


def render(summary: dict[str, Any], systems: Sequence[str], sizes: Sequence[int], concs: Sequence[int],
           samples: Sequence[dict[str, Any]] = ()) -> str:
    f = mesh_cost._fmt
    lines: list[str] = []
    for size in sizes:
        lines.append(f"#### Payload {mesh_cost._size_name(size)}\n")
        head = ["system"]
        for c in concs:
            head += [f"calls/s @{c}", f"p50 µs @{c}", f"p99 µs @{c}", f"CPU µs/call @{c}"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key in systems:
            row = [TITLES[key]]
            for c in concs:
                s = summary[f"{key}/{size}/{c}"]
                row += [f(s["calls_per_s"]), f(s["p50_us"]), f(s["p99_us"]), f(s["cpu_us"])]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if "hivemesh" in systems and len(systems) > 1:
        lines.append("#### hivemesh ÷ peer (same run; calls/s: higher is better for hivemesh, p50: lower is)\n")
        head = ["peer", "payload"]
        for c in concs:
            head += [f"calls/s @{c}", f"p50 @{c}"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key in [k for k in systems if k != "hivemesh"]:
            for size in sizes:
                row = [TITLES[key], mesh_cost._size_name(size)]
                for c in concs:
                    h, p = summary[f"hivemesh/{size}/{c}"], summary[f"{key}/{size}/{c}"]
                    row += [f"{h['calls_per_s'] / p['calls_per_s']:.2f}×", f"{h['p50_us'] / p['p50_us']:.2f}×"]
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        lines += _goals(summary, systems, sizes, concs, samples)
    return "\n".join(lines) + "\n"


def _by_round(samples: Sequence[dict[str, Any]], size: int, conc: int) -> list[float]:
    """hivemesh's calls/s over AutoGen's in each round (the goal is judged on the medians; these show the spread)."""
    rates: dict[tuple[int, str], float] = {(s["round"], s["system"]): s["calls_per_s"] for s in samples
                                           if s["size"] == size and s["concurrency"] == conc}
    return [rates[(r, "hivemesh")] / rates[(r, "autogen")]
            for r in sorted({r for r, _ in rates}) if (r, "hivemesh") in rates and (r, "autogen") in rates]


SLOW_BELOW = 0.75
"""A sample of the host's speed in a window is slow below this share of the run's fast level (the 90th percentile
of every sample taken in the run's windows): here the host's speed sat at one of two levels, about 2x apart."""


def _slow_share(inside: Sequence[float], fast: float) -> float:
    return sum(x < SLOW_BELOW * fast for x in inside) / len(inside) if inside else 0.0


STEADY_SLOW_SHARE = 0.25
"""A window the host left steady: at most this share of its host-speed samples ran slow (see `_host_table`)."""


def _fast_level(samples: Sequence[dict[str, Any]]) -> float:
    """The run's fast host speed: the 90th percentile of every sample taken during its windows (0.0: none)."""
    everything = sorted(x for s in samples for x in s.get("host_in_window", ()))
    return everything[int(0.9 * (len(everything) - 1))] if everything else 0.0


def _steady_ratio(samples: Sequence[dict[str, Any]], size: int, conc: int) -> str:
    """hivemesh's calls/s over AutoGen's by the medians of only the windows the host left steady, with how many
    windows of each that is; "" where the run sampled no host speed or either system had no steady window. The
    goal is judged on every window; this says how much of a miss or a pass the host's slow stretches made."""
    fast = _fast_level(samples)
    if not fast:
        return ""
    rates: dict[str, list[float]] = {"hivemesh": [], "autogen": []}
    for s in samples:
        if (s["system"] in rates and s["size"] == size and s["concurrency"] == conc and s.get("host_in_window")
                and _slow_share(s["host_in_window"], fast) <= STEADY_SLOW_SHARE):
            rates[s["system"]].append(s["calls_per_s"])
    if not rates["hivemesh"] or not rates["autogen"]:
        return ""
    h, a = statistics.median(rates["hivemesh"]), statistics.median(rates["autogen"])
    return (f"{h / a:.2f}× ({mesh_cost._fmt(h)} against {mesh_cost._fmt(a)} calls/s; {len(rates['hivemesh'])} and "
            f"{len(rates['autogen'])} of the windows)")


def _goals(summary: dict[str, Any], systems: Sequence[str], sizes: Sequence[int], concs: Sequence[int],
           samples: Sequence[dict[str, Any]] = ()) -> list[str]:
    """Issue 14's goals against the peers: 2x AutoGen's calls/s at 200 B, 4x at 64 KiB; p50 below both peers."""
    out = ["#### Goals (issue 14)\n"]
    want = {200: 2.0, 64 * 1024: 4.0}
    conc = max(concs)
    for size in sizes:
        if "autogen" in systems and size in want:
            r = summary[f"hivemesh/{size}/{conc}"]["calls_per_s"] / summary[f"autogen/{size}/{conc}"]["calls_per_s"]
            rounds = _by_round(samples, size, conc)
            spread = f" (by round {', '.join(f'{x:.2f}×' for x in rounds)})" if rounds else ""
            out.append(f"- {mesh_cost._size_name(size)} @{conc}: {r:.2f}× AutoGen's calls/s{spread} (goal ≥ "
                       f"{want[size]:g}×): {'**met**' if r >= want[size] else '**not met**'}")
            steady = _steady_ratio(samples, size, conc)
            if steady:
                out.append(f"  - in the windows the host left steady (at most {STEADY_SLOW_SHARE:.0%} of the samples "
                           f"during them slow): {steady}")
        peers = [k for k in systems if k not in BASELINES]
        for c in concs:
            mine = summary[f"hivemesh/{size}/{c}"]["p50_us"]
            below = all(mine < summary[f"{k}/{size}/{c}"]["p50_us"] for k in peers)
            out.append(f"- {mesh_cost._size_name(size)} @{c}: p50 {mine:,.0f} µs, below "
                       f"{' and '.join(TITLES[k] for k in peers)}: {'**met**' if below else '**not met**'}")
    return [*out, ""]


HOST_RATES = (("aes_gbs", "AES-GCM GB/s"), ("tls_gbs", "TLS writes GB/s"), ("copy_gbs", "copy GB/s"),
              ("python_mops", "Python M turns/s"))


def _host_rate(sample: dict[str, Any], rate: str) -> float:
    """The host's speed by one probe around a window: the mean of the probes before and after it (NaN for a probe
    a run saved before it existed: `tls_gbs` before 6 Dec)."""
    return statistics.fmean(h.get(rate, math.nan) for h in sample["host"])


def _rate_text(value: float, fmt: str = "{:.2f}") -> str:
    return "–" if math.isnan(value) else fmt.format(value)


def _host_table(samples: Sequence[dict[str, Any]], systems: Sequence[str], sizes: Sequence[int],
                conc: int) -> list[str]:
    """How fast the host itself ran around and during each system's windows at conc (bench/host_speed.py's probes,
    medians over rounds), beside the system's calls/s: a ratio between systems measured at different host speeds
    compares the host too. The spread over all windows of the run closes the table."""
    with_host = [s for s in samples if "host" in s]
    if not with_host:
        return []
    fast = _fast_level(with_host)
    rows = []
    for key in systems:
        for size in sizes:
            cells = [s for s in with_host if s["system"] == key and s["size"] == size and s["concurrency"] == conc]
            if not cells:
                continue
            around = [_rate_text(statistics.median(_host_rate(c, r) for c in cells)) for r, _ in HOST_RATES]
            inside = [c["host_in_window"] for c in cells if c.get("host_in_window")]
            during = (f"{statistics.median(statistics.median(i) for i in inside):.2f} | "
                      f"{statistics.median(_slow_share(i, fast) for i in inside):.0%}") if inside else "– | –"
            rows.append(f"| {TITLES[key]} | {mesh_cost._size_name(size)} | "
                        f"{mesh_cost._fmt(statistics.median(c['calls_per_s'] for c in cells))} | "
                        f"{' | '.join(around)} | {during} |")
    spread = "; ".join(
        f"{title} {_rate_text(min(_host_rate(s, r) for s in with_host))}–"
        f"{_rate_text(max(_host_rate(s, r) for s in with_host))}"
        for r, title in HOST_RATES)
    return ["", f"#### The host's speed around and during each system's windows @{conc} (bench/host_speed.py, "
            "medians over rounds)\n",
            "Around: the four probes just before and just after each window. During: the Python probe every "
            f"{HOST_SAMPLE_S:g} s; slow: the share of those samples below {SLOW_BELOW:.0%} of the run's fast level "
            f"({fast:.2f}, the 90th percentile of all of them).\n",
            "| system | payload | calls/s | " + " | ".join(f"{t} around" for _, t in HOST_RATES)
            + " | Python M turns/s during | slow during |",
            "|---|---|---|" + "---|" * (len(HOST_RATES) + 2), *rows, "", f"Around every window of the run: {spread}.",
            ""]


def _sched_table(samples: Sequence[dict[str, Any]], systems: Sequence[str], sizes: Sequence[int],
                 conc: int) -> list[str]:
    """Each system's processes in its windows at conc: cores running, and cores runnable but waiting for one
    (medians over rounds; processes running at least 0.05 cores). A process near a whole core is the system's
    bottleneck; one that waits is held back by the rest of the machine, which moves a ratio between runs."""
    rows: list[str] = []
    for key in systems:
        for size in sizes:
            cells = [s["sched_cores"] for s in samples if "sched_cores" in s and s["system"] == key
                     and s["size"] == size and s["concurrency"] == conc]
            if not cells:
                continue
            for label in cells[0]:
                running = statistics.median(c[label][0] for c in cells if label in c)
                waiting = statistics.median(max(0.0, c[label][1]) for c in cells if label in c)
                if running >= 0.05:
                    rows.append(f"| {TITLES[key]} | {mesh_cost._size_name(size)} | {label} | {running:.2f} | "
                                f"{waiting:.2f} |")
    if not rows:
        return []
    return [f"#### Who ran and who waited @{conc} (cores in the window, medians over rounds)\n",
            "| system | payload | process | running | waiting for a core |", "|---|---|---|---|---|", *rows, ""]


def _settled_text(samples: Sequence[dict[str, Any]]) -> str:
    waits = [w for s in samples for w in s.get("settle_s", ())]
    if not waits:
        return "windows not settled (a run from before settling)"
    gave_up = sum(not ok for s in samples for ok in s.get("settled", ()))
    return (f"each window began and its CPU count ended once the machine settled (at most {SETTLE_BUSY_CORES:g} cores "
            f"busy for 0.5 s): median wait {statistics.median(waits):.1f} s, the {SETTLE_MAX_S:g} s bound reached "
            f"{gave_up} time(s) of {len(waits)}; CPU µs/call counts every process the calls use (hivemesh: the "
            "control plane and etcd too)")


def report_text(data: dict[str, Any]) -> str:
    info, o = data["machine"], data["options"]
    busy = [s["machine_busy_cores"] for s in data["peer_samples"]]
    steal = [s["steal_cores"] for s in data["peer_samples"] if "steal_cores" in s]
    steal_text = (f"; the hypervisor took {statistics.median(steal):.2f} cores (median over windows, max "
                  f"{max(steal):.2f})" if steal else "")
    text = (
        f"{'quick smoke run' if o['quick'] else 'full run'}: {o['rounds']} round(s), {o['seconds']:g} s windows "
        f"(at most {o['max_calls']} calls) @{', @'.join(map(str, o['concurrency']))}\n"
        f"machine: {info['nproc']} cores, {info['cpu']}, Python {info['python']}, grpcio {info['grpcio']} "
        f"(AutoGen's venv: {data.get('autogen_grpcio', '?')}), {info.get('openssl', 'OpenSSL ?')} (hivemesh's direct "
        f"links' TLS), {info['date']}, load {info['loadavg_at_start']:.2f} "
        f"at start, wall {info['wall_s']} s; the whole machine was busy {statistics.median(busy or [0]):.2f} cores "
        f"(median over windows, ours included){steal_text}\n"
        f"code: commit {info.get('commit') or '?'} + {info.get('uncommitted_files', '?')} uncommitted file(s)\n"
        f"{_settled_text(data['peer_samples'])}\n\n"
        "### The user's path: the three systems\n\n"
    )
    text += render(summarize(data["peer_samples"]), o["systems"], o["sizes"], o["concurrency"], data["peer_samples"])
    text += "\n".join(_sched_table(data["peer_samples"], o["systems"], o["sizes"], max(o["concurrency"])))
    text += "\n".join(_host_table(data["peer_samples"], o["systems"], o["sizes"], max(o["concurrency"])))
    if data.get("internal_samples"):
        paths = mesh_cost._path_infos({"paths": data["internal_paths"], "samples": data["internal_samples"]})
        io = data["internal_options"]
        text += (f"\n### bench/mesh_cost.py's internal paths, same run ({io['calls']} calls @1, {io['seconds']:g} s "
                 "windows)\n\n")
        text += mesh_cost.render(mesh_cost.summarize(data["internal_samples"], paths), paths,
                                 data["internal_options"])
    return text


async def driver(opts: argparse.Namespace, internal: argparse.Namespace) -> dict[str, Any]:
    bench = PeersBench(opts, internal)
    started = time.monotonic()
    info = mesh_cost.machine()
    try:
        await bench.start()
        log.info("everything up in %.1f s", time.monotonic() - started)
        await bench.run()
    finally:
        await bench.stop()
    info["wall_s"] = round(time.monotonic() - started, 1)
    return {
        "machine": info,
        "options": {k: v for k, v in vars(opts).items() if k not in ("json", "autogen_python")},
        "peer_samples": bench.peer_samples,
        "internal_options": {k: v for k, v in vars(internal).items()},
        "internal_paths": [{"key": p.key, "title": p.title, "labels": [c.label for c in p.processes]}
                           for p in bench.paths],
        "internal_samples": bench.samples,
    }


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["_child"]:
        child_main(argv)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 1 s windows")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; quick 1)")
    p.add_argument("--seconds", type=float, default=None, help="window per cell (default 3; quick 1)")
    p.add_argument("--max-calls", type=int, default=20_000, help="calls per window at most")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--sizes", type=int, nargs="+", default=[200, 64 * 1024])
    p.add_argument("--systems", nargs="+", choices=list(TITLES), default=list(TITLES))
    p.add_argument("--internal", nargs="+", default=["a", "f", "b", "l", "c"],
                   choices=["a", "f", "b", "l", "c", "u", "none"],
                   help="bench/mesh_cost.py paths measured in the same run (none: skip them)")
    p.add_argument("--json", default="", help="also write every sample to this file")
    p.add_argument("--report", default="", metavar="JSON", help="only print the report of a saved --json file")
    p.add_argument("--profile", default="", help="cProfile every hivemesh process (client, agent, control plane, "
                   "internal paths) into <dir>/<process>.prof; slows them: for hot spots, not for figures")
    p.add_argument("--keep-tmp", action="store_true")
    opts = p.parse_args(argv)
    if opts.report:
        sys.stdout.write(report_text(json.loads(Path(opts.report).read_text())))
        return 0
    opts.rounds = opts.rounds or (1 if opts.quick else 3)
    opts.seconds = opts.seconds or (1.0 if opts.quick else 3.0)
    opts.warmup = 30 if opts.quick else 100
    if opts.rounds < 1 or opts.seconds <= 0 or min(opts.sizes) < 16 or min(opts.concurrency) < 1:
        p.error("rounds >= 1, seconds > 0, sizes >= 16 bytes, concurrency >= 1")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    opts.autogen_python = autogen_python() if "autogen" in opts.systems else ""
    paths = [] if "none" in opts.internal else sorted(set(opts.internal) | {"a"}, key="afblcu".index)
    internal = argparse.Namespace(  # mesh_cost's options for its internal paths (no re-measuring: one run's noise)
        quick=opts.quick, rounds=opts.rounds, paths=paths, sizes=opts.sizes, concurrency=[16],
        calls=200 if opts.quick else 500, seconds=opts.seconds, no_content_screen=False,
        profile=str(Path(opts.profile).resolve()) if opts.profile else "", keep_tmp=opts.keep_tmp,
        max_foreign=1e9, retries=0, quiet_wait_s=0.0, retry_budget=0, warmup=30 if opts.quick else 100,
        ramp_s=0.2 if opts.quick else 0.5, latency_max_s=10.0, soak_minutes=0.0, cert_ttl=3600,
    )
    if internal.profile:
        os.makedirs(internal.profile, exist_ok=True)
    data = asyncio.run(driver(opts, internal))
    if opts.autogen_python:
        data["autogen_grpcio"] = subprocess.run([opts.autogen_python, "-c", "import grpc; print(grpc.__version__)"],
                                                capture_output=True, text=True).stdout.strip()
    sys.stdout.write(report_text(data))
    if opts.json:
        Path(opts.json).write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""What one mesh call costs in CPU instructions, counted instead of timed, so a loaded shared machine cannot skew it.

Wall-clock and CPU-time ratios from `mesh_cost.py` move by ±7% between paired runs when other sessions share the
cores. Instruction counts move far less: this bench runs one process under `valgrind --tool=callgrind` that makes

    (a) direct    plain grpc.aio client → plain grpc.aio agent (plaintext loopback), both in this process
    (b) in-proc   MeshClient (proxyless) → SDK AgentServer (mTLS, token, authz, input guard with schema and
                  content screen, audit), both in this process; everything on, as mesh_cost.py's path (b)

calls in an idle phase and four call phases (direct n1, mesh n1, direct n2, mesh n2). Instrumentation is off
until both paths are warm (`--instr-atstart=no`, then `callgrind_control --instr=on`: start-up deadlines hold),
and the paths are warmed again instrumented. Each phase starts with a marker
call (`os.sched_get_priority_max`, which nothing else calls) that callgrind dumps its counters before
(`--dump-before`), so every phase's instructions (all threads: gRPC's pollers included) land in their own dump.
Per call = (phase n2 - phase n1) / (n2 - n1): start-up, warm-up and the marker cancel out. The ratio is mesh over
direct from the same process; the etcd member and the control plane run natively in their own processes (mesh_cost's
own `Bench.start()`), uncounted, as mesh_cost.py's CPU figures leave them out of the path.

What is left of the noise is clock-paced background (watch probes, status, lease refreshes, audit shipping): ~50x
more of it per call under callgrind, since each call takes ~50x longer. The idle phase measures its rate, and the
"less background" figure subtracts rate x phase wall time. The direct path, the same code in any tree, shows the
noise floor (±3-5% between paired runs in BENCHMARKS.md).

    .venv/bin/python bench/mesh_instructions.py                    # callgrind, n1=20 n2=120 (~1-3 min on 2 cores)
    .venv/bin/python bench/mesh_instructions.py --n1 20 --n2 220 --idle 15 --json out.json   # BENCHMARKS.md's runs
    .venv/bin/python bench/mesh_instructions.py --no-valgrind      # smoke run: CPU seconds per phase, no counts
    .venv/bin/python bench/mesh_instructions.py --no-valgrind --n2 300 --profile p.prof  # cProfile 300 mesh calls

It imports only what every tree since 37ff495 has (mesh_cost.Bench, its PlainEcho and SDK echo agent, MeshClient,
AgentServer), so the same file copied into an older checkout measures that checkout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mesh_cost  # the bench's own infrastructure, from this same tree

AGENT = "bench-inproc"  # names mesh_cost's authz policy allows: bench-client may call bench-inproc's echo-inproc
CLIENT = "bench-client"
CAPABILITY = "echo-inproc"
CALL_TIMEOUT_S = 120.0  # callgrind runs the process ~50x slower
PHASES = ("idle", "direct-n1", "mesh-n1", "direct-n2", "mesh-n2")


def _marker() -> None:
    """Callgrind dumps its counters just before this libc call (`--dump-before=sched_get_priority_max`)."""
    os.sched_get_priority_max(os.SCHED_OTHER)


# ==== the measured process =======================================================================================
async def measure(
    n1: int, n2: int, size: int, warmup: int, idle_s: float, profile: str = ""
) -> list[dict[str, Any]]:
    """Set up both paths in this process, warm them, then run the marked phases; per-phase CPU and wall.

    The idle phase makes no calls: what the process does meanwhile (registry and policy watch probes, status
    publishing, lease refreshes, audit shipping) is paced by the clock, not by calls, and the slower the process
    runs (callgrind, a loaded machine) the more of it lands in each call's phase. Its rate per second is what
    `corrected` subtracts.

    profile: also cProfile the long mesh phase into this file. Its call counts are deterministic too, and name the
    Python functions an instruction difference comes from (callgrind sees only the interpreter's C functions)."""
    import cProfile

    import grpc

    from hivemesh.mesh.errors import NoLiveInstanceError
    from hivemesh.mesh.settings import MeshSettings
    from hivemesh.sdk import AgentServer, MeshClient
    from hivemesh.v1 import agent_pb2, agent_pb2_grpc

    payload = mesh_cost.payload_of(size)
    async with contextlib.AsyncExitStack() as stack:
        server, port = await mesh_cost._serve_plain("bench-direct", "echo")
        stack.push_async_callback(server.stop, 0.5)
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
        invoke = agent_pb2_grpc.AgentStub(channel).Invoke

        async def direct() -> Any:
            req = agent_pb2.InvokeRequest(
                capability="echo", input=json.dumps(payload, separators=(",", ":")).encode(),
                content_type=mesh_cost.JSON_TYPE,
            )
            resp = await invoke(req, timeout=CALL_TIMEOUT_S)
            return json.loads(resp.output)

        # Identities joined by the driver (natively): under callgrind a join's key generation outlasts its deadline.
        agent_settings = MeshSettings.resolve(
            cert_file=os.environ["BENCH_AGENT_CERT"], key_file=os.environ["BENCH_AGENT_KEY"]
        )
        agent = mesh_cost._sdk_agent(AGENT, CAPABILITY)
        try:  # issue 9 replaced AgentServer's keyword options with a config; both default to everything on
            from hivemesh.sdk import AgentServerConfig  # type: ignore[attr-defined,unused-ignore]
        except ImportError:
            agent_server = AgentServer(agent, agent_settings)
        else:
            agent_server = AgentServer(agent, agent_settings, AgentServerConfig())
        await stack.enter_async_context(agent_server)
        mesh = await stack.enter_async_context(MeshClient.connect(
            name=CLIENT, kind="client",
            settings=MeshSettings.resolve(
                cert_file=os.environ["BENCH_CLIENT_CERT"], key_file=os.environ["BENCH_CLIENT_KEY"]
            ),
        ))
        if not await mesh.node.registry.wait_for_capability(CAPABILITY, 1, timeout=CALL_TIMEOUT_S):
            raise RuntimeError(f"{CAPABILITY} never appeared in the registry")

        async def via_mesh() -> Any:
            for _ in range(50):
                try:
                    return await mesh.call(CAPABILITY, payload, timeout=CALL_TIMEOUT_S)
                except NoLiveInstanceError:  # a liveness heartbeat late under callgrind; rare, and counted
                    await asyncio.sleep(0.1)
            raise RuntimeError(f"{CAPABILITY} had no live instance for 5 s")

        for name, call in (("direct", direct), ("mesh", via_mesh)):
            out = await call()
            if out != payload:
                raise RuntimeError(f"{name}: wrong echo {str(out)[:200]}")
            for _ in range(warmup):
                await call()
        # Warm: the driver now switches callgrind's instrumentation on (off until here, so start-up runs ~10x
        # faster than instrumented and its deadlines hold on a loaded machine), then says go.
        sys.stdout.write(json.dumps({"ready": True}) + "\n")
        sys.stdout.flush()
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        for call in (direct, via_mesh):  # again, instrumented: callgrind translates the code on its first run
            for _ in range(warmup):
                await call()
        phases: list[dict[str, Any]] = []
        for phase in PHASES:
            call = direct if phase.startswith("direct") else via_mesh
            n = n1 if phase.endswith("n1") else n2
            prof = cProfile.Profile() if profile and phase == "mesh-n2" else None
            _marker()
            cpu0, wall0 = time.process_time(), time.perf_counter()
            if prof is not None:
                prof.enable()
            if phase == "idle":
                n = 0
                await asyncio.sleep(idle_s)
            for _ in range(n):
                await call()
            if prof is not None:
                prof.disable()
                prof.dump_stats(profile)
            phases.append({"phase": phase, "calls": n, "cpu_s": time.process_time() - cpu0,
                           "wall_s": time.perf_counter() - wall0})
        _marker()  # closes the last phase: teardown lands in the final dump
        return phases


def measure_main(argv: list[str]) -> None:
    mesh_cost.die_with_parent_if_asked()  # imported by mesh_cost from wherever its tree keeps it
    p = argparse.ArgumentParser(prog="mesh_instructions.py _measure")
    p.add_argument("--n1", type=int, required=True)
    p.add_argument("--n2", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--idle", type=float, required=True)
    p.add_argument("--profile", default="")
    a = p.parse_args(argv)
    phases = asyncio.run(measure(a.n1, a.n2, a.size, a.warmup, a.idle, a.profile))
    sys.stdout.write(json.dumps({"phases": phases}) + "\n")
    sys.stdout.flush()


# ==== driver =====================================================================================================
def dump_totals(out_file: Path) -> list[int]:
    """Instructions of each callgrind dump in order: out.1, out.2, ... then the final dump (out)."""
    dumps = sorted(out_file.parent.glob(out_file.name + ".*"), key=lambda p: int(p.suffix[1:]))
    totals = []
    for path in [*dumps, out_file]:
        match = re.search(r"^(?:totals|summary):\s*(\d+)", path.read_text(errors="replace"), re.M)
        if match is None:
            raise RuntimeError(f"no totals in {path}")
        totals.append(int(match.group(1)))
    return totals


async def run_measured(proc: asyncio.subprocess.Process, valgrind: bool) -> bytes:
    """Wait for the measured process to be warm, switch callgrind's instrumentation on, say go; its last line."""
    assert proc.stdin is not None and proc.stdout is not None
    while True:
        line = await proc.stdout.readline()
        if not line:
            await proc.wait()
            return b""
        if line.startswith(b"{") and json.loads(line).get("ready"):
            break
    if valgrind:
        control = await asyncio.create_subprocess_exec(
            "callgrind_control", "--instr=on", str(proc.pid), stdout=asyncio.subprocess.DEVNULL,
        )
        if await control.wait() != 0:
            raise RuntimeError("callgrind_control --instr=on failed")
    proc.stdin.write(b"go\n")
    await proc.stdin.drain()
    stdout, _ = await proc.communicate()
    return stdout


async def identity_files(bench: Any, prefix: str, name: str, kind: str) -> dict[str, str]:
    """Join the mesh as name (one-time token, as any node would) and write its certificate and key for the
    measured process; returns the variables naming them."""
    from hivemesh.mesh.tls import join

    env = bench.env
    token = (await bench.join_env(name, kind))["HIVEMESH_JOIN_TOKEN"]
    ca_pem = Path(env["HIVEMESH_CA"]).read_bytes()  # noqa: ASYNC240 - a small file, once
    workload = await join(env["HIVEMESH_JOIN"], ca_pem, token, name, kind, trust_domain=env["HIVEMESH_TRUST_DOMAIN"])
    cert, key = bench.tmp / f"{name}.crt", bench.tmp / f"{name}.key"
    cert.write_bytes(workload.cert_pem)
    key.write_bytes(workload.key_pem)
    key.chmod(0o600)
    return {f"{prefix}_CERT": str(cert), f"{prefix}_KEY": str(key)}


def keep_dumps(tmp: Path, keep: Path) -> None:
    keep.mkdir(parents=True, exist_ok=True)
    for f in tmp.glob("callgrind.out*"):
        shutil.copy(f, keep / f.name)


def per_call(phases: list[dict[str, Any]], key: str) -> dict[str, float]:
    """(phase n2 - phase n1) / (n2 - n1) of `key` for each path: the fixed cost of a phase cancels out."""
    by = {p["phase"]: p for p in phases}
    out = {}
    for path in ("direct", "mesh"):
        lo, hi = by[f"{path}-n1"], by[f"{path}-n2"]
        out[path] = (hi[key] - lo[key]) / (hi["calls"] - lo["calls"])
    return out


async def drive(opts: argparse.Namespace) -> dict[str, Any]:
    bench_opts = argparse.Namespace(
        paths=[], profile=None, retry_budget=0, retries=0, keep_tmp=opts.keep_tmp, no_content_screen=False,
        max_foreign=1.0, quiet_wait_s=0.0, soak_minutes=0.0, cert_ttl=3600,
    )
    bench = mesh_cost.Bench(bench_opts)
    try:
        await bench.start()  # etcd + control plane + grants + authz, as mesh_cost.py runs them (natively)
        env = {
            **os.environ, **bench.env, mesh_cost.PARENT_ENV: str(os.getpid()),
            **await identity_files(bench, "BENCH_AGENT", AGENT, "agent"),
            **await identity_files(bench, "BENCH_CLIENT", CLIENT, "client"),
        }
        out_file = bench.tmp / "callgrind.out"
        argv = [sys.executable, __file__, "_measure", "--n1", str(opts.n1), "--n2", str(opts.n2),
                "--size", str(opts.size), "--warmup", str(opts.warmup), "--idle", str(opts.idle)]
        if opts.valgrind:
            valgrind = shutil.which("valgrind")
            if valgrind is None:
                raise RuntimeError("valgrind is not installed (apt-get install valgrind), or use --no-valgrind")
            argv = [valgrind, "--tool=callgrind", "--instr-atstart=no", "--dump-before=sched_get_priority_max",
                    f"--callgrind-out-file={out_file}", *argv]
        started = time.monotonic()
        if opts.profile:
            argv += ["--profile", opts.profile]
        with open(bench.tmp / "measure.log", "wb") as log_file:  # noqa: ASYNC230 - before the child starts
            proc = await asyncio.create_subprocess_exec(
                *argv, env=env, cwd=str(bench.tmp), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
            )
        try:
            stdout = await asyncio.wait_for(run_measured(proc, opts.valgrind), opts.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"the measured process did not finish within {opts.timeout:.0f} s") from None
        if proc.returncode != 0:
            tail = (bench.tmp / "measure.log").read_text(errors="replace").splitlines()[-20:]
            raise RuntimeError(f"the measured process exited {proc.returncode}:\n  " + "\n  ".join(tail))
        phases: list[dict[str, Any]] = json.loads(stdout.decode().strip().splitlines()[-1])["phases"]
        phases = [p for p in phases if p["phase"] in PHASES]
        result: dict[str, Any] = {
            "n1": opts.n1, "n2": opts.n2, "size": opts.size, "warmup": opts.warmup,
            "elapsed_s": time.monotonic() - started, "phases": phases,
            "cpu_us_per_call": {k: v * 1e6 for k, v in per_call(phases, "cpu_s").items()},
        }
        if opts.valgrind:
            totals = dump_totals(out_file)
            # dumps: [start-up .. marker 0], then one per phase, then [last marker .. exit]
            if len(totals) != len(PHASES) + 2:
                raise RuntimeError(f"expected {len(PHASES) + 2} callgrind dumps, got {len(totals)}: {totals}")
            for phase, total in zip(phases, totals[1:-1], strict=True):
                phase["instructions"] = total
            result["startup_instructions"] = totals[0]
            result["instructions_per_call"] = per_call(phases, "instructions")
            idle = phases[0]
            rate = idle["instructions"] / idle["wall_s"]
            result["idle_instructions_per_s"] = rate
            for phase in phases:
                phase["corrected"] = phase["instructions"] - rate * phase["wall_s"]
            result["corrected_instructions_per_call"] = per_call(phases, "corrected")
            if opts.keep_dumps:
                keep_dumps(bench.tmp, Path(opts.keep_dumps))
        return result
    finally:
        await bench.stop()


def report(result: dict[str, Any]) -> str:
    lines = [f"size {result['size']} B, n1={result['n1']} n2={result['n2']} (warm-up {result['warmup']}), "
             f"{result['elapsed_s']:.0f} s"]
    ipc = result.get("instructions_per_call")
    cpu = result["cpu_us_per_call"]
    if ipc:
        lines.append(f"  instructions/call  direct {ipc['direct']:,.0f}  in-process mesh {ipc['mesh']:,.0f}  "
                     f"ratio {ipc['mesh'] / ipc['direct']:.3f}")
        fixed = result["corrected_instructions_per_call"]
        rate = result["idle_instructions_per_s"]
        lines.append(f"  less the clock-paced background ({rate:,.0f} instructions/s idle): "
                     f"direct {fixed['direct']:,.0f}  mesh {fixed['mesh']:,.0f}  "
                     f"ratio {fixed['mesh'] / fixed['direct']:.3f}")
        lines.append("  per phase: " + ", ".join(
            f"{p['phase']} {p['instructions']:,} ({p['calls']} calls, {p['wall_s']:.1f} s)" for p in result["phases"]
        ))
    lines.append(f"  CPU µs/call{' (under valgrind)' if ipc else ''}  direct {cpu['direct']:,.0f}  "
                 f"mesh {cpu['mesh']:,.0f}  ratio {cpu['mesh'] / cpu['direct']:.3f}")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["_measure"]:
        measure_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n1", type=int, default=20, help="calls per path in the short phases")
    p.add_argument("--n2", type=int, default=120, help="calls per path in the long phases")
    p.add_argument("--size", type=int, default=200, help="payload bytes (compact JSON)")
    p.add_argument("--warmup", type=int, default=20, help="calls per path before the first phase")
    p.add_argument("--idle", type=float, default=20.0, help="seconds of the no-call phase (background rate)")
    p.add_argument("--no-valgrind", dest="valgrind", action="store_false", help="CPU seconds only (smoke run)")
    p.add_argument("--timeout", type=float, default=1800.0, help="bound on the measured process, seconds")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--keep-dumps", help="copy callgrind's dumps here (for callgrind_annotate)")
    p.add_argument("--keep-tmp", action="store_true")
    p.add_argument("--profile", help="cProfile the long mesh phase into this file (best with --no-valgrind)")
    opts = p.parse_args()
    if opts.n2 <= opts.n1:
        p.error("--n2 must be larger than --n1")
    if opts.profile:
        opts.profile = os.path.abspath(opts.profile)  # the measured process runs in the bench's temporary dir
    result = asyncio.run(drive(opts))
    sys.stdout.write(report(result) + "\n")
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

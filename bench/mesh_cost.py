"""What the mesh costs: one echo capability called four ways, every server and client in its own process.

    (a) direct    plain grpc.aio client → plain grpc.aio agent (plaintext loopback): the floor
    (f) 2 hops    client → raw-bytes proxy → (mTLS) → raw-bytes proxy → agent: a sidecar path with no mesh work
    (b) in-proc   MeshClient (proxyless) → SDK AgentServer (mTLS, token, authz, input guard, routing, audit),
                  each call a unary RPC (HIVEMESH_LINK=0)
    (l) link      (b) as shipped (HIVEMESH_LINK on): each call a frame on one multiplexed Link stream, same layers
    (c) sidecar   plain client → caller's Sidecar (Mesh.Link) → callee's Sidecar (the same inbound work) → agent
                  (serving Agent.Link): the sidecar path as shipped, each end keeping one link to its sidecar
    (u) unary     (c) with unary ends: Mesh.Call in, Invoke out (a caller and an agent that speak no links)

Per path and payload (200 B and 64 KiB of JSON): p50/p99 latency one call at a time, calls/s at 16 and 64 in
flight, and the CPU time per call of every process on the path (utime + stime from /proc/<pid>/stat around each
measured window). Rounds interleave the paths; figures are medians over rounds; ratios are to (a) in the same
run, because grpcio's speed moves with versions and machines.

    /tmp/v/bin/python bench/mesh_cost.py            # full run (3 rounds, ~7-9 min on 2 cores)
    /tmp/v/bin/python bench/mesh_cost.py --quick    # smoke run (1 round, ~50 s)
    .venv/bin/python bench/mesh_cost.py --paths c u --sizes 200 --soak-minutes 30   # soak, by hand (~31 min)
    .venv/bin/python bench/mesh_cost.py --paths l c --sizes 200 --soak-minutes 30 --cert-ttl 300  # ~12 renewals

A soak calls every mesh path (b, l, c, u) at once at a steady rate instead of the rounds: failed calls, the RSS
and open fds of every process on the path every 10 s, and each call's audit record at the control plane.

The same file is every child process too (`_child <role>`), so the bench needs nothing outside this repo.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import platform
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import grpc

from hivemesh.mesh import loop
from hivemesh.mesh.lifeline import PARENT_ENV, die_with_parent_if_asked
from hivemesh.mesh.tls import STREAM_WINDOW_OPTIONS
from hivemesh.v1 import agent_pb2, agent_pb2_grpc, mesh_pb2_grpc

log = logging.getLogger("bench.mesh_cost")

TRUST_DOMAIN = "hivemesh.local"
JSON_TYPE = "application/json"
CALL_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 60.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_ECHO_SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {"text": {"type": "string"}},
        "required": ["text"],
        "additionalProperties": False,
    },
    sort_keys=True,
)
_AUTHZ = {  # authorization is default deny: allow exactly the bench's two mesh callers, as an operator would
    "kind": "authz",
    "name": "bench",
    "spec": {"rules": [
        {"name": "bench-client-calls-inproc", "action": "ALLOW",
         "from": {"callers": [f"spiffe://{TRUST_DOMAIN}/client/bench-client"]},
         "to": {"agents": [f"spiffe://{TRUST_DOMAIN}/agent/bench-inproc"], "capabilities": ["echo-inproc"]}},
        {"name": "bench-link-client-calls-link", "action": "ALLOW",
         "from": {"callers": [f"spiffe://{TRUST_DOMAIN}/client/bench-client-link"]},
         "to": {"agents": [f"spiffe://{TRUST_DOMAIN}/agent/bench-link"], "capabilities": ["echo-link"]}},
        *({"name": f"bench-caller-calls-plain-{k}", "action": "ALLOW",
           "from": {"callers": [f"spiffe://{TRUST_DOMAIN}/agent/bench-caller-{k}"]},
           "to": {"agents": [f"spiffe://{TRUST_DOMAIN}/agent/bench-plain-{k}"], "capabilities": [f"echo-sidecar-{k}"]}}
          for k in ("c", "u")),
    ]},
}
_GRANTS = {
    "grants": [
        {"name": "bench-clients", "subjects": [f"spiffe://{TRUST_DOMAIN}/client/*"], "capabilities": ["*"]},
        {"name": "bench-agents", "subjects": [f"spiffe://{TRUST_DOMAIN}/agent/*"], "capabilities": ["*"]},
    ]
}


def payload_of(size: int) -> dict[str, str]:
    """A JSON object whose compact encoding is exactly size bytes."""
    overhead = len(json.dumps({"text": ""}, separators=(",", ":")))
    return {"text": "x" * (size - overhead)}


def _emit(obj: dict[str, Any]) -> None:
    """One protocol line to the driver (children talk JSON lines on stdout; logs go to stderr)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# ==== child roles ================================================================================================
class PlainEcho(agent_pb2_grpc.AgentServicer):
    """An agent as one in any language would be: generated stubs, JSON in, JSON out, nothing else."""

    def __init__(self, name: str, capability: str) -> None:
        self._card = agent_pb2.AgentCard(
            name=name,
            version="1.0.0",
            description="bench echo",
            owner="bench",
            capabilities=[
                agent_pb2.Capability(
                    name=capability, description="echo the text", input_schema=_ECHO_SCHEMA,
                    idempotent=True, input_modes=[JSON_TYPE], output_modes=[JSON_TYPE],
                )
            ],
        )

    async def Describe(self, request: agent_pb2.DescribeRequest, context: Any) -> agent_pb2.AgentCard:
        return self._card

    async def InvokeStream(
        self, request: agent_pb2.InvokeRequest, context: Any
    ) -> AsyncIterator[agent_pb2.InvokeChunk]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the bench agent streams nothing")
        yield agent_pb2.InvokeChunk()  # never reached: abort raises

    async def Invoke(self, request: agent_pb2.InvokeRequest, context: Any) -> agent_pb2.InvokeResponse:
        value = json.loads(request.input)
        return agent_pb2.InvokeResponse(
            output=json.dumps({"text": value["text"]}, separators=(",", ":")).encode(),
            content_type=JSON_TYPE,
            state=agent_pb2.TASK_STATE_COMPLETED,
        )


class LinkedPlainEcho(PlainEcho):
    """PlainEcho that also serves Agent.Link (as an agent in any language may: docs/any-language.md), with
    hivemesh's frame server and no interceptor: the frames run its Invoke and nothing else."""

    def __init__(self, name: str, capability: str) -> None:
        from hivemesh.mesh.link_server import LinkServer

        super().__init__(name, capability)
        self._link = LinkServer(None, grpc.unary_unary_rpc_method_handler(
            self.Invoke, request_deserializer=agent_pb2.InvokeRequest.FromString,
            response_serializer=agent_pb2.InvokeResponse.SerializeToString,
        ))

    async def Link(self, request_iterator: Any, context: Any) -> AsyncIterator[agent_pb2.LinkFrame]:  # type: ignore[override]
        async for frame in self._link.serve(request_iterator, context):
            yield frame


async def _serve_plain(name: str, capability: str, link: bool = False) -> tuple[grpc.aio.Server, int]:
    # An agent that serves Agent.Link gives the link's stream the 1 MiB window docs/any-language.md asks for
    # (with gRPC's default 64 KiB each 64 KiB call waits a round trip for a window update); one that does not, as
    # an agent in any language would be, keeps gRPC's defaults.
    server = grpc.aio.server(options=list(STREAM_WINDOW_OPTIONS) if link else None)
    agent_pb2_grpc.add_AgentServicer_to_server((LinkedPlainEcho if link else PlainEcho)(name, capability), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def child_plain_agent(args: argparse.Namespace) -> None:
    server, port = await _serve_plain(args.name, args.capability, args.link)
    _emit({"ready": True, "port": port})
    try:
        await _until_signal()
    finally:
        await server.stop(0.5)


def _read_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


async def _join(name: str, kind: str) -> Any:
    """A workload certificate from the mesh's CA (the same join flow agents use)."""
    from hivemesh.mesh.tls import join

    ca_pem = _read_bytes(os.environ["HIVEMESH_CA"])
    return await join(
        os.environ["HIVEMESH_JOIN"], ca_pem,
        os.environ["HIVEMESH_JOIN_TOKEN"], name, kind, trust_domain=TRUST_DOMAIN,
    )


class _Forward(grpc.GenericRpcHandler):
    """Forwards any unary call as raw bytes (no parsing, no metadata), keeping only the deadline."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            upstream: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self._channel.unary_unary(method)

            async def forward(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
                raw: bytes = await upstream(request, timeout=context.time_remaining())
                return raw

            handler = grpc.unary_unary_rpc_method_handler(forward)
            self._handlers[method] = handler
        return handler


async def child_proxy(args: argparse.Namespace) -> None:
    """A bare pass-through hop; `--tls in|out` puts mutual TLS on its listener or on its upstream link."""
    from hivemesh.mesh.pki import parse_spiffe_id
    from hivemesh.mesh.tls import secure_channel

    workload = await _join(args.name, "agent") if args.tls else None
    if args.tls == "out":
        assert workload is not None
        server_name = parse_spiffe_id(args.upstream_identity).dns_name
        channel = secure_channel(args.upstream, workload.channel_credentials(), server_name=server_name)
    else:
        channel = grpc.aio.insecure_channel(args.upstream)
    server = grpc.aio.server(handlers=[_Forward(channel)])
    if args.tls == "in":
        assert workload is not None
        port = server.add_secure_port("127.0.0.1:0", workload.server_credentials(require_client_auth=True))
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    _emit({"ready": True, "port": port, "identity": workload.spiffe_id if workload else ""})
    try:
        await _until_signal()
    finally:
        await server.stop(0.5)
        await channel.close()


class Text(TypedDict):
    text: str


def _sdk_agent(name: str, capability_name: str) -> Any:
    from hivemesh.sdk import Agent, capability

    class BenchEcho(Agent):
        """Echoes the text: the SDK twin of PlainEcho."""

        @capability(name=capability_name, description="echo the text", idempotent=True)
        async def echo(self, req: Text) -> Text:
            return {"text": req["text"]}

    BenchEcho.name = name
    return BenchEcho()


async def child_sdk_agent(args: argparse.Namespace) -> None:
    from hivemesh.mesh.settings import MeshSettings
    from hivemesh.sdk import AgentServer, AgentServerConfig

    config = AgentServerConfig(content_screen=None) if args.no_content_screen else AgentServerConfig()
    async with AgentServer(_sdk_agent(args.name, args.capability), MeshSettings.resolve(), config) as server:
        _emit({"ready": True, "port": server.port})
        await _until_signal()


Caller = Callable[[dict[str, str]], Awaitable[Any]]


async def _client_caller(args: argparse.Namespace, stack: contextlib.AsyncExitStack) -> Caller:
    """The call each client kind makes; every kind encodes JSON, sets a deadline and decodes JSON per call."""
    if args.kind in ("agent", "mesh"):
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(args.target))
        stub: Any = agent_pb2_grpc.AgentStub(channel) if args.kind == "agent" else mesh_pb2_grpc.MeshStub(channel)
        method = stub.Invoke if args.kind == "agent" else stub.Call
        capability = args.capability

        async def plain_call(payload: dict[str, str]) -> Any:
            req = agent_pb2.InvokeRequest(
                capability=capability, input=json.dumps(payload, separators=(",", ":")).encode(),
                content_type=JSON_TYPE,
            )
            resp = await method(req, timeout=CALL_TIMEOUT_S)
            return json.loads(resp.output)

        return plain_call
    if args.kind == "mesh-link":  # a local caller keeping one Mesh.Link to its sidecar (docs/any-language.md)
        from hivemesh.mesh.outbound.link import MESH_LINK, LinkedInvoke

        # The answers come back on the link's one stream: the 1 MiB window the doc asks of the side that receives.
        channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(args.target, options=list(STREAM_WINDOW_OPTIONS)))
        linked = LinkedInvoke(channel, channel.unary_unary("/hivemesh.v1.Mesh/Call"), path=MESH_LINK)
        stack.callback(linked.close)
        capability = args.capability

        async def linked_call(payload: dict[str, str]) -> Any:
            req = agent_pb2.InvokeRequest(
                capability=capability, input=json.dumps(payload, separators=(",", ":")).encode(),
                content_type=JSON_TYPE,
            )
            raw = await linked(req.SerializeToString(), timeout=CALL_TIMEOUT_S)
            return json.loads(agent_pb2.InvokeResponse.FromString(raw).output)

        return linked_call
    from hivemesh.mesh.settings import MeshSettings
    from hivemesh.sdk import MeshClient

    mesh = await stack.enter_async_context(
        MeshClient.connect(name=args.name, kind="client", settings=MeshSettings.resolve())
    )
    if not await mesh.node.registry.wait_for_capability(args.capability, 1, timeout=READY_TIMEOUT_S):
        raise RuntimeError(f"capability {args.capability} never appeared in the registry")
    capability = args.capability

    async def mesh_call(payload: dict[str, str]) -> Any:
        return await mesh.call(capability, payload, timeout=CALL_TIMEOUT_S)

    return mesh_call


def _pct(sorted_values: Sequence[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def _warmup(call: Caller, payload: dict[str, str], n: int, max_s: float) -> dict[str, Any]:
    """Retry until the path answers (registries may still be filling), check the echo, then n more calls."""
    deadline = time.monotonic() + max_s
    last = ""
    while True:
        try:
            out = await call(payload)
            break
        except grpc.aio.AioRpcError as exc:
            last = f"{exc.code().name}: {exc.details()}"
        except Exception as exc:  # noqa: BLE001 - MeshClient raises typed mesh errors; any is retried here
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            raise RuntimeError(f"the path never answered within {max_s:.0f} s: {last}")
        await asyncio.sleep(0.1)
    if out != payload:
        raise RuntimeError(f"wrong echo: sent {len(payload['text'])} chars, got {str(out)[:200]}")
    for _ in range(n):
        if time.monotonic() >= deadline:
            break
        await call(payload)
    return {"ok": True}


async def _latency(call: Caller, payload: dict[str, str], n: int, max_s: float) -> dict[str, Any]:
    """n calls one at a time (fewer if max_s runs out); per-call wall time."""
    times: list[float] = []
    start = time.perf_counter()
    deadline = start + max_s
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        await call(payload)
        t1 = clock()
        times.append(t1 - t0)
        if t1 >= deadline:
            break
    elapsed = time.perf_counter() - start
    times.sort()
    return {
        "calls": len(times), "elapsed_s": elapsed,
        "p50_us": _pct(times, 0.50) * 1e6, "p99_us": _pct(times, 0.99) * 1e6,
        "mean_us": statistics.fmean(times) * 1e6,
    }


async def _throughput(call: Caller, payload: dict[str, str], concurrency: int, seconds: float) -> dict[str, Any]:
    """concurrency callers in a closed loop for `seconds`; counts calls completed inside the window."""
    max_calls_each = 1_000_000
    start = time.perf_counter()
    deadline = start + seconds
    errors: list[str] = []

    async def worker() -> int:
        done = 0
        while done < max_calls_each and time.perf_counter() < deadline:
            try:
                await call(payload)
            except Exception as exc:  # noqa: BLE001 - counted and reported, never hidden
                if len(errors) < 5:
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            done += 1
        return done

    counts = await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {"calls": sum(counts), "elapsed_s": elapsed, "calls_per_s": sum(counts) / elapsed, "errors": errors}


async def _soak(call: Caller, payload: dict[str, str], rate: float, seconds: float) -> dict[str, Any]:
    """Calls at a steady rate for `seconds`, each its own task, so a slow call does not hold the next ones back
    (every call is bounded by CALL_TIMEOUT_S). A call fails when it raises or answers other than its input."""
    loop = asyncio.get_running_loop()
    ok = failed = 0
    errors: dict[str, int] = {}
    inflight: set[asyncio.Task[None]] = set()

    async def one() -> None:
        nonlocal ok, failed
        try:
            answer = await call(payload)
            if answer != payload:
                raise AssertionError("the echo answered something else")
            ok += 1
        except Exception as exc:  # noqa: BLE001 - counted and reported, never hidden
            failed += 1
            key = f"{type(exc).__name__}: {exc}"[:200]
            errors[key] = errors.get(key, 0) + 1

    start = loop.time()
    n = 0
    while loop.time() - start < seconds:
        task = loop.create_task(one())
        inflight.add(task)
        task.add_done_callback(inflight.discard)
        n += 1
        await asyncio.sleep(max(0.0, start + n / rate - loop.time()))
    await asyncio.gather(*inflight)
    return {"calls": n, "ok": ok, "failed": failed, "errors": errors, "elapsed_s": loop.time() - start}


async def child_client(args: argparse.Namespace) -> None:
    """A load generator driven by JSON-line commands on stdin; optionally also serves an idle plain agent (the
    caller behind the caller's sidecar: a sidecar needs an agent to front)."""
    async with contextlib.AsyncExitStack() as stack:
        extra_port = 0
        if args.serve_as:
            name, cap = args.serve_as.split(":")
            server, extra_port = await _serve_plain(name, cap)
            stack.push_async_callback(server.stop, 0.5)
            _emit({"serving": True, "port": extra_port})
            # The caller's sidecar starts only now (it needs this agent); the driver then names its Mesh port.
            line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            args.target = json.loads(line)["target"]
        call = await _client_caller(args, stack)
        _emit({"ready": True})
        payloads: dict[int, dict[str, str]] = {}
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "quit":
                _emit({"bye": True})
                return
            size = int(cmd["size"])
            payload = payloads.setdefault(size, payload_of(size))
            try:
                if op == "warmup":
                    result = await _warmup(call, payload, int(cmd["n"]), float(cmd["max_s"]))
                elif op == "latency":
                    result = await _latency(call, payload, int(cmd["n"]), float(cmd["max_s"]))
                elif op == "throughput":
                    result = await _throughput(call, payload, int(cmd["concurrency"]), float(cmd["seconds"]))
                elif op == "soak":
                    result = await _soak(call, payload, float(cmd["rate"]), float(cmd["seconds"]))
                else:
                    result = {"error": f"unknown op {op}"}
            except Exception as exc:  # noqa: BLE001 - reported to the driver, which stops the run
                result = {"error": f"{type(exc).__name__}: {exc}"}
            _emit(result)


CHILDREN: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, None]]] = {
    "plain-agent": child_plain_agent,
    "proxy": child_proxy,
    "sdk-agent": child_sdk_agent,
    "client": child_client,
}


def child_main(argv: Sequence[str]) -> None:
    die_with_parent_if_asked()
    p = argparse.ArgumentParser(prog="mesh_cost.py _child")
    p.add_argument("role", choices=sorted(CHILDREN))
    p.add_argument("--name", default="")
    p.add_argument("--capability", default="echo")
    p.add_argument("--upstream", default="")
    p.add_argument("--upstream-identity", default="")
    p.add_argument("--tls", choices=["in", "out"], default=None)
    p.add_argument("--kind", choices=["agent", "mesh", "mesh-link", "meshclient"], default="agent")
    p.add_argument("--link", action="store_true", help="plain-agent: also serve Agent.Link")
    p.add_argument("--target", default="")
    p.add_argument("--serve-as", default="")
    p.add_argument("--no-content-screen", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("hivemesh.mesh.node").setLevel(logging.INFO)  # its renewals: a soak counts them (RENEWED)
    profile_to = os.environ.get("BENCH_PROFILE_TO")
    if not profile_to:
        loop.run(CHILDREN[args.role](args))  # every path's processes on the same loop (hivemesh's)
        return
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    try:
        loop.run(CHILDREN[args.role](args))  # every path's processes on the same loop (hivemesh's)
    finally:
        prof.disable()
        prof.dump_stats(profile_to)


# ==== driver =====================================================================================================
def _open_log(path: Path) -> Any:
    return open(path, "wb")


def system_cpu_seconds() -> tuple[float, float, float]:
    """(process time, interrupt time, steal) of the whole machine since boot, all cores, from /proc/stat.

    Interrupt time (mostly loopback networking softirqs) is charged to no process, so it is kept apart: it is
    part of what our own calls cost, not a sign of other load."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
    return (user + nice + system) / _CLK_TCK, (irq + softirq) / _CLK_TCK, steal / _CLK_TCK


def all_process_cpu() -> dict[int, tuple[str, float]]:
    """(command, CPU seconds) of every process now, to name who else was busy during a noisy window."""
    out: dict[int, tuple[str, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry}/stat") as f:
                    text = f.read()
                fields = text.rpartition(")")[2].split()
                comm = text[text.index("(") + 1: text.rindex(")")]
                out[int(entry)] = (comm, (int(fields[11]) + int(fields[12])) / _CLK_TCK)
    return out


async def wait_idle(max_s: float, cores: float, leave_out: Callable[[], float] = lambda: 0.0) -> tuple[float, bool]:
    """Wait (at most max_s) for half a second in which the machine used at most cores, less what leave_out (CPU
    seconds so far, of processes not to count) grew by: the seconds waited, and whether it came."""
    started = time.monotonic()
    while time.monotonic() - started < max_s:
        busy0, left0, t0 = system_cpu_seconds()[0], leave_out(), time.monotonic()
        await asyncio.sleep(0.5)
        busy = (system_cpu_seconds()[0] - busy0) - (leave_out() - left0)
        if busy / (time.monotonic() - t0) <= cores:
            return time.monotonic() - started, True
    return time.monotonic() - started, False


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of pid, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def run_delay_seconds(pid: int) -> float:
    """Seconds the threads of pid alive now have spent runnable but waiting for a core (the scheduler's run
    delay, /proc/<pid>/task/*/schedstat). Beside CPU time it tells a process held back by others on the machine
    from one waiting for work; 0.0 where the kernel keeps no schedstats."""
    total = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, IndexError, ValueError):  # a thread may end between list and read
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[1])
    return total / 1e9


SOAK_CAPABILITIES: dict[str, str] = {"b": "echo-inproc", "l": "echo-link", "c": "echo-sidecar-c", "u": "echo-sidecar-u"}
"""The paths a soak runs (those with the mesh's layers, so every call leaves an audit record) and their capability."""
SOAK_SAMPLE_S = 10.0


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Child:
    """One child process: its role on the path, its protocol pipe and its stderr log."""

    label: str
    proc: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n    ".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
        return ""

    async def read(self, timeout: float) -> dict[str, Any]:
        """The next JSON line the child prints (bounded; a dead child fails loudly with its log)."""
        assert self.proc.stdout is not None
        while True:
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            except TimeoutError:
                raise RuntimeError(f"{self.label}: no answer within {timeout:.0f} s\n    {self._log_tail()}") from None
            if not line:
                await asyncio.sleep(0.2)
                raise RuntimeError(f"{self.label} exited ({self.proc.returncode}):\n    {self._log_tail()}")
            text = line.decode(errors="replace").strip()
            if text.startswith("{"):
                obj: dict[str, Any] = json.loads(text)
                return obj
            if text.startswith("sidecar ready") or text.startswith("ready controlplane="):
                return {"line": text}

    async def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        await self.proc.stdin.drain()

    async def command(self, obj: dict[str, Any], timeout: float) -> dict[str, Any]:
        await self.send(obj)
        result = await self.read(timeout)
        if "error" in result:
            raise RuntimeError(f"{self.label}: {result['error']}")
        return result

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await asyncio.wait_for(self.proc.wait(), 5.0)


@dataclass
class CallPath:
    """One way of calling echo: its client and the servers/proxies its calls pass through."""

    key: str
    title: str
    client: Child
    servers: list[Child] = field(default_factory=list)

    @property
    def capability(self) -> str:
        """The capability its calls name (each audited path has its own)."""
        return SOAK_CAPABILITIES.get(self.key, "echo")

    @property
    def processes(self) -> list[Child]:
        return [self.client, *self.servers]


class Bench:
    """Starts the mesh and the four paths, runs interleaved rounds, and stops everything it started."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.tmp = Path(tempfile.mkdtemp(prefix="hivemesh-bench-"))
        self.children: list[Child] = []
        self.etcd: Any = None
        self.operator: Any = None
        self.env: dict[str, str] = {}
        self.infra: list[Child] = []
        self.paths: list[CallPath] = []
        self.samples: list[dict[str, Any]] = []
        self.retries_left = opts.retry_budget
        self.retried = 0

    # --- processes --------------------------------------------------------------------------------------------
    async def spawn(self, label: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Child:
        log_path = self.tmp / f"{label}.log"
        if self.opts.profile:
            prof = f"{self.opts.profile}/{label}.prof"  # made absolute in main()
            env = {**(env or {}), "BENCH_PROFILE_TO": prof}
            if argv[1:3] == ["-m", "hivemesh.controlplane.cli"]:
                argv = [argv[0], "-m", "cProfile", "-o", prof, *argv[1:]]
        with _open_log(log_path) as log_file:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                # Children die with the driver (PR_SET_PDEATHSIG, set by each child itself: a preexec_fn would force
                # a plain fork() of this process, which has gRPC threads).
                env={**os.environ, PARENT_ENV: str(os.getpid()), **self.env, **(env or {})},
                cwd=str(self.tmp),
            )
        child = Child(label, proc, log_path)
        self.children.append(child)
        return child

    async def spawn_role(self, label: str, role: str, *args: str, env: dict[str, str] | None = None) -> Child:
        return await self.spawn(label, [sys.executable, __file__, "_child", role, *args], env)

    async def join_env(self, name: str, kind: str) -> dict[str, str]:
        resp = await self.operator.create_join_token(name, kind, 600)
        return {"HIVEMESH_JOIN_TOKEN": resp.token}

    async def start(self) -> None:
        from hivemesh.controlplane.ca import init_ca, load_ca
        from hivemesh.controlplane.etcd_certs import issue_etcd_certs
        from hivemesh.mesh.controlplane_client import ControlPlaneClient
        from hivemesh.mesh.etcd import EtcdServer

        certs = init_ca(self.tmp / "certs", TRUST_DOMAIN)
        tls = issue_etcd_certs(load_ca(certs.certs_dir), certs.certs_dir)  # etcd as `hivemesh up` runs it
        self.etcd = EtcdServer(data_dir=self.tmp / "etcd", log_path=self.tmp / "etcd.log", tls=tls)
        self.etcd.start()
        grants = self.tmp / "grants.yaml"
        grants.write_text(json.dumps(_GRANTS))  # JSON is YAML
        cp = await self.spawn(
            "controlplane",
            [sys.executable, "-m", "hivemesh.controlplane.cli", "--home", str(self.tmp / "home"),
             "--certs-dir", str(self.tmp / "certs"), "controlplane", "--etcd", self.etcd.endpoint,
             "--grants", str(grants), "--cert-ttl", str(self.opts.cert_ttl)],
        )
        line = (await cp.read(READY_TIMEOUT_S))["line"]
        addrs = dict(part.split("=", 1) for part in line.split()[1:])
        self.env = {
            "HIVEMESH_HOME": str(self.tmp / "home"),
            "HIVEMESH_ETCD": self.etcd.endpoint,
            "HIVEMESH_CONTROLPLANE": addrs["controlplane"],
            "HIVEMESH_JOIN": addrs["join"],
            "HIVEMESH_CA": str(certs.ca_cert),
            "HIVEMESH_TRUST_DOMAIN": TRUST_DOMAIN,
        }
        self.operator = ControlPlaneClient.from_certs_dir(addrs["controlplane"], self.tmp / "certs")
        self.infra = [cp]
        await self._apply_authz()
        starters = {"a": self._start_direct, "f": self._start_hops, "b": self._start_inproc,
                    "l": self._start_inproc_link, "c": self._start_sidecar, "u": self._start_sidecar_unary}
        await asyncio.gather(*(starters[k]() for k in self.opts.paths))
        order = {"a": 0, "f": 1, "b": 2, "l": 3, "c": 4, "u": 5}
        self.paths.sort(key=lambda p: order[p.key])

    async def _apply_authz(self) -> None:
        """Apply the bench's authz policy, as `hivemesh policy apply` would (skipped by a tree without policies)."""
        try:
            from hivemesh.controlplane.policies import apply_text
        except ImportError:
            return
        from hivemesh.mesh.etcd import client, wait_connected

        c = client(self.etcd.access)
        try:
            await wait_connected(c)
            await apply_text(c, json.dumps(_AUTHZ))
        finally:
            await c.close()

    async def _ready(self, child: Child) -> dict[str, Any]:
        return await child.read(READY_TIMEOUT_S)

    async def _start_direct(self) -> None:
        agent = await self.spawn_role("a.agent", "plain-agent", "--name", "bench-direct", "--capability", "echo")
        port = (await self._ready(agent))["port"]
        client = await self.spawn_role("a.client", "client", "--kind", "agent", "--target", f"127.0.0.1:{port}")
        await self._ready(client)
        self.paths.append(CallPath("a", "direct", client, [agent]))

    async def _start_hops(self) -> None:
        agent = await self.spawn_role("f.agent", "plain-agent", "--name", "bench-hops", "--capability", "echo")
        agent_port = (await self._ready(agent))["port"]
        hop2 = await self.spawn_role(
            "f.hop2", "proxy", "--name", "bench-hop2", "--tls", "in", "--upstream", f"127.0.0.1:{agent_port}",
            env=await self.join_env("bench-hop2", "agent"),
        )
        r2 = await self._ready(hop2)
        hop1 = await self.spawn_role(
            "f.hop1", "proxy", "--name", "bench-hop1", "--tls", "out", "--upstream", f"127.0.0.1:{r2['port']}",
            "--upstream-identity", r2["identity"], env=await self.join_env("bench-hop1", "agent"),
        )
        r1 = await self._ready(hop1)
        client = await self.spawn_role("f.client", "client", "--kind", "agent", "--target", f"127.0.0.1:{r1['port']}")
        await self._ready(client)
        self.paths.append(CallPath("f", "two bare hops", client, [hop1, hop2, agent]))

    async def _start_inproc(self) -> None:
        unary = {"HIVEMESH_LINK": "0"}  # one unary RPC per call, as before links
        agent = await self.spawn_role(
            "b.agent", "sdk-agent", "--name", "bench-inproc", "--capability", "echo-inproc",
            *(["--no-content-screen"] if self.opts.no_content_screen else []),
            env={**await self.join_env("bench-inproc", "agent"), **unary},
        )
        await self._ready(agent)
        client = await self.spawn_role(
            "b.client", "client", "--kind", "meshclient", "--name", "bench-client", "--capability", "echo-inproc",
            env={**await self.join_env("bench-client", "client"), **unary},
        )
        await self._ready(client)
        self.paths.append(CallPath("b", "in-process mesh, unary", client, [agent]))

    async def _start_inproc_link(self) -> None:
        """(b) with links on at both ends (HIVEMESH_LINK=1, the default), on its own agent and capability."""
        link = {"HIVEMESH_LINK": "1"}
        agent = await self.spawn_role(
            "l.agent", "sdk-agent", "--name", "bench-link", "--capability", "echo-link",
            *(["--no-content-screen"] if self.opts.no_content_screen else []),
            env={**await self.join_env("bench-link", "agent"), **link},
        )
        await self._ready(agent)
        client = await self.spawn_role(
            "l.client", "client", "--kind", "meshclient", "--name", "bench-client-link", "--capability", "echo-link",
            env={**await self.join_env("bench-client-link", "client"), **link},
        )
        await self._ready(client)
        self.paths.append(CallPath("l", "in-process over a link", client, [agent]))

    async def _sidecar(self, label: str, name: str, agent_addr: str) -> tuple[Child, dict[str, str]]:
        child = await self.spawn(
            label,
            # -v in a soak: its renewals are logged (counted by `_renewals`); not in the rounds, where logs cost.
            [sys.executable, "-m", "hivemesh.controlplane.cli", *(["-v"] if self.opts.soak_minutes > 0 else []),
             "sidecar", "--agent", agent_addr, "--name", name,
             *(["--no-content-screen"] if self.opts.no_content_screen else [])],
            env=await self.join_env(name, "agent"),
        )
        line = (await self._ready(child))["line"]
        return child, dict(part.split("=", 1) for part in line.split()[2:])

    async def _start_sidecar(self) -> None:
        await self._start_sidecar_path("c", link=True)

    async def _start_sidecar_unary(self) -> None:
        await self._start_sidecar_path("u", link=False)

    async def _start_sidecar_path(self, key: str, *, link: bool) -> None:
        """link: the caller keeps one Mesh.Link to its sidecar and the agent serves Agent.Link (as shipped; both
        optional for an agent in any language); off: the plain unary ends (Mesh.Call in, Invoke out)."""
        cap = f"echo-sidecar-{key}"
        agent = await self.spawn_role(f"{key}.agent", "plain-agent", "--name", f"bench-plain-{key}",
                                      "--capability", cap, *(["--link"] if link else []))
        agent_port = (await self._ready(agent))["port"]
        callee, _ = await self._sidecar(f"{key}.sidecar-callee", f"bench-plain-{key}", f"127.0.0.1:{agent_port}")
        # The caller is an agent in "any language" too: its client process also serves an idle plain agent, which
        # the caller's sidecar fronts; the client calls echo through that sidecar's loopback Mesh service.
        client = await self.spawn_role(
            f"{key}.client", "client", "--kind", "mesh-link" if link else "mesh", "--capability", cap,
            "--serve-as", f"bench-caller-{key}:caller-noop-{key}",
        )
        caller_agent_port = (await self._ready(client))["port"]
        caller, addrs = await self._sidecar(f"{key}.sidecar-caller", f"bench-caller-{key}",
                                            f"127.0.0.1:{caller_agent_port}")
        await client.send({"target": addrs["mesh"]})
        await self._ready(client)
        self.paths.append(CallPath(key, TITLES[key], client, [caller, callee, agent]))

    async def soak(self) -> list[dict[str, Any]]:
        """Every mesh path at once, each at a steady rate for --soak-minutes: failed calls, every process's RSS and
        open fds every 10 s, then every call's inbound ALLOW record in the control plane's audit log, and its chain."""
        return list(await asyncio.gather(*(self._soak_path(p) for p in self.paths if p.key in SOAK_CAPABILITIES)))

    async def _soak_path(self, path: CallPath) -> dict[str, Any]:
        from hivemesh.controlplane.audit.checkpoints import verify_log
        from hivemesh.controlplane.audit.query import AuditFilter

        o = self.opts
        seconds = o.soak_minutes * 60
        samples: list[dict[str, Any]] = []
        t0 = time.monotonic()

        def sample() -> None:
            samples.append({"t_s": round(time.monotonic() - t0, 1), **{
                c.label: {"rss_mib": round(rss_mib(c.pid), 1), "fds": open_fds(c.pid)} for c in path.processes}})

        async def sampler() -> None:
            while True:
                sample()
                await asyncio.sleep(SOAK_SAMPLE_S)

        log.info("soak: %s at %g calls/s for %g min", path.title, o.soak_rate, o.soak_minutes)
        task = asyncio.get_running_loop().create_task(sampler())
        try:
            result = await path.client.command(
                {"op": "soak", "size": o.sizes[0], "rate": o.soak_rate, "seconds": seconds}, seconds + 60)
        finally:
            task.cancel()
        sample()
        if "error" in result:
            raise RuntimeError(f"{path.title}: soak failed: {result['error']}")
        # Every call is one inbound ALLOW record where the mesh's inbound layers ran (the SDK agent or the callee's
        # sidecar), shipped to the control plane; wait (bounded) for the shipper, then verify the hash chain.
        log_path = self.tmp / "home" / "controlplane" / "audit" / "log.jsonl"
        flt = AuditFilter(capability=path.capability, kind="inbound", decision="allow")
        stored = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            stored = _count_matching(log_path, flt)
            if stored >= result["ok"]:
                break
            await asyncio.sleep(0.5)
        report = verify_log(log_path.read_bytes().splitlines() if log_path.exists() else [])
        warm = samples[min(1, len(samples) - 1)]  # 10 s in: connections, links and caches exist
        return {
            "path": path.key, "title": path.title, "minutes": o.soak_minutes, "rate_per_s": o.soak_rate,
            "size": o.sizes[0], "cert_ttl_s": o.cert_ttl, **result, "audit_records": stored,
            "audit_expected": result["ok"],
            "audit_chain_ok": bool(report.ok),
            "processes": {c.label: {
                "rss_warm_mib": warm[c.label]["rss_mib"], "rss_last_mib": samples[-1][c.label]["rss_mib"],
                "rss_max_mib": max(s[c.label]["rss_mib"] for s in samples), "fds_warm": warm[c.label]["fds"],
                "fds_last": samples[-1][c.label]["fds"], "fds_max": max(s[c.label]["fds"] for s in samples),
                "renewals": _renewals(c.log_path),
            } for c in path.processes},
            "samples": samples,
        }

    async def stop(self) -> None:
        """Stop everything this run started, clients first (bounded at every step)."""
        for path in self.paths:  # a clean exit (not a signal) lets a profiled client write its profile
            with contextlib.suppress(Exception):
                await path.client.command({"op": "quit"}, 5.0)
                await asyncio.wait_for(path.client.proc.wait(), 5.0)
        for child in reversed(self.children):
            with contextlib.suppress(Exception):
                await child.stop()
        if self.operator is not None:
            with contextlib.suppress(Exception):
                await self.operator.close()
        if self.etcd is not None:
            with contextlib.suppress(Exception):
                self.etcd.stop()
        if not self.opts.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # --- measuring ----------------------------------------------------------------------------------------------
    def _cpu(self, path: CallPath) -> dict[str, float]:
        snap = {c.label: cpu_seconds(c.pid) for c in path.processes}
        snap["infra.controlplane"] = sum(cpu_seconds(c.pid) for c in self.infra)
        snap["infra.etcd"] = cpu_seconds(self.etcd.pid) if self.etcd is not None and self.etcd.pid else 0.0
        snap["infra"] = snap["infra.controlplane"] + snap["infra.etcd"]
        snap["_ours"] = self._ours_cpu()
        snap["_busy"], snap["_irq"], snap["_steal"] = system_cpu_seconds()
        snap["_wall"] = time.monotonic()
        return snap

    def _ours_cpu(self) -> float:
        ours = sum(cpu_seconds(c.pid) for c in self.children if c.proc.returncode is None)
        return ours + cpu_seconds(os.getpid()) + (cpu_seconds(self.etcd.pid) if self.etcd.pid else 0.0)

    async def _wait_quiet(self, max_s: float) -> bool:
        """Wait (at most max_s) for half a second in which other processes use less than --max-foreign cores."""
        return (await wait_idle(max_s, self.opts.max_foreign, leave_out=self._ours_cpu))[1]

    async def _measured(self, path: CallPath, cmd: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Run one measured window, re-running it (a bounded number of times) when other processes on this
        shared machine took a noticeable share of the CPU meanwhile; keeps the quietest attempt."""
        best: dict[str, Any] | None = None
        for _attempt in range(1 + self.opts.retries):
            procs_before = all_process_cpu()
            before = self._cpu(path)
            result = await path.client.command(cmd, timeout)
            after = self._cpu(path)
            procs_after = all_process_cpu()
            delta = {k: after[k] - before[k] for k in before}
            result["cpu_s"] = {k: v for k, v in delta.items() if not k.startswith("_")}
            result["foreign_cores"] = max(0.0, delta["_busy"] - delta["_ours"]) / delta["_wall"]
            result["steal_cores"] = delta["_steal"] / delta["_wall"]
            result["irq_s"] = delta["_irq"]
            if best is None or result["foreign_cores"] < best["foreign_cores"]:
                best = result
            if best["foreign_cores"] <= self.opts.max_foreign or self.retries_left <= 0:
                break
            self.retries_left -= 1
            self.retried += 1
            ours = {c.pid for c in self.children} | {os.getpid(), self.etcd.pid}
            busiest = sorted(
                ((procs_after[pid][1] - procs_before[pid][1], pid, procs_after[pid][0])
                 for pid in procs_after.keys() & procs_before.keys() if pid not in ours),
                reverse=True,
            )[:3]
            log.info("  other processes used %.2f cores during %s %s (busiest: %s); measuring again",
                     result["foreign_cores"], path.title, cmd["op"],
                     ", ".join(f"{comm}[{pid}] {cpu:.2f} s" for cpu, pid, comm in busiest))
            await self._wait_quiet(self.opts.quiet_wait_s)
        assert best is not None
        return best

    async def run_cell(self, rnd: int, path: CallPath, size: int) -> None:
        o = self.opts
        client = path.client
        await self._wait_quiet(o.quiet_wait_s)
        await client.command({"op": "warmup", "size": size, "n": o.warmup, "max_s": 60.0}, 90.0)
        lat = await self._measured(
            path, {"op": "latency", "size": size, "n": o.calls, "max_s": o.latency_max_s}, o.latency_max_s + 30
        )
        self._record(rnd, path, size, "c1", lat)
        loads = [conc for conc in o.concurrency if conc != 1]  # one at a time is the latency run above ("c1")
        for conc in loads:
            ramp = {"op": "throughput", "size": size, "concurrency": conc, "seconds": o.ramp_s}
            await client.command(ramp, o.ramp_s + 30)
            thr = await self._measured(
                path, {"op": "throughput", "size": size, "concurrency": conc, "seconds": o.seconds}, o.seconds + 30
            )
            if thr["errors"]:
                raise RuntimeError(f"{path.title} at {conc} in flight, {size} B: errors {thr['errors']}")
            self._record(rnd, path, size, f"c{conc}", thr)
        log.info("round %d %-16s %6d B  p50 %7.0f µs  %s", rnd + 1, path.title, size, lat["p50_us"],
                 "  ".join(f"{s['mode']} {s['calls_per_s']:6.0f}/s" for s in self.samples[-1 - len(loads):]))

    def _record(self, rnd: int, path: CallPath, size: int, mode: str, result: dict[str, Any]) -> None:
        calls = result["calls"]
        self.samples.append({
            "round": rnd, "path": path.key, "size": size, "mode": mode, "calls": calls,
            "elapsed_s": result["elapsed_s"],
            "calls_per_s": calls / result["elapsed_s"],
            "p50_us": result.get("p50_us"), "p99_us": result.get("p99_us"),
            "cpu_us_per_call": {k: v * 1e6 / calls for k, v in result["cpu_s"].items()},
            "irq_us_per_call": result["irq_s"] * 1e6 / calls,
            "foreign_cores": result["foreign_cores"], "steal_cores": result["steal_cores"],
        })

    async def run(self) -> None:
        o = self.opts
        for rnd in range(o.rounds):
            # Interleave: every round visits every path, starting from a different one each time.
            order = self.paths[rnd % len(self.paths):] + self.paths[: rnd % len(self.paths)]
            for path in order:
                for size in o.sizes:
                    await self.run_cell(rnd, path, size)


# ==== report =====================================================================================================
def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass(frozen=True)
class PathInfo:
    """What the report needs of a path: its key, its title and its processes' labels (client first)."""

    key: str
    title: str
    labels: tuple[str, ...]


TITLES = {"a": "direct", "f": "two bare hops", "b": "in-process mesh, unary", "l": "in-process over a link",
          "c": "sidecar path", "u": "sidecar path, unary ends"}


def summarize(samples: Sequence[dict[str, Any]], paths: Sequence[PathInfo]) -> dict[str, Any]:
    """Medians over rounds per (path, size, mode), per process and in total."""
    out: dict[str, Any] = {}
    for path in paths:
        for size in sorted({s["size"] for s in samples}):
            for mode in sorted({s["mode"] for s in samples}):
                rows = [s for s in samples if s["path"] == path.key and s["size"] == size and s["mode"] == mode]
                if not rows:
                    continue
                labels = path.labels
                out[f"{path.key}/{size}/{mode}"] = {
                    "rounds": len(rows),
                    "calls_per_s": _median([r["calls_per_s"] for r in rows]),
                    "p50_us": _median([r["p50_us"] for r in rows]) if mode == "c1" else None,
                    "p99_us": _median([r["p99_us"] for r in rows]) if mode == "c1" else None,
                    "cpu_us": {lb: _median([r["cpu_us_per_call"].get(lb, float("nan")) for r in rows])
                               for lb in [*labels, "infra", "infra.controlplane", "infra.etcd"]},
                    "irq_us": _median([r.get("irq_us_per_call", float("nan")) for r in rows]),
                    "cpu_total_us": _median([sum(r["cpu_us_per_call"][lb] for lb in labels) for r in rows]),
                    "cpu_total_all_us": _median(
                        [sum(r["cpu_us_per_call"][lb] for lb in [*labels, "infra"]) for r in rows]
                    ),
                }
    return out


def _fmt(v: float, digits: int = 0) -> str:
    return f"{v:,.{digits}f}"


def _size_name(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


def render(summary: dict[str, Any], paths: Sequence[PathInfo], opts: dict[str, Any]) -> str:
    """Markdown tables plus the verdict per target (ratios to (a) from this same run)."""
    lines: list[str] = []
    concs = list(opts["concurrency"])
    sizes = list(opts["sizes"])
    for size in sizes:
        lines.append(f"#### Payload {_size_name(size)}\n")
        head = ["path", "p50 µs", "p99 µs", "p50 ×(a)"]
        for c in concs:
            head += [f"calls/s @{c}", "×(a)"]
        head += [f"CPU µs/call @{concs[0]}", "×(a)", "CPU µs/call @1"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        base_lat = summary[f"a/{size}/c1"]
        for path in paths:
            lat = summary[f"{path.key}/{size}/c1"]
            row = [f"({path.key}) {path.title}", _fmt(lat["p50_us"]), _fmt(lat["p99_us"]),
                   _fmt(lat["p50_us"] / base_lat["p50_us"], 2)]
            for c in concs:
                thr, base = summary[f"{path.key}/{size}/c{c}"], summary[f"a/{size}/c{c}"]
                row += [_fmt(thr["calls_per_s"]), _fmt(thr["calls_per_s"] / base["calls_per_s"], 2)]
            cpu, base_cpu = summary[f"{path.key}/{size}/c{concs[0]}"], summary[f"a/{size}/c{concs[0]}"]
            row += [_fmt(cpu["cpu_total_us"]), _fmt(cpu["cpu_total_us"] / base_cpu["cpu_total_us"], 2),
                    _fmt(lat["cpu_total_us"])]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines.append("#### CPU per call, per process (µs; medians over rounds)\n")
    head = ["path", "process"]
    for size in sizes:
        head += [f"{_size_name(size)} @1", *(f"{_size_name(size)} @{c}" for c in concs)]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for path in paths:
        names = {"infra.controlplane": "(control plane)", "infra.etcd": "(etcd)", "total_all": "total with them",
                 "irq": "(interrupts, machine-wide)", "total": "**total of the path**"}
        for label in [*path.labels, "total", "infra.controlplane", "infra.etcd", "total_all", "irq"]:
            row = [f"({path.key}) {path.title}", names.get(label, label.split(".", 1)[-1])]
            for size in sizes:
                for mode in ["c1", *(f"c{c}" for c in concs)]:
                    s = summary[f"{path.key}/{size}/{mode}"]
                    extra = {"total": s["cpu_total_us"], "total_all": s.get("cpu_total_all_us"), "irq": s["irq_us"]}
                    value = extra[label] if label in extra else s["cpu_us"].get(label, float("nan"))
                    row.append(_fmt(value))
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("#### Targets (issue #2)\n")
    lines.extend(_verdicts(summary, {p.key for p in paths}, sizes, concs))
    return "\n".join(lines) + "\n"


def _verdicts(summary: dict[str, Any], keys: set[str], sizes: Sequence[int], concs: Sequence[int]) -> list[str]:
    """One line per target and payload, for the paths this run has."""
    def met(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    out: list[str] = []
    for size in sizes:
        name = _size_name(size)
        lat = {k: summary[f"{k}/{size}/c1"]["p50_us"] for k in keys}
        for key, what in (("b", "in-process"), ("l", "in-process over a link")):
            if key not in keys:
                continue
            r = lat[key] / lat["a"]
            out.append(f"- {name}: {what} p50 {r:.2f}× direct (target ≤ 1.30×): {met(r <= 1.3)}")
            for conc in concs:
                r = summary[f"{key}/{size}/c{conc}"]["calls_per_s"] / summary[f"a/{size}/c{conc}"]["calls_per_s"]
                out.append(f"- {name} @{conc}: {what} throughput {r:.2f}× direct (target ≥ 0.75×): "
                           f"{met(r >= 0.75)}")
        for side, what in (("c", "sidecar"), ("u", "sidecar, unary ends")):
            if side not in keys or "f" not in keys:
                continue
            out.append(f"- {name}: {what} p50 {lat[side] / lat['a']:.2f}× direct vs bare hops "
                       f"{lat['f'] / lat['a']:.2f}× (target: no slower): {met(lat[side] <= lat['f'])}")
            for conc in concs:
                at, ct, ft = (summary[f"{k}/{size}/c{conc}"]["calls_per_s"] for k in ("a", side, "f"))
                out.append(f"- {name} @{conc}: {what} throughput {ct / at:.2f}× direct vs bare hops {ft / at:.2f}× "
                           f"(target: no lower): {met(ct >= ft)}")
    return out


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    repo = Path(__file__).resolve().parent.parent
    commit, dirty = "", ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "mesh", "sdk", "protos"],
                               capture_output=True, text=True, timeout=10).stdout
    return {
        "commit": commit, "uncommitted_files": len(dirty.splitlines()),
        "nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(), "grpcio": grpc.__version__,
        "openssl": ssl.OPENSSL_VERSION,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_at_start": os.getloadavg()[0],
    }


def _path_infos(data: dict[str, Any]) -> list[PathInfo]:
    if "paths" in data:
        return [PathInfo(p["key"], p["title"], tuple(p["labels"])) for p in data["paths"]]
    infos = []  # files written before "paths" was saved: labels from the samples (client first)
    for key in [k for k in "afblcu" if any(s["path"] == k for s in data["samples"])]:
        first = next(s for s in data["samples"] if s["path"] == key)
        infos.append(PathInfo(key, TITLES[key], tuple(k for k in first["cpu_us_per_call"] if "infra" not in k)))
    return infos


def report_text(data: dict[str, Any]) -> str:
    """The whole report (header, tables, verdicts) from a run's saved data."""
    info, opts, samples = data["machine"], data["options"], data["samples"]
    paths = _path_infos(data)
    foreign = [x["foreign_cores"] for x in samples]
    steal = [x["steal_cores"] for x in samples]
    header = (
        f"{'quick smoke run' if opts['quick'] else 'full run'}"
        f"{' (content screen OFF)' if opts.get('no_content_screen') else ''}: {opts['rounds']} round(s), "
        f"{opts['calls']} calls "
        f"@1, {opts['seconds']:g} s windows @{', @'.join(map(str, opts['concurrency']))}\n"
        f"machine: {info['nproc']} cores, {info['cpu']}, Python {info['python']}, grpcio {info['grpcio']}, "
        f"{info.get('openssl', 'OpenSSL ?')} (the direct links' TLS), {info['date']}, "
        f"load {info['loadavg_at_start']:.2f} at start, wall {info['wall_s']} s\n"
        f"code: commit {info.get('commit') or '?'} + {info.get('uncommitted_files', '?')} uncommitted file(s) in "
        "mesh/, sdk/, protos/\n"
        f"other processes during measured windows: median {_median(foreign):.2f} cores, max "
        f"{max(foreign, default=0.0):.2f} (hypervisor steal max {max(steal, default=0.0):.2f}); "
        f"{info.get('remeasured_windows', 0)} window(s) re-measured\n"
    )
    return header + "\n" + render(summarize(samples, paths), paths, opts)


def _read_json(path: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(path).read_text())
    return data


def _write_text(path: str, text: str) -> None:
    Path(path).write_text(text)


def _count_matching(log_path: Path, flt: Any) -> int:
    if not log_path.exists():
        return 0
    n = 0
    for raw in log_path.read_bytes().splitlines():
        with contextlib.suppress(ValueError):
            n += bool(flt.matches(json.loads(raw)))
    return n


RENEWED = "renewed certificate for "
"""What a node logs at each renewal of its certificate (`mesh/node.py`), counted in a child's log after a soak."""


def _renewals(log_path: Path) -> int:
    """How many times the child whose stderr is log_path renewed its certificate."""
    with contextlib.suppress(OSError):
        return log_path.read_text(errors="replace").count(RENEWED)
    return 0


def soak_text(results: Sequence[dict[str, Any]], info: dict[str, Any]) -> str:
    lines = [f"soak: {info['nproc']} cores, {info['cpu']}, Python {info['python']}, grpcio {info['grpcio']}, "
             f"{info['date']}, load {info['loadavg_at_start']:.2f} at start, commit {info['commit']} + "
             f"{info['uncommitted_files']} uncommitted file(s), workload certificates of "
             f"{results[0].get('cert_ttl_s', 3600) if results else 3600} s\n",
             "| path | calls | failed | audit records / calls answered | chain | process | RSS MiB warm → last (max) "
             "| fds warm → last (max) | renewals |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        first = True
        for label, p in r["processes"].items():
            head = (f"| {r['title']}, {r['minutes']:g} min at {r['rate_per_s']:g}/s, {r['size']} B | {r['calls']:,} | "
                    f"**{r['failed']}** | {r['audit_records']:,} / {r['audit_expected']:,} | "
                    f"{'verified' if r['audit_chain_ok'] else '**broken**'} |") if first else "| | | | | |"
            lines.append(f"{head} {label} | {p['rss_warm_mib']:.1f} → {p['rss_last_mib']:.1f} ({p['rss_max_mib']:.1f}) "
                         f"| {p['fds_warm']} → {p['fds_last']} ({p['fds_max']}) | {p.get('renewals', '–')} |")
            first = False
        if r["errors"]:
            lines.append(f"\nerrors of {r['title']}: {json.dumps(r['errors'])}")
    return "\n".join(lines) + "\n"


async def driver(opts: argparse.Namespace) -> int:
    bench = Bench(opts)
    started = time.monotonic()
    info = machine()
    try:
        log.info("starting etcd, control plane and %d path(s) in %s", len(opts.paths), bench.tmp)
        await bench.start()
        log.info("all paths up in %.1f s; %d process(es) on the paths", time.monotonic() - started,
                 sum(len(p.processes) for p in bench.paths))
        if opts.soak_minutes > 0:
            soaked = await bench.soak()
            sys.stdout.write(soak_text(soaked, info))
            if opts.json:
                _write_text(opts.json, json.dumps({"machine": info, "soak": soaked}, indent=1))
            return 0 if all(r["failed"] == 0 and r["audit_records"] == r["audit_expected"] and r["audit_chain_ok"]
                            for r in soaked) else 1
        await bench.run()
    finally:
        await bench.stop()
    info["wall_s"] = round(time.monotonic() - started, 1)
    info["remeasured_windows"] = bench.retried
    data = {
        "machine": info,
        "options": {k: v for k, v in vars(opts).items() if k != "json"},
        "paths": [{"key": p.key, "title": p.title, "labels": [c.label for c in p.processes]} for p in bench.paths],
        "samples": bench.samples,
    }
    text = report_text(data)
    sys.stdout.write(text)
    if opts.json:
        data["summary"] = summarize(bench.samples, _path_infos(data))
        _write_text(opts.json, json.dumps(data, indent=1))
    return 0


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["_child"]:
        child_main(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, short windows (~1 min)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; quick 1)")
    p.add_argument("--calls", type=int, default=None, help="calls one at a time per cell (default 2000; quick 200)")
    p.add_argument("--seconds", type=float, default=None, help="throughput window (default 5; quick 1)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    p.add_argument("--sizes", type=int, nargs="+", default=[200, 64 * 1024], help="JSON payload sizes, bytes")
    p.add_argument("--no-content-screen", action="store_true",
                   help="turn the prompt-injection content screen off in the SDK agent and the sidecars (default on)")
    p.add_argument("--paths", nargs="+", choices=["a", "f", "b", "l", "c", "u"], default=["a", "f", "b", "l", "c"],
                   help="paths to run (a is always run: every ratio is to it)")
    p.add_argument("--json", default="", help="also write every sample and the summary to this file")
    p.add_argument("--report", default="", metavar="JSON", help="only print the report of a saved --json file")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp folder (child logs) for inspection")
    p.add_argument("--max-foreign", type=float, default=0.15,
                   help="re-measure a window when other processes used more than this many cores meanwhile")
    p.add_argument("--retries", type=int, default=2, help="re-measurements per window at most")
    p.add_argument("--quiet-wait-s", type=float, default=3.0,
                   help="before re-measuring, wait up to this long for the other processes to calm down")
    p.add_argument("--retry-budget", type=int, default=None, help="re-measurements per run at most (default 12; "
                   "quick 4), so a busy machine cannot stretch the run much")
    p.add_argument("--soak-minutes", type=float, default=0.0,
                   help="instead of the rounds: call each mesh path (b, l, c, u) at --soak-rate for this long, with "
                   "every process's RSS and open fds sampled every 10 s and every call's audit record checked (30 by "
                   "hand; exit 1 on a failed call or a missing record)")
    p.add_argument("--soak-rate", type=float, default=50.0, help="calls per second during a soak")
    p.add_argument("--cert-ttl", type=int, default=3600,
                   help="workload certificate lifetime, seconds (the control plane's default: 3600). Every node "
                   "renews at about half of it, so a soak with --cert-ttl 300 crosses ~12 renewals in 30 minutes "
                   "where the default crosses at most one")
    p.add_argument("--profile", default="", help="run every child under cProfile, writing <dir>/<process>.prof "
                   "(slows everything down: for finding hot spots, not for figures)")
    opts = p.parse_args(argv)
    if opts.report:
        sys.stdout.write(report_text(_read_json(opts.report)))
        return 0
    q = opts.quick
    opts.rounds = opts.rounds or (1 if q else 3)
    opts.calls = opts.calls or (200 if q else 2000)
    opts.seconds = opts.seconds or (1.0 if q else 5.0)
    opts.profile = str(Path(opts.profile).resolve()) if opts.profile else ""
    if opts.profile:
        Path(opts.profile).mkdir(parents=True, exist_ok=True)
    opts.paths = sorted(set(opts.paths) | {"a"}, key="afblcu".index)
    opts.retry_budget = opts.retry_budget if opts.retry_budget is not None else (4 if q else 12)
    opts.warmup = 50 if q else 200
    opts.ramp_s = 0.2 if q else 0.5
    opts.latency_max_s = 10.0 if q else 20.0
    if opts.rounds < 1 or opts.calls < 10 or opts.seconds <= 0 or min(opts.sizes) < 16:
        p.error("rounds >= 1, calls >= 10, seconds > 0 and sizes >= 16 bytes")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    return asyncio.run(driver(opts))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

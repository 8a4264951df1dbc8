"""The load generator every system in bench/peers.py is driven by: the same loop for each, so only the call differs.

It imports nothing but the standard library, because it also runs inside AutoGen's own virtual environment.
A caller process builds its `call` (JSON-like dict in, dict out) and hands it to `serve_commands`, which reads
JSON-line commands on stdin and answers on stdout:

    {"op": "warmup", "size": 200, "n": 200, "max_s": 60}
    {"op": "run", "size": 200, "concurrency": 16, "seconds": 3, "max_calls": 20000}
    {"op": "quit"}

A run is a closed loop of `concurrency` callers, bounded both by time and by a call count; every call's wall time
is kept, so calls/s and p50/p99 come from the same window.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

Call = Callable[[dict[str, str]], Awaitable[dict[str, Any]]]


def payload_of(size: int) -> dict[str, str]:
    """A JSON object whose compact encoding is exactly size bytes (the same as bench/mesh_cost.py's)."""
    overhead = len(json.dumps({"text": ""}, separators=(",", ":")))
    return {"text": "x" * (size - overhead)}


def emit(obj: dict[str, Any]) -> None:
    """One protocol line to the driver (logs go to stderr)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))] if sorted_values else float("nan")


async def warmup(call: Call, payload: dict[str, str], n: int, max_s: float) -> dict[str, Any]:
    """Retry until the system answers, check that the echo is exact, then n more calls (bounded by max_s)."""
    deadline = time.monotonic() + max_s
    last = ""
    while True:
        try:
            out = await call(payload)
            break
        except Exception as exc:  # noqa: BLE001 - each system raises its own errors; all are retried here
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            raise RuntimeError(f"the system never answered within {max_s:.0f} s: {last}")
        await asyncio.sleep(0.1)
    if out != payload:
        raise RuntimeError(f"wrong echo: sent {len(payload['text'])} chars, got {str(out)[:200]}")
    for _ in range(n):
        if time.monotonic() >= deadline:
            break
        await call(payload)
    return {"ok": True}


async def run(call: Call, payload: dict[str, str], concurrency: int, seconds: float, max_calls: int) -> dict[str, Any]:
    """concurrency callers in a closed loop until `seconds` pass or `max_calls` calls are done."""
    clock = time.perf_counter
    start = clock()
    deadline = start + seconds
    times: list[float] = []
    errors: list[str] = []
    failed = 0
    budget = [max_calls]

    async def worker() -> None:
        nonlocal failed
        while budget[0] > 0 and clock() < deadline:
            budget[0] -= 1
            t0 = clock()
            try:
                await call(payload)
            except Exception as exc:  # noqa: BLE001 - counted and reported, never hidden
                failed += 1
                if len(errors) < 5:
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            times.append(clock() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = clock() - start
    times.sort()
    return {
        "calls": len(times), "failed": failed, "elapsed_s": elapsed, "calls_per_s": len(times) / elapsed,
        "p50_us": _pct(times, 0.50) * 1e6, "p99_us": _pct(times, 0.99) * 1e6, "errors": errors,
    }


async def serve_commands(call: Call) -> None:
    """Answer the driver's commands until it says quit or closes stdin."""
    payloads: dict[int, dict[str, str]] = {}
    loop = asyncio.get_running_loop()
    emit({"ready": True})
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            emit({"bye": True})
            return
        payload = payloads.setdefault(int(cmd["size"]), payload_of(int(cmd["size"])))
        try:
            if cmd["op"] == "warmup":
                result = await warmup(call, payload, int(cmd["n"]), float(cmd["max_s"]))
            elif cmd["op"] == "run":
                result = await run(call, payload, int(cmd["concurrency"]), float(cmd["seconds"]),
                                   int(cmd["max_calls"]))
            else:
                result = {"error": f"unknown op {cmd['op']}"}
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which stops the run
            result = {"error": f"{type(exc).__name__}: {exc}"}
        emit(result)

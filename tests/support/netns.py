"""Separate network hosts on one machine: Linux network namespaces joined by veth pairs to a bridge.

Every host is a namespace of its own with one interface, `eth0`, holding an address from 198.18.0.0/24 (RFC 2544's
benchmarking range) and no default route; the bridge lives in a further namespace, so nothing is added to the
machine's own network namespace and no packet can leave the sandbox. `cut(host)` takes the host's cable out (the
bridge side of its veth goes down: packets vanish, connections hang as on a real partition) and `restore(host)`
puts it back. Processes run inside a host with `ip netns exec`; the rig stops every process it started before it
deletes the namespaces, and a run's names carry its pid, so leftovers of a crashed run are found and removed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "198.18.0"
"""RFC 2544's benchmarking range: never routed, assigned here only inside namespaces this rig creates."""
_NAME = re.compile(r"^hmnet(\d+)-")


class NetnsUnavailableError(RuntimeError):
    """The kernel (or the sandbox) refuses network namespaces; the message is what `ip` said."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")


def namespaces() -> list[str]:
    """Every named network namespace on the machine."""
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30, check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers() -> list[str]:
    """Delete the namespaces of runs whose process is gone (a crashed or killed test run); their names."""
    removed = []
    for ns in namespaces():
        m = _NAME.match(ns)
        if m and not _alive(int(m.group(1))):
            with contextlib.suppress(RuntimeError):
                _kill_processes_in(ns)
                _ip("netns", "del", ns)
                removed.append(ns)
    return removed


def _kill_processes_in(ns: str) -> None:
    done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30, check=False)
    for pid in done.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def unavailable_reason() -> str | None:
    """None when this process may create network namespaces; else why not, in `ip`'s own words (EPERM in a
    container without CAP_SYS_ADMIN, a missing `ip`)."""
    probe = f"hmnet{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
    except FileNotFoundError:
        return "the `ip` command (iproute2) is not installed"
    except RuntimeError as exc:
        return f"network namespaces unavailable: {exc}"
    _ip("netns", "del", probe)
    return None


@dataclass(frozen=True)
class Host:
    """One network host: its namespace and its address on the shared /24."""

    index: int
    netns: str
    address: str

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """argv run inside this host's network namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]


@dataclass
class Network:
    """N hosts on one bridge. `with Network(3) as net:` creates them and removes everything on exit."""

    size: int
    prefix: str = field(default_factory=lambda: f"hmnet{os.getpid()}-")
    hosts: list[Host] = field(default_factory=list)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _created: list[str] = field(default_factory=list)

    @property
    def bridge_ns(self) -> str:
        return f"{self.prefix}br"

    def _veth(self, host: Host) -> str:
        return f"vh{host.index}"

    def create(self) -> None:
        """Create the bridge namespace and every host, each with loopback up and `eth0` on the bridge."""
        remove_leftovers()
        try:
            br = self.bridge_ns
            _ip("netns", "add", br)
            self._created.append(br)
            _ip("-n", br, "link", "set", "lo", "up")
            _ip("-n", br, "link", "add", "br0", "type", "bridge")
            _ip("-n", br, "link", "set", "br0", "up")
            for i in range(1, self.size + 1):
                host = Host(i, f"{self.prefix}h{i}", f"{SUBNET}.{i}")
                _ip("netns", "add", host.netns)
                self._created.append(host.netns)
                _ip("-n", br, "link", "add", self._veth(host), "type", "veth", "peer", "name", "eth0",
                    "netns", host.netns)
                _ip("-n", br, "link", "set", self._veth(host), "master", "br0", "up")
                _ip("-n", host.netns, "link", "set", "lo", "up")
                _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
                _ip("-n", host.netns, "link", "set", "eth0", "up")
                self.hosts.append(host)
        except BaseException:
            self.teardown()
            raise

    def host(self, index: int) -> Host:
        """Host 1..size."""
        return self.hosts[index - 1]

    def cut(self, host: Host) -> None:
        """Pull the host's cable: its bridge port goes down; the host itself keeps running, unreachable."""
        _ip("-n", self.bridge_ns, "link", "set", self._veth(host), "down")

    def restore(self, host: Host) -> None:
        """Plug the cable back in."""
        _ip("-n", self.bridge_ns, "link", "set", self._veth(host), "up")

    def spawn(self, host: Host, argv: Sequence[str], *, env: Mapping[str, str], log: Path, cwd: Path | None = None,
              stdin: bool = False) -> subprocess.Popen[bytes]:
        """Start argv inside host (stdout piped, stderr to log); stopped at teardown if still running."""
        with log.open("ab") as log_file:
            proc = subprocess.Popen(
                host.exec_argv(argv), env=dict(env), cwd=cwd, stdout=subprocess.PIPE, stderr=log_file,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, start_new_session=True,
            )
        self._procs.append(proc)
        return proc

    def run(self, host: Host, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path | None = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run argv inside host to completion; its output."""
        return subprocess.run(host.exec_argv(argv), env=dict(env), cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        """SIGTERM proc's process group, SIGKILL after timeout; reap it."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def teardown(self) -> None:
        """Stop every process started here (newest first), then delete every namespace created here."""
        for proc in self._procs:  # all at once, so the waits overlap
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self._procs):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout=5.0)
        self._procs.clear()
        for ns in reversed(self._created):
            with contextlib.suppress(RuntimeError):
                _kill_processes_in(ns)
                _ip("netns", "del", ns)
        self._created.clear()
        self.hosts.clear()

    def __enter__(self) -> Network:
        self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def processes(self) -> Iterator[subprocess.Popen[bytes]]:
        return iter(self._procs)

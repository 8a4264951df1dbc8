"""What runs on each host of the multi-host mesh, as plain argv lists and environment dicts.

One place for every process command of tests/e2e/test_multihost.py, built from the real entry points (the
`hivemesh` CLI, `etcd` as `EtcdServer.command` builds it, the SDK through `replica_main`), so that deployment
manifests (deploy/k8s) can be compared with what the test proves works across hosts (tests/integration/
test_k8s_manifests.py does: same subcommands, options, ports and HIVEMESH_* variables, differences listed):

    host 1  198.18.0.1   etcd member h1, control-plane replica (bind 0.0.0.0, advertise its IP), the caller
    host 2  198.18.0.2   etcd member h2, control-plane replica, SDK agent `echo` replica h2
                         (HIVEMESH_LISTEN/HIVEMESH_ADVERTISE)
    host 3  198.18.0.3   etcd member h3, SDK agent `echo` replica h3, plain-gRPC agent `plain` on loopback
                         behind `hivemesh sidecar --listen 0.0.0.0:7443 --advertise 198.18.0.3`, a client that
                         keeps asking the control plane for tokens and certificates (`issuer`), a client
                         (`orch`) owning a durable workflow run that waits for a person

Every host runs in a network namespace of its own, so all use the same fixed ports.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from hivemesh.controlplane.ca import CaFiles
from hivemesh.mesh.etcd import EtcdServer, EtcdServerTls, find_etcd_binary, initial_cluster

ETCD_CLIENT_PORT: Final = 2379
ETCD_PEER_PORT: Final = 2380
CONTROLPLANE_PORT: Final = 7443
JOIN_PORT: Final = 7444
SIDECAR_PORT: Final = 7443
"""The port the Kubernetes manifests give the sidecar (host 3 runs no control plane, so it is free there)."""
PLAIN_AGENT: Final = "127.0.0.1:7001"
LEASE_TTL_S: Final = 5
CONTROLPLANE_HOSTS: Final = (1, 2)
"""The hosts that run a control-plane replica; every workload is given all of them (clients fail over)."""
LEADER_TTL_S: Final = 3
"""The replicas' leader lease (--leader-ttl): a partitioned leader is replaced within about TTL + 1 s."""
TRUST_DOMAIN: Final = "hivemesh.local"
REPO: Final = Path(__file__).resolve().parents[2]

Command = tuple[list[str], dict[str, str]]
"""(argv, environment) of one process."""


@dataclass(frozen=True)
class MultiHostMesh:
    """The layout of the three-host mesh: addresses, files, and each process's command."""

    root: Path
    """A folder of the test's own: CA files, etcd data, each process's state and logs."""
    addresses: tuple[str, ...]
    """Host 1..N's address (index 0 is host 1)."""
    etcd_tls: EtcdServerTls
    """One member certificate naming every member's address (peers and multi-endpoint clients check it)."""

    @property
    def certs(self) -> CaFiles:
        return CaFiles.in_dir(self.root / "certs")

    @property
    def etcd_endpoints(self) -> str:
        return ",".join(f"{a}:{ETCD_CLIENT_PORT}" for a in self.addresses)

    def etcd_members(self) -> list[EtcdServer]:
        members = [
            EtcdServer(data_dir=self.root / f"etcd-h{i}", name=f"h{i}", host=addr, listen_host="0.0.0.0",
                       client_port=ETCD_CLIENT_PORT, peer_port=ETCD_PEER_PORT, cluster_token="hivemesh-multihost",
                       tls=self.etcd_tls)
            for i, addr in enumerate(self.addresses, 1)
        ]
        cluster = initial_cluster(members)
        for m in members:
            m.initial_cluster = cluster
        return members

    def base_env(self, home: str) -> dict[str, str]:
        """Where the mesh is, as every workload and the CLI read it (HIVEMESH_*), with a state folder."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMESH_")}
        replicas = [self.addresses[h - 1] for h in CONTROLPLANE_HOSTS]
        env.update(
            HIVEMESH_HOME=str(self.root / home),
            HIVEMESH_ETCD=self.etcd_endpoints,
            HIVEMESH_CONTROLPLANE=",".join(f"{a}:{CONTROLPLANE_PORT}" for a in replicas),
            HIVEMESH_JOIN=",".join(f"{a}:{JOIN_PORT}" for a in replicas),
            HIVEMESH_CA=str(self.certs.ca_cert),
            HIVEMESH_TRUST_DOMAIN=TRUST_DOMAIN,
            HIVEMESH_METRICS_LISTEN="off",
            PYTHONPATH=str(REPO),
        )
        return env

    def _hivemesh(self, home: str, *args: str) -> list[str]:
        return [sys.executable, "-m", "hivemesh.controlplane.cli", "--home", str(self.root / home),
                "--certs-dir", str(self.certs.certs_dir), *args]

    # --- the processes ----------------------------------------------------------------------------------------
    def etcd(self, host: int) -> Command:
        """etcd member h<host>: binds 0.0.0.0, advertises its host's address, TLS and auth on."""
        member = self.etcd_members()[host - 1]
        member.data_dir.mkdir(parents=True, exist_ok=True)
        return member.command(find_etcd_binary()), {"PATH": os.environ.get("PATH", "")}

    def etcd_bootstrap(self) -> Command:
        """Wait for the cluster's quorum, then create etcd's users and roles and turn auth on (host 1)."""
        t = self.etcd_tls
        argv = [sys.executable, "-m", "tests.support.netns_main", "etcd-bootstrap", self.etcd_endpoints,
                str(t.trusted_ca_file), str(t.admin_cert_file), str(t.admin_key_file)]
        return argv, self.base_env("bootstrap")

    def controlplane(self, grants: Path, host: int = 1) -> Command:
        """A control-plane replica on host: `hivemesh controlplane --host 0.0.0.0 --advertise <host>`, its own
        state folder (audit log, key mirror), the shared CA folder and etcd, a short leader lease."""
        argv = self._hivemesh(
            f"cp-h{host}", "controlplane", "--etcd", self.etcd_endpoints, "--host", "0.0.0.0",
            "--advertise", self.addresses[host - 1], "--port", str(CONTROLPLANE_PORT), "--join-port", str(JOIN_PORT),
            "--grants", str(grants), "--metrics-listen", "off", "--leader-ttl", str(LEADER_TTL_S),
        )
        return argv, self.base_env(f"cp-h{host}")

    def operator(self, *args: str) -> Command:
        """The operator's `hivemesh ARGS` (any host that reaches the control plane and etcd)."""
        return self._hivemesh("operator", *args), self.base_env("operator")

    def join_tokens(self, *workloads: tuple[str, str]) -> Command:
        """Mint one-time join tokens for (name, kind) workloads as the operator, in one process: the call each
        `hivemesh join-token NAME --kind KIND` makes (see `operator`)."""
        argv = [sys.executable, "-m", "tests.support.netns_main", "join-tokens",
                f"{self.addresses[0]}:{CONTROLPLANE_PORT}", str(self.certs.certs_dir),
                *(f"{name}:{kind}" for name, kind in workloads)]
        return argv, self.base_env("operator")

    def sdk_agent(self, host: int, join_token: str) -> Command:
        """An SDK `echo` replica on host: binds 0.0.0.0 (a free port), advertises the host's address."""
        env = self.base_env(f"agent-h{host}")
        env.update(HIVEMESH_JOIN_TOKEN=join_token, HIVEMESH_LISTEN="0.0.0.0",
                   HIVEMESH_ADVERTISE=self.addresses[host - 1], HIVEMESH_REPLICA_TAG=f"h{host}",
                   HIVEMESH_LEASE_TTL_S=str(LEASE_TTL_S))
        return [sys.executable, "-m", "tests.support.replica_main"], env

    def plain_agent(self) -> Command:
        """A plain-gRPC agent (no mesh code) on host 3's loopback."""
        return [sys.executable, "-m", "tests.support.netns_main", "plain-agent", PLAIN_AGENT], self.base_env("plain")

    def sidecar(self, host: int, join_token: str) -> Command:
        """`hivemesh sidecar` fronting the plain agent: binds 0.0.0.0:7443, advertises the host's address."""
        argv = self._hivemesh(
            f"sidecar-h{host}", "sidecar", "--agent", PLAIN_AGENT, "--listen", f"0.0.0.0:{SIDECAR_PORT}",
            "--advertise", self.addresses[host - 1], "--lease-ttl", str(LEASE_TTL_S), "--metrics-listen", "off",
        )
        env = self.base_env(f"sidecar-h{host}")
        env["HIVEMESH_JOIN_TOKEN"] = join_token
        return argv, env

    def issuer(self, join_token: str) -> Command:
        """A client (`issuer`) that asks the control-plane replicas for tokens and certificates on demand."""
        env = self.base_env("issuer")
        env["HIVEMESH_JOIN_TOKEN"] = join_token
        return [sys.executable, "-m", "tests.support.netns_main", "cp-issuer"], env

    def workflow_owner(self, join_token: str) -> Command:
        """A client (`orch`) that owns one durable run waiting for a person (`netns_main wf-owner`)."""
        env = self.base_env("orch")
        env["HIVEMESH_JOIN_TOKEN"] = join_token
        return [sys.executable, "-m", "tests.support.netns_main", "wf-owner"], env

    def caller(self, join_token: str) -> Command:
        """The load driver on host 1, a mesh client `caller` (commands on stdin, JSON lines on stdout)."""
        env = self.base_env("caller")
        env["HIVEMESH_JOIN_TOKEN"] = join_token
        return [sys.executable, "-m", "tests.support.multihost_caller"], env


def with_pdeathsig(argv: list[str]) -> list[str]:
    """argv that dies with the test process (PR_SET_PDEATHSIG), so a crashed run leaves nothing running."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", *argv] if setpriv else argv

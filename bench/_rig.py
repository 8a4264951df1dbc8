"""A real mesh inside one bench process: an etcd member with mutual TLS and auth (as `hivemesh up` runs it),
the control plane on free loopback ports, grants, an allow-all authz policy, and join tokens on demand.

The claims and scale benches share it, so they measure the mesh a user gets with every default on; they only
differ in the agents and clients they put on it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRUST_DOMAIN = "hivemesh.local"
GRANTS = {
    "grants": [
        {"name": "bench-clients", "subjects": [f"spiffe://{TRUST_DOMAIN}/client/*"], "capabilities": ["*"]},
        {"name": "bench-agents", "subjects": [f"spiffe://{TRUST_DOMAIN}/agent/*"], "capabilities": ["*"]},
    ]
}
ALLOW_ALL = {
    "kind": "authz",
    "name": "bench",
    "spec": {"rules": [{"name": "trust-domain", "action": "ALLOW",
                        "from": {"callers": [f"spiffe://{TRUST_DOMAIN}/*"]}}]},
}


@dataclass
class Mesh:
    """What a bench needs from the running mesh."""

    tmp: Path
    etcd: Any  # EtcdServer
    controlplane: Any  # ControlPlaneServer
    operator: Any  # ControlPlaneClient
    ca_bundle: Path

    async def settings(self, name: str, kind: str = "agent") -> Any:
        """MeshSettings with a fresh join token for name."""
        from hivemesh.mesh.settings import MeshSettings

        token = (await self.operator.create_join_token(name, kind, 600)).token
        return MeshSettings(
            etcd=self.etcd.endpoint, controlplane=self.controlplane.address, join=self.controlplane.join_address,
            ca_bundle=self.ca_bundle, trust_domain=TRUST_DOMAIN, join_token=token,
        )

    async def apply(self, *docs: dict[str, Any]) -> int:
        """Apply policy documents as `hivemesh policy apply` would (validated, one transaction): the revision."""
        from hivemesh.controlplane.policies import apply_text
        from hivemesh.mesh.etcd import client, wait_connected

        c = client(self.etcd.access)
        try:
            await wait_connected(c)
            result = await apply_text(c, json.dumps(list(docs)))
        finally:
            await c.close()
        return int(result.revision or max(a.version for a in result.applied))

    def etcd_client(self) -> Any:
        """A root etcd client (the caller closes it)."""
        from hivemesh.mesh.etcd import client

        return client(self.etcd.access)


@contextlib.asynccontextmanager
async def running_mesh(keep: bool = False) -> AsyncIterator[Mesh]:
    """Start etcd + control plane in a temporary folder; stop both and remove the folder on exit."""
    from hivemesh.controlplane.ca import init_ca, load_ca
    from hivemesh.controlplane.etcd_certs import issue_etcd_certs
    from hivemesh.controlplane.server import ControlPlaneConfig, ControlPlaneServer
    from hivemesh.mesh.controlplane_client import ControlPlaneClient
    from hivemesh.mesh.etcd import EtcdServer

    tmp = Path(tempfile.mkdtemp(prefix="hivemesh-bench-"))
    os.environ["HIVEMESH_HOME"] = str(tmp / "home")  # audit spools of the bench's agents and clients
    certs = init_ca(tmp / "certs", TRUST_DOMAIN)
    tls = issue_etcd_certs(load_ca(certs.certs_dir), certs.certs_dir)
    etcd = EtcdServer(data_dir=tmp / "etcd", log_path=tmp / "etcd.log", tls=tls)
    etcd.start()
    cp = None
    operator = None
    try:
        grants = tmp / "grants.yaml"
        grants.write_text(json.dumps(GRANTS))  # JSON is YAML
        cp = ControlPlaneServer(ControlPlaneConfig(
            etcd_endpoints=etcd.endpoint, certs_dir=tmp / "certs", state_dir=tmp / "cp-state",
            trust_domain=TRUST_DOMAIN, grants_file=grants, metrics_listen="off",
        ))
        await cp.start()
        operator = ControlPlaneClient.from_certs_dir(cp.address, tmp / "certs")
        mesh = Mesh(tmp, etcd, cp, operator, certs.ca_cert)
        await mesh.apply(ALLOW_ALL)
        yield mesh
    finally:
        if operator is not None:
            await operator.close()
        if cp is not None:
            await cp.stop(0.5)
        etcd.stop()
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def machine() -> dict[str, Any]:
    """The machine a figure was measured on."""
    import grpc

    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "when": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "grpcio": grpc.__version__,
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }

"""A real mesh for integration tests: CA files, a control plane on free ports, join tokens on demand."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from hivemesh.controlplane.ca import CaFiles, init_ca
from hivemesh.controlplane.client import ControlPlaneClient
from hivemesh.controlplane.server import ControlPlaneConfig, ControlPlaneServer
from hivemesh.mesh.settings import MeshSettings

TRUST_DOMAIN = "hivemesh.local"

DEFAULT_GRANTS = {
    "grants": [
        {
            "name": "tests-clients",
            "subjects": [f"spiffe://{TRUST_DOMAIN}/client/*", f"spiffe://{TRUST_DOMAIN}/operator/*"],
            "capabilities": ["*"],
        },
        {
            # Agents may call each other, except the 'restricted' capability (for scope tests).
            "name": "tests-agents",
            "subjects": [f"spiffe://{TRUST_DOMAIN}/agent/*"],
            "capabilities": ["echo", "shout", "slow", "count", "upper", "fields"],
        },
    ]
}


@dataclass
class MeshEnv:
    """A running control plane plus what a test needs to put workloads on the mesh."""

    etcd: str
    certs: CaFiles
    controlplane: ControlPlaneServer
    operator: ControlPlaneClient

    def base_settings(self) -> MeshSettings:
        return MeshSettings(
            etcd=self.etcd,
            controlplane=self.controlplane.address,
            join=self.controlplane.join_address,
            ca_bundle=self.certs.ca_cert,
            trust_domain=TRUST_DOMAIN,
        )

    async def settings_for(self, name: str, kind: str = "agent") -> MeshSettings:
        """Settings carrying a fresh one-time join token for name."""
        resp = await self.operator.create_join_token(name, kind, 120)
        s = self.base_settings()
        return MeshSettings(
            etcd=s.etcd, controlplane=s.controlplane, join=s.join, ca_bundle=s.ca_bundle,
            trust_domain=s.trust_domain, join_token=resp.token,
        )


async def start_mesh_env(tmp: Path, etcd_endpoint: str, grants: dict[str, object] | None = None) -> MeshEnv:
    certs = init_ca(tmp / "certs", TRUST_DOMAIN)
    grants_file = tmp / "grants.yaml"
    grants_file.write_text(yaml.safe_dump(grants or DEFAULT_GRANTS))
    cp = ControlPlaneServer(
        ControlPlaneConfig(
            etcd_endpoints=etcd_endpoint,
            certs_dir=tmp / "certs",
            state_dir=tmp / "cp-state",
            trust_domain=TRUST_DOMAIN,
            grants_file=grants_file,
        )
    )
    await cp.start()
    operator = ControlPlaneClient.from_certs_dir(cp.address, tmp / "certs")
    return MeshEnv(etcd=etcd_endpoint, certs=certs, controlplane=cp, operator=operator)


async def stop_mesh_env(env: MeshEnv) -> None:
    await env.operator.close()
    await env.controlplane.stop(0.5)

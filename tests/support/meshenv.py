"""A real mesh for integration tests: CA files, a control plane on free ports, join tokens on demand."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hivemesh.controlplane.ca import CaFiles
from hivemesh.controlplane.etcd_certs import controlplane_etcd_tls
from hivemesh.controlplane.server import ControlPlaneConfig, ControlPlaneServer
from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.etcd import EtcdAccess
from hivemesh.mesh.settings import MeshSettings

TRUST_DOMAIN = "hivemesh.local"
SESSION_CA_DIR: Path | None = None
"""The session CA (tests/conftest.py), which etcd trusts: each test mesh starts from a copy of it."""

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


ALLOW_ALL_AUTHZ = f"""
kind: authz
name: tests-allow-all
description: the tests' mesh lets every workload of the trust domain call (grants still narrow the tokens)
spec:
  rules:
    - name: everyone-in-the-trust-domain
      action: ALLOW
      from:
        callers: ["spiffe://{TRUST_DOMAIN}/*"]
"""
"""Authorization is default deny (no policy: nothing is allowed); most tests are not about it."""


def _session_ca_dir() -> Path:
    if SESSION_CA_DIR is None:  # outside pytest (a script importing this module): a CA of its own
        raise RuntimeError("tests.support.meshenv.SESSION_CA_DIR is unset: the session_ca fixture sets it")
    return SESSION_CA_DIR


def copy_session_ca(certs_dir: Path) -> CaFiles:
    """A test's own CA folder holding the session CA (so a rotation in it stays in it)."""
    shutil.copytree(_session_ca_dir(), certs_dir)
    return CaFiles.in_dir(certs_dir)


def controlplane_access(etcd_endpoint: str) -> EtcdAccess:
    """etcd as the control plane reaches it (its own etcd user, root): for tests that inspect the store."""
    return EtcdAccess(etcd_endpoint, controlplane_etcd_tls(_session_ca_dir()))


async def apply_policies_text(etcd_endpoint: str, text: str) -> None:
    """Apply policy documents (any registered kind) straight to etcd, as `hivemesh policy apply` would."""
    from hivemesh.controlplane.policies import apply_text
    from hivemesh.mesh.etcd import client, wait_connected

    c = client(etcd_endpoint, tls=controlplane_etcd_tls(_session_ca_dir()))  # as the control plane would
    try:
        await wait_connected(c)
        await apply_text(c, text)
    finally:
        await c.close()


async def start_mesh_env(
    tmp: Path, etcd_endpoint: str, grants: dict[str, object] | None = None, *,
    authz: str | None = ALLOW_ALL_AUTHZ, **config: Any
) -> MeshEnv:
    """config: ControlPlaneConfig overrides (cert_ttl_s, token_ttl_s, ...); authz: the authz policies to apply
    (None: none at all, so every call is denied)."""
    certs = copy_session_ca(tmp / "certs")
    grants_file = tmp / "grants.yaml"
    grants_file.write_text(yaml.safe_dump(grants or DEFAULT_GRANTS))
    cp = ControlPlaneServer(
        ControlPlaneConfig(
            etcd_endpoints=etcd_endpoint,
            certs_dir=tmp / "certs",
            state_dir=tmp / "cp-state",
            trust_domain=TRUST_DOMAIN,
            grants_file=grants_file,
            **config,
        )
    )
    await cp.start()
    if authz:
        await apply_policies_text(etcd_endpoint, authz)
    operator = ControlPlaneClient.from_certs_dir(cp.address, tmp / "certs")
    return MeshEnv(etcd=etcd_endpoint, certs=certs, controlplane=cp, operator=operator)


async def stop_mesh_env(env: MeshEnv) -> None:
    await env.operator.close()
    await env.controlplane.stop(0.5)


async def run_cli(env: MeshEnv, *args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """Run the real `hivemesh` CLI as the operator in a child process: (exit code, stdout, stderr).

    A child process, not click's CliRunner in the test process: the CLI runs its own grpc.aio event loop, and two
    loops using grpc.aio at once in one process is not supported by grpc (it can crash). The child is forked from
    a process that imported the CLI already (`tests.support.cli_zygote`): a run costs its work, not its imports.
    """
    import os

    from tests.support.cli_zygote import run_hivemesh

    s = env.base_settings()
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMESH_")}
    child_env.update(HIVEMESH_ETCD=s.etcd, HIVEMESH_CONTROLPLANE=s.controlplane, HIVEMESH_JOIN=s.join,
                     HIVEMESH_CA=str(s.ca_bundle), HIVEMESH_TRUST_DOMAIN=s.trust_domain,
                     HIVEMESH_HOME=str(env.certs.certs_dir.parent / "cli-home"))
    return await run_hivemesh(["--certs-dir", str(env.certs.certs_dir), *args], child_env, timeout=timeout)

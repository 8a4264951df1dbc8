"""A CA rotation with two control-plane replicas, each with its own certs folder: only etcd links them.

Two operators racing `prepare` on both replicas: one wins, the other gets FAILED_PRECONDITION (and a step
computed from an older state is refused by the compare-and-swap). The step run on
replica A reaches B within a bounded wait (B trusts both roots, then issues from the new one); `finish` on B
refuses while a node registered anywhere still presents the old root, then succeeds once the nodes renewed, and A
drops the old root. A replica restarted with the stale pre-rotation folder adopts the mesh's CA. A workload's etcd
login cannot read the shared CA (it holds the root key).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from hivemesh.controlplane import ca_rotation, shared_ca
from hivemesh.controlplane.server import ControlPlaneConfig, ControlPlaneServer
from hivemesh.controlplane.shared_ca import CaRotationRaceError
from hivemesh.mesh.cert_presence import CERT_ROOT_LABEL
from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.errors import HivemeshError
from hivemesh.mesh.etcd import EtcdServer, EtcdTls, client, is_permission_denied, wait_connected
from hivemesh.mesh.keyspace import AGENTS, CONTROLPLANE_CA
from hivemesh.mesh.pki import new_key_and_csr
from hivemesh.mesh.trustdoc import fingerprint
from hivemesh.sdk import AgentServer
from hivemesh.v1 import mesh_pb2, trust_pb2
from tests.support.agents_for_tests import EchoAgent
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv


async def _until(check: Callable[[], bool], limit_s: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < limit_s, f"{what} not within {limit_s} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def _roots(bundle: bytes) -> list[str]:
    return [fingerprint(c) for c in x509.load_pem_x509_certificates(bundle)]


async def _step(server: ControlPlaneServer, certs_dir: Path, step: str) -> trust_pb2.CaStatusResponse:
    """One step as the CLI runs it: an operator client that re-reads the folder (the bundle changes each step)."""
    op = ControlPlaneClient.from_certs_dir(server.address, certs_dir)
    try:
        status: trust_pb2.CaStatusResponse = await op.call(op.trust.RotateCa, trust_pb2.RotateCaRequest(step=step))
        return status
    finally:
        await op.close()


def _replica(etcd_server: EtcdServer, certs_dir: Path, state_dir: Path) -> ControlPlaneServer:
    return ControlPlaneServer(ControlPlaneConfig(
        etcd_endpoints=etcd_server.endpoint, certs_dir=certs_dir, state_dir=state_dir, trust_domain=TRUST_DOMAIN,
    ))


async def test_a_rotation_on_one_replica_takes_effect_on_the_other(
    mesh_env: MeshEnv, etcd: Any, etcd_server: EtcdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ca_rotation, "MIN_ACTIVE_S", 0.0)  # off: the straggler guard is the one tested here
    a, a_dir = mesh_env.controlplane, mesh_env.certs.certs_dir
    pristine = tmp_path / "pristine-certs"  # the folder as first deployed (a Secret), before any rotation
    shutil.copytree(a_dir, pristine)
    b_dir = tmp_path / "b-certs"
    shutil.copytree(a_dir, b_dir)
    old_root = _roots(a_dir.joinpath("ca.pem").read_bytes())[0]
    b = _replica(etcd_server, b_dir, tmp_path / "b-state")
    await b.start()
    c: ControlPlaneServer | None = None
    certs = mesh_env.certs
    workload_etcd = client(etcd_server.endpoint, tls=EtcdTls.from_files(certs.ca_cert, certs.operator_cert,
                                                                        certs.operator_key))
    agent = AgentServer(EchoAgent("ok"), await mesh_env.settings_for("echo"))
    await agent.start()
    try:
        await wait_connected(workload_etcd)
        before_prepare = int((await etcd.get(CONTROLPLANE_CA.encode())).mod_revision)
        assert b._core is not None and a._core is not None
        a_core, b_core = a._core, b._core

        # Two operators racing the same step on two replicas: exactly one wins.
        results = await asyncio.gather(_step(a, a_dir, "prepare"), _step(b, b_dir, "prepare"),
                                       return_exceptions=True)
        won = [r for r in results if isinstance(r, trust_pb2.CaStatusResponse)]
        lost = [r for r in results if isinstance(r, BaseException)]
        assert len(won) == 1 and len(lost) == 1, results
        assert isinstance(lost[0], HivemeshError) and lost[0].code == grpc.StatusCode.FAILED_PRECONDITION, lost
        assert "another control-plane replica" in str(lost[0]) or "the rotation is prepared" in str(lost[0])
        both = list(won[0].roots)
        assert len(both) == 2 and both[0] == old_root

        # A step computed from the state before that (the loser's, had it read first) is refused by the
        # compare-and-swap, and changes nothing in its folder.
        late = tmp_path / "late-certs"
        shutil.copytree(pristine, late)
        with pytest.raises(CaRotationRaceError, match="another control-plane replica"):
            await shared_ca.step(etcd, late, "prepare", revision=before_prepare)
        assert late.joinpath("ca.pem").read_bytes() == pristine.joinpath("ca.pem").read_bytes()

        # Whichever replica won, both trust old + new now, and both folders hold the same bundle.
        await _until(lambda: _roots(a_core.ca.bundle_pem()) == both == _roots(b_core.ca.bundle_pem()), 5,
                     "both replicas trusting old and new roots")
        assert _roots(b_dir.joinpath("ca.pem").read_bytes()) == both

        # Activate on A: B issues from the new root within a bounded wait, without a restart.
        status = await _step(a, a_dir, "activate")
        new_root = status.signing_root
        assert new_root == both[1]
        took = await _until(lambda: fingerprint(b_core.ca.certificate) == new_root, 5, "B signing with the new root")
        probe = f"spiffe://{TRUST_DOMAIN}/agent/probe"
        issued = b_core.sign(new_key_and_csr(probe)[1], probe)
        leaf = x509.load_pem_x509_certificate(issued.certificate_pem)
        new_cert = x509.load_pem_x509_certificates(b_core.ca.bundle_pem())[0]
        leaf.verify_directly_issued_by(new_cert)
        b_server = x509.load_pem_x509_certificate(b_core.server_cert[0])
        b_server.verify_directly_issued_by(new_cert)  # B's own certificate follows too (new handshakes)
        x509.load_pem_x509_certificate(b_dir.joinpath("operator.pem").read_bytes()).verify_directly_issued_by(new_cert)

        # The straggler guard on B sees a node that registered through A and has not renewed.
        stale = mesh_pb2.AgentInstance(instance_id="s1", endpoint="127.0.0.1:9", identity="spiffe://x/agent/old")
        stale.card.name = "old-node"
        stale.labels[CERT_ROOT_LABEL] = old_root
        await etcd.put(f"{AGENTS}old-node/s1".encode(), stale.SerializeToString())
        with pytest.raises(HivemeshError) as refused:
            await _step(b, b_dir, "finish")
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION and "old-node/s1" in str(refused.value)
        await etcd.delete(f"{AGENTS}old-node/s1".encode())

        # The real agent renewed onto the new root (its registry entry says so): finish on B, A drops the old root.
        async def agent_renewed() -> bool:
            got = [i for i in await a_core.agent_instances("echo")]
            return bool(got) and all(i.labels.get(CERT_ROOT_LABEL) == new_root for i in got)

        deadline = time.monotonic() + 10
        while not await agent_renewed():
            assert time.monotonic() < deadline, "the agent did not renew onto the new root"
            await asyncio.sleep(0.1)
        finished = await _step(b, b_dir, "finish")
        assert list(finished.roots) == [new_root]
        await _until(lambda: _roots(a_core.ca.bundle_pem()) == [new_root], 5, "A dropping the old root")
        assert _roots(a_dir.joinpath("ca.pem").read_bytes()) == [new_root]
        assert not a_dir.joinpath("ca-prev.key").exists()
        async with ControlPlaneClient.from_certs_dir(a.address, a_dir) as op_a:  # new-root trust only
            st = await op_a.call(op_a.trust.GetCaStatus, trust_pb2.GetCaStatusRequest())
            assert (st.phase, list(st.roots)) == ("steady", [new_root])

        # A replica restarted with the folder as first deployed adopts the mesh's CA, not its stale one.
        c = _replica(etcd_server, pristine, tmp_path / "c-state")
        await c.start()
        assert c._core is not None and _roots(c._core.ca.bundle_pem()) == [new_root]
        assert _roots(pristine.joinpath("ca.pem").read_bytes()) == [new_root]

        # The shared CA (root key included) is etcd root's only: a workload's etcd login is refused.
        with pytest.raises(Exception) as denied:
            await workload_etcd.get(CONTROLPLANE_CA.encode())
        assert is_permission_denied(denied.value)
        print(f"\nFIGURE CA step reaching the other replica: {took:.2f} s")
    finally:
        await agent.stop()
        await workload_etcd.close()
        if c is not None:
            await c.stop(0.2)
        await b.stop(0.2)
        await etcd.delete(CONTROLPLANE_CA.encode())  # the next test's control plane starts from its own CA

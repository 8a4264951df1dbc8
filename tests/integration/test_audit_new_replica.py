"""A control-plane replica that joins (or comes back) after the leader trimmed older checkpoint keys from etcd.

Trimming keeps only the newest checkpoint every live replica copied, so a replica started with an empty state
folder, while etcd still holds the whole log, meets checkpoint N > 1 with none of the ones before it. It takes
the chain up there, once that checkpoint proves its own copy of the log (the mesh key's signature over the hash
of its entry at that seq), serves `hivemesh audit` and, leading, signs the next checkpoints in sequence; a
checkpoint in etcd that does not prove its log is refused. Real etcd, real control planes over mutual TLS.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from hivemesh.controlplane.audit.checkpoints import LogReport, sign_checkpoint, verify_log
from hivemesh.controlplane.audit.heads import trusted_key_from_cert, verify_head
from hivemesh.controlplane.audit.shared_log import SharedLog
from hivemesh.controlplane.audit.store import AuditStore
from hivemesh.controlplane.server import ControlPlaneConfig, ControlPlaneServer
from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.errors import FailedPreconditionError
from hivemesh.mesh.etcd import EtcdServer
from hivemesh.mesh.keyspace import AUDIT_CHECKPOINTS, AUDIT_LOG
from hivemesh.v1 import audit_pb2
from tests.integration.test_audit_shared_log import NodeChain
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, copy_session_ca, run_cli
from tests.support.waiting import until


@pytest.fixture(autouse=True)
async def _no_log_left(etcd: Any) -> AsyncIterator[None]:
    """A later test's control plane on the session etcd must not find this test's log."""
    yield
    await etcd.delete_prefix(b"/hivemesh/audit")


class Mesh:
    """Control-plane replicas of one mesh (one CA folder) over the session etcd, each with its own state folder."""

    def __init__(self, tmp: Path, etcd_server: EtcdServer) -> None:
        self.tmp, self.etcd_server = tmp, etcd_server
        self.certs = copy_session_ca(tmp / "certs")
        self.running: list[tuple[ControlPlaneServer, ControlPlaneClient]] = []

    async def start(self, folder: str) -> tuple[ControlPlaneServer, ControlPlaneClient]:
        server = ControlPlaneServer(ControlPlaneConfig(
            etcd_endpoints=self.etcd_server.endpoint, certs_dir=self.certs.certs_dir, state_dir=self.tmp / folder,
            trust_domain=TRUST_DOMAIN, leader_ttl_s=2))
        await server.start()
        op = ControlPlaneClient.from_certs_dir(server.address, self.certs.certs_dir)
        self.running.append((server, op))
        return server, op

    async def stop(self, server: ControlPlaneServer) -> None:
        for pair in [p for p in self.running if p[0] is server]:
            self.running.remove(pair)
            await pair[1].close()
            await server.stop(0.2)

    async def stop_all(self) -> None:
        for server, _ in list(self.running):
            await self.stop(server)


def store_of(server: ControlPlaneServer) -> AuditStore:
    assert server._core is not None
    store = server._core.extensions["audit"]
    assert isinstance(store, AuditStore)
    return store


def shared_of(server: ControlPlaneServer) -> SharedLog:
    shared = store_of(server).shared
    assert isinstance(shared, SharedLog)
    return shared


async def ship(op: ControlPlaneClient, chain: NodeChain, n: int) -> None:
    """n more records of chain, shipped as a node ships its spool."""
    resp = await op.call(op.audit.AppendBatch, audit_pb2.AppendBatchRequest(source="op-spool", records=chain.next(n)))
    assert (resp.last_seq, resp.stored) == (chain.seq, n)


async def checkpoint(op: ControlPlaneClient) -> dict[str, Any]:
    """Have the replica op reaches (the leader) sign a checkpoint now; the newest it holds."""
    got = await op.call(op.audit.CreateCheckpoint, audit_pb2.CreateCheckpointRequest())
    return dict(json.loads(got.checkpoints[-1]))


async def held_in_etcd(etcd: Any) -> list[int]:
    return [int(kv.key.decode().rsplit("/", 1)[1]) for kv in await etcd.get_prefix(AUDIT_CHECKPOINTS.encode())]


async def exported(mesh: Mesh, op: ControlPlaneClient) -> tuple[LogReport, list[bytes], list[dict[str, Any]]]:
    """What an operator downloads from the replica op reaches, verified as `hivemesh audit verify` does: with the
    checkpoint key its CA certified, against the head signed for the export. (report, entries, checkpoints)"""
    lines: list[bytes] = []
    head = b""
    async for chunk in op.audit.Export(audit_pb2.ExportRequest(), timeout=30):
        lines.extend(chunk.entries)
        head = head or chunk.head
    cps = await op.call(op.audit.Checkpoints, audit_pb2.CheckpointsRequest())
    key = trusted_key_from_cert(cps.key_cert_pem, mesh.certs.ca_cert.read_bytes(), TRUST_DOMAIN)
    report = verify_log(lines, list(cps.checkpoints), key, verify_head(head, key))
    assert report.signatures_checked
    return report, lines, [json.loads(c) for c in cps.checkpoints]


async def test_a_new_replica_with_an_empty_folder_takes_up_the_trimmed_checkpoint_chain(
    etcd: Any, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    mesh = Mesh(tmp_path, etcd_server)
    try:
        a, op_a = await mesh.start("a")
        chain = NodeChain(op_a.workload.spiffe_id)  # the operator ships records about itself, as a node would
        signed = []
        for _ in range(4):
            await ship(op_a, chain, 5)
            signed.append(await checkpoint(op_a))
        assert [cp["checkpoint"] for cp in signed] == [1, 2, 3, 4]
        # The leader trims etcd's checkpoints to the newest (every live replica, a alone, copied them) and keeps
        # every batch (younger than the 10-minute window): the whole log is still in etcd.
        assert await shared_of(a).trim() == 0
        assert await held_in_etcd(etcd) == [4]
        assert await etcd.get(f"{AUDIT_LOG}{1:020d}".encode()) is not None
        await ship(op_a, chain, 3)  # the log goes on past the last checkpoint

        # A new replica with an empty state folder: it serves the audit log, the same one as a.
        b, op_b = await mesh.start("b")
        assert a.replica is not None and a.replica.election.is_leader
        report_b, lines_b, cps_b = await exported(mesh, op_b)
        assert report_b.ok, report_b.problem
        assert [cp["checkpoint"] for cp in cps_b] == [4] and cps_b[0] == signed[-1]
        assert report_b.first_checkpoint == 4 and report_b.checkpoints == 1
        report_a, lines_a, cps_a = await exported(mesh, op_a)
        assert report_a.ok and [cp["checkpoint"] for cp in cps_a] == [1, 2, 3, 4], report_a.problem
        assert lines_a[:len(lines_b)] == lines_b and len(lines_b) >= chain.seq  # one log, entry for entry
        verified = await op_b.call(op_b.audit.Verify, audit_pb2.AuditVerifyRequest())
        assert verified.ok and verified.checkpoints == 1, verified.problem
        query = audit_pb2.AuditQueryRequest(agent=op_a.workload.spiffe_id, kind="inbound", limit=1000)
        found_b = await op_b.call(op_b.audit.Query, query)
        found_a = await op_a.call(op_a.audit.Query, query)
        assert list(found_b.entries) == list(found_a.entries) and len(found_b.entries) == chain.seq
        # What the reviewer ran: the operator's CLI, through the new replica.
        env_b = MeshEnv(etcd=etcd_server.endpoint, certs=mesh.certs, controlplane=b, operator=op_b)
        code, out, err = await run_cli(env_b, "audit", "verify", "--json")
        assert code == 0, (out, err)
        assert json.loads(out)["ok"] is True and json.loads(out)["first_checkpoint"] == 4, out
        code, out, err = await run_cli(env_b, "audit", "verify")  # and the line a person reads says so
        said = " ".join(out.split())  # (rich wraps the line at the terminal's width)
        assert code == 0 and "signed checkpoint(s) (from checkpoint 4) checked" in said, (out, err)
        code, out, err = await run_cli(env_b, "audit", "tail", "-n", "1")
        assert code == 0 and "checkpoint" not in err, (out, err)

        # a stops: b leads and signs the next checkpoint, linked to a's last.
        await mesh.stop(a)
        assert b.replica is not None
        assert await until(lambda: b.replica is not None and b.replica.election.is_leader, 10), "b never led"
        await ship(op_b, chain, 2)
        fifth = await checkpoint(op_b)
        assert (fifth["checkpoint"], fifth["prev_sig"]) == (5, signed[-1]["sig"])
        assert 5 in await held_in_etcd(etcd)

        # a, restarted on its folder, takes b's checkpoint: it links on from a's own.
        a, op_a = await mesh.start("a")
        report_a, lines_a, cps_a = await exported(mesh, op_a)
        assert report_a.ok, report_a.problem
        assert [cp["checkpoint"] for cp in cps_a] == [1, 2, 3, 4, 5] and cps_a[-1] == fifth
        assert (await op_a.call(op_a.audit.Verify, audit_pb2.AuditVerifyRequest())).ok

        # a is down while b signs two more and trims the ones before the newest: back, a's copy lacks 6 and
        # etcd holds only 7. It takes the chain up at 7 too; its own 1..5 are kept aside.
        await mesh.stop(a)
        for _ in range(2):
            await ship(op_b, chain, 2)
            await checkpoint(op_b)
        await shared_of(b).trim()
        assert await held_in_etcd(etcd) == [7]
        a, op_a = await mesh.start("a")
        # Its latest signed head (the export head it signed at checkpoint 5) names a checkpoint it no longer holds:
        # the entries that head covers are still compared, and its copy verifies.
        verified = await op_a.call(op_a.audit.Verify, audit_pb2.AuditVerifyRequest())
        assert verified.ok and verified.checkpoints == 1, verified.problem
        report_a, lines_a, cps_a = await exported(mesh, op_a)
        assert report_a.ok and [cp["checkpoint"] for cp in cps_a] == [7], report_a.problem
        aside = tmp_path / "a" / "audit" / "checkpoints.before-7.jsonl"
        assert [json.loads(line)["checkpoint"] for line in aside.read_bytes().splitlines()] == [1, 2, 3, 4, 5]
        report_b, lines_b, _ = await exported(mesh, op_b)
        assert report_b.ok and lines_b[:len(lines_a)] == lines_a, report_b.problem
    finally:
        await mesh.stop_all()


async def test_a_checkpoint_in_etcd_that_does_not_prove_the_log_is_refused(
    etcd: Any, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    """The checkpoint a new replica would take the chain up at is the mesh key's signature over another hash
    than its entry at that seq (or is signed by another key): it refuses it, copies none, and serves no audit."""
    mesh = Mesh(tmp_path, etcd_server)
    try:
        a, op_a = await mesh.start("a")
        chain = NodeChain(op_a.workload.spiffe_id)
        for _ in range(3):
            await ship(op_a, chain, 4)
            last = await checkpoint(op_a)
        await shared_of(a).trim()
        assert await held_in_etcd(etcd) == [3]
        key = store_of(a)._key
        assert key is not None
        earlier = json.loads(list(store_of(a).lines())[last["log_seq"] - 2])["hash"]
        rogue = ed25519.Ed25519PrivateKey.generate()
        forgeries = {
            # Signed with the mesh's key, numbered and linked as checkpoint 3, but over the hash of the entry
            # before: it does not match the log.
            "does not match this copy of the log": sign_checkpoint(key, {**last, "head": earlier}),
            # The true checkpoint 3 re-signed by a key that is not the mesh's.
            "signature does not verify": sign_checkpoint(rogue, last),
        }
        where = f"{AUDIT_CHECKPOINTS}{3:020d}".encode()
        for n, (why, forged) in enumerate(forgeries.items()):
            await etcd.put(where, json.dumps(forged).encode())
            c, op_c = await mesh.start(f"c{n}")
            with pytest.raises(FailedPreconditionError, match=why):
                await op_c.call(op_c.audit.Verify, audit_pb2.AuditVerifyRequest())
            with pytest.raises(FailedPreconditionError, match="cannot take up the mesh-wide log's checkpoints"):
                await op_c.call(op_c.audit.Checkpoints, audit_pb2.CheckpointsRequest())
            assert store_of(c).checkpoints() == [] and store_of(c).checkpoint_no == 0
            await mesh.stop(c)
        # The replica that held checkpoint 3 all along still serves its own (true) chain.
        report, _, cps = await exported(mesh, op_a)
        assert report.ok and [cp["checkpoint"] for cp in cps] == [1, 2, 3], report.problem
    finally:
        await mesh.stop_all()

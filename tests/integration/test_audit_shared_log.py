"""One audit log for the whole mesh across control-plane replicas, over the session etcd (in process).

A node that ships to replica A, fails over to B and comes back to A neither stalls nor leaves a gap; every replica
holds the same chain (one head); what the old leader acknowledged is in the new leader's log and checkpoints
continue its chain; concurrent appends get one total order; a replica whose copy ends before etcd's trimmed
window refuses to serve; and no workload's etcd identity can read or write the log's keys.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import pytest

from hivemesh.controlplane.audit.checkpoints import verify_log
from hivemesh.controlplane.audit.shared_log import SharedLog
from hivemesh.controlplane.audit.store import AuditStore
from hivemesh.controlplane.leader import LeaderElection
from hivemesh.mesh.audit.chain import GENESIS, seal
from hivemesh.mesh.errors import AuditUnavailableError, FailedPreconditionError
from hivemesh.mesh.etcd import EtcdServer, client, wait_connected
from hivemesh.mesh.keyspace import AUDIT_LOG, AUDIT_LOG_TAIL
from tests.support.waiting import until

NODE = "spiffe://hivemesh.test/agent/echo"
CP = "spiffe://hivemesh.test/controlplane"


@pytest.fixture(autouse=True)
async def _no_log_left(etcd: Any) -> AsyncIterator[None]:
    """A later test's control plane on the session etcd must not find this test's (trimmed) log."""
    yield
    await etcd.delete_prefix(b"/hivemesh/audit")


class NodeChain:
    """A node's own hash chain of records, as its spool builds it."""

    def __init__(self, node: str = NODE) -> None:
        self.node, self.seq, self.prev = node, 0, GENESIS

    def next(self, n: int) -> list[bytes]:
        out = []
        for _ in range(n):
            self.seq += 1
            line, self.prev = seal({"v": 1, "kind": "inbound", "node": self.node, "trace_id": f"t{self.seq}"},
                                   self.seq, self.prev)
            out.append(line.rstrip(b"\n"))
        return out


class Replica:
    """One replica's audit copy and its side of the shared log, each with its own etcd client and election."""

    def __init__(self, name: str, tmp: Path, etcd_server: EtcdServer, **shared: Any) -> None:
        self.name = name
        self.etcd = client(etcd_server.access)
        self.election = LeaderElection(self.etcd, name, ttl_s=2)
        self.store = AuditStore(tmp / name, identity=CP, checkpoint_every=10**9, checkpoint_interval_s=3600)
        self.shared = SharedLog(self.etcd, self.store, name, leading=lambda: self.election.is_leader,
                                fence=self.election.fence, **{"poll_s": 0.05, **shared})
        self.store.shared = self.shared

    async def start(self) -> Replica:
        await wait_connected(self.etcd)
        await self.election.start()
        await self.store.start()
        return self

    async def stop(self) -> None:
        await self.election.stop()
        await self.store.close()
        await self.etcd.close()

    def report(self) -> Any:
        return verify_log(self.store.lines(), self.store.checkpoints(), self.store.public_key)


async def test_ship_across_replicas_leader_change_and_concurrent_appends(
    etcd: Any, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    a = await Replica("a", tmp_path, etcd_server).start()
    b = await Replica("b", tmp_path, etcd_server).start()
    try:
        assert a.election.is_leader and not b.election.is_leader
        assert a.store.public_key.public_bytes_raw() == b.store.public_key.public_bytes_raw()  # one mesh key

        # A node ships to a, fails over to b, and comes back to a: no gap anywhere, nothing refused.
        node = NodeChain()
        assert (await a.store.append("spool-1", NODE, node.next(3)))[2] == 3
        assert (await b.store.append("spool-1", NODE, node.next(3)))[2] == 3
        last_seq, last_hash, stored = await a.store.append("spool-1", NODE, node.next(3))
        assert (last_seq, last_hash, stored) == (9, node.prev, 3)
        # A resend after a lost acknowledgement is recognised at the other replica too: stored once.
        assert (await b.store.append("spool-1", NODE, _resend(node, 2)))[2] == 0
        await b.store.sync()
        assert b.store.source_state("spool-1") == (9, node.prev)
        # A gap is still refused, whichever replica sees it.
        gap = NodeChain()
        gap.seq, gap.prev = node.seq + 1, "f" * 64
        with pytest.raises(FailedPreconditionError, match="gap"):
            await b.store.append("spool-1", NODE, gap.next(1))

        # The replicas' own decisions join the same log (committed in one etcd write, not one per record).
        commits = a.shared.commits
        for i in range(20):
            await a.store.record({"method": f"m{i}", "decision": "allow"})
        await b.store.record({"method": "from-b", "decision": "allow"})
        await a.store.sync()
        assert a.shared.commits - commits <= 3
        cp = await a.store.checkpoint()
        assert cp is not None and cp["checkpoint"] == 1
        assert await b.store.checkpoint() is None  # only the leader signs

        # Concurrent appends from both replicas (two nodes each): one total order, no duplicate, no gap.
        nodes = {f"n{i}": NodeChain(f"spiffe://hivemesh.test/agent/n{i}") for i in range(4)}

        async def ship(replica: Replica, name: str) -> None:
            for _ in range(5):
                await replica.store.append(name, nodes[name].node, nodes[name].next(4))

        await asyncio.gather(ship(a, "n0"), ship(b, "n1"), ship(a, "n2"), ship(b, "n3"))
        await a.store.sync()
        await b.store.sync()
        assert a.shared.conflicts + b.shared.conflicts > 0 or a.store.seq == b.store.seq
        for name, chain in nodes.items():
            assert a.store.source_state(name) == b.store.source_state(name) == (20, chain.prev)
        assert list(a.store.lines()) == list(b.store.lines())  # byte for byte the same log, in the same order
        ra, rb = a.report(), b.report()
        assert ra.ok and rb.ok, (ra.problem, rb.problem)
        assert ra.entries == rb.entries == 9 + 21 + 80 and ra.head_hash == rb.head_hash
        assert ra.sources == 6 and rb.checkpoints == 1

        # Leader change: a stops cleanly; b leads, holds everything a acknowledged, and continues the
        # checkpoint chain a started (numbering and signature link), with the same key.
        acked = a.store.seq
        await a.stop()
        async with asyncio.timeout(5):
            while not await _leads(b):
                pass
        await b.store.sync()
        assert b.store.seq == acked
        await b.store.append("spool-1", NODE, node.next(2))
        cp2 = await b.store.checkpoint()
        assert cp2 is not None and cp2["checkpoint"] == 2 and cp2["prev_sig"] == cp["sig"]
        rb = b.report()
        assert rb.ok and rb.checkpoints == 2 and rb.entries == acked + 2, rb.problem
        print(f"\nFIGURE shared audit log: {b.shared.commits + a.shared.commits} etcd commits for "
              f"{b.store.seq} entries; {a.shared.conflicts + b.shared.conflicts} tail conflicts retried")
    finally:
        if a.store._fd is not None:
            await a.stop()
        await b.stop()


async def _leads(replica: Replica) -> bool:
    if not replica.election.is_leader:
        await asyncio.sleep(0.05)
    return replica.election.is_leader


def _resend(node: NodeChain, n: int) -> list[bytes]:
    """The node's last n records again, exactly as it sent them."""
    again = NodeChain(node.node)
    return again.next(node.seq)[-n:]


async def test_a_replica_behind_the_trimmed_window_refuses_and_workloads_cannot_touch_the_log(
    etcd: Any, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    from hivemesh.mesh.etcd import EtcdTls, is_permission_denied
    from hivemesh.mesh.etcd_roles import ensure_workload_user
    from hivemesh.mesh.pki import parse_spiffe_id, spiffe_id_of
    from tests.support.meshenv import copy_session_ca

    a = await Replica("a", tmp_path, etcd_server, min_age_s=0).start()
    node = NodeChain()
    try:
        for _ in range(3):
            await a.store.append("spool-1", NODE, node.next(2))
        # a is the only live replica and holds everything: the leader trims etcd's window to nothing old.
        assert await a.shared.trim() == 3
        assert list(await etcd.get_prefix(AUDIT_LOG.encode())) == []
        assert await etcd.get(AUDIT_LOG_TAIL.encode()) is not None
        # A new replica with an empty copy cannot rebuild the log from etcd: it refuses, and says why.
        late = Replica("late", tmp_path, etcd_server)
        await late.start()
        try:
            with pytest.raises(FailedPreconditionError, match="restored from a live replica"):
                await late.store.sync()
            with pytest.raises(AuditUnavailableError, match="restored from a live replica"):  # a node moves on
                await late.store.append("spool-2", NODE, NodeChain().next(1))
        finally:
            await late.stop()
        # a still appends after the trim (the tail, not the window, orders the log).
        assert (await a.store.append("spool-1", NODE, node.next(1)))[0] == 7
        assert a.report().ok
        # The window never holds more than max_bytes of entries, whatever their age or who lacks them.
        before = a.store.size
        await a.store.append("spool-1", NODE, node.next(3))
        a.shared.min_age_s, a.shared.max_bytes = None, a.store.size - before
        assert await a.shared.trim() == 1
        assert [kv.key for kv in await etcd.get_prefix(AUDIT_LOG.encode())] == [f"{AUDIT_LOG}{8:020d}".encode()]
        # A tail lost under a running mesh is set again from the newest batch etcd holds; appends go on.
        await etcd.delete(AUDIT_LOG_TAIL.encode())
        assert (await a.store.append("spool-1", NODE, node.next(1)))[0] == 11
        assert (await etcd.get(AUDIT_LOG_TAIL.encode())).value.decode().startswith("11 ")

        # A workload's etcd identity (the operator's: the widest role a workload holds) can neither read nor
        # write the log, its tail, or the checkpoint key.
        certs = copy_session_ca(tmp_path / "certs")
        op = parse_spiffe_id(spiffe_id_of(certs.operator_cert.read_bytes()))
        await ensure_workload_user(etcd, op.kind, op.name)
        operator = client(etcd_server.endpoint, tls=EtcdTls.from_files(certs.ca_cert, certs.operator_cert,
                                                                       certs.operator_key))
        try:
            await wait_connected(operator)
            for key in (f"{AUDIT_LOG}{1:020d}", AUDIT_LOG_TAIL, "/hivemesh/audit-checkpoint-key",
                        "/hivemesh/audit-checkpoints/00000000000000000001"):
                with pytest.raises(Exception) as denied:
                    await operator.get(key.encode())
                assert is_permission_denied(denied.value), key
                with pytest.raises(Exception) as denied:
                    await operator.put(key.encode(), b"forged")
                assert is_permission_denied(denied.value), key
        finally:
            await operator.close()
    finally:
        await a.stop()


async def test_two_control_planes_export_one_log(mesh_env: Any, etcd_server: EtcdServer, tmp_path: Path) -> None:
    """Over gRPC, as a node and an operator reach them: ship to a, b, a; each replica's export verifies with the
    checkpoint key its CA certified (one key for both) and ends at the same head."""
    from hivemesh.controlplane.audit.heads import trusted_key_from_cert, verify_head
    from hivemesh.controlplane.server import ControlPlaneConfig, ControlPlaneServer
    from hivemesh.mesh.controlplane_client import ControlPlaneClient
    from hivemesh.v1 import audit_pb2
    from tests.support.meshenv import TRUST_DOMAIN

    a = mesh_env.controlplane
    b = ControlPlaneServer(ControlPlaneConfig(
        etcd_endpoints=etcd_server.endpoint, certs_dir=mesh_env.certs.certs_dir, state_dir=tmp_path / "b-state",
        trust_domain=TRUST_DOMAIN, leader_ttl_s=2,
    ))
    await b.start()
    op_a, op_b = mesh_env.operator, ControlPlaneClient.from_certs_dir(b.address, mesh_env.certs.certs_dir)
    try:
        chain = NodeChain(op_a.workload.spiffe_id)  # the operator ships records about itself, as a node would
        for op in (op_a, op_b, op_a):
            resp = await op.call(op.audit.AppendBatch,
                                 audit_pb2.AppendBatchRequest(source="op-spool", records=chain.next(3)))
            assert (resp.last_seq, resp.stored) == (chain.seq, 3)
        # Checkpoints: the leader (a) signs; b refuses to, and copies a's.
        with pytest.raises(FailedPreconditionError, match="leader"):
            await op_b.call(op_b.audit.CreateCheckpoint, audit_pb2.CreateCheckpointRequest())
        signed = await op_a.call(op_a.audit.CreateCheckpoint, audit_pb2.CreateCheckpointRequest())
        assert len(signed.checkpoints) == 1
        bundle = mesh_env.certs.ca_cert.read_bytes()
        exports = []
        for op in (op_a, op_b):
            lines, head = [], b""
            async for chunk in op.audit.Export(audit_pb2.ExportRequest(), timeout=30):
                lines.extend(chunk.entries)
                head = head or chunk.head
            cps = await op.call(op.audit.Checkpoints, audit_pb2.CheckpointsRequest())
            key = trusted_key_from_cert(cps.key_cert_pem, bundle, TRUST_DOMAIN)
            report = verify_log(lines, list(cps.checkpoints), key, verify_head(head, key))
            assert report.ok and report.signatures_checked, report.problem
            ships = [json_line for json_line in lines if b'"source":"op-spool"' in json_line]
            assert len(ships) == 9  # every record once, at both replicas
            assert list(cps.checkpoints) == list(signed.checkpoints) and report.checkpoints == 1
            exports.append((key.public_bytes_raw(), report, lines))
        # One key, one log: b's export holds a's entry for entry (so it passes a's head), then the records
        # of the RPCs made since (the operator's Checkpoints call at a, audited like every control-plane RPC).
        (key_a, report_a, lines_a), (key_b, report_b, lines_b) = exports
        assert key_a == key_b and lines_b[:len(lines_a)] == lines_a and report_b.head_seq >= report_a.head_seq
        assert json.loads(lines_b[report_a.head_seq - 1])["hash"] == report_a.head_hash
        assert a.replica is not None and a.replica.election.is_leader  # b copies a's checkpoints, signs none
    finally:
        await op_b.close()
        await b.stop(0.2)


async def test_own_batches_apply_as_built_a_lagging_copy_catches_up_and_a_corrupt_batch_is_refused(
    etcd: Any, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    """One etcd write per shipped batch; the replica that committed it stores exactly what every other replica
    applies (after checking each entry) from etcd; a copy that lags is caught up by its refused attempt (not a
    lost race); and a batch altered in etcd, re-sealed or not, stops a replica from following, saying why."""
    from hivemesh.controlplane.audit import batches
    from hivemesh.mesh.audit.chain import canonical

    slow = {"poll_s": 3600.0}  # no background following: each replica's copy moves only when it commits or syncs
    a = await Replica("a", tmp_path, etcd_server, **slow).start()
    b = await Replica("b", tmp_path, etcd_server, **slow).start()
    node = NodeChain()
    try:
        before = (await etcd.get(AUDIT_LOG_TAIL.encode())).mod_revision
        assert (await a.store.append("spool-1", NODE, node.next(4)))[:2] == (4, node.prev)
        tail = await etcd.get(AUDIT_LOG_TAIL.encode())
        assert tail.mod_revision == before + 1  # one write (a transaction: the batch and the tail together)
        (kv,) = list(await etcd.get_prefix(AUDIT_LOG.encode()))
        header, lines = batches.lines(kv.value)
        assert [line + b"\n" for line in lines] == [line + b"\n" for line in a.store.lines()]
        assert (header["first"], header["last"], header["end"]) == (1, 4, a.store.size)
        assert tail.value.decode() == f"4 {header['head']}" and header["head"] == a.store.head

        # b lags a: its copy still says spool-1 is new, then that 7 leaves a gap after 3. Its first attempt is
        # refused (or its check fails) on the stale copy; it catches up and commits, with no conflict counted.
        assert (await b.store.append("spool-1", NODE, node.next(2)))[:3] == (6, node.prev, 2)
        await a.store.sync()  # a catches up on b's batch: it checks every entry it applies
        chain_at_a = node.next(2)
        assert (await a.store.append("spool-1", NODE, chain_at_a))[0] == 8
        assert (await b.store.append("spool-1", NODE, node.next(1)))[:3] == (9, node.prev, 1)
        assert a.shared.conflicts == b.shared.conflicts == 0
        await a.store.sync()
        assert list(a.store.lines()) == list(b.store.lines())  # byte for byte, whichever replica built them
        assert a.store.source_state("spool-1") == b.store.source_state("spool-1") == (9, node.prev)
        assert a.report().ok and b.report().ok and a.report().entries == 9

        # A batch altered in etcd and re-sealed with a valid header and compression: its entry no longer
        # matches its hash, and a replica that applies it refuses to serve (it never stores the change).
        c = await Replica("c", tmp_path, etcd_server, **slow).start()
        try:
            assert c.store.seq == 9  # a new replica applied (and checked) the whole window at start
            await b.store.append("spool-1", NODE, node.next(1))
            key = f"{AUDIT_LOG}{10:020d}".encode()
            value = (await etcd.get(key)).value
            header, lines = batches.lines(value)
            forged = lines[0].replace(b'"trace_id":"t10"', b'"trace_id":"tX"')
            assert forged != lines[0]
            await etcd.put(key, batches.encode(header, [forged + b"\n"]))
            with pytest.raises(FailedPreconditionError, match="diverged"):
                await c.store.sync()
            assert c.store.seq == 9 and b"tX" not in b"".join(c.store.lines())
        finally:
            await c.stop()
        # Bytes that are not a batch at all (or an older value format) are refused as unreadable.
        d = Replica("d", tmp_path, etcd_server, **slow)
        await etcd.put(key, canonical({"first": 10, "last": 10, "lines": ["{}"]}))
        await d.start()
        try:
            with pytest.raises(FailedPreconditionError, match="unreadable"):
                await d.store.sync()
            with pytest.raises(AuditUnavailableError, match="unreadable"):  # a node is sent to another replica
                await d.store.append("spool-2", NODE, NodeChain().next(1))
        finally:
            await d.stop()
    finally:
        await a.stop()
        await b.stop()


class _LostAnswer:
    """The replica's etcd client, except that the answer of its first `transaction` is lost: the caller sees a
    timeout (a member cut, or slow, after the leader took the write). etcd applies that transaction at once
    ("now"), only when the next one arrives ("late": a proposal still in flight when the caller gave up and
    tried again), or never ("never": the write was lost with its answer)."""

    def __init__(self, etcd: Any, *, when: str) -> None:
        self._etcd = etcd
        self._when = when
        self._held: dict[str, Any] | None = None
        self.lost = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._etcd, name)

    async def transaction(self, **kwargs: Any) -> Any:
        import aetcd

        if self._held is not None:
            held, self._held = self._held, None
            assert (await self._etcd.transaction(**held))[0]  # the first one lands before its retry
        if self.lost:
            return await self._etcd.transaction(**kwargs)
        self.lost += 1
        if self._when == "late":
            self._held = kwargs
        elif self._when == "now":
            await self._etcd.transaction(**kwargs)
        raise aetcd.exceptions.ConnectionTimeoutError("the answer was lost (test)")


@pytest.mark.parametrize("when", ["now", "late", "never"])
async def test_a_commit_whose_answer_is_lost_is_recognised_not_written_twice(
    etcd: Any, etcd_server: EtcdServer, tmp_path: Path, when: str
) -> None:
    """The control plane's own records sent in a transaction whose answer never came: when etcd applied it
    (before the retry, or while the retry was on its way), the replica finds them in the log, drops them from
    its queue and does not commit them a second time; when etcd did not, the retry commits them, once."""
    a = await Replica("a", tmp_path, etcd_server, poll_s=0.05).start()
    try:
        lossy = _LostAnswer(a.shared.etcd, when=when)
        a.shared.etcd = lossy
        for i in range(3):
            await a.store.record({"method": f"lost-{i}", "decision": "allow"})
        assert await until(lambda: not a.store.pending, 20), list(a.store.pending)
        assert lossy.lost == 1
        await a.store.record({"method": "after", "decision": "allow"})
        await a.store.sync()
        assert not a.store.pending
        lines = list(a.store.lines())
        methods = [json.loads(line)["record"].get("method") for line in lines]
        assert methods == ["lost-0", "lost-1", "lost-2", "after"]
        # Where the settling looks first: the line at the offset its batch was written at.
        assert a.store.line_at(0) == lines[0] and a.store.line_at(len(lines[0]) + 1) == lines[1]
        assert a.store.line_at(a.store.size) is None and a.store.line_at(1) != lines[0]
        report = a.report()
        assert report.ok, report.problem
    finally:
        await a.stop()


class _TwoCopies:
    """A replica's `writes`: each commit transaction sent twice, as a hedge sends it to a second member, with the
    first copy's answer lost and the second's coming back. "lands": the first copy commits, so the answer is
    the second's refusal (the tail moved under it). "raced": another replica commits just before the first
    use, so both copies are refused and nothing of this batch is in the log."""

    def __init__(self, etcd: Any, *, when: str, other: Replica | None = None) -> None:
        self.etcd, self.when, self.other = etcd, when, other
        self.answers: list[bool] = []

    async def run(self, fn: Any) -> Any:
        if self.other is not None and self.when == "raced":
            other, self.other = self.other, None
            await other.store.record({"method": "other", "decision": "allow"})
            assert await until(lambda: not other.store.pending, 20), "the other replica did not commit"
        await fn(self.etcd)  # the first copy: its answer is lost
        answer = await fn(self.etcd)
        self.answers.append(answer)
        return answer


@pytest.mark.parametrize("when", ["lands", "raced"])
async def test_a_commit_answered_by_a_refused_copy_is_settled_from_the_log(
    etcd: Any, etcd_server: EtcdServer, tmp_path: Path, when: str
) -> None:
    """A hedged commit's first answer may be a copy refused because another copy of it committed: the control
    plane's own records are then found in the log and leave the queue (not committed a second time), and a node's
    records are acknowledged once; a refusal because another replica won the tail is not taken for a commit (the
    records go in after the other's)."""
    b = await Replica("b", tmp_path, etcd_server).start()
    copies: list[_TwoCopies] = []
    a = await Replica("a", tmp_path, etcd_server, writes=lambda fn: copies[0].run(fn)).start()
    try:
        copies.append(_TwoCopies(a.etcd, when=when, other=b))
        for i in range(3):
            await a.store.record({"method": f"x-{i}", "decision": "allow"})
        assert await until(lambda: not a.store.pending, 20), list(a.store.pending)
        node = NodeChain()
        last_seq, last_hash, _ = await a.store.append("spool-1", NODE, node.next(2))
        assert (last_seq, last_hash) == (2, node.prev)
        await a.store.record({"method": "after", "decision": "allow"})  # the node's batch left nothing to settle
        assert await until(lambda: not a.store.pending, 20), list(a.store.pending)
        assert False in copies[0].answers, "no commit was answered by a refused copy (else no test)"
        await a.store.sync()
        entries = [json.loads(line) for line in a.store.lines()]
        own = [e["record"].get("method") for e in entries if e["source"] == "controlplane"]
        assert own == (["other"] if when == "raced" else []) + ["x-0", "x-1", "x-2", "after"]
        assert [e["record"]["seq"] for e in entries if e["source"] == "spool-1"] == [1, 2]
        report = a.report()
        assert report.ok, report.problem
        await b.store.sync()
        assert list(b.store.lines()) == list(a.store.lines())
    finally:
        await a.stop()
        await b.stop()


async def test_the_leader_checkpoints_right_after_a_commit_without_reading_the_log_again(
    etcd: Any, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    """A checkpoint due after a commit signs the copy the commit just proved whole (its compare was that the
    tail is this copy's head): no catch-up read first, which on a cut member would hold the store's lock for the
    read's hedge (2 s). The checkpoints still verify with the log."""
    reads: list[int] = []
    holder: list[Replica] = []

    def counted(fn: Any) -> Any:
        reads.append(1)
        return fn(holder[0].etcd)

    # No follow rounds (each reads the tail): under load one fell between the appends and was counted.
    a = Replica("a", tmp_path, etcd_server, reads=counted, poll_s=3600)
    holder.append(a)
    await a.start()
    try:
        assert a.election.is_leader
        a.store.checkpoint_every = 2
        node = NodeChain()
        before, first_checkpoints = len(reads), len(a.store.checkpoints())
        for _ in range(3):
            assert (await a.store.append("spool-1", NODE, node.next(2)))[2] == 2
        assert len(a.store.checkpoints()) == first_checkpoints + 3
        assert len(reads) == before, "a checkpoint after a commit read the log again"
        await a.store.sync()  # a read as before: the copy and etcd agree
        report = a.report()
        assert report.ok, report.problem
    finally:
        await a.stop()


async def _cancel_at_the_fsync(store: AuditStore, work: Coroutine[Any, Any, Any]) -> None:
    """Run work (an append or a read) and cancel it, as gRPC cancels a handler whose caller went away, at the
    await right after it wrote lines to store's copy: their fsync."""
    before = store.seq
    task = asyncio.create_task(work)
    async with asyncio.timeout(10):
        # One loop step at a time, no event to wait on: the lines are written synchronously, then the fsync is
        # awaited, and that await is where the cancel must land.
        while store.seq == before and not task.done():  # noqa: ASYNC110
            await asyncio.sleep(0)
    assert not task.done(), "the work ended before it could be cancelled at its fsync"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("apply", ["as built", "caught up"])
async def test_an_append_cancelled_while_its_lines_are_synced_leaves_no_resend_to_store_twice(
    etcd: Any, etcd_server: EtcdServer, tmp_path: Path, apply: str
) -> None:
    """A node SIGKILLed mid-AppendBatch cancels the handler where it waits. Right after the lines are written
    (awaiting their fsync), the source's head must already say so: the next node to ship that spool asks
    `source_state` and resends from there, and a head left behind had those records appended twice
    (tests/e2e/test_audit_kill.py saw seq 151 twice). "as built": this replica's own commit (write_sealed_locked);
    "caught up": entries another replica committed, applied on a catch-up (apply_locked)."""
    a = await Replica("a", tmp_path, etcd_server).start()
    b = await Replica("b", tmp_path, etcd_server).start() if apply == "caught up" else a
    try:
        node = NodeChain()
        await a.store.append("spool-1", NODE, node.next(2))
        if b is not a:
            await b.store.sync()
            await a.store.append("spool-1", NODE, node.next(3))  # b's copy is now behind: its next append catches up
            batch, appender = node.next(2), b
        else:
            batch, appender = node.next(3), a
        await _cancel_at_the_fsync(appender.store, appender.store.append("spool-1", NODE, batch))
        # What the copy holds and what it says about the source agree: the resend is recognised, stored once.
        last = [json.loads(line) for line in appender.store.lines()][-1]
        assert appender.store.source_state("spool-1")[0] == last["record"]["seq"], (
            appender.store.source_state("spool-1"), last["record"]["seq"])
        resend_from = appender.store.source_state("spool-1")[0]
        stored = (await appender.store.append("spool-1", NODE, _resend(node, node.seq - resend_from)))[2] \
            if node.seq > resend_from else 0
        assert appender.store.source_state("spool-1") == (node.seq, node.prev)
        report = appender.report()
        assert report.ok, report.problem
        assert report.entries == node.seq, (report.entries, node.seq, stored)
    finally:
        if b is not a:
            await b.stop()
        await a.stop()


async def test_own_records_committed_by_a_cancelled_read_are_not_committed_again(
    etcd: Any, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    """A read (query, export, verify) first commits the control plane's pending records; cancelled by its
    caller right after their commit, while the lines are synced, the records must be off the queue already, or
    the next commit chains them again (each decision in the log twice)."""
    a = await Replica("a", tmp_path, etcd_server, poll_s=3600).start()  # no background commit: the read does it
    try:
        for i in range(3):
            await a.store.record({"method": f"m{i}", "decision": "allow"})
        assert len(a.store.pending) == 3
        await _cancel_at_the_fsync(a.store, a.store.sync())
        assert not a.store.pending
        await a.store.record({"method": "after", "decision": "allow"})
        await a.store.sync()
        methods = [json.loads(line)["record"].get("method") for line in a.store.lines()]
        assert methods == ["m0", "m1", "m2", "after"]
        report = a.report()
        assert report.ok, report.problem
    finally:
        await a.stop()

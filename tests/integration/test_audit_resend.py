"""A node's resend of audit records it already shipped, over the real control plane (the mesh-wide log in the
session etcd) and real gRPC: acknowledged only when each resent record is the one stored at its seq; one that
differs, at any seq at or below the stored head (not only at the head), is refused with FAILED_PRECONDITION naming
the seq and the node, and nothing of its batch is stored. Every replica compares alike (one that applied the
records from etcd, and one restarted from its copy), opening the log once for a resent run in any order. The
index that finds a stored record keeps one offset in 64 records and at most its cap per source, and a record
stored as a line far longer than it was sent (\\u escapes) is compared like any other."""

from __future__ import annotations

import json
import random
from array import array
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from hivemesh.controlplane.audit.store import AuditStore
from hivemesh.mesh.audit import GENESIS, seal
from hivemesh.mesh.errors import FailedPreconditionError, InvalidInputError
from hivemesh.mesh.etcd import EtcdServer
from hivemesh.v1 import audit_pb2
from tests.integration.test_audit_shared_log import Replica
from tests.support.meshenv import MeshEnv

NODE = "spiffe://hivemesh.test/agent/echo"


@pytest.fixture(autouse=True)
async def _no_log_left(etcd: Any) -> AsyncIterator[None]:
    yield
    await etcd.delete_prefix(b"/hivemesh/audit")


def chain(node: str, n: int, *, start: int = 1, prev: str = GENESIS, tag: str = "t") -> list[bytes]:
    """Records start..start+n-1 of a node's hash chain after prev; tag varies their content."""
    out = []
    for seq in range(start, start + n):
        line, prev = seal({"v": 1, "kind": "inbound", "node": node, "decision": "allow", "trace_id": f"{tag}{seq}"},
                          seq, prev)
        out.append(line.rstrip(b"\n"))
    return out


class LineReads:
    """Counts the stored lines a store reads one by one (`AuditStore.line_at`, an open and a read each): a resend
    reads none of them (it reads the log through `AuditStore.resend_reads`' one open file a batch)."""

    def __init__(self, store: Any) -> None:
        self.offsets: list[int] = []
        self._read = store.line_at
        store.line_at = self

    def __call__(self, offset: int) -> bytes | None:
        self.offsets.append(offset)
        line: bytes | None = self._read(offset)
        return line


def index_entries(store: Any, source: str) -> int:
    """How many offsets a store keeps to find source's stored records (every array of its state)."""
    return sum(len(v) for v in vars(store._sources[source]).values() if isinstance(v, array))


def stored_lines(store: Any) -> int:
    return sum(1 for _ in store.lines())


def hash_of(record: bytes) -> str:
    return str(json.loads(record)["hash"])


async def test_a_resend_that_differs_from_the_stored_record_is_refused_at_any_seq(mesh_env: MeshEnv) -> None:
    op = mesh_env.operator
    me = str(op.workload.spiffe_id)
    records = chain(me, 7)

    async def append(batch: list[bytes]) -> audit_pb2.AppendBatchResponse:
        resp: audit_pb2.AppendBatchResponse = await op.audit.AppendBatch(
            audit_pb2.AppendBatchRequest(source="spool-r", records=batch), timeout=30)
        return resp

    async def refused(batch: list[bytes]) -> str:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await append(batch)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value
        return info.value.details() or ""

    assert (await append(records[:3])).stored == 3
    assert (await append(records[3:6])).stored == 3
    # True resends after a reconnect are acknowledged, storing nothing: below the head, up to it, and across it.
    for again in (records[:3], records[1:2], records[3:6], records[:6]):
        resp = await append(again)
        assert (resp.last_seq, resp.stored) == (6, 0)
    resp = await append(records[2:7])
    assert (resp.last_seq, resp.last_hash, resp.stored) == (7, hash_of(records[6]), 1)

    # Another record at a stored seq below the head: alone, among true resends, ahead of a new record, or the
    # start of another chain reaching the head. Each is refused naming the seq and the node; nothing is stored.
    other = chain(me, 7, tag="forged-")
    eighth = chain(me, 1, start=8, prev=hash_of(records[6]))
    for batch, seq in [([other[1]], 2), ([records[0], other[1], *records[2:5]], 2),
                       ([other[4], *eighth], 5), (chain(me, 5, start=3, prev=hash_of(records[1]), tag="alt-"), 7),
                       ([other[6]], 7)]:
        details = await refused(batch)
        assert f"seq {seq} of {me}" in details and "differs from the record stored" in details, details
    state = await op.audit.SourceState(audit_pb2.SourceStateRequest(source="spool-r"), timeout=30)
    assert (state.last_seq, state.last_hash) == (7, hash_of(records[6]))
    entries = (await op.audit.Query(audit_pb2.AuditQueryRequest(limit=1000), timeout=30)).entries
    stored = [json.loads(e)["record"] for e in entries if json.loads(e)["source"] == "spool-r"]
    assert [r["hash"] for r in stored] == [hash_of(r) for r in records], "only the true records, once each"
    assert (await append(eighth)).stored == 1  # the node goes on from its head
    assert (await op.audit.Verify(audit_pb2.AuditVerifyRequest(), timeout=30)).ok


async def check_resends(store: Any, records: list[bytes]) -> None:
    """store acknowledges true resends of records (all stored) and refuses changed ones, opening the log at most
    once per batch (never for a run that reaches the head), whatever the order of the resent records."""
    for changed in (chain(NODE, 3, start=12, prev=hash_of(records[10]), tag="x"), chain(NODE, 1, tag="x")):
        seq = json.loads(changed[-1])["seq"]
        with pytest.raises(FailedPreconditionError, match=f"seq {seq} of {NODE} .*differs"):
            await store.append("spool-1", NODE, changed)
    reads = LineReads(store)
    for again in (records[5:25], records[24:4:-1], records[0:1]):  # below the head, descending too
        assert (await store.append("spool-1", NODE, again))[2] == 0
    assert reads.offsets == []  # not a line at a time (an open each): one open of the log a batch
    opens = store.resend_reads.opens
    assert (await store.append("spool-1", NODE, records[30:40]))[2] == 0  # up to the head: no read at all
    assert store.resend_reads.opens == opens
    assert (await store.append("spool-1", NODE, records[24:4:-1]))[2] == 0
    assert store.resend_reads.opens == opens + 1
    assert store.source_state("spool-1") == (40, hash_of(records[39]))
    assert len(list(store.lines())) == 40


async def test_every_replica_compares_resends_with_the_stored_records_opening_the_log_once_a_batch(
        etcd: Any, etcd_server: EtcdServer, tmp_path: Path) -> None:
    """Replica a stores the records, b holds them as applied from etcd, and c is b's copy reopened (its index
    rebuilt from the file): each acknowledges a true resend and refuses a changed one. A resent run, in any
    order, is compared through its highest record: with the head in memory, or with the stored one, found by
    reading on from the offset indexed at or before it."""
    a = await Replica("a", tmp_path, etcd_server).start()
    b = await Replica("b", tmp_path, etcd_server).start()
    try:
        records = chain(NODE, 40)
        for i in range(0, 40, 10):
            assert (await a.store.append("spool-1", NODE, records[i:i + 10]))[2] == 10
        await b.store.sync()
        for replica in (a, b):
            await check_resends(replica.store, records)
        await b.stop()
        b = c = await Replica("b", tmp_path, etcd_server).start()  # the same folder: recovered from its copy
        await check_resends(c.store, records)
    finally:
        await a.stop()
        await b.stop()


async def test_a_source_index_keeps_one_offset_in_64_records_and_at_most_its_cap(tmp_path: Path) -> None:
    """The index that finds a stored record (to compare a resend with) grows by one offset per 64 records of a
    source, not one per record, and no further than its cap (every other offset dropped, the stride doubled):
    3836e90 kept 8 bytes per record for the process's life. Resends below the head are compared through it, with
    another source's batches between, and after a restart (the index rebuilt from the file)."""
    one, two = chain(NODE, 4000, tag="one-"), chain(NODE, 4000, tag="two-")
    forged = chain(NODE, 1300, tag="forged-")[-1]  # seq 1300, another record

    async def fill(store: Any) -> None:
        for i in range(0, 4000, 100):  # the two sources' batches take turns in the log
            assert (await store.append("spool-1", NODE, one[i:i + 100]))[2] == 100
            assert (await store.append("spool-2", NODE, two[i:i + 100]))[2] == 100

    async def resends(store: Any) -> None:
        for again in (one[:1], one[1499:2499][::-1], one[2999:3031:2], one[3998:3999], two[63:64]):
            source = "spool-2" if again[0] in two else "spool-1"
            assert (await store.append(source, NODE, again))[2] == 0
        with pytest.raises(FailedPreconditionError, match=f"seq 1300 of {NODE} .*differs from the record stored"):
            await store.append("spool-1", NODE, [*one[1289:1299], forged, *one[1300:1310]])
        assert store.source_state("spool-1") == (4000, hash_of(one[-1]))
        assert stored_lines(store) == 8000

    store = AuditStore(tmp_path / "sparse").open()
    try:
        await fill(store)
        assert [index_entries(store, s) for s in ("spool-1", "spool-2")] == [63, 63]  # seqs 1, 65, ... 3969
        await resends(store)
    finally:
        await store.close()
    store = AuditStore(tmp_path / "sparse").open()  # restarted: the same index, rebuilt from the log
    try:
        assert [index_entries(store, s) for s in ("spool-1", "spool-2")] == [63, 63]
        await resends(store)
    finally:
        await store.close()

    capped = AuditStore(tmp_path / "capped").open()
    capped.index_stride, capped.index_marks = 4, 8  # 8 offsets at most: every 512th record's by 4000 records
    try:
        await fill(capped)
        assert [index_entries(capped, s) for s in ("spool-1", "spool-2")] == [8, 8]
        await resends(capped)
    finally:
        await capped.close()


async def test_a_resend_in_any_order_opens_the_log_once_a_batch(tmp_path: Path) -> None:
    """1,000 stored records resent below the head, descending or shuffled, are compared through one open of the
    log and one read (3836e90: an open and a read per record, on the event loop, under the store's lock). A
    batch of scattered stored seqs costs one open too, and more than 16 separate runs of them are refused
    INVALID_ARGUMENT (they had one batch read the source's whole stretch of the log)."""
    records = chain(NODE, 3000)
    store = AuditStore(tmp_path / "audit").open()
    try:
        for i in range(0, 3000, 1000):
            assert (await store.append("spool-1", NODE, records[i:i + 1000]))[2] == 1000
        line_reads = LineReads(store)
        shuffled = records[1000:2000]
        random.Random(7).shuffle(shuffled)
        # Reads so far: a lookup reads on from the offset indexed at or before its seq, < 64 lines in one read.
        for n, (again, reads) in enumerate([(records[1999:999:-1], 1), (shuffled, 2), (records[100:1700:100], 18)]):
            assert (await store.append("spool-1", NODE, again))[2] == 0
            assert line_reads.offsets == []
            assert store.resend_reads.opens == n + 1, store.resend_reads
            assert store.resend_reads.reads <= reads, store.resend_reads

        forged = chain(NODE, 1500, tag="forged-")[-1]
        with pytest.raises(FailedPreconditionError, match=f"seq 1500 of {NODE} .*differs from the record stored"):
            await store.append("spool-1", NODE, [*records[1999:1499:-1], forged, *records[1498:999:-1]])
        with pytest.raises(InvalidInputError, match="more than 16 separate runs of stored records"):
            await store.append("spool-1", NODE, [*records[100:1800:100], *chain(NODE, 1, start=3001,
                                                                              prev=hash_of(records[-1]))])
        assert store.resend_reads.opens == 4  # the refused batch read nothing
        assert store.source_state("spool-1") == (3000, hash_of(records[-1]))
        assert stored_lines(store) == 3000
    finally:
        await store.close()


def long_record(node: str, seq: int, prev: str, fill: str) -> tuple[bytes, str]:
    """A record sent as raw UTF-8 within 64 KiB whose canonical (stored) form is ~6x longer (fill escaped as
    \\u007f or \\u00e9): (the record as sent, its hash)."""
    n = 65_000 // len(fill.encode())
    while True:
        line, digest = seal({"v": 1, "kind": "inbound", "node": node, "note": fill * n}, seq, prev)
        sent = json.dumps(json.loads(line), ensure_ascii=False, separators=(",", ":")).encode()
        if len(sent) <= 64 * 1024:
            return sent, digest
        n -= 10


async def test_a_long_record_is_compared_on_a_resend_before_and_after_a_restart(
        etcd: Any, etcd_server: EtcdServer, tmp_path: Path) -> None:
    """A record of 64 KiB as sent is stored as a line of up to ~392 KB (DEL and accented letters written as
    \\u escapes): its true resend below the head is acknowledged, and one that differs refused, on the replica
    that stored it and after its restart (3836e90 read at most 135 KB of a line: FAILED_PRECONDITION "restart the
    control plane", before and after a restart)."""
    a = await Replica("a", tmp_path, etcd_server).start()
    try:
        dels, h1 = long_record(NODE, 1, GENESIS, "\x7f")
        accents, h2 = long_record(NODE, 2, h1, "é")
        rest = chain(NODE, 2, start=3, prev=h2)
        assert (await a.store.append("spool-1", NODE, [dels, accents, *rest]))[2] == 4
        assert max(len(line) for line in a.store.lines()) > 380_000
        other, _ = long_record(NODE, 1, GENESIS, "\x7e\x7f")
        for when in ("before", "after"):
            for again in ([dels], [accents], [dels, accents], [accents, dels, rest[0]]):
                assert (await a.store.append("spool-1", NODE, again))[2] == 0, when
            with pytest.raises(FailedPreconditionError, match=f"seq 1 of {NODE} .*differs from the record stored"):
                await a.store.append("spool-1", NODE, [other])
            await a.stop()
            a = await Replica("a", tmp_path, etcd_server).start()  # the same folder: recovered from its copy
        assert a.store.source_state("spool-1") == (4, hash_of(rest[-1]))
        assert stored_lines(a.store) == 4
    finally:
        await a.stop()


async def test_a_log_changed_under_the_store_is_named_without_sending_operators_to_restart(tmp_path: Path) -> None:
    """A stored record no longer where the store indexed it (its log edited on disk while it ran) is refused with
    FAILED_PRECONDITION naming the file and Verify: a restart, which 3836e90's message asked for, does not
    repair a changed log."""
    records = chain(NODE, 10)
    store = AuditStore(tmp_path / "audit").open()
    try:
        assert (await store.append("spool-1", NODE, records))[2] == 10
        data = store.log_path.read_bytes()
        lines = data.split(b"\n")
        lines[4] = lines[4].replace(b'"source":"spool-1"', b'"source":"spool-X"')  # seq 5's entry, same length
        store.log_path.write_bytes(b"\n".join(lines))
        with pytest.raises(FailedPreconditionError) as info:
            await store.append("spool-1", NODE, records[4:5])
        message = info.value.message
        assert "seq 5 of" in message and str(store.log_path) in message and "audit verify" in message, message
        assert "restart" not in message, message
    finally:
        await store.close()

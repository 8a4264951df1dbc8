"""A node's resend of audit records it already shipped, over the real control plane (the mesh-wide log in the
session etcd) and real gRPC: acknowledged only when each resent record is the one stored at its seq; one that
differs, at any seq at or below the stored head (not only at the head), is refused with FAILED_PRECONDITION naming
the seq and the node, and nothing of its batch is stored. Every replica compares alike (one that applied the
records from etcd, and one restarted from its copy), reading at most one stored line for a resent run."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from hivemesh.mesh.audit import GENESIS, seal
from hivemesh.mesh.errors import FailedPreconditionError
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
    """Counts the stored lines a store reads by offset (`AuditStore.line_at`, which it still does)."""

    def __init__(self, store: Any) -> None:
        self.offsets: list[int] = []
        self._read = store.line_at
        store.line_at = self

    def __call__(self, offset: int) -> bytes | None:
        self.offsets.append(offset)
        line: bytes | None = self._read(offset)
        return line


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
    """store acknowledges true resends of records (all stored) and refuses changed ones, reading at most one
    stored line per resent run."""
    for changed in (chain(NODE, 3, start=12, prev=hash_of(records[10]), tag="x"), chain(NODE, 1, tag="x")):
        seq = json.loads(changed[-1])["seq"]
        with pytest.raises(FailedPreconditionError, match=f"seq {seq} of {NODE} .*differs"):
            await store.append("spool-1", NODE, changed)
    reads = LineReads(store)
    assert (await store.append("spool-1", NODE, records[30:40]))[2] == 0  # up to the head: no read
    assert (await store.append("spool-1", NODE, records[5:25]))[2] == 0  # below it: one line (seq 25's)
    assert (await store.append("spool-1", NODE, records[0:1]))[2] == 0
    at, offset = {}, 0  # where each record's entry starts in the file
    for line in store.lines():
        at[json.loads(line)["record"]["seq"]] = offset
        offset += len(line) + 1
    assert reads.offsets == [at[25], at[1]], (reads.offsets, at)
    assert store.source_state("spool-1") == (40, hash_of(records[39]))
    assert len(list(store.lines())) == 40


async def test_every_replica_compares_resends_with_the_stored_records_reading_at_most_one_line(
        etcd: Any, etcd_server: EtcdServer, tmp_path: Path) -> None:
    """Replica a stores the records, b holds them as applied from etcd, and c is b's copy reopened (its index
    rebuilt from the file): each acknowledges a true resend and refuses a changed one. A resent run is compared
    through its last record: with the head in memory, or with one stored line read at its offset."""
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

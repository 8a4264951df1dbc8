"""Hostile input to the audit pipeline, on real files: records no verifier accepts are refused at ingest (the
log stays verifiable), refusals quote bounded text, query filters are bounded, a query answers within a byte
budget and pages on, offline verification reports malformed checkpoints instead of raising, and a short write
(a full disk: a file-size limit in a child process) leaves neither the spool nor the log with half a line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from hivemesh.controlplane.audit import AuditFilter, AuditStore, verify_log
from hivemesh.mesh.audit import GENESIS, seal, verify_chain
from hivemesh.mesh.errors import InvalidInputError, PermissionDeniedError
from tests.support.audit_rig import NODE, fields

SEND_LIMIT = 8 * 1024 * 1024
"""The control plane's gRPC send limit: an answer over it fails RESOURCE_EXHAUSTED."""
STATUS_BUDGET = 1024
"""Far below the 16 KiB a status's details may take: what a refusal quotes must stay small."""


def _record(seq: Any, prev: Any, **extra: Any) -> bytes:
    line, _ = seal({**fields(0), **extra}, seq, prev)
    return line.rstrip(b"\n")


def _store(tmp_path: Path) -> AuditStore:
    return AuditStore(tmp_path / "cp", identity="spiffe://hivemesh.local/controlplane").open()


@pytest.mark.parametrize(("seq", "prev", "why"), [
    (True, GENESIS, "seq is not an integer"),
    (1, 12345, "prev is not 64 hex digits"),
    (1, "not-a-hash", "prev is not 64 hex digits"),
    (-5, GENESIS, "seq is outside"),
    (0, GENESIS, "seq is outside"),
    (2**63, GENESIS, "seq is outside"),
    (2**64 + 3, GENESIS, "seq is outside"),
])
async def test_a_record_no_verifier_accepts_is_refused_at_ingest(
    tmp_path: Path, seq: Any, prev: Any, why: str
) -> None:
    store = _store(tmp_path)
    try:
        await store.append("src", NODE, [_record(1, GENESIS)])  # a good chain: the bad record is its only fault
        bad = _record(seq, prev)
        with pytest.raises(InvalidInputError) as refused:
            await store.append("fresh", NODE, [bad, _record(2, json.loads(bad)["hash"])])
        assert why in refused.value.message and "records[0]" in refused.value.field_violations
        assert store.seq == 1 and store.source_state("fresh") == (0, GENESIS), "nothing of the batch is stored"
        report = store.verify()
        assert report.ok, report.problem
        # The verifier's own rule is the ingest's: such a record is a chain problem there too.
        count, problem = verify_chain([bad], first_seq=1)
        assert count == 0 and problem is not None and why in problem.reason
    finally:
        await store.close()


async def test_a_refusal_quotes_a_bounded_part_of_the_node_it_names(tmp_path: Path) -> None:
    store = _store(tmp_path)
    try:
        with pytest.raises(PermissionDeniedError) as refused:
            await store.append("huge", NODE, [_record(1, GENESIS, node="x" * 40_000)])
        assert len(refused.value.message) < STATUS_BUDGET, len(refused.value.message)
    finally:
        await store.close()


@pytest.mark.parametrize("name", ["since", "until"])
@pytest.mark.parametrize("text", ["x" * 20_000, "x" * 1000, "nan", "inf", "-inf", "1e999"])
def test_a_time_filter_is_refused_with_a_bounded_message_naming_it(name: str, text: str) -> None:
    with pytest.raises(InvalidInputError) as refused:
        AuditFilter.from_strings(**{name: text})
    err = refused.value
    assert list(err.field_violations) == [name]
    assert len(err.message) < STATUS_BUDGET and all(len(v) < STATUS_BUDGET for v in err.field_violations.values())


@pytest.mark.parametrize("name", ["caller", "capability", "principal", "agent", "jti", "trace_id"])
def test_a_text_filter_longer_than_1_kib_is_refused_at_once(name: str) -> None:
    AuditFilter(**{name: "[" * 1024})  # the limit itself is taken
    started = time.monotonic()
    with pytest.raises(InvalidInputError) as refused:
        AuditFilter(**{name: "[" * 20_000})  # translated, 9 s on the control plane's event loop
    assert time.monotonic() - started < 1.0
    assert list(refused.value.field_violations) == [name] and name in refused.value.message


async def test_a_query_answers_within_its_byte_budget_and_pages_on_to_every_entry(tmp_path: Path) -> None:
    store = _store(tmp_path)
    try:
        prev, lines = GENESIS, []
        for seq in range(1, 201):  # 200 legal 60 KB records: 12 MB, over the server's 8 MiB send limit
            line, prev = seal({**fields(seq), "message": "m" * 60_000}, seq, prev)
            lines.append(line.rstrip(b"\n"))
        for i in range(0, 200, 50):
            await store.append("fat", NODE, lines[i:i + 50])
        await store.record({"method": "Join", "decision": "allow"})  # the last entry does not match the filter
        flt_args = {"agent": NODE}

        def pages(tail: bool) -> list[int]:
            """Page as the CLI does: on from after_seq + covered while short of the limit and of the head."""
            seqs: list[int] = []
            after, first = 0, True
            while True:
                page, covered = store.query(AuditFilter(after_seq=after, **flt_args), limit=200 - len(seqs),
                                            tail=tail and first)
                assert sum(len(e) for e in page) <= SEND_LIMIT // 2 and (page or not covered)
                seqs += [json.loads(e)["seq"] for e in page]
                after, first = after + covered, False
                if len(seqs) >= 200 or not covered or after >= store.seq:
                    return seqs

        page, covered = store.query(AuditFilter(**flt_args), limit=200)
        assert 0 < len(page) < 200 and covered == len(page), "cut short at the budget, covering only its entries"
        assert pages(tail=False) == list(range(1, 201))
        assert pages(tail=True) == list(range(1, 201))
        # A tail of 20 of them fits: the newest 20, covering the whole log.
        page, covered = store.query(AuditFilter(**flt_args), limit=20, tail=True)
        assert [json.loads(e)["seq"] for e in page] == list(range(181, 201)) and covered == store.seq
    finally:
        await store.close()


@pytest.mark.parametrize("bad", [
    {"log_seq": [1]}, {"log_seq": "7"}, {"log_seq": None}, {"log_seq": True}, {"log_seq": -1}, {"log_seq": {}},
])
def test_unsigned_checkpoints_that_are_malformed_are_a_problem_not_a_crash(bad: dict[str, Any]) -> None:
    line, _ = seal({"source": "s", "record": json.loads(_record(1, GENESIS))}, 1, GENESIS)
    cp = {"checkpoint": 1, "head": json.loads(line)["hash"], "time": "", "prev_sig": "", "kid": "k", "sig": "x",
          **bad}
    report = verify_log([line.rstrip(b"\n")], [json.dumps(cp)])
    assert not report.ok and report.problem is not None and "checkpoint 1 is malformed" in report.problem.reason


def test_a_record_nested_deeper_than_json_reads_is_a_chain_problem() -> None:
    deep = b'{"seq":1,"prev":"' + GENESIS.encode() + b'","hash":"' + b"0" * 64 + b'","x":' + b"[" * 100_000 + \
        b"]" * 100_000 + b"}"
    count, problem = verify_chain([deep])
    assert count == 0 and problem is not None
    report = verify_log([deep])
    assert not report.ok


_SHORT_WRITE = textwrap.dedent("""
    import asyncio, json, os, resource, signal, sys
    from hivemesh.controlplane.audit import AuditStore
    from hivemesh.mesh.audit import Spool, verify_chain
    from hivemesh.mesh.errors import AuditUnavailableError

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, write() returns short instead of killing us
    where = sys.argv[1]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def full_disk(size):  # the next write stops 10 bytes into its line
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, hard))

    def spool():
        sp = Spool(where, fsync_interval_s=0.2).open()
        for i in range(3):
            sp.append({"kind": "inbound", "i": i})
        full_disk(sum(os.path.getsize(p) for p in sp.dir.glob("audit-*.log")))
        try:
            sp.append({"kind": "inbound", "i": 3})
            refused = False
        except AuditUnavailableError:
            refused = True
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        acked = sp.append({"kind": "inbound", "i": 4})
        sp.close()
        again = Spool(where, fsync_interval_s=0.2).open()
        count, problem = verify_chain(list(again.lines()))
        out = {"refused": refused, "acked": acked, "seq": again.seq, "count": count, "problem": str(problem or "")}
        again.close()
        return out

    async def store():
        st = AuditStore(where, identity="cp").open()
        for i in range(3):
            await st.record({"method": f"m{i}"})
        full_disk(os.path.getsize(st.log_path))
        try:
            await st.record({"method": "m3"})
            refused = False
        except AuditUnavailableError:
            refused = True
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        acked = await st.record({"method": "m4"})
        report = st.verify()
        await st.close()
        again = AuditStore(where, identity="cp").open()
        out = {"refused": refused, "acked": acked, "seq": again.seq, "count": report.entries,
               "problem": str(report.problem or "")}
        await again.close()
        return out

    print(json.dumps(spool() if sys.argv[2] == "spool" else asyncio.run(store())))
""")


@pytest.mark.parametrize("what", ["spool", "store"])
def test_a_short_write_is_cut_off_so_later_records_survive_a_restart(tmp_path: Path, what: str) -> None:
    done = subprocess.run([sys.executable, "-c", _SHORT_WRITE, str(tmp_path / what), what],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["refused"], "the write that did not fit is refused (the call fails closed)"
    assert got["problem"] == "", got
    assert got["acked"] == got["seq"] == got["count"] == 4, f"the acknowledged record 4 survives a restart: {got}"

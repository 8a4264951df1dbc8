"""Paged prefix reads (`etcd.read_prefix`) against a real etcd, at a small scale.

A prefix is read in pages so that one larger than an etcd client's receive limit (64 MiB, `MAX_READ_BYTES`) stays
readable. Showing that at the real limit needs over 64 MiB of data, so these tests use a client that accepts at
most LIMIT bytes an answer: a few hundred KiB then needs many pages, as gigabytes would with the real limit. The
held-call queue and the workflow journal read through it too, and are checked through their own APIs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aetcd
import pytest
from aetcd import rpc
from aetcd.utils import prefix_range_end

from hivemesh.mesh.etcd import EtcdServer, client, read_prefix, too_large, wait_connected
from hivemesh.mesh.keyspace import QUEUE
from hivemesh.mesh.queue import CallQueue
from hivemesh.sdk.workflow.state import WorkflowState
from hivemesh.sdk.workflow.store import INDEX, WorkflowStore, events_prefix

LIMIT = 64 * 1024
"""The small client's receive limit: 1/1024 of the real one."""
PREFIX = b"/test/paging/"


@pytest.fixture
async def small(etcd: aetcd.Client, etcd_server: EtcdServer) -> AsyncIterator[aetcd.Client]:
    """A root client of the session etcd that accepts answers of at most LIMIT bytes."""
    c = client(etcd_server.access, max_receive_bytes=LIMIT)
    await wait_connected(c)
    try:
        yield c
    finally:
        await c.close()
        await etcd.delete_prefix(PREFIX)


async def _refused_in_one_answer(c: aetcd.Client, prefix: bytes) -> bool:
    """True when a single read of prefix (aetcd's get_prefix) is refused for its size: paging is needed."""
    try:
        await c.get_prefix(prefix)
    except aetcd.exceptions.ClientError as exc:
        return too_large(exc)
    return False


async def _paged(c: aetcd.Client, prefix: bytes, **kwargs: Any) -> tuple[list[Any], int]:
    """read_prefix, bounded: a cursor that stopped moving would otherwise read for ever."""
    return await asyncio.wait_for(read_prefix(c, prefix, **kwargs), 20)


def _value(i: int, size: int) -> bytes:
    """A value that names its key (so a value read under the wrong key shows), padded to size."""
    head = b"value-%04d:" % i
    return head + b"x" * (size - len(head))


async def test_a_prefix_larger_than_one_answer_is_read_whole_in_pages(
    etcd: aetcd.Client, small: aetcd.Client
) -> None:
    """~600 KiB under a prefix, ten answers' worth: a single read is refused, the paged one reads every key once,
    in key order, with its value, and nothing outside the prefix."""
    await etcd.put(PREFIX.rstrip(b"/"), b"outside")  # the prefix without its slash
    await etcd.put(PREFIX[:-1] + b"0", b"outside")  # the first key past the prefix's range
    sizes = [1 + (i * 7919) % 9000 for i in range(150)]  # 1 B to 9 KB, mixed, so pages grow and shrink
    for i, size in enumerate(sizes):
        await etcd.put(PREFIX + b"k%04d" % i, _value(i, max(size, 12)))
    assert sum(sizes) > 8 * LIMIT
    assert await _refused_in_one_answer(small, PREFIX)

    kvs, revision = await _paged(small, PREFIX)
    assert [bytes(kv.key) for kv in kvs] == [PREFIX + b"k%04d" % i for i in range(150)]
    assert [bytes(kv.value) for kv in kvs] == [_value(i, max(s, 12)) for i, s in enumerate(sizes)]
    assert revision >= max(int(kv.mod_revision) for kv in kvs)
    keys, _ = await _paged(small, PREFIX, keys_only=True, page=1)
    assert [bytes(kv.key) for kv in keys] == [bytes(kv.key) for kv in kvs]
    await etcd.delete(PREFIX.rstrip(b"/"))
    await etcd.delete(PREFIX[:-1] + b"0")


async def test_values_near_the_receive_limit_are_read_one_a_page(etcd: aetcd.Client, small: aetcd.Client) -> None:
    """Small keys, then values just under the receive limit (only one fits an answer), then small keys again:
    the pages that grew over the small ones shrink to one key for the large ones, and grow again after."""
    near = LIMIT - 256  # the key, revisions and the answer's header fit in the rest
    layout = [40] * 60 + [near] * 6 + [40] * 60
    for i, size in enumerate(layout):
        await etcd.put(PREFIX + b"k%04d" % i, _value(i, size))
    assert await _refused_in_one_answer(small, PREFIX)

    kvs, _ = await _paged(small, PREFIX)
    assert [bytes(kv.key) for kv in kvs] == [PREFIX + b"k%04d" % i for i in range(len(layout))]
    assert [len(kv.value) for kv in kvs] == layout
    assert all(bytes(kv.value) == _value(i, size) for i, (kv, size) in enumerate(zip(kvs, layout, strict=True)))


async def test_one_value_larger_than_the_receive_limit_is_refused_not_skipped(
    etcd: aetcd.Client, small: aetcd.Client
) -> None:
    """A single key-value larger than an answer can hold can never be read: read_prefix raises the size refusal
    (too_large: never worth retrying) rather than loop or leave the key out. Its key is still listed keys-only."""
    for i in range(20):
        await etcd.put(PREFIX + b"k%04d" % i, _value(i, 2000))
    await etcd.put(PREFIX + b"k0010a", b"y" * (LIMIT + 1024))
    with pytest.raises(aetcd.exceptions.ClientError) as refused:
        await _paged(small, PREFIX)
    assert too_large(refused.value), refused.value
    keys, _ = await _paged(small, PREFIX, keys_only=True)
    assert PREFIX + b"k0010a" in [bytes(kv.key) for kv in keys] and len(keys) == 21


async def test_writes_and_deletes_between_pages_do_not_change_what_is_read(
    etcd: aetcd.Client, small: aetcd.Client
) -> None:
    """Every page is read at the first page's revision: while the pages are read, keys not yet read are deleted
    and rewritten and keys are added past the cursor, and the read still returns exactly the prefix as it was
    at that revision (each key once, in order, its value then), never a mix of before and after."""
    count, size = 40, 20_000  # three values an answer: over a dozen pages
    before = {PREFIX + b"k%04d" % i: _value(i, size) for i in range(count)}
    for key, value in before.items():
        await etcd.put(key, value)
    reading = asyncio.Event()
    landed: list[int] = []  # revisions of the writes that completed while the read ran

    async def write_while_reading() -> None:
        """Work from the end of the prefix (the last pages): delete, rewrite and add keys, until the read ends."""
        n = 0
        while reading.is_set():
            victim = PREFIX + b"k%04d" % (count - 1 - n % (count // 2))
            if n % 3 == 0:
                resp = await etcd.delete(victim)
            elif n % 3 == 1:
                resp = await etcd.put(victim, b"rewritten")
            else:
                resp = await etcd.put(PREFIX + b"k%04dz-%d" % (count - 1, n), b"added")
            if reading.is_set():
                landed.append(int(resp.header.revision))
            n += 1

    for _attempt in range(5):  # the writer must land writes between pages; the read's pace decides how many
        reading.set()
        landed.clear()
        writer = asyncio.create_task(write_while_reading())
        await asyncio.sleep(0)  # the writer's first request is in flight as the read starts
        try:
            kvs, revision = await _paged(small, PREFIX)
        finally:
            reading.clear()
            await writer
        got = [(bytes(kv.key), bytes(kv.value)) for kv in kvs]
        assert got == await _read_at(etcd, revision)  # the prefix as it was then, read in one answer
        assert [k for k, _ in got] == sorted({k for k, _ in got}), "a key out of order or read twice"
        if sum(rev > revision for rev in landed) >= 3:
            break
    else:
        pytest.fail(f"no attempt had writes land between pages (last: {landed})")
    now = await _read_at(etcd, 0)
    assert now != got, "the writes changed nothing: the test proved nothing"


async def _read_at(etcd: aetcd.Client, revision: int) -> list[tuple[bytes, bytes]]:
    """The prefix as it was at revision (0: now), in one read (the root client takes 64 MiB answers)."""
    await etcd.connect()
    resp = await etcd.kvstub.Range(rpc.RangeRequest(key=PREFIX, range_end=prefix_range_end(PREFIX),
                                                    revision=revision), metadata=etcd.metadata)
    return [(bytes(kv.key), bytes(kv.value)) for kv in resp.kvs]


async def test_the_held_call_queue_lists_every_call_across_pages(etcd: aetcd.Client, small: aetcd.Client) -> None:
    """CallQueue reads its prefix in pages: 30 held calls of ~20 KiB each (several answers' worth) are all
    listed, each once, oldest first."""
    owner = "client-paging"
    prefix = f"{QUEUE}{owner}/".encode()
    await etcd.delete_prefix(prefix)

    async def never_sent(raw: bytes, capability: str, key: str, timeout: float | None) -> Any:
        raise AssertionError("no instance is live: nothing is sent")

    queue = CallQueue(small, owner, never_sent, lambda cap: False)
    try:
        ids = [await queue.enqueue("echo", b"r%03d" % i + b"." * 15_000, f"idem-{i}", 60) for i in range(30)]
        assert await _refused_in_one_answer(small, prefix)
        held = await queue.held()
        assert sorted(c.id for c in held) == sorted(ids) and len(held) == 30
        assert [c.enqueued_at_unix_ms for c in held] == sorted(c.enqueued_at_unix_ms for c in held)
        assert {c.idempotency_key for c in held} == {f"idem-{i}" for i in range(30)}
        assert all(c.state == "queued" for c in held)
    finally:
        await queue.stop()
        await etcd.delete_prefix(prefix)


async def test_the_workflow_journal_reads_every_event_across_pages(etcd: aetcd.Client, small: aetcd.Client) -> None:
    """WorkflowStore reads a run's events in pages: a run of 31 events of ~15 KiB (several answers' worth)
    loads whole, its events in order."""
    store = WorkflowStore(small)
    wid = "agent-paging/run-1"
    state = WorkflowState(wid)
    await store.create(state, {"definition": "paging", "input": {}, "owner": "agent-paging"})
    for i in range(30):
        await store.append(state, "memo", {"key": f"m{i:02d}", "value": f"{i:02d}" + "v" * 15_000})
    assert await _refused_in_one_answer(small, events_prefix(wid).encode())

    loaded = await store.load(wid)
    assert loaded.seq == 31
    assert loaded.memos == {f"m{i:02d}": f"{i:02d}" + "v" * 15_000 for i in range(30)}
    events = await store.events(wid)
    assert [e["seq"] for e in events] == list(range(1, 32))
    assert [e["type"] for e in events] == ["created"] + ["memo"] * 30
    assert [e["seq"] for e in await store.events(wid, after=25)] == list(range(26, 32))


async def test_the_run_index_lists_and_resolves_every_run_across_pages(etcd: aetcd.Client,
                                                                       small: aetcd.Client) -> None:
    """WorkflowStore.list and resolve read the run index in pages: 400 runs whose summaries together need
    several answers are all listed, and a bare id is resolved among them."""
    store = WorkflowStore(small)
    for i in range(400):
        await store.create(WorkflowState(f"agent-paging/run-{i:03d}"),
                           {"definition": "paging", "input": {}, "owner": "agent-paging"})
    assert await _refused_in_one_answer(small, INDEX.encode())

    listed = await store.list()
    assert sorted(s["id"] for s in listed) == [f"agent-paging/run-{i:03d}" for i in range(400)]
    assert len(await store.list("agent-paging")) == 400
    assert await store.resolve("run-299") == "agent-paging/run-299"

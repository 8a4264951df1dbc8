"""Packing a link's waiting frames into one message (`mesh/link_frames.py`): order, limits and the end marker."""

from __future__ import annotations

import asyncio

import pytest

from hivemesh.mesh.link_frames import (
    BATCH_ANNOUNCE,
    MAX_BATCH_BYTES,
    MAX_BATCH_FRAMES,
    announced,
    outgoing,
    take_waiting,
)
from hivemesh.mesh.link_wire import Outgoing, call_frame, pack, read
from hivemesh.v1 import agent_pb2

END = object()


def _call(i: int, size: int = 10) -> Outgoing:
    return call_frame(i, bytes([i % 256]) * size, agent_pb2.LinkCall())


def _queue(*items: object) -> asyncio.Queue[object]:
    q: asyncio.Queue[object] = asyncio.Queue()
    for item in items:
        q.put_nowait(item)
    return q


def test_waiting_frames_go_as_one_message_in_order_and_each_reads_as_if_sent_alone() -> None:
    q = _queue(*(_call(i) for i in range(2, 6)))
    frames, leftover, ended = take_waiting(_call(1), q, END)
    assert [f.id for f in frames] == [1, 2, 3, 4, 5] and leftover is None and not ended and q.empty()
    wire = pack(frames)
    assert [(f.id, f.request) for f in read(wire)] == [(i, bytes([i]) * 10) for i in range(1, 6)]
    as_protobuf = agent_pb2.LinkFrame.FromString(wire)
    assert [(f.id, f.call.request) for f in as_protobuf.batch] == [(i, bytes([i]) * 10) for i in range(1, 6)]
    # A lone frame is sent as itself, and read as itself: a peer that predates batches sees what it always saw.
    alone = agent_pb2.LinkFrame.FromString(pack([_call(7)]))
    assert not alone.batch and alone.id == 7 and alone.call.request == bytes([7]) * 10


def test_a_batch_stops_at_its_frame_and_byte_limits_and_at_the_end_marker() -> None:
    q = _queue(*(_call(i) for i in range(MAX_BATCH_FRAMES + 5)))
    frames, leftover, _ = take_waiting(q.get_nowait(), q, END)
    assert len(frames) == MAX_BATCH_FRAMES and leftover is None and q.qsize() == 5

    big = MAX_BATCH_BYTES // 2
    q = _queue(_call(2, big), _call(3, big), _call(4))
    frames, leftover, ended = take_waiting(_call(1, 100), q, END)
    assert [f.id for f in frames] == [1, 2] and leftover.id == 3 and not ended and q.qsize() == 1
    # A frame larger than the limit goes alone rather than never.
    frames, leftover, _ = take_waiting(_call(9, MAX_BATCH_BYTES * 2), _queue(), END)
    assert [f.id for f in frames] == [9] and leftover is None

    q = _queue(_call(2), END, _call(3))
    frames, leftover, ended = take_waiting(_call(1), q, END)
    assert [f.id for f in frames] == [1, 2] and ended and leftover is None and q.qsize() == 1


def test_only_a_peer_that_announced_it_is_sent_batches() -> None:
    assert announced(BATCH_ANNOUNCE) and announced([("x", "y"), *BATCH_ANNOUNCE])
    assert not announced(None) and not announced([]) and not announced([(BATCH_ANNOUNCE[0][0], "0")])


async def test_outgoing_sends_lone_frames_until_the_peer_reads_batches_then_packs_what_waits() -> None:
    allowed = False
    out = outgoing(_queue(_call(1), _call(2), _call(3), END), END, lambda: allowed)
    first = await out.__anext__()
    assert [f.id for f in first] == [1]
    allowed = True
    second = await out.__anext__()
    assert [f.id for f in second] == [2, 3]
    with pytest.raises(StopAsyncIteration):
        await out.__anext__()


async def test_a_lingering_frame_is_joined_by_one_that_comes_meanwhile() -> None:
    q = _queue(_call(1))
    out = outgoing(q, END, lambda: True, lambda: 0.2)
    asyncio.get_running_loop().call_soon(q.put_nowait, _call(2))
    message = await out.__anext__()
    assert [f.id for f in message] == [1, 2]
    await out.aclose()

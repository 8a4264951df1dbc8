"""Packing the frames waiting on a Link into one message, and the header by which each side says it reads them.

gRPC's cost on an open stream is per message (a write and a read through the C core, an event-loop wake-up on
each side), not per byte: at 16 calls in flight the frames of a link arrive in bursts (the answers of one read
resume many callers, which send again together), so sending what is already queued as one `LinkFrame.batch`
pays that cost once per burst. A call made one at a time is never delayed to fill a batch (only under
concurrency does a caller's lone frame linger briefly: `mesh/outbound/link.py`, `LINGER_S`). Each side packs
only after the other announced `BATCH_HEADER` (the caller in its request metadata, the server in its initial
metadata), so a peer that predates batches is never sent one. Frames are wire bytes (`mesh/link_wire.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Final

from hivemesh.mesh.link_wire import Outgoing

BATCH_HEADER: Final = "hivemesh-link-batch"
BATCH_ANNOUNCE: Final = ((BATCH_HEADER, "1"),)
MAX_BATCH_FRAMES: Final = 8
"""Frames per batch at most: a burst larger than this goes as several messages. Small on purpose: one batch of
16 made caller and callee take turns (each idle while the other worked its 16 calls: ~1 of 2 cores busy);
batches of 8 keep both at work, 1.2-1.7x the calls/s at 16 in flight on 2 cores (BENCHMARKS.md)."""
MAX_BATCH_BYTES: Final = 1024 * 1024
"""Frame bytes per batch at most: one stream window (`STREAM_WINDOW_BYTES`), well under the 8 MiB message limit;
a bigger frame goes alone. At 256 KiB a batch held three 64 KiB calls: with room for all eight, bench/peers.py at
64 KiB and 16 in flight took 0.86x the CPU per call (lower in 7 of 7 interleaved pairs) and its p99 fell in each."""


def announced(metadata: Iterable[tuple[str, Any]] | None) -> bool:
    """Whether the peer's metadata says it reads batches."""
    return any(key == BATCH_HEADER and value == "1" for key, value in metadata or ())


def take_waiting(first: Outgoing, queue: asyncio.Queue[Any], end: object) -> tuple[list[Outgoing], Any, bool]:
    """first and the frames already waiting behind it in queue (never waiting for more), within the batch limits.

    Returns (frames, leftover, ended): leftover is a frame taken off the queue that would have made the batch too
    big (the writer sends it next; None if none); ended is True if the end marker was taken (nothing after it is).
    """
    frames = [first]
    size = first.size
    while len(frames) < MAX_BATCH_FRAMES and not queue.empty():
        nxt = queue.get_nowait()
        if nxt is end:
            return frames, None, True
        size += nxt.size
        if size > MAX_BATCH_BYTES:
            return frames, nxt, False
        frames.append(nxt)
    return frames, None, False


def _no_linger() -> float:
    return 0.0


async def outgoing(
    queue: asyncio.Queue[Any], end: object, batches: Callable[[], bool], linger: Callable[[], float] = _no_linger,
) -> AsyncIterator[list[Outgoing]]:
    """The frames put on queue, in order, until end, grouped by the message that carries them (`pack`): each
    lone frame alone, or, once batches() (the peer announced it reads them), what waits together. A lone frame
    first waits linger() seconds for company when that is above 0 (the caller's side asks it only under
    concurrency)."""
    leftover: Any = None
    while True:
        frame = leftover if leftover is not None else await queue.get()
        leftover = None
        if frame is end:
            return
        if batches() and queue.empty():
            wait = linger()
            if wait > 0:
                await asyncio.sleep(wait)
        if not batches() or queue.empty():
            yield [frame]
            continue
        frames, leftover, ended = take_waiting(frame, queue, end)
        yield frames
        if ended:
            return
